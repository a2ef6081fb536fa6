"""On-policy distillation on tiny models: the divergences by hand, the beta mixture at its ends, the
tokenizer check, students built from the teacher's layers, padded vocabularies, and a run that lowers
the reverse KL to the teacher."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, SPECIALS, build_tiny_model, build_tiny_tokenizer, write_jsonl
from pipeline.config import DistillConfig, KeepLayersConfig, ModelConfig, RecipeError, StudentConfig, parse_recipe
from pipeline.models import resolve_precision
from pipeline.onpolicy import (
    RolloutBatch,
    Throughput,
    UpdateSettings,
    encode_prompts,
    mask_after_eos,
    optimise,
    recompute_logprobs,
    response_logits,
)
from pipeline.models import TokenizerMismatchError, keep_layer_indices, student_from_teacher
from pipeline.stages.distill_eval import heldout_eval
from pipeline.stages.distill import (
    DistillModels,
    beta_at,
    check_config,
    distill_loss,
    make_loss_fn,
    StateStats,
    make_rollout,
    sampled_rewards,
    state_stats,
    train_distill,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [{"prompt": [{"role": "user", "content": f"write a short poem about the sea {i}"}]} for i in range(16)]
PREC = resolve_precision(ModelConfig(cpu_autocast="off"))


def peaked_teacher(tok, n_layers=4, seed=1, sharpness=6.0):
    """A tiny random model whose next-token distributions are far from uniform (a random init gives
    near-uniform ones, between which every KL is ~0): the final norm scales the logits."""
    model = build_tiny_model(tok, n_layers=n_layers, seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpness)
    return model.eval().requires_grad_(False)


def tiny_pair(keep="every_2nd", n_layers=4, lora=False):
    tok = build_tiny_tokenizer()
    teacher = peaked_teacher(tok, n_layers)
    student = student_from_teacher(teacher, keep).eval()
    return DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok))


def cfg_for(**kw):
    base = dict(iterations=3, rollout_batch_size=8, minibatch_size=8, micro_batch_size=4, max_new_tokens=10,
                lr=3e-3, log_samples_every=0, checkpoint_every=0,
                student=StudentConfig(from_teacher=KeepLayersConfig()))
    base.update(kw)
    return DistillConfig(**base)


# ------------------------------------------------------------------------------ divergences by hand


def test_reverse_forward_and_jsd_losses_match_hand_computation():
    # One state, vocabulary of 3: p_s = (0.7, 0.2, 0.1), p_t = (0.4, 0.4, 0.2); logits = log-probs.
    p_s, p_t = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    # reverse KL(p_s || p_t) = .7 ln(.7/.4) + .2 ln(.2/.4) + .1 ln(.1/.2)          = 0.183787...
    rkl = sum(a * math.log(a / b) for a, b in zip(p_s, p_t))
    # forward KL(p_t || p_s) = .4 ln(.4/.7) + .4 ln(.4/.2) + .2 ln(.2/.1)          = 0.192042...
    fkl = sum(b * math.log(b / a) for a, b in zip(p_s, p_t))
    # JSD_0.5 = .5 KL(p_t || m) + .5 KL(p_s || m), m = (p_t + p_s) / 2
    m = [(a + b) / 2 for a, b in zip(p_s, p_t)]
    jsd = 0.5 * sum(b * math.log(b / c) for b, c in zip(p_t, m)) \
        + 0.5 * sum(a * math.log(a / c) for a, c in zip(p_s, m))
    assert rkl == pytest.approx(0.1837869, abs=1e-6) and fkl == pytest.approx(0.1920420, abs=1e-6)
    # Row 0: the state above at position 0; position 1 is after EOS (masked) and holds garbage, even NaN.
    s = torch.tensor([[p_s, [0.1, 0.1, 0.8]]]).log()
    t = torch.tensor([[p_t, [0.3, 0.3, 0.4]]]).log()
    s[0, 1, 0] = float("nan")
    mask = torch.tensor([[True, False]])
    # n_tokens = 2: the minibatch has another counted token elsewhere; the loss is a sum / n_tokens.
    for name, want in (("reverse_kl", rkl), ("forward_kl", fkl), ("jsd", jsd)):
        loss, per_token = distill_loss(s, t, mask, name, n_tokens=2.0)
        assert per_token[0, 0].item() == pytest.approx(want, abs=1e-6), name
        assert loss.item() == pytest.approx(want / 2, abs=1e-6), name
    # Gradient of the reverse KL w.r.t. the student's logits: p_s * (log p_s - log p_t - KL).
    z = torch.tensor([[p_s]]).log().requires_grad_(True)
    loss, _ = distill_loss(z, torch.tensor([[p_t]]).log(), torch.tensor([[True]]), "reverse_kl", n_tokens=1.0)
    loss.backward()
    want_grad = [a * (math.log(a) - math.log(b) - rkl) for a, b in zip(p_s, p_t)]
    torch.testing.assert_close(z.grad[0, 0], torch.tensor(want_grad), atol=1e-6, rtol=1e-5)
    # Sampled estimator: token 0 sampled -> r = -(ln .7 - ln .4); uncounted tokens get 0.
    r = sampled_rewards(torch.tensor([[math.log(0.7), 0.3]]), torch.tensor([[math.log(0.4), float("nan")]]), mask)
    assert r[0, 0].item() == pytest.approx(-math.log(0.7 / 0.4), abs=1e-6) and r[0, 1].item() == 0.0


def test_sampled_estimator_only_for_reverse_kl():
    for div in ("forward_kl", "jsd"):
        with pytest.raises(RecipeError, match="sampled"):
            check_config(cfg_for(estimator="sampled", divergence=div), "r.yaml")
    check_config(cfg_for(estimator="sampled"), "r.yaml")


def test_beta_schedules_and_keep_layers():
    assert [beta_at(cfg_for(beta=0.3), i) for i in (0, 5)] == [0.3, 0.3]
    lin = cfg_for(beta=1.0, beta_end=0.0, beta_schedule="linear", iterations=5)
    assert [beta_at(lin, i) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    exp = cfg_for(beta=0.8, beta_schedule="exponential", beta_decay=0.5)
    assert [beta_at(exp, i) for i in range(3)] == pytest.approx([0.8, 0.4, 0.2])
    assert keep_layer_indices("every_3rd", 30) == list(range(0, 30, 3))
    assert len(keep_layer_indices("every_2nd", 30)) == 15
    assert keep_layer_indices("first_4", 30) == [0, 1, 2, 3]
    assert keep_layer_indices([0, 5, 29], 30) == [0, 5, 29]
    # influence_K: the K layers that change the residual stream most (ShortGPT's Block Influence), in order.
    assert keep_layer_indices("influence_3", 5, [0.9, 0.1, 0.5, 0.2, 0.7]) == [0, 2, 4]
    for bad in ("every_other", "first_40", "influence_31", [3, 1], [0, 0], [30]):
        with pytest.raises(RecipeError, match="keep_layers"):
            keep_layer_indices(bad, 30, influence=[0.0] * 30)


def test_influence_student_keeps_the_layers_with_the_highest_block_influence():
    from pipeline.models import block_influence

    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=4).eval()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: influence 0, dropped first
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    q, qm = encode_prompts(tok, PROMPTS[:4], "cpu")
    scores = block_influence(teacher, q, qm)
    assert len(scores) == 4 and scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores[:2]) > 0
    student = student_from_teacher(teacher, "influence_3", calibration=(q, qm))
    assert student.config.num_hidden_layers == 3
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    # Dropping a layer that adds nothing leaves the logits as they were.
    torch.testing.assert_close(_logits(student.eval(), tok)[0], _logits(teacher, tok)[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ students from the teacher


def _logits(model, tok):
    q, qm = encode_prompts(tok, PROMPTS[:3] + [{"prompt": [{"role": "user", "content": "hi"}]}], "cpu")
    pos = (qm.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=q, attention_mask=qm, position_ids=pos).logits, q, qm


def qwen3_teacher(tok, n_layers=4):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                      sliding_window=4, max_window_layers=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_student_with_all_layers_reproduces_teacher_logits(arch):
    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=4).eval() if arch == "llama" else qwen3_teacher(tok)
    student = student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    assert student is not teacher and student.model.layers[0] is not teacher.model.layers[0]
    a, _, _ = _logits(teacher, tok)
    b, _, _ = _logits(student, tok)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_2nd_student_has_half_the_layers_generates_and_reloads(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=4).eval() if arch == "llama" else qwen3_teacher(tok)
    student = student_from_teacher(teacher, "every_2nd").eval()
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    # The kept layers are the teacher's 0 and 2, weights and all.
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    if arch == "qwen3":  # per-layer config follows the kept layers: teacher full, full, sliding, sliding
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    _, q, qm = _logits(student, tok)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    with_cache = student.generate(input_ids=q, attention_mask=qm, use_cache=True, **kw)
    no_cache = student.generate(input_ids=q, attention_mask=qm, use_cache=False, **kw)
    assert with_cache.shape[1] == q.shape[1] + 8 and torch.equal(with_cache, no_cache)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(reloaded, tok)[0], _logits(student, tok)[0])


# ------------------------------------------------------------------------------ the mixture


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_mixture_rows_and_behaviour_logprobs(beta):
    torch.manual_seed(0)
    models = tiny_pair()
    cfg = cfg_for(beta=beta, estimator="sampled", temperature=0.8)
    batch, info = make_rollout(models, PROMPTS[:8], cfg, beta, PREC, Throughput(), torch.Generator().manual_seed(3))
    rows = batch.from_teacher
    if beta == 1.0:
        assert rows.all()
    elif beta == 0.0:
        assert not rows.any()
    else:
        assert 0 < rows.sum() < 8
    # Behaviour log-probs are the sampler's: recomputed with the teacher on its rows, the student on the others.
    m = batch.response_mask
    t_lp = recompute_logprobs(models.teacher, batch, 0.8, 4, vocab_size=models.vocab_size)
    s_lp = recompute_logprobs(models.student, batch, 0.8, 4, vocab_size=models.vocab_size)
    torch.testing.assert_close(batch.teacher_logprobs[m], t_lp[m])
    want = torch.where(rows[:, None], t_lp, s_lp)
    torch.testing.assert_close(batch.logprobs[m], want[m])
    torch.testing.assert_close(batch.advantages[m], -(s_lp - t_lp)[m])
    assert info["stats"]["distill/teacher_share"] == pytest.approx(float(rows.float().mean()))
    # The coins are seeded: the same generator seed gives the same rows.
    again, _ = make_rollout(models, PROMPTS[:8], cfg, beta, PREC, Throughput(), torch.Generator().manual_seed(3))
    assert torch.equal(again.from_teacher, rows)


# ------------------------------------------------------------------------------ tokenizers and vocabularies


def _other_tokenizer(kind):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHAT_TEMPLATE

    tok = build_tiny_tokenizer()
    if kind == "pad":  # same vocabulary, another padding token
        tok.pad_token = "<|im_start|>"
        return tok
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    other.chat_template = CHAT_TEMPLATE
    return other


def _recipe(tmp_path, teacher_dir, student=None, **distill):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"][0]["content"]} for p in PROMPTS])
    d = {"teacher_from": "base", "prompts": str(tmp_path / "prompts.jsonl"), "iterations": 2,
         "rollout_batch_size": 4, "minibatch_size": 4, "micro_batch_size": 4, "max_new_tokens": 6,
         "checkpoint_every": 0, "log_samples_every": 1,
         "student": student or {"from_teacher": {"keep_layers": "every_2nd"}}, **distill}
    return parse_recipe({"run": {"output_dir": str(tmp_path / "run")}, "stages": ["distill"],
                         "model": {"name_or_path": str(teacher_dir), "cpu_autocast": "off"}, "distill": d},
                        str(tmp_path / "r.yaml"))


@pytest.mark.parametrize("kind", ["vocab", "pad"])
def test_mismatched_tokenizers_error_before_any_model_is_loaded(kind, tmp_path, monkeypatch):
    from pipeline.stages import distill

    tok = build_tiny_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    other = _other_tokenizer(kind)
    build_tiny_model(other).save_pretrained(tmp_path / "student")
    other.save_pretrained(tmp_path / "student")

    def no_compute(*a, **k):
        raise AssertionError("a model was loaded before the tokenizer check")

    import pipeline.rlmodels

    monkeypatch.setattr(pipeline.rlmodels, "load_causal_lm", no_compute)
    recipe = _recipe(tmp_path, tmp_path / "teacher", student={"name_or_path": str(tmp_path / "student")})
    with pytest.raises(TokenizerMismatchError, match="vocabularies differ" if kind == "vocab" else "pad_token_id"):
        distill.run(recipe, tmp_path / "run" / "distill")
    assert issubclass(TokenizerMismatchError, ValueError)


def test_padded_teacher_vocabulary_is_sliced_and_never_sampled(tmp_path):
    """Teacher embeddings padded to len(tok) + 8 (rows made attractive), student unpadded: logits are
    sliced to the tokenizer's vocabulary and sampling never picks a padding row."""
    from pipeline.stages import distill

    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=2, seed=1)
    teacher.resize_token_embeddings(len(tok) + 8, mean_resizing=False)
    with torch.no_grad():
        teacher.get_output_embeddings().weight[len(tok):] = 5.0
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    build_tiny_model(tok, n_layers=1).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    recipe = _recipe(tmp_path, tmp_path / "teacher", student={"name_or_path": str(tmp_path / "student")}, beta=1.0)
    models = distill.build_models(recipe, recipe.distill, PREC)
    assert models.teacher.get_output_embeddings().weight.shape[0] == len(tok) + 8 == models.vocab_size + 8
    batch, info = make_rollout(models, PROMPTS[:4], recipe.distill, 1.0, PREC, Throughput(),
                               torch.Generator().manual_seed(0))
    assert int(batch.response_ids.max()) < len(tok)
    assert batch.teacher_logits.shape[-1] == len(tok)
    assert math.isfinite(info["stats"]["distill/reverse_kl_teacher_rows"])


