"""Options for a student cut from its teacher's layers (issue #20), each checked by its effect on tiny random models:
`distill.topk_forward_kl_coef` / `_k` (a term added to the loss and logged), `student.from_teacher.neighbour_lr_scale`
(AdamW param groups), `warmup_divergence: cross_entropy` (SFT on the demonstrations, no teacher forward) and
`distill.extra_prompts` (prompts without instructions mixed in; the pass rate counts the instructed rows only)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, write_jsonl
from pipeline.config import DistillConfig, KeepLayersConfig, LoraConfig, ModelConfig, RecipeError, StudentConfig, parse_recipe
from pipeline.data import DataError
from pipeline.loop import Process
from pipeline.models import cut_neighbours, peft_lora_config, resolve_precision, student_from_teacher
from pipeline.onpolicy import Throughput, policy_logprobs, response_logits
from pipeline.rl import masked_mean, masked_sum
from pipeline.rl.losses import topk_forward_kl
from pipeline.stages.distill import (
    Distill, DistillModels, make_loss_fn, make_rollout, make_warmup_batch, prompt_pool, train_distill,
)

PREC = resolve_precision(ModelConfig(cpu_autocast="off"))
PROMPTS = [{"prompt": [{"role": "user", "content": f"write a short poem about the sea {i}"}]} for i in range(8)]
DEMOS = [{"prompt": [{"role": "user", "content": f"write a short poem about the sea {i}"}],
          "completion": ["the sea is blue and the dog sleeps", "* first point\n* second point",
                         "the quick brown fox jumps over the lazy dog"][i % 3]} for i in range(12)]


def pair(n_layers=4, keep=(0, 2), lora=False):
    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=n_layers, seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6.0)  # peaked next-token distributions (a random init is near uniform)
    teacher = teacher.eval().requires_grad_(False)
    student = student_from_teacher(teacher, list(keep)).eval()
    if lora:
        from peft import get_peft_model

        student = get_peft_model(student, peft_lora_config(LoraConfig(r=4, alpha=8, dropout=0.0)))
    return DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok), kept_layers=list(keep))


def cfg_for(**kw):
    base = dict(iterations=2, rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, max_new_tokens=8,
                lr=3e-3, log_samples_every=0, checkpoint_every=0,
                student=StudentConfig(from_teacher=KeepLayersConfig()))
    base.update(kw)
    return DistillConfig(**base)


# ------------------------------------------------------------------------------ top-k forward KL in the loss


@pytest.mark.parametrize("chunk", [0, 5])
def test_topk_forward_kl_is_added_to_the_loss_and_logged(chunk):
    torch.manual_seed(0)
    models = pair()
    off = cfg_for(logits_chunk_size=chunk)
    on = cfg_for(logits_chunk_size=chunk, topk_forward_kl_coef=0.5, topk_forward_kl_k=3)
    batch, _ = make_rollout(models, PROMPTS[:4], on, 0.0, PREC, Throughput(), torch.Generator().manual_seed(0),
                            student_pass=False)
    n = float(batch.n_tokens) + 3.0  # the minibatch has tokens elsewhere too: a sum / n_tokens
    loss_off, stats_off = make_loss_fn(models, off, PREC)(batch, n)
    loss_on, stats_on = make_loss_fn(models, on, PREC)(batch, n)
    with torch.no_grad():
        logits = response_logits(models.student, batch)[..., :models.vocab_size]
        term = topk_forward_kl(logits, batch.teacher_logits, k=3)
    mask = batch.response_mask
    assert float(term.abs().max()) > 1e-3  # the cut student differs from its teacher: the term is not 0
    assert (loss_on - loss_off).item() == pytest.approx(0.5 * float(masked_sum(term, mask)) / n, rel=1e-4)
    assert float(stats_on["topk_forward_kl"]) == pytest.approx(float(masked_mean(term, mask)), rel=1e-4)
    assert "topk_forward_kl" not in stats_off
    assert float(stats_on["divergence"]) == pytest.approx(float(stats_off["divergence"]), rel=1e-5)
    # k changes the term (k = V would be the full forward KL).
    loss_k1, _ = make_loss_fn(models, cfg_for(logits_chunk_size=chunk, topk_forward_kl_coef=0.5,
                                              topk_forward_kl_k=1), PREC)(batch, n)
    assert float(loss_k1) != pytest.approx(float(loss_on), rel=1e-4)


def test_topk_forward_kl_is_logged_by_training_and_needs_the_full_estimator(tmp_path):
    torch.manual_seed(0)
    hist = train_distill(pair(), PROMPTS, cfg_for(topk_forward_kl_coef=1.0, topk_forward_kl_k=4), PREC, tmp_path,
                         progress=False)
    assert all(h["distill/topk_forward_kl"] > 0 for h in hist)
    with pytest.raises(RecipeError, match="topk_forward_kl_coef.*estimator: full"):
        Distill(pair(), PROMPTS, cfg_for(topk_forward_kl_coef=1.0, estimator="sampled"), PREC)


# ------------------------------------------------------------------------------ lr of the cut's neighbours


def test_cut_neighbours_are_the_kept_layers_next_to_a_removed_block():
    assert cut_neighbours([0, 1, 4, 5], 6) == [1, 2]  # block 2-3 removed: teacher layers 1 and 4
    assert cut_neighbours([0, 1, 2, 3], 4) == []  # nothing removed
    assert cut_neighbours([0, 1, 2], 5) == [2]  # the last two removed: only the layer before them
    assert cut_neighbours([2, 3, 4], 5) == [0]  # the first two removed: only the layer after them
    assert cut_neighbours([0, 2, 4], 5) == [0, 1, 2]  # every other layer: each kept layer borders a gap
    assert cut_neighbours([0, 3, 4, 5, 9], 10) == [0, 1, 3, 4]  # two blocks: 1-2 and 6-8


def _layers_of(model, params) -> set:
    names = {id(p): n for n, p in model.named_parameters()}
    out = set()
    for p in params:
        m = re.search(r"layers\.(\d+)\.", names[id(p)])
        out.add(int(m.group(1)) if m else names[id(p)].split(".")[-2])
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_neighbour_lr_scale_gives_the_seams_their_own_param_group(lora):
    """Teacher of 6 layers, student keeps 0, 1, 4, 5: its layers 1 and 2 (teacher 1 and 4) border the removed block
    and train at lr x 5; layers 0 and 3 and the rest of the model at lr."""
    models = pair(n_layers=6, keep=(0, 1, 4, 5), lora=lora)
    cfg = cfg_for(lr=1e-3, student=StudentConfig(from_teacher=KeepLayersConfig(keep_layers=[0, 1, 4, 5],
                                                                               neighbour_lr_scale=5.0)))
    (updater,) = Distill(models, PROMPTS, cfg, PREC).setup(Process(None, 1, 0), 0)
    groups = {g["name"]: g for g in updater.optimizer.param_groups}
    assert set(groups) == {"cut_neighbours", "rest"}
    assert groups["cut_neighbours"]["lr"] == pytest.approx(5e-3) and groups["rest"]["lr"] == pytest.approx(1e-3)
    near, rest = groups["cut_neighbours"]["params"], groups["rest"]["params"]
    assert _layers_of(models.student, near) == {1, 2}
    assert {x for x in _layers_of(models.student, rest) if isinstance(x, int)} == {0, 3}
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    assert sorted(map(id, near + rest)) == sorted(map(id, trainable)) == sorted(map(id, updater.params))
    if lora:  # only the adapters train, the seams' adapters among them
        names = {id(p): n for n, p in models.student.named_parameters()}
        assert near and all("lora_" in names[id(p)] for p in near + rest)
    # scale 1.0 (the default): one group, every trainable parameter at lr.
    cfg1 = cfg_for(lr=1e-3, student=StudentConfig(from_teacher=KeepLayersConfig(keep_layers=[0, 1, 4, 5])))
    (plain,) = Distill(pair(n_layers=6, keep=(0, 1, 4, 5), lora=lora), PROMPTS, cfg1, PREC).setup(Process(None, 1, 0), 0)
    assert len(plain.optimizer.param_groups) == 1 and plain.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_neighbour_lr_scale_moves_the_seams_further_in_one_step(tmp_path):
    """One AdamW step: the first step moves every weight by about lr (Adam's normalised step), so the seams' weights
    move about `scale` times as far as the other layers'."""
    moved = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        models = pair(n_layers=6, keep=(0, 1, 4, 5))
        before = {n: p.detach().clone() for n, p in models.student.named_parameters()}
        cfg = cfg_for(iterations=1, lr=1e-4, student=StudentConfig(from_teacher=KeepLayersConfig(
            keep_layers=[0, 1, 4, 5], neighbour_lr_scale=scale)))
        train_distill(models, PROMPTS, cfg, PREC, tmp_path / str(scale), progress=False)
        step = {n: float((p.detach() - before[n]).abs().mean()) for n, p in models.student.named_parameters()}
        moved[scale] = {i: step[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)}
    for i in (1, 2):  # the seams
        assert moved[10.0][i] > 5 * moved[1.0][i], moved
    for i in (0, 3):
        assert moved[10.0][i] == pytest.approx(moved[1.0][i], rel=1e-3), moved


# ------------------------------------------------------------------------------ cross-entropy warm-up


def test_cross_entropy_warmup_is_sft_on_the_demonstrations_without_the_teacher():
    torch.manual_seed(0)
    models = pair()
    calls = []
    models.teacher.register_forward_hook(lambda *a: calls.append(1))
    cfg = cfg_for(warmup_data="d.jsonl", warmup_iterations=1, warmup_divergence="cross_entropy")
    batch, info = make_warmup_batch(models, DEMOS[:4], cfg, PREC, Throughput())
    assert calls == [] and batch.teacher_logits is None
    algo = Distill(models, PROMPTS, cfg, PREC, demonstrations=DEMOS)
    n = float(batch.n_tokens)
    loss, stats = algo.loss_fn(True, batch)(batch, n)
    assert calls == []
    # The hand-computed loss: -log softmax(student logits) at each demonstration token, summed over counted tokens / n.
    with torch.no_grad():
        logp = torch.log_softmax(response_logits(models.student, batch).double(), -1)
        nll = -logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask
    assert float(loss) == pytest.approx(float(nll[mask].sum()) / n, rel=1e-5)
    assert float(stats["cross_entropy"]) == pytest.approx(float(nll[mask].mean()), rel=1e-5)
    assert algo.recorder is None and algo.after_update(batch, info, True) == {}
    # A KL warm-up, by contrast, labels the demonstrations with the teacher.
    make_warmup_batch(models, DEMOS[:4], cfg_for(warmup_data="d.jsonl", warmup_iterations=1,
                                                 warmup_divergence="forward_kl"), PREC, Throughput())
    assert calls


def test_cross_entropy_warmup_lowers_the_demonstrations_loss_then_hands_over(tmp_path):
    torch.manual_seed(0)
    models = pair()
    cfg = cfg_for(warmup_data="d.jsonl", warmup_iterations=9, warmup_divergence="cross_entropy", iterations=1,
                  log_samples_every=1)
    hist = train_distill(models, PROMPTS, cfg, PREC, tmp_path, progress=False, demonstrations=DEMOS)
    warm, mix = hist[:9], hist[9:]
    assert all(h["distill/warmup"] == 1.0 and "distill/forward_kl_demonstrations" not in h for h in warm)
    first = sum(h["distill/cross_entropy"] for h in warm[:3]) / 3
    last = sum(h["distill/cross_entropy"] for h in warm[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert warm[0]["distill/loss"] == pytest.approx(warm[0]["distill/cross_entropy"], rel=1e-5)
    assert "distill/reverse_kl" in mix[0] and "distill/cross_entropy" not in mix[0]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["reverse_kl_per_token"] for s in samples if s["source"] == "demonstration"} == {None}


# ------------------------------------------------------------------------------ extra prompts


NEVER = {"instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"num_words": 1000, "relation": "at least"}]}  # 8 new tokens never make 1000 words


def test_pass_rate_counts_only_the_rows_with_instructions():
    torch.manual_seed(0)
    models = pair()
    general = [{"prompt": [{"role": "user", "content": "hello world"}], "instruction_id_list": [], "kwargs": []},
               {"prompt": [{"role": "user", "content": "the quick brown fox"}]}]
    task = [{**PROMPTS[0], **NEVER}, {**PROMPTS[1], **NEVER}]
    cfg = cfg_for()
    # Mixed: the general rows (whose empty instruction lists would pass vacuously) are not counted.
    _, info = make_rollout(models, general + task, cfg, 0.0, PREC, Throughput(), torch.Generator().manual_seed(0))
    assert info["stats"]["distill/pass_rate"] == 0.0
    # Only general rows: no pass rate at all (not 1.0, not an error).
    _, info = make_rollout(models, general * 2, cfg, 0.0, PREC, Throughput(), torch.Generator().manual_seed(0))
    assert "distill/pass_rate" not in info["stats"]


def _recipe(tmp_path, teacher_dir, **distill):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"][0]["content"], **NEVER} for p in PROMPTS])
    d = {"teacher_from": "base", "prompts": str(tmp_path / "prompts.jsonl"), "iterations": 2,
         "rollout_batch_size": 4, "minibatch_size": 4, "micro_batch_size": 4, "max_new_tokens": 6,
         "checkpoint_every": 0, "log_samples_every": 1, "student": {"from_teacher": {"keep_layers": "every_2nd"}},
         **distill}
    return parse_recipe({"run": {"output_dir": str(tmp_path / "run")}, "stages": ["distill"],
                         "model": {"name_or_path": str(teacher_dir), "cpu_autocast": "off"}, "distill": d},
                        str(tmp_path / "r.yaml"))


def test_extra_prompts_join_the_pool_and_name_their_file_and_row(tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": "say hello"}, {"prompt": "count to three",
                                                                                 "instruction_id_list": [], "kwargs": []}])
    recipe = _recipe(tmp_path, tmp_path, extra_prompts=[str(general)])
    pool = prompt_pool(recipe.distill, "r.yaml")
    assert len(pool) == len(PROMPTS) + 2
    assert [ex["prompt"][-1]["content"] for ex in pool[-2:]] == ["say hello", "count to three"]
    assert "instruction_id_list" not in pool[-2] and pool[-1]["instruction_id_list"] == []
    # A mapping entry (DataSource) works too.
    recipe = _recipe(tmp_path, tmp_path, extra_prompts=[{"path": str(general)}, str(general)])
    assert len(prompt_pool(recipe.distill, "r.yaml")) == len(PROMPTS) + 4
    # A bad row names the file and the row.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"question": "no prompt field"}])
    recipe = _recipe(tmp_path, tmp_path, extra_prompts=[str(general), str(bad)])
    with pytest.raises(DataError, match=r"bad\.jsonl.*row 2"):
        prompt_pool(recipe.distill, "r.yaml")


def test_stage_run_with_every_new_option(tmp_path):
    """Through the recipe: extra prompts, a cross-entropy warm-up, the top-k term and the seams' lr reach the run."""
    from pipeline.runner import run_recipe

    tok = build_tiny_tokenizer()
    build_tiny_model(tok, n_layers=4, seed=1).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": f"say hello {i}"} for i in range(8)])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": d["prompt"][0]["content"], "completion": d["completion"]}
                                                   for d in DEMOS])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "Describe a cat.", **NEVER}])
    recipe = _recipe(tmp_path, tmp_path / "teacher", extra_prompts=[str(general)], warmup_data=str(demos),
                     warmup_iterations=1, warmup_divergence="cross_entropy", topk_forward_kl_coef=0.5,
                     topk_forward_kl_k=4, heldout_prompts=str(held),
                     student={"from_teacher": {"keep_layers": [0, 1], "neighbour_lr_scale": 3.0}})
    summary = run_recipe(recipe)["distill"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert "distill/cross_entropy" in rows[0] and "distill/topk_forward_kl" not in rows[0]
    assert all("distill/topk_forward_kl" in r for r in rows[1:])
    assert "distill/topk_forward_kl_last" in summary and summary["student_kept_layers"] == [0, 1]
    inputs = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert str(general) in inputs["distill"]


# ------------------------------------------------------------------------------ ranges


@pytest.mark.parametrize("key, value, match", [
    ("topk_forward_kl_coef", -0.1, r"distill\.topk_forward_kl_coef` must be >= 0"),
    ("topk_forward_kl_k", 0, r"distill\.topk_forward_kl_k` must be >= 1"),
    ("student", {"from_teacher": {"keep_layers": "every_2nd", "neighbour_lr_scale": 0.0}},
     r"distill\.student\.from_teacher\.neighbour_lr_scale` must be > 0"),
    ("warmup_divergence", "hard_labels", r"warmup_divergence"),
])
def test_new_keys_are_range_checked(tmp_path, key, value, match):
    from pipeline.preflight import check_ranges

    with pytest.raises(RecipeError, match=match):
        recipe = _recipe(tmp_path, tmp_path, **{key: value})
        check_ranges(recipe.distill, "distill", "r.yaml")
