"""Frozen models stored in bf16 (`model.frozen_dtype`, issue #21): PPO's reference copy, reward-model scorers and
the distillation teacher are never trained, so under bf16 autocast (which casts every matmul weight to bf16 on
each forward anyway) they are stored in bf16. Checked here on tiny random models: the resolution of the setting,
the recipe check, reference log-probs and reward scores close to the fp32 ones under autocast, trainable models
still fp32, and a student cut from a bf16-stored teacher still an exact copy of its fp32 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, write_jsonl
from pipeline.config import ModelConfig, RecipeError, parse_recipe
from pipeline.models import ModelError, Precision, frozen_dtype, resolve_precision
from pipeline.onpolicy import RolloutBatch, recompute_logprobs

CPU = torch.device("cpu")
PROMPTS = [{"prompt": [{"role": "user", "content": f"write a short poem about the sea {i}"}]} for i in range(8)]


def peaked_model_dir(path: Path, n_layers: int = 2, seed: int = 0, sharpness: float = 6.0) -> Path:
    """A tiny random chat model whose next-token distributions are far from uniform (the final norm scales the
    logits; a plain random init gives near-uniform ones, where any precision would agree), saved with its
    tokenizer."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, n_layers=n_layers, seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpness)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return peaked_model_dir(tmp_path_factory.mktemp("frozen") / "model", n_layers=4)


# ------------------------------------------------------------------------------ resolution and the recipe check


@pytest.mark.parametrize("param,autocast,setting,expect", [
    (torch.float32, True, "auto", torch.bfloat16),  # CPU with native bf16: autocast on
    (torch.float32, False, "auto", torch.float32),  # CPU without it: everything fp32
    (torch.bfloat16, False, "auto", torch.bfloat16),  # GPU with bf16 parameters
    (torch.float16, False, "auto", torch.float16),  # GPU without bf16: the parameter dtype
    (torch.float32, True, "float32", torch.float32),  # fp32 kept on request (the bench's `equal`)
    (torch.bfloat16, False, "float32", torch.float32),
    (torch.float32, False, "bfloat16", torch.bfloat16),  # bf16 on request
    (torch.float32, True, "bfloat16", torch.bfloat16),
])
def test_frozen_dtype_resolution(param, autocast, setting, expect):
    precision = Precision(device=CPU, dtype=param, autocast=autocast)
    assert frozen_dtype(precision, ModelConfig(frozen_dtype=setting)) == expect


def test_frozen_dtype_default_follows_autocast():
    assert ModelConfig().frozen_dtype == "auto"
    on = resolve_precision(ModelConfig(device="cpu", cpu_autocast="on"))
    off = resolve_precision(ModelConfig(device="cpu", cpu_autocast="off"))
    assert frozen_dtype(on, ModelConfig(cpu_autocast="on")) == torch.bfloat16
    assert frozen_dtype(off, ModelConfig(cpu_autocast="off")) == torch.float32
    assert frozen_dtype(on) == torch.bfloat16  # no config: auto


def test_bad_frozen_dtype_is_refused_naming_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"`model\.frozen_dtype` must be one of 'auto', 'float32', 'bfloat16'"):
        parse_recipe({"run": {"output_dir": str(tmp_path)}, "stages": ["ppo"],
                      "model": {"name_or_path": "m", "frozen_dtype": "fp16"}, "ppo": {"prompts": "p.jsonl"}})
    # A ModelConfig built in code (the benches) is refused by the helper and by preflight's rule.
    with pytest.raises(ModelError, match=r"model\.frozen_dtype: 'fp16'.*auto, float32 or bfloat16"):
        frozen_dtype(Precision(device=CPU, dtype=torch.float32, autocast=True), ModelConfig(frozen_dtype="fp16"))
    from pipeline.preflight import check_frozen_dtype

    with pytest.raises(RecipeError, match=r"`model\.frozen_dtype` is 'bf16'.*Did you mean `bfloat16`"):
        check_frozen_dtype(ModelConfig(frozen_dtype="bf16"), CPU, "r.yaml")
    check_frozen_dtype(ModelConfig(frozen_dtype="bfloat16"), CPU, "r.yaml")  # accepted on a CPU


