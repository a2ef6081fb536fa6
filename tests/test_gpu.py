"""The GPU path: the quickstart recipe's every stage on CUDA in bf16, on a tiny model (skipped without a GPU).

CI has no GPU, so these run only where one is present (scripts/gpu_check.sh runs them first). They
check what the CPU suite cannot: device placement of every model a stage builds, bf16 on CUDA through
the Trainer stages and the shared RL core, and per-token math on CUDA against the same math on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, save_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_recipe_runs_every_stage_on_cuda_in_bf16(tmp_path):
    from pipeline.config import load_recipe
    from pipeline.runner import run_recipe

    model = save_tiny(tmp_path / "tiny", n_layers=4)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        f"model.name_or_path={model}", f"run.output_dir={tmp_path / 'run'}",
        "reward.norm_samples=4", "ppo.iterations=2", "ppo.max_new_tokens=16",
        "distill.student.from_teacher.keep_layers=every_2nd", "distill.warmup_iterations=1",
        "distill.iterations=2", "distill.max_new_tokens=16", "eval.max_new_tokens=16",
    ])
    assert recipe.model.device == "auto"
    summaries = run_recipe(recipe)
    assert set(summaries) >= {"sft", "reward", "ppo", "distill", "eval"}
    for stage in ("sft", "reward", "ppo", "distill"):
        assert (tmp_path / "run" / stage / "final" / "config.json").exists(), stage
        assert summaries[stage]["peak_gpu_gb"] > 0, stage
    ppo_metrics = [json.loads(x) for x in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for m in ppo_metrics for k, v in m.items() if "loss" in k and isinstance(v, float)]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any("ppo/score" in m for m in ppo_metrics)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert "distill" in json.dumps(results)
    assert (tmp_path / "run" / "report.md").exists()


def test_models_land_on_cuda_in_bf16(tmp_path):
    from pipeline.config import ModelConfig
    from pipeline.models import load_causal_lm

    path = save_tiny(tmp_path / "tiny")
    model = load_causal_lm(str(path), ModelConfig(name_or_path=str(path)))
    p = next(model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16


def test_chunked_logprobs_on_cuda_match_the_cpu():
    """Per-token log-probs from the hidden states in chunks, on CUDA (fp32), equal the CPU's."""
    from pipeline.rl.chunked import chunked_token_logprobs

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, n_layers=2).double()
    ids = torch.randint(3, len(tok), (3, 20))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    cpu, cpu_ent = chunked_token_logprobs(hidden[:, :-1], model.lm_head, ids[:, 1:], chunk_size=7, with_entropy=True)
    model.cuda()
    gpu, gpu_ent = chunked_token_logprobs(hidden[:, :-1].cuda(), model.lm_head, ids[:, 1:].cuda(), chunk_size=7,
                                          with_entropy=True)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-9, rtol=0)
    torch.testing.assert_close(gpu_ent.cpu(), cpu_ent, atol=1e-9, rtol=0)