# ------------------------------------------------------------------------------ training


def test_distill_run_lowers_reverse_kl_to_the_teacher(tmp_path):
    """On-policy (beta = 0), full estimator: the student built from half the teacher's layers moves
    towards the teacher at the states it visits itself."""
    torch.manual_seed(0)
    models = tiny_pair()
    heldout = PROMPTS[8:]
    cfg = cfg_for(iterations=25, max_new_tokens=12, lr=3e-3, rollout_batch_size=8, minibatch_size=4)
    before = heldout_eval(models, heldout, cfg, PREC)
    hist = train_distill(models, PROMPTS[:8], cfg, PREC, tmp_path, seed=0, progress=False)
    after = heldout_eval(models, heldout, cfg, PREC)
    assert after["reverse_kl_per_token"] < 0.5 * before["reverse_kl_per_token"], (before, after)
    first = sum(h["distill/reverse_kl"] for h in hist[:3]) / 3
    last = sum(h["distill/reverse_kl"] for h in hist[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert len(after["reverse_kl_by_position"]) == 12 and after["prompts_by_position"][0] == len(heldout)
    # The KLs are taken on seeded student samples: the same seed gives the same figures, another seed others;
    # the greedy-state figures do not depend on the seed.
    again, other = heldout_eval(models, heldout, cfg, PREC), heldout_eval(models, heldout, cfg, PREC, seed=1)
    assert again["reverse_kl_per_token"] == after["reverse_kl_per_token"]
    assert other["reverse_kl_per_token"] != after["reverse_kl_per_token"]
    assert other["reverse_kl_per_token_greedy"] == pytest.approx(after["reverse_kl_per_token_greedy"])
    for key in ("distill/loss", "distill/reverse_kl", "distill/forward_kl", "distill/beta", "distill/teacher_share",
                "distill/tokens_per_s", "distill/response_length"):
        assert key in hist[-1], key


def test_sampled_estimator_with_a_mixture_trains(tmp_path):
    torch.manual_seed(0)
    models = tiny_pair()
    before = [p.detach().clone() for p in models.student.parameters()]
    cfg = cfg_for(estimator="sampled", beta=0.5, iterations=3)
    hist = train_distill(models, PROMPTS, cfg, PREC, tmp_path, seed=0, progress=False)
    assert all(math.isfinite(h["distill/loss"]) for h in hist)
    assert "distill/clipfrac" in hist[-1] and "distill/reward" in hist[-1]
    assert any(not torch.equal(a, b) for a, b in zip(before, models.student.parameters()))


def test_minibatch_split_into_micro_batches_gives_the_same_update():
    results = []
    for micro in (8, 2):
        torch.manual_seed(0)
        models = tiny_pair()
        cfg = cfg_for(micro_batch_size=micro)
        batch, _ = make_rollout(models, PROMPTS[:8], cfg, 0.0, PREC, Throughput(), torch.Generator().manual_seed(0))
        params = list(models.student.parameters())
        opt = torch.optim.SGD(params, lr=1.0)
        optimise(batch, make_loss_fn(models, cfg, PREC), opt, params, UpdateSettings(1, 8, micro, 1e9),
                 torch.Generator().manual_seed(0))
        results.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("beta, chunk, divergence", [(0.0, 0, "reverse_kl"), (0.5, 0, "reverse_kl"),
                                                      (0.5, 7, "reverse_kl"), (0.5, 1000, "reverse_kl"),
                                                      (0.5, 7, "forward_kl")])
def test_kl_stats_from_the_update_forward_equal_the_label_pass(beta, chunk, divergence):
    """Full estimator: the student's KLs / entropy recorded by the loss at its training forward (no separate
    no-grad student pass) equal those of the label pass when the epoch is one minibatch (no step before):
    from the logits (chunk 0), from the reverse KL's own chunks (`reverse_kl_with_figures`) or next to another
    divergence's."""
    torch.manual_seed(0)
    models = tiny_pair()
    cfg = cfg_for(beta=beta, micro_batch_size=3, logits_chunk_size=chunk, divergence=divergence)
    with_pass, info = make_rollout(models, PROMPTS[:8], cfg, beta, PREC, Throughput(),
                                   torch.Generator().manual_seed(3))
    torch.manual_seed(0)  # the same samples again, without the student pass
    models2 = tiny_pair()
    batch, info2 = make_rollout(models2, PROMPTS[:8], cfg, beta, PREC, Throughput(),
                                torch.Generator().manual_seed(3), student_pass=False)
    assert torch.equal(batch.response_ids, with_pass.response_ids) and batch.logprobs is None
    assert "distill/reverse_kl" not in info2["stats"] and "row_reverse_kl" not in info2
    recorder = StateStats(batch)
    params = list(models2.student.parameters())
    optimise(batch, make_loss_fn(models2, cfg, PREC, recorder), torch.optim.SGD(params, lr=1.0), params,
             UpdateSettings(1, 8, 3, 1e9), torch.Generator().manual_seed(0))
    assert recorder.seen.all()
    stats, row_kl = state_stats(batch, recorder.reverse_kl, recorder.forward_kl, recorder.entropy)
    assert set(stats) == {k for k in info["stats"] if k.startswith(("distill/reverse_kl", "distill/forward_kl",
                                                                    "distill/entropy"))}
    for k, v in stats.items():
        assert v == pytest.approx(info["stats"][k], rel=1e-5), k
    assert row_kl == pytest.approx(info["row_reverse_kl"], rel=1e-5)
    with pytest.raises(ValueError, match="sampled estimator"):
        make_rollout(models2, PROMPTS[:2], cfg_for(estimator="sampled"), 0.0, PREC, Throughput(),
                     torch.Generator().manual_seed(0), student_pass=False)


def test_stage_run_writes_final_student_heldout_and_metrics(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.runner import run_recipe

    tok = build_tiny_tokenizer()
    peaked_teacher(tok, n_layers=4).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    held = write_jsonl(tmp_path / "heldout.jsonl", [
        {"prompt": "write a poem about the sea in lowercase", "instruction_id_list": ["change_case:english_lowercase"],
         "kwargs": [{}]},
        {"prompt": "Describe a cat. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]}])
    recipe = _recipe(tmp_path, tmp_path / "teacher", heldout_prompts=str(held), beta=0.5,
                     beta_schedule="linear", beta_end=0.0)
    summary = run_recipe(recipe)["distill"]
    stage = tmp_path / "run" / "distill"
    student = AutoModelForCausalLM.from_pretrained(stage / "final")
    assert student.config.num_hidden_layers == 2 and (stage / "final" / "tokenizer.json").exists()
    result = json.loads((stage / "heldout.json").read_text())
    for key in ("teacher", "student", "reverse_kl_per_token", "forward_kl_per_token", "reverse_kl_by_position"):
        assert key in result, key
    assert result["teacher"]["pass_rate"] is not None and 0 <= result["student"]["pass_rate"] <= 1
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["distill/beta"] for r in rows] == [0.5, 0.0]
    assert summary["heldout_reverse_kl"] == pytest.approx(result["reverse_kl_per_token"])
    assert (stage / "samples.jsonl").exists() and (stage / "summary.json").exists()


def test_heldout_eval_false_skips_the_stages_own_heldout_comparison(tmp_path):
    from pipeline.runner import run_recipe

    tok = build_tiny_tokenizer()
    peaked_teacher(tok, n_layers=4).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    held = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": "Describe a cat. Do not use any commas.",
                                                     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    recipe = _recipe(tmp_path, tmp_path / "teacher", heldout_prompts=str(held), heldout_eval=False, iterations=1)
    summary = run_recipe(recipe)["distill"]
    stage = tmp_path / "run" / "distill"
    assert (stage / "final").is_dir() and not (stage / "heldout.json").exists()
    assert not any(k.startswith("heldout_") for k in summary)


def test_distill_recipe_parses():
    from pipeline.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "distill.yaml")
    assert recipe.stages == ["distill"] and recipe.distill.student.from_teacher is not None
    check_config(recipe.distill, "recipes/distill.yaml")


def test_full_reverse_kl_loss_and_gradient_match_trl_distillation_trainer():
    """On one batch (a left-padded prompt, a response cut by EOS), our full-vocabulary reverse-KL loss and
    its gradient equal TRL's DistillationTrainer loss (`beta = 1`: reverse KL, per-token mean)."""
    trl_distill = pytest.importorskip("trl.trainer.distillation_trainer")
    if not hasattr(trl_distill, "_chunked_divergence_loss"):
        pytest.skip("this TRL has no _chunked_divergence_loss")

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=4, seed=1).eval()
    student = build_tiny_model(tok, n_layers=2, seed=2).eval()
    B, P, T, V = 3, 5, 6, student.config.vocab_size
    q = torch.randint(3, V, (B, P))
    qm = torch.ones(B, P, dtype=torch.long)
    q[0, :2], qm[0, :2] = tok.pad_token_id, 0
    r = torch.randint(3, V, (B, T))
    rm = torch.ones(B, T, dtype=torch.bool)
    r[1, 4:], rm[1, 4:] = tok.pad_token_id, False
    batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm, logprobs=torch.zeros(B, T),
                         ended=torch.ones(B, dtype=torch.bool))
    with torch.no_grad():
        batch.teacher_logits = response_logits(teacher, batch)
    ours, _ = distill_loss(response_logits(student, batch), batch.teacher_logits, rm, "reverse_kl", float(rm.sum()))
    ours.backward()
    g_ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    ids, am = torch.cat([q, r], 1), torch.cat([qm, rm.long()], 1)

    def completion_hidden(model):  # as DistillationTrainer._get_last_hidden_state
        return model.base_model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state[:, :-1][:, -T:]

    with torch.no_grad():
        h_teacher = completion_hidden(teacher)
    theirs = trl_distill._chunked_divergence_loss(
        completion_hidden(student), h_teacher, student.get_output_embeddings().weight,
        teacher.get_output_embeddings().weight, rm.long(), beta=1.0, num_items_in_batch=rm.sum())[0]
    theirs.backward()
    g_theirs = [p.grad.clone() for p in student.parameters()]
    assert float(ours) == pytest.approx(float(theirs), rel=1e-4)
    diff = sum(float((a - b).norm() ** 2) for a, b in zip(g_ours, g_theirs)) ** 0.5
    scale = sum(float(b.norm() ** 2) for b in g_theirs) ** 0.5
    assert scale > 0 and diff / scale < 1e-4


def test_distinct_ngrams_hand_computed():
    from pipeline.stages.distill_eval import distinct_ngrams

    # "a b a b a": 2-grams ab ba ab ba -> 2 distinct of 4; "x y z": 2 of 2; "w": no 2-gram, skipped.
    assert distinct_ngrams(["a b a b a", "x y z", "w"], n=2) == pytest.approx((0.5 + 1.0) / 2)
    assert distinct_ngrams(["a. a. a. a. a."], n=4) == pytest.approx(1 / 2)
    assert distinct_ngrams(["too short"], n=4) is None


# ------------------------------------------------------------------------------ warm-up on demonstrations

DEMOS = [{"prompt": [{"role": "user", "content": f"write a short poem about the sea {i}"}],
          "completion": ["the sea is blue and the dog sleeps", "* first point\n* second point",
                         "the quick brown fox jumps over the lazy dog"][i % 3]} for i in range(12)]


def test_demonstration_batch_is_the_completion_tokens_through_eos():
    from pipeline.data import completion_token_ids, prompt_token_ids
    from pipeline.stages.distill import demonstration_batch

    tok = build_tiny_tokenizer()
    rows = DEMOS[:3]
    full = [completion_token_ids(tok, ex["prompt"], ex["completion"]) for ex in rows]
    assert all(ids[-1] == tok.eos_token_id for ids in full)
    cut = min(len(ids) for ids in full) + 1  # one row fits with its EOS, the longer ones are cut
    batch = demonstration_batch(tok, rows, cut, torch.device("cpu"))
    for i, ids in enumerate(full):
        kept = ids[:cut]
        n = len(kept)
        assert batch.response_ids[i, :n].tolist() == kept
        assert batch.response_mask[i].tolist() == [True] * n + [False] * (batch.response_ids.shape[1] - n)
        assert bool(batch.ended[i]) == (len(ids) <= cut)
        p = prompt_token_ids(tok, rows[i]["prompt"])  # left-padded prompt, as for sampling
        assert batch.query_ids[i, -len(p):].tolist() == p and int(batch.query_mask[i].sum()) == len(p)
    assert batch.ended.tolist().count(True) >= 1 and not batch.ended.all()
    assert batch.from_teacher.all() and batch.rows.tolist() == [0, 1, 2]


def test_warmup_on_demonstrations_lowers_the_kl_at_their_states_then_hands_over_to_the_mixture(tmp_path):
    torch.manual_seed(0)
    models = tiny_pair()
    cfg = cfg_for(warmup_data="demos.jsonl", warmup_iterations=12, warmup_divergence="forward_kl", iterations=2,
                  beta=1.0, beta_schedule="linear", beta_end=0.0, rollout_batch_size=4, minibatch_size=4,
                  log_samples_every=1)
    hist = train_distill(models, PROMPTS, cfg, PREC, tmp_path, seed=0, progress=False, demonstrations=DEMOS)
    assert len(hist) == 14
    warm, mix = hist[:12], hist[12:]
    assert all(h["distill/warmup"] == 1.0 and "distill/beta" not in h for h in warm)
    assert [h["distill/beta"] for h in mix] == [1.0, 0.0] and not any("distill/warmup" in h for h in mix)
    # Warm-up figures are at the demonstrations' states, logged apart from the mixture's.
    assert "distill/forward_kl_demonstrations" in warm[0] and "distill/reverse_kl" not in warm[0]
    # Trained on forward KL at fixed states: the forward KL there falls (each state is seen once per
    # 3 batches, so the figure is the one the update starts from).
    first = sum(h["distill/forward_kl_demonstrations"] for h in warm[:3]) / 3
    last = sum(h["distill/forward_kl_demonstrations"] for h in warm[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert warm[0]["distill/loss"] == pytest.approx(warm[0]["distill/forward_kl_demonstrations"], rel=1e-4)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["source"] for s in samples if s["iteration"] <= 12} == {"demonstration"}
    assert {s["source"] for s in samples if s["iteration"] == 14} == {"student"}


def test_warmup_divergence_defaults_to_the_divergence(tmp_path):
    """Warm-up loss = the exact per-token divergence at the demonstrations' states, before any step."""
    for div, warm_div, key in (("reverse_kl", None, "reverse_kl"), ("reverse_kl", "forward_kl", "forward_kl")):
        torch.manual_seed(0)
        models = tiny_pair()
        cfg = cfg_for(divergence=div, warmup_divergence=warm_div, warmup_data="d.jsonl", warmup_iterations=1,
                      iterations=1, rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, lr=0.0)
        hist = train_distill(models, PROMPTS, cfg, PREC, tmp_path / key, seed=0, progress=False,
                             demonstrations=DEMOS)
        assert hist[0]["distill/loss"] == pytest.approx(hist[0][f"distill/{key}_demonstrations"], rel=1e-4)


def test_warmup_resumes_mid_warmup_like_an_uninterrupted_run(tmp_path):
    cfg = cfg_for(warmup_data="d.jsonl", warmup_iterations=3, iterations=2, beta=0.5, rollout_batch_size=4,
                  minibatch_size=4, checkpoint_every=2)
    params = []
    for name in ("whole", "resumed"):
        torch.manual_seed(0)
        models = tiny_pair()
        hist = train_distill(models, PROMPTS, cfg, PREC, tmp_path / name, seed=0, progress=False,
                             demonstrations=DEMOS)
        if name == "resumed":  # drop the later checkpoint: resume from iteration 2, inside the warm-up
            import shutil

            shutil.rmtree(tmp_path / name / "checkpoints" / "iter-000004")
            torch.manual_seed(123)  # the checkpoint's RNG states, not this, must decide what follows
            models = tiny_pair()
            hist = train_distill(models, PROMPTS, cfg, PREC, tmp_path / name, seed=0, progress=False,
                                 demonstrations=DEMOS)
            assert len(hist) == 5 and [h.get("distill/warmup") for h in hist] == [1.0, 1.0, 1.0, None, None]
        params.append(torch.cat([p.detach().flatten() for p in models.student.parameters()]))
    torch.testing.assert_close(params[0], params[1])


@pytest.mark.parametrize("kw, match", [
    (dict(warmup_iterations=2), "needs `distill.warmup_data`"),
    (dict(warmup_data="d.jsonl"), "`distill.warmup_iterations` is 0"),
    (dict(warmup_data="d.jsonl", warmup_iterations=2, estimator="sampled"), "needs `distill.estimator: full`"),
    (dict(warmup_data="d.jsonl", warmup_iterations=-1), "must be >= 0"),
])
def test_warmup_config_errors(kw, match):
    with pytest.raises(RecipeError, match=match):
        check_config(cfg_for(**kw), "r.yaml")


def test_stage_run_with_warmup_data_file(tmp_path):
    from pipeline.runner import run_recipe

    tok = build_tiny_tokenizer()
    peaked_teacher(tok, n_layers=4).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": d["prompt"][0]["content"], "completion": d["completion"]}
                                                   for d in DEMOS])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "Describe a cat. Do not use any commas.",
                                                  "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    recipe = _recipe(tmp_path, tmp_path / "teacher", warmup_data=str(demos), warmup_iterations=2,
                     heldout_prompts=str(held))
    summary = run_recipe(recipe)["distill"]
    assert summary["iterations"] == 2 and summary["warmup_iterations"] == 2 and summary["warmup_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("distill/warmup") for r in rows] == [1.0, 1.0, None, None]
    # The warm-up file is one of the stage's recorded inputs (a changed file is refused on rerun).
    inputs = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert str(demos) in inputs["distill"]
    # A bad row names the file and the row.
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "completion": "yes"}, {"prompt": "no completion"}])
    bad = _recipe(tmp_path, tmp_path / "teacher", warmup_data=str(tmp_path / "bad.jsonl"), warmup_iterations=1,
                  heldout_prompts=str(held))
    bad.run.output_dir = str(tmp_path / "run_bad")
    with pytest.raises(Exception, match=r"bad\.jsonl.*2"):
        run_recipe(bad)


