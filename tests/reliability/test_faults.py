"""Numerical faults: a non-finite loss or gradient skips the update and is logged; N in a row stop."""

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState

from pipeline.onpolicy import RolloutBatch, UpdateSettings, optimise
from pipeline.stages.common import NonFiniteCallback


def _batch(n=4, T=3):
    return RolloutBatch(query_ids=torch.zeros(n, 1, dtype=torch.long), query_mask=torch.ones(n, 1),
                        response_ids=torch.zeros(n, T, dtype=torch.long), response_mask=torch.ones(n, T, dtype=torch.bool),
                        logprobs=torch.zeros(n, T), ended=torch.ones(n, dtype=torch.bool))


def test_nonfinite_gradient_skips_the_update():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)

    def nan_loss(mb, n_tokens):
        return (w * float("nan")).sum(), {}

    out = optimise(_batch(), nan_loss, opt, [w], UpdateSettings(1, 2, 2), torch.Generator().manual_seed(0))
    assert out["optimizer_steps"] == 0 and out["skipped_steps"] == 2
    assert torch.equal(w.detach(), torch.ones(2)), "weights untouched by a NaN step"

    def ok_loss(mb, n_tokens):
        return (w * mb.response_mask.float().sum()).sum() / n_tokens, {}

    out = optimise(_batch(), ok_loss, opt, [w], UpdateSettings(1, 2, 2), torch.Generator().manual_seed(0))
    assert out["optimizer_steps"] == 2 and out["skipped_steps"] == 0 and not torch.equal(w.detach(), torch.ones(2))


def test_trainer_stops_after_n_nonfinite_losses(tmp_path):
    cb = NonFiniteCallback("sft", limit=3)
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate([1.0, float("nan"), float("inf"), 0.5, float("nan"), float("nan")], start=1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"loss": loss})
    assert not control.should_training_stop, "the finite loss at step 4 reset the count"
    state.global_step = 7
    cb.on_log(None, state, control, logs={"loss": math.nan})
    assert control.should_training_stop
    with pytest.raises(FloatingPointError, match=r"sft: 3 logged losses in a row were NaN/inf \(last at step 7\)"):
        cb.raise_if_stopped(tmp_path)


def test_metrics_logger_writes_nan_visibly(tmp_path):
    import json

    from pipeline.utils import MetricsLogger

    m = MetricsLogger(tmp_path, tensorboard=False)
    m.log(1, {"ppo/loss": float("nan")})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["ppo/loss"] == "nan", "NaN is written as 'nan', never as 0.0"


def test_trainer_nonfinite_gradient_never_reaches_the_weights():
    w = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.w = w
    w.grad = torch.tensor([float("nan"), 1.0])
    NonFiniteCallback("sft").on_pre_optimizer_step(None, TrainerState(), TrainerControl(), model=model)
    assert w.grad is None, "gradients dropped, so the optimizer step leaves the weights alone"
    w.grad = torch.tensor([0.5, 1.0])
    NonFiniteCallback("sft").on_pre_optimizer_step(None, TrainerState(), TrainerControl(), model=model)
    assert w.grad is not None
