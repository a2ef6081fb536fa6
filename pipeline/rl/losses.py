"""PPO-family losses over response tokens. Inputs (B, T); mask True = a token that counts.

Normalisation: every loss is a SUM over counted tokens divided by `loss_norm_tokens`, the number
of counted tokens in the whole minibatch, which the caller passes to each micro-batch. Summing the
micro-batch losses then gives exactly the minibatch loss and gradient, however the minibatch is
split (docs/implementation_details.md: gradient accumulation). None means mask.sum() (the call is the whole minibatch).

NaN safety: masked slots may hold NaN/inf in any input; they are replaced with torch.where before
any arithmetic, so neither the loss nor the gradient w.r.t. a leaf input sees them.
Stats are detached scalar tensors (masked means over this call's tokens).
"""

from __future__ import annotations

import functools

import torch

from pipeline.rl.kl import _row_divergence, forward_kl_full, generalized_jsd_full, kl_penalty, reverse_kl_full
from pipeline.rl.masks import masked_mean, masked_sum, masked_var

Tensor = torch.Tensor


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _normalised_sum(x: Tensor, mask: Tensor, loss_norm_tokens: int | float | Tensor | None) -> Tensor:
    """sum of counted x / loss_norm_tokens (default: this call's counted tokens, at least 1)."""
    if loss_norm_tokens is None:
        loss_norm_tokens = mask.sum().clamp(min=1)
    return masked_sum(x, mask) / loss_norm_tokens


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    loss_norm_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017). (B, T) x4 -> scalar loss, stats.

    ratio = pi_theta / pi_old;  pg_loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
    Stats: clipfrac (share of tokens with |ratio - 1| > eps), approx_kl, ratio_mean.
    """
    mask = mask.bool()
    logratio = _zero_masked(logprobs - old_logprobs, mask)
    ratio = torch.exp(logratio)
    advantages = _zero_masked(advantages, mask)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_losses = torch.max(pg_loss1, pg_loss2)
    loss = _normalised_sum(pg_losses, mask, loss_norm_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_coef).float(), mask),
            # approx_kl = E[(r - 1) - log r], k3 of KL(pi_old || pi_theta): joschu.net/blog/kl-approx.html
            "approx_kl": masked_mean((ratio - 1) - logratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_coef_v: float | None,
    loss_norm_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2). -> scalar, stats.

    The critic may not move further than eps from its rollout-time values (cleanrl `v_loss_clipped`).
    clip_coef_v=None: unclipped 0.5 * (V - R)^2. Stats: vf_clipfrac (share of tokens clipped).
    """
    mask = mask.bool()
    values, old_values, returns = (_zero_masked(x, mask) for x in (values, old_values, returns))
    v_loss_unclipped = (values - returns) ** 2
    if clip_coef_v is None:
        v_loss_max = v_loss_unclipped
        vf_clipfrac = torch.zeros((), device=values.device)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_coef_v, clip_coef_v)
        v_loss_clipped = (v_clipped - returns) ** 2
        v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
        vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).float(), mask)
    loss = 0.5 * _normalised_sum(v_loss_max, mask, loss_norm_tokens)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


