"""DAgger's mixture policy pi_i = beta_i * teacher + (1 - beta_i) * student (Ross et al. 2011), mixed per
sequence: the beta_i schedule and the seeded coin that says which model samples each sequence."""

from __future__ import annotations

import torch


def mixture_beta(schedule: str, beta: float, beta_end: float, decay: float, i: int, iterations: int) -> float:
    """beta_i for iteration i = 0, 1, ...: `constant` beta; `linear` from beta to beta_end over `iterations`
    (beta_end from the last iteration on); `exponential` beta * decay**i."""
    if schedule == "linear":
        return beta + (beta_end - beta) * min(i / max(iterations - 1, 1), 1.0)
    if schedule == "exponential":
        return beta * decay ** i
    if schedule == "constant":
        return beta
    raise ValueError(f"unknown beta schedule {schedule!r}: constant, linear or exponential")


def mixture_coins(n: int, beta: float, generator: torch.Generator) -> torch.Tensor:
    """One seeded coin per sequence of the global batch: True = sampled wholly by the teacher."""
    return torch.rand(n, generator=generator) < beta