def test_heldout_batch_size_leaves_the_greedy_figures_unchanged():
    torch.manual_seed(0)
    models = tiny_pair()
    rows = PROMPTS[:8]
    out = [heldout_eval(models, rows, cfg_for(max_new_tokens=8, heldout_batch_size=b), PREC) for b in (None, 3)]
    for who in ("teacher", "student"):
        assert out[0][who]["response_length"] == out[1][who]["response_length"]
        assert out[0][who]["eos_share"] == out[1][who]["eos_share"]
    assert out[1]["reverse_kl_per_token_greedy"] == pytest.approx(out[0]["reverse_kl_per_token_greedy"], rel=1e-4)
    assert out[1]["prompts_by_position_greedy"] == out[0]["prompts_by_position_greedy"]
    # The batches did change: the sampled answers are seeded per batch, so their KL is another draw.
    assert out[1]["reverse_kl_per_token"] != out[0]["reverse_kl_per_token"]
    with pytest.raises(RecipeError, match="heldout_batch_size"):
        check_config(cfg_for(heldout_batch_size=0), "r.yaml")


def test_build_models_cuts_an_influence_student_scored_on_the_stage_prompts(tmp_path):
    """`keep_layers: influence_K` scores the teacher's layers on the distillation prompts (read from the recipe's
    prompt file) and keeps the K most influential."""
    from pipeline.stages import distill

    tok = build_tiny_tokenizer()
    build_tiny_model(tok, n_layers=4).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    recipe = _recipe(tmp_path, tmp_path / "teacher", student={"from_teacher": {"keep_layers": "influence_2"}})
    models = distill.build_models(recipe, recipe.distill, PREC)
    assert len(models.kept_layers) == 2 and models.student.config.num_hidden_layers == 2