def entropy_bonus(
    entropy: Tensor, mask: Tensor, loss_norm_tokens: int | float | Tensor | None = None
) -> Tensor:
    """Mean entropy over counted tokens (a bonus: total loss = pg - ent_coef * this). (B, T) -> scalar."""
    return _normalised_sum(entropy, mask.bool(), loss_norm_tokens)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kind: str = "k3",
    loss_norm_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """KL to the reference as a loss term (instead of in the reward). (B, T) x2 -> scalar.

    k3's gradient is biased for KL(pi || ref) (it follows the forward KL); k2's is unbiased
    on-policy; see pipeline/rl/kl.py. k3 is the default to match GRPO/verl's "low_var_kl".
    """
    mask = mask.bool()
    kl = kl_penalty(_zero_masked(logprobs, mask), _zero_masked(ref_logprobs, mask), kind)
    return _normalised_sum(kl, mask, loss_norm_tokens)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over counted tokens (1 = perfect critic, 0 = predicts the mean).

    (B, T) x2 -> scalar. NaN when Var[R] = 0 (undefined), as in cleanrl / SB3.
    """
    mask = mask.bool()
    values, returns = _zero_masked(values, mask), _zero_masked(returns, mask)
    var_returns = masked_var(returns, mask, unbiased=False)
    ev = 1 - masked_var(returns - values, mask, unbiased=False) / var_returns
    return torch.where(var_returns == 0, torch.full_like(ev, float("nan")), ev)


# Distillation: the divergence to a teacher at each visited state, and its sampled-token estimate.


def divergence_fn(name: str, jsd_beta: float = 0.5):
    """(student_logits, teacher_logits, temperature) -> (B, T) per-token divergence over the vocabulary."""
    return {"reverse_kl": reverse_kl_full, "forward_kl": forward_kl_full,
            "jsd": functools.partial(generalized_jsd_full, beta=jsd_beta)}[name]


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, divergence: str, n_tokens: float,
                 temperature: float = 1.0, jsd_beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """Full-vocabulary estimator. (B, T, V) x2, mask (B, T) -> (sum of counted per-token divergences /
    n_tokens, the per-token divergence (B, T)). `n_tokens` counts the whole minibatch (optimise)."""
    per_token = divergence_fn(divergence, jsd_beta)(student_logits, teacher_logits.detach(), temperature=temperature)
    return masked_sum(per_token, mask.bool()) / n_tokens, per_token


def _topk_forward_kl_rows(logp_s: Tensor, logp_t: Tensor, k: int) -> Tensor:
    """(T, V) log-probs of student and teacher -> (T,) KL(teacher || student) over the teacher's top-k tokens
    plus one bucket for the rest of the vocabulary."""
    k = min(k, logp_t.shape[-1])
    top_t, idx = logp_t.topk(k, dim=-1)  # (T, k) the teacher's k most likely tokens
    top_s = logp_s.gather(-1, idx)
    q = top_t.exp()
    kl = (q * torch.where(q > 0, top_t - top_s, torch.zeros((), dtype=q.dtype, device=q.device))).sum(-1)
    if k == logp_t.shape[-1]:  # no tail: the top-k KL is the forward KL over the whole vocabulary
        return kl
    # The tail's log mass, 1 - (sum of the top k), as a logsumexp over the other tokens (exact; no cancellation
    # in 1 - sum when the top k hold nearly all the mass). Teacher: its own tail; student: its mass off those k.
    out = torch.zeros((), dtype=logp_t.dtype, device=logp_t.device)
    tail_t = logp_t.scatter(-1, idx, float("-inf")).logsumexp(-1)
    tail_s = logp_s.scatter(-1, idx, float("-inf")).logsumexp(-1)
    has_tail = torch.isfinite(tail_t)  # a teacher with all its mass on the top k: the bucket adds 0
    tail_t = torch.where(has_tail, tail_t, out)
    return kl + torch.where(has_tail, tail_t.exp() * (tail_t - tail_s), out)


def topk_forward_kl(student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Forward KL(teacher || student) over k + 1 outcomes at each state: the teacher's k most likely tokens
    and one bucket for the rest. (B, T, V) x2 -> (B, T) float32 (float64 stays float64).

    Teacher: q_i = p_t(v_i) for its top-k tokens v_1..v_k, q_tail = 1 - sum_i q_i; student: s_i = p_s(v_i),
    s_tail = 1 - sum_i s_i (its mass on every other token). KL = sum_i q_i log(q_i / s_i) + q_tail log(q_tail /
    s_tail) <= the full forward KL (a coarser partition, the log-sum inequality). Gradient w.r.t. the student's
    logits: p_s(v) - q_v on the top-k tokens, p_s(v) (1 - q_tail / s_tail) on the others. Both distributions
    at `temperature`, as the main divergence. Top-k teacher probabilities alone are a biased, unnormalised target
    (sparse knowledge distillation, Anshumann et al. 2025, "Sparse Logit Sampling", arXiv:2503.16870); the tail
    bucket keeps the k + 1 outcomes a distribution, so the student is also told how much mass to leave off the
    teacher's top tokens."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _row_divergence(student_logits, teacher_logits.detach(), temperature,
                           lambda s, t: _topk_forward_kl_rows(s, t, k))


def eos_state_weights(teacher_logits: Tensor, eos_id: int, weight: float, temperature: float = 1.0) -> Tensor:
    """Per-state loss weights that stress where the teacher would stop: (B, T, V) -> (B, T) float32,
    w = 1 + (weight - 1) * p_teacher(EOS | state) at `temperature`. weight = 1: all ones (no reweighting).

    A token-mean divergence gives the few states where an answer should end a tiny share of the loss, so a
    cut student can match its teacher's words and still not learn to stop (its answers run to the length cap).
    Softer than up-weighting only the states where the teacher samples EOS: every state counts by how much the
    teacher wants to stop there. Computed one row at a time (no (B, T, V) float32 copy); no gradient."""
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    b, t = teacher_logits.shape[:2]
    if weight == 1.0:
        return torch.ones(b, t, dtype=torch.float32, device=teacher_logits.device)
    rows = []
    with torch.no_grad():
        for row in teacher_logits.detach():
            z = row.float() / temperature
            rows.append((z[:, eos_id] - z.logsumexp(-1)).exp())
    return 1.0 + (weight - 1.0) * torch.stack(rows)


def sampled_rewards(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """r_t = -(log pi_s(a_t) - log pi_t(a_t)): minus the k1 reverse-KL estimate at the sampled token (B, T).
    Zero on uncounted tokens."""
    r = -(student_logprobs - teacher_logprobs)
    return torch.where(mask.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))
