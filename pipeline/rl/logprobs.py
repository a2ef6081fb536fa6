"""Per-token log-probabilities and entropies from logits.

Shapes: logits (B, T, V), tokens (B, T) -> (B, T) float32.

Memory: the vocabulary axis dominates (V ~ 150k). Both functions work one batch row at a time, so
float32 temporaries are (T, V), never a second (B, T, V) (TRL's `selective_log_softmax` does the
same). Under no_grad (rollout, reference model) this bounds peak memory; with autograd each row
keeps what its backward needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Masked helpers live in masks.py; re-exported here so callers can import them with the log-probs.
from pipeline.rl.masks import masked_count, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
]

Tensor = torch.Tensor


def upcast(x: Tensor) -> Tensor:
    """Half / bfloat16 / float32 -> float32; float64 stays float64 (tests compare in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _scaled_row(logits_row: Tensor, temperature: float) -> Tensor:
    """(T, V) in any dtype -> (T, V) float32 (float64 stays) divided by the sampling temperature."""
    # divide by the sampling temperature, or recomputed log-probs do not match the sampler (docs/implementation_details.md)
    row = upcast(logits_row)
    return row if temperature == 1.0 else row / temperature


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at `tokens`. logits (B, T, V), tokens (B, T) -> (B, T) float32.

    log p(a) = z_a - logsumexp(z): gather one logit and one logsumexp per position instead of
    materialising a full (B, T, V) log-softmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[0] == 0:
        return logits.new_zeros(tokens.shape, dtype=torch.float32)
    rows = []
    for logits_row, tokens_row in zip(logits, tokens):
        z = _scaled_row(logits_row, temperature)  # (T, V)
        z_token = z.gather(-1, tokens_row.long().unsqueeze(-1)).squeeze(-1)  # (T,)
        rows.append(z_token - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H(softmax(logits / temperature)) = -sum_v p_v log p_v. (B, T, V) -> (B, T) float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    rows = []
    for logits_row in logits:
        logp = F.log_softmax(_scaled_row(logits_row, temperature), dim=-1)  # (T, V)
        p = logp.exp()
        # 0 * log 0 = 0: logits set to -inf (filtered vocabulary) would otherwise give NaN
        rows.append(-(p * torch.where(p > 0, logp, 0.0)).sum(-1))
    return torch.stack(rows)
