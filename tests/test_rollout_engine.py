"""Rollout engines and seeded generation chunks, without vLLM (not installed here): the engine choice
and its errors, the shapes the vLLM path returns, and chunk seeds that do not depend on the process count."""

from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline.config import RecipeError
from pipeline.onpolicy import (
    Generation,
    SamplingSettings,
    encode_prompts,
    hf_sample,
    seeded_rng,
)
from pipeline.distributed import shard
from pipeline.onpolicy import pad_responses
from pipeline.rollout_vllm import (
    resolve_engine_name,
    rollout_engine,
    sampled_ids,
    vllm_available,
    vllm_weight_items,
)


def test_vllm_without_the_package_names_the_key_and_the_extra():
    with pytest.raises(RecipeError, match=r"`ppo.rollout_engine: vllm` needs the vLLM package.*rlhf-pipeline\[vllm\]"):
        resolve_engine_name("vllm", "cuda", "ppo.rollout_engine", available=False)


def test_vllm_on_cpu_names_the_key():
    with pytest.raises(RecipeError, match=r"`distill.rollout_engine: vllm` needs a CUDA GPU"):
        resolve_engine_name("vllm", "cpu", "distill.rollout_engine", available=True)


@pytest.mark.parametrize("available", [True, False])
def test_auto_falls_back_to_hf_on_cpu(available):
    assert resolve_engine_name("auto", "cpu", "ppo.rollout_engine", available=available) == "hf"
    assert resolve_engine_name("auto", "cuda", "ppo.rollout_engine", available=available) == (
        "vllm" if available else "hf")
    assert rollout_engine("auto", "cpu", "ppo.rollout_engine") is hf_sample


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed")
def test_stage_with_vllm_engine_fails_before_training(tmp_path):
    from pipeline.config import DistillConfig, KeepLayersConfig, ModelConfig, StudentConfig
    from pipeline.models import resolve_precision
    from pipeline.models import student_from_teacher
    from pipeline.stages.distill import DistillModels, train_distill

    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=2).eval().requires_grad_(False)
    models = DistillModels(student=student_from_teacher(teacher, "every_2nd"), teacher=teacher, tokenizer=tok,
                           vocab_size=len(tok))
    cfg = DistillConfig(rollout_engine="vllm", student=StudentConfig(from_teacher=KeepLayersConfig()))
    with pytest.raises(RecipeError, match="distill.rollout_engine"):
        train_distill(models, [{"prompt": "hi"}], cfg, resolve_precision(ModelConfig(cpu_autocast="off")), tmp_path,
                      progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_engine_outputs_padded_like_generate():
    eos, pad = 2, 0
    r, m, ended = pad_responses([[5, 6, eos], [5, 6, 7, 8], []], eos, pad, "cpu")
    assert r.tolist() == [[5, 6, eos, pad], [5, 6, 7, 8], [eos, pad, pad, pad]]
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    # A completion stopped on EOS keeps it (appended if the engine dropped it); a length stop does not.
    assert sampled_ids(SimpleNamespace(token_ids=(5, 6), finish_reason="stop"), eos) == [5, 6, eos]
    assert sampled_ids(SimpleNamespace(token_ids=(5, 6, eos), finish_reason="stop"), eos) == [5, 6, eos]
    assert sampled_ids(SimpleNamespace(token_ids=(5, 6), finish_reason="length"), eos) == [5, 6]


def test_vllm_weight_names_are_plain_transformers_names():
    t = torch.zeros(1)
    state = {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": t,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": t,
             "model.embed_tokens.weight": t}
    assert [n for n, _ in vllm_weight_items(state)] == ["model.layers.0.self_attn.q_proj.weight",
                                                         "model.embed_tokens.weight"]


def test_generation_chunks_do_not_depend_on_the_process_count():
    one = Generation(chunk_size=4, seed=123, first_row=0).chunks(8)
    ranks = [Generation(chunk_size=4, seed=123, first_row=4 * r).chunks(4) for r in range(2)]
    assert one == ranks[0] + [(s + 4, e + 4, seed) for s, e, seed in ranks[1]]
    assert Generation().chunks(8) == [(0, 8, None)]  # default: one call, the global RNG stream
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_stream_alone():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok).eval()
    q, qm = encode_prompts(tok, [{"prompt": "hello"}, {"prompt": "write a poem"}], "cpu")
    settings = SamplingSettings(max_new_tokens=6)
    torch.manual_seed(0)
    a = hf_sample(model, tok, q, qm, settings, seed=7)[0]
    after_a = torch.rand(1)
    torch.manual_seed(1)
    b = hf_sample(model, tok, q, qm, settings, seed=7)[0]
    torch.manual_seed(0)
    with seeded_rng(5, "cpu"):
        torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after_a)