def test_cli_validate_refuses_a_bad_frozen_dtype(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n' * 3)
    (tmp_path / "r.yaml").write_text("run: {name: t, output_dir: out}\nmodel: {name_or_path: m, frozen_dtype: half}\n"
                                     "stages: [ppo]\nppo: {policy_from: base, reward_from: m, prompts: prompts.jsonl}\n")
    code = main(["validate", "r.yaml"])
    out = capsys.readouterr()
    text = out.err + out.out
    assert code == 2, text
    assert "`model.frozen_dtype`" in text and "'bfloat16'" in text and "Traceback" not in text, text


# ------------------------------------------------------------------------------ PPO: reference and reward model


def _ppo_recipe(tmp_path, model_dir, frozen: str, lora=None):
    return parse_recipe({
        "run": {"name": "t", "output_dir": str(tmp_path / "out"), "seed": 0, "report_to": "none"},
        "model": {"name_or_path": str(model_dir), "device": "cpu", "cpu_autocast": "on", "frozen_dtype": frozen},
        "stages": ["ppo"],
        "ppo": {"prompts": "p.jsonl", "policy_from": str(model_dir), "advantage": "reinforce", "lora": lora},
    })


def _batch(tok, B: int = 4, P: int = 6, T: int = 10, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    q = torch.randint(3, V, (B, P), generator=g)
    qm = torch.ones(B, P, dtype=torch.long)
    qm[0, :2] = 0  # left padding on one row
    q = torch.where(qm.bool(), q, tok.pad_token_id)
    r = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    r = torch.where(mask, r, tok.pad_token_id)
    return RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=mask, logprobs=None,
                        ended=torch.zeros(B, dtype=torch.bool))


@pytest.mark.parametrize("chunk", [0, 4])
def test_bf16_reference_logprobs_match_fp32_under_autocast(tmp_path, model_dir, chunk, capsys):
    from pipeline.rlmodels import build_ppo_models

    fp32_recipe = _ppo_recipe(tmp_path / "a", model_dir, "float32")
    bf16_recipe = _ppo_recipe(tmp_path / "b", model_dir, "auto")
    precision = resolve_precision(bf16_recipe.model)
    assert precision.autocast and precision.dtype == torch.float32
    ref32 = build_ppo_models(fp32_recipe, fp32_recipe.ppo, precision)
    ref16 = build_ppo_models(bf16_recipe, bf16_recipe.ppo, precision)
    assert "frozen models (the reference copy, the reward model) stored in bfloat16" in capsys.readouterr().err
    assert {p.dtype for p in ref32.reference.parameters()} == {torch.float32}
    assert {p.dtype for p in ref16.reference.parameters()} == {torch.bfloat16}
    # The trained policy keeps fp32 weights (and its gradients), the reference is frozen.
    assert {p.dtype for p in ref16.policy.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in ref16.policy.parameters())
    assert not any(p.requires_grad for p in ref16.reference.parameters())

    batch = _batch(ref16.tokenizer)
    lp = {}
    for name, models in (("fp32", ref32), ("bf16", ref16)):
        with models.reference_ctx():
            lp[name] = recompute_logprobs(models.ref_model, batch, 1.0, 2, precision.autocast_ctx(), chunk_size=chunk)
    assert lp["bf16"].dtype == torch.float32  # upcast before any loss math
    m = batch.response_mask
    diff = (lp["bf16"] - lp["fp32"]).abs()[m]
    assert float(diff.max()) < 3e-2, float(diff.max())
    # the distributions are peaked (a real check, not -log V everywhere)
    assert float(lp["fp32"][m].std()) > 0.5


def test_lora_reference_is_the_policy_and_stays_fp32(tmp_path, model_dir, capsys):
    from pipeline.rlmodels import build_ppo_models

    recipe = _ppo_recipe(tmp_path, model_dir, "auto", lora={"r": 4, "alpha": 8})
    models = build_ppo_models(recipe, recipe.ppo, resolve_precision(recipe.model))
    assert models.reference is None
    assert {p.dtype for p in models.policy.parameters()} == {torch.float32}
    assert "the reference is the policy with its LoRA adapter disabled" in capsys.readouterr().err


def test_reward_scorer_loaded_in_frozen_dtype(tmp_path):
    """A reward model a scorer loads itself (PPO rewards, eval) is stored in bf16 under autocast; its scores stay
    float32 and close to the fp32 model's. A model handed in (the reward stage's own) keeps its dtype."""
    from transformers import LlamaForSequenceClassification

    from pipeline.rewards import RewardModelScorer

    tok = build_tiny_tokenizer()
    cfg = build_tiny_model(tok).config
    cfg.num_labels = 1
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        rm.score.weight.mul_(50.0)  # scores of order 1
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    responses = ["the sea is blue", "no commas here at all", "* one\n* two", '"quoted"']
    scores = {}
    for setting in ("float32", "auto"):
        mcfg = ModelConfig(name_or_path=str(tmp_path / "rm"), device="cpu", cpu_autocast="on", frozen_dtype=setting)
        scorer = RewardModelScorer(str(tmp_path / "rm"), mcfg, resolve_precision(mcfg))
        want = torch.float32 if setting == "float32" else torch.bfloat16
        assert {p.dtype for p in scorer.model.parameters()} == {want}
        scores[setting] = scorer.score(PROMPTS[:4], responses)
        assert scores[setting].dtype == torch.float32
    assert float(scores["float32"].abs().max()) > 0.1
    assert torch.allclose(scores["auto"], scores["float32"], atol=5e-2, rtol=5e-2), scores
    mcfg = ModelConfig(device="cpu", cpu_autocast="on")
    given = RewardModelScorer(rm, mcfg, resolve_precision(mcfg), tokenizer=tok)
    assert {p.dtype for p in given.model.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------ distillation: teacher and student


def _distill_recipe(tmp_path, teacher_dir, frozen: str, student=None):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"][0]["content"]} for p in PROMPTS])
    d = {"teacher_from": "base", "prompts": str(tmp_path / "prompts.jsonl"), "iterations": 1,
         "rollout_batch_size": 4, "minibatch_size": 4, "micro_batch_size": 4, "max_new_tokens": 4,
         "checkpoint_every": 0, "log_samples_every": 0,
         "student": student or {"from_teacher": {"keep_layers": "every_2nd"}}}
    return parse_recipe({"run": {"output_dir": str(tmp_path / "run")}, "stages": ["distill"],
                         "model": {"name_or_path": str(teacher_dir), "device": "cpu", "cpu_autocast": "on",
                                   "frozen_dtype": frozen}, "distill": d},
                        str(tmp_path / "r.yaml"))


@pytest.mark.parametrize("keep", ["every_2nd", "influence_2"])
def test_student_cut_from_a_bf16_teacher_keeps_its_fp32_weights(tmp_path, model_dir, keep, capsys):
    from transformers import AutoModelForCausalLM

    from pipeline.rlmodels import build_distill_models

    recipe = _distill_recipe(tmp_path, model_dir, "auto", student={"from_teacher": {"keep_layers": keep}})
    precision = resolve_precision(recipe.model)
    models = build_distill_models(recipe, recipe.distill, precision)
    assert "distill: frozen teacher stored in bfloat16 (model.frozen_dtype: auto); trainable student in float32" \
        in capsys.readouterr().err
    assert {p.dtype for p in models.teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in models.teacher.parameters())
    assert {p.dtype for p in models.student.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in models.student.parameters())

    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    kept = models.kept_layers
    assert kept is not None and len(kept) == 2
    student = models.student.state_dict()
    for key, value in student.items():
        if key.startswith("model.layers."):
            i, rest = key.split(".", 3)[2:]
            src = f"model.layers.{kept[int(i)]}.{rest}"
        else:
            src = key
        assert value.dtype == torch.float32
        assert torch.equal(value, original[src]), key  # exact fp32 copy, not a bf16 round trip
    # ... and the stored teacher is the bf16 rounding of the same weights
    t = models.teacher.state_dict()
    assert torch.equal(t["model.norm.weight"], original["model.norm.weight"].to(torch.bfloat16))


def test_teacher_loaded_in_frozen_dtype_beside_a_separate_student(tmp_path, model_dir):
    from pipeline.rlmodels import build_distill_models

    student_dir = peaked_model_dir(tmp_path / "student", n_layers=1, seed=3)
    for frozen, want in (("auto", torch.bfloat16), ("float32", torch.float32)):
        recipe = _distill_recipe(tmp_path / frozen, model_dir, frozen, student={"name_or_path": str(student_dir)})
        models = build_distill_models(recipe, recipe.distill, resolve_precision(recipe.model))
        assert {p.dtype for p in models.teacher.parameters()} == {want}
        assert {p.dtype for p in models.student.parameters()} == {torch.float32}


def test_teacher_labels_with_bf16_storage_are_float32_and_close(tmp_path, model_dir):
    """The teacher's labelling forward (under the same autocast) with bf16 storage: the log-probs and the KLs the
    loss uses come out float32 and close to the fp32-stored teacher's."""
    from pipeline.rlmodels import build_distill_models
    from pipeline.stages.distill import label_states

    labels = {}
    for frozen in ("float32", "auto"):
        recipe = _distill_recipe(tmp_path / frozen, model_dir, frozen)
        precision = resolve_precision(recipe.model)
        models = build_distill_models(recipe, recipe.distill, precision)
        batch = _batch(models.tokenizer, seed=1)
        labels[frozen] = label_states(models, batch, 1.0, 2, precision)
    m = batch.response_mask
    for name in ("teacher_logprobs", "student_logprobs", "reverse_kl", "forward_kl"):
        a, b = getattr(labels["auto"], name), getattr(labels["float32"], name)
        assert a.dtype == torch.float32, name
        assert float((a - b).abs()[m].max()) < 3e-2, (name, float((a - b).abs()[m].max()))
