"""Masked reductions over response tokens.

One mask polarity everywhere: `mask` is bool or 0/1 with True = a response token that counts.
Masked-out slots may hold NaN/inf (padding, log-probs of pad tokens): every reduction first
replaces them with `torch.where(mask, x, 0)`, because NaN * 0 is NaN.

An empty mask gives 0 (the count is clamped to 1), never a NaN from 0/0.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _bool(mask: Tensor, like: Tensor) -> Tensor:
    return mask.bool().expand_as(like)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the counted entries of x. x, mask: same shape (B, T) -> scalar, or reduced over `dim`."""
    mask = _bool(mask, x)
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of counted entries (at least 1, so it is always a safe divisor)."""
    mask = mask.bool()
    n = mask.sum() if dim is None else mask.sum(dim)
    return n.clamp(min=1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of the counted entries of x. (B, T) -> scalar, or reduced over `dim`."""
    return masked_sum(x, mask, dim) / masked_count(_bool(mask, x), dim).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of all counted entries of x (one scalar over the whole batch). (B, T) -> scalar.

    unbiased: Bessel's correction n / (n - 1); with one counted entry the variance is 0.
    """
    mask = _bool(mask, x)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(x.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise x to zero mean, unit variance over ALL counted tokens of the batch. (B, T) -> (B, T).

    shift_mean=False keeps the original mean (only rescales), as TRL/torchtune's `whiten` do for
    rewards. Masked slots come out as 0.
    """
    # whiten over the whole rollout batch, not per micro-batch (docs/implementation_details.md)
    mask = _bool(mask, x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))
