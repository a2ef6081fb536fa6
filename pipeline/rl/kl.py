"""KL estimators, full-vocabulary divergences and KL-coefficient controllers.

Per-token estimators (Schulman, "Approximating KL Divergence", joschu.net/blog/kl-approx.html).
Tokens are sampled from the policy p = pi_theta; the target is KL(p || p_ref). With
r = p_ref / p, i.e. log r = ref_logprobs - logprobs:
  k1 = -log r              unbiased value, can be negative, high variance.
  k2 = (log r)^2 / 2       biased value, non-negative, low variance.
  k3 = (r - 1) - log r     unbiased value, non-negative, low variance.
Which one where:
  - In the reward (PPO's r_t - kl_coef * kl_t, gradient through the policy-gradient term): use k1.
    It is the exact per-sample log-ratio, so the reward-to-go of -k1 is an unbiased estimate
    of -KL and the resulting policy gradient is unbiased.
  - As a loss term differentiated directly (GRPO-style `kl_loss`), on-policy samples:
    grad k1 = grad log p has expectation 0 (no KL gradient at all);
    grad k2 = (log p - log p_ref) grad log p has expectation grad KL(p || p_ref) (unbiased);
    grad k3 = (1 - r) grad log p has expectation -E_ref[grad log p] = grad KL(p_ref || p):
    the gradient of the *forward* KL, i.e. biased for the reverse KL it estimates as a value.
Full-vocabulary divergences (distillation) take two logits tensors (B, T, V) and return (B, T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.rl.logprobs import _scaled_row, upcast

Tensor = torch.Tensor


# ---------------------------------------------------------------- per-token estimators (B, T)


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log p - log p_ref = -log r. (B, T), (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2. (B, T), (B, T) -> (B, T)."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r >= 0, r = p_ref / p. (B, T), (B, T) -> (B, T)."""
    # k3: unbiased as a value and never negative (joschu.net/blog/kl-approx.html)
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """|log p - log p_ref|. (B, T), (B, T) -> (B, T)."""
    return (logprobs - ref_logprobs).abs()


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate of `kind` in KL_ESTIMATORS. (B, T), (B, T) -> (B, T)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


# ---------------------------------------------------- full-vocabulary divergences (B, T, V) -> (B, T)


def _check_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        # same-family models can pad vocabularies differently (docs/implementation_details.md): slice to the shared vocab
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher logits "
            f"{tuple(teacher_logits.shape)}; slice both to the shared vocabulary first"
        )


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis, with 0 log 0 = 0."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, 0.0)
    return (p * diff).sum(-1)


def _row_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """Apply fn(logp_student, logp_teacher) -> (T,) one batch row at a time (bounds (T, V) copies)."""
    _check_vocab(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return student_logits.new_zeros(student_logits.shape[:-1], dtype=torch.float32)
    rows = []
    for s_row, t_row in zip(student_logits, teacher_logits):
        logp_s = F.log_softmax(_scaled_row(s_row, temperature), dim=-1)
        logp_t = F.log_softmax(_scaled_row(t_row, temperature), dim=-1)
        rows.append(fn(logp_s, logp_t))
    return torch.stack(rows)


class _ReverseKLRows(torch.autograd.Function):
    """KL(softmax(s) || softmax(t)) over the last axis of float32 / float64 (T, V) rows; gradient to `s` only.

    The same forward as `_kl_rows` on the two log-softmaxes; the backward is the closed form
    d KL / d s_j = p_j (d_j - KL), d_j = log p_j - log q_j (0 where p_j = 0), from the two (T, V) tensors the
    forward keeps (p and d), where autograd's composition keeps more and runs a kernel per operation."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:
        logp_s = F.log_softmax(s, dim=-1)
        p = logp_s.exp()
        d = torch.where(p > 0, logp_s - F.log_softmax(t, dim=-1), 0.0)
        kl = (p * d).sum(-1)
        ctx.save_for_backward(p, d, kl)
        return kl

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reverse_kl_grad(ctx, grad), None


def _reverse_kl_grad(ctx, grad: Tensor) -> Tensor:
    p, d, kl = ctx.saved_tensors
    return (d - kl.unsqueeze(-1)).mul_(p).mul_(grad.unsqueeze(-1))


class _ReverseKLRowsWithFigures(torch.autograd.Function):
    """`_ReverseKLRows` at temperature 1 that also returns the (T, 3) `student_state_figures` of its rows, made
    from the same log-softmaxes and probabilities; the figures carry no gradient (marked non-differentiable)."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor):
        p, d, figures = _figure_rows(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1))
        kl = figures[..., 0].clone()
        ctx.save_for_backward(p, d, kl)
        ctx.mark_non_differentiable(figures)
        return kl, figures

    @staticmethod
    def backward(ctx, grad: Tensor, _figures_grad: Tensor):
        return _reverse_kl_grad(ctx, grad), None


def _figure_rows(logp_s: Tensor, logp_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(p_s, d = log p_s - log p_t (0 where p_s = 0), the (T, 3) figures in STATE_FIGURES' order) of (T, V) rows:
    the same operations as `_kl_rows` both ways and `entropy_from_logits`."""
    p, q = logp_s.exp(), logp_t.exp()
    d = torch.where(p > 0, logp_s - logp_t, 0.0)
    reverse = (p * d).sum(-1)
    forward = (q * torch.where(q > 0, logp_t - logp_s, 0.0)).sum(-1)
    entropy = -(p * torch.where(p > 0, logp_s, 0.0)).sum(-1)
    return p, d, torch.stack([reverse, forward, entropy], -1)


class _ForwardKLRows(torch.autograd.Function):
    """KL(softmax(t) || softmax(s)) over the last axis, gradient to `s` only: d KL / d s_j = p_j - q_j
    (p = softmax(s), q = softmax(t)); the same forward as `_kl_rows(log q, log p)`."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:
        logp_s = F.log_softmax(s, dim=-1)
        logp_t = F.log_softmax(t, dim=-1)
        q = logp_t.exp()
        kl = (q * torch.where(q > 0, logp_t - logp_s, 0.0)).sum(-1)
        ctx.save_for_backward(logp_s, q)
        return kl

    @staticmethod
    def backward(ctx, grad: Tensor):
        logp_s, q = ctx.saved_tensors
        return (logp_s.exp() - q).mul_(grad.unsqueeze(-1)), None


def _fused_row_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float, rows_fn,
                          composed: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """`rows_fn` (an autograd Function of (scaled student row, scaled teacher row)) one batch row at a time; a
    teacher side that requires grad (not the pipeline's: its teachers are frozen or detached) takes `composed`
    through `_row_divergence`, so that it gets its gradient too."""
    if teacher_logits.requires_grad:
        return _row_divergence(student_logits, teacher_logits, temperature, composed)
    _check_vocab(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape[0] == 0:
        return student_logits.new_zeros(student_logits.shape[:-1], dtype=torch.float32)
    return torch.stack([rows_fn.apply(_scaled_row(s_row, temperature), _scaled_row(t_row, temperature))
                        for s_row, t_row in zip(student_logits, teacher_logits)])


def reverse_kl_full(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_s || p_t) = sum_v p_s (log p_s - log p_t): mode seeking. (B, T, V) x2 -> (B, T) float32."""
    return _fused_row_divergence(student_logits, teacher_logits, temperature, _ReverseKLRows, _kl_rows)


def forward_kl_full(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_t || p_s) = sum_v p_t (log p_t - log p_s): mode covering. (B, T, V) x2 -> (B, T) float32."""
    return _fused_row_divergence(student_logits, teacher_logits, temperature, _ForwardKLRows,
                                 lambda s, t: _kl_rows(t, s))


def generalized_jsd_full(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD of GKD (Agarwal et al. 2023). (B, T, V) x2 -> (B, T) float32.

    m = beta * p_t + (1 - beta) * p_s;  JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m).
    Symmetry: JSD_beta(student, teacher) = JSD_{1-beta}(teacher, student).
    Limits: the formula itself is identically 0 at beta = 0 and beta = 1 (m equals one of the two
    distributions and its weight vanishes), which would train nothing. For small beta,
    JSD_beta ~ beta * KL(p_t || p_s), and near 1, JSD_beta ~ (1 - beta) * KL(p_s || p_t); so, like
    TRL's GKDTrainer, the endpoints return those limits of the normalised divergence:
    beta = 0 -> forward KL(p_t || p_s), beta = 1 -> reverse KL(p_s || p_t).
    Interior beta returns the unnormalised JSD_beta (its scale shrinks towards the endpoints).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_full(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl_full(student_logits, teacher_logits, temperature)
    log_beta, log_1m_beta = math.log(beta), math.log1p(-beta)

    def jsd(logp_s: Tensor, logp_t: Tensor) -> Tensor:
        # log m computed in log space: logsumexp(log p_t + log beta, log p_s + log(1 - beta))
        logm = torch.logaddexp(logp_t + log_beta, logp_s + log_1m_beta)
        return beta * _kl_rows(logp_t, logm) + (1 - beta) * _kl_rows(logp_s, logm)

    return _row_divergence(student_logits, teacher_logits, temperature, jsd)


# ------------------------------------------------------------------------------- KL controllers


@dataclass
class FixedKLController:
    """Constant KL coefficient beta; `update` is a no-op."""

    kl_coef: float

    @property
    def value(self) -> float:
        return self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards `target`.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2:
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    """

    init_kl_coef: float
    target: float
    horizon: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {self.target}, {self.horizon}")
        self.value = self.init_kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


STATE_FIGURES = ("reverse_kl", "forward_kl", "entropy")


def reverse_kl_with_figures(student_logits: Tensor, teacher_logits: Tensor,
                            temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(reverse_kl_full (B, T), with its gradient; student_state_figures_stacked (B, T, 3), without one) from one
    pass: each side's log-softmax made once for both. Temperature 1 only (the figures' temperature); a frozen
    teacher side (no gradient)."""
    if temperature != 1.0:
        raise ValueError(f"reverse_kl_with_figures: the figures are at temperature 1, got {temperature}")
    if teacher_logits.requires_grad:
        raise ValueError("reverse_kl_with_figures: the teacher side must not require grad")
    _check_vocab(student_logits, teacher_logits)
    if student_logits.shape[0] == 0:
        shape = student_logits.shape[:-1]
        return (student_logits.new_zeros(shape, dtype=torch.float32),
                student_logits.new_zeros((*shape, len(STATE_FIGURES)), dtype=torch.float32))
    kls, figures = zip(*(_ReverseKLRowsWithFigures.apply(upcast(s_row), upcast(t_row))
                         for s_row, t_row in zip(student_logits, teacher_logits)))
    return torch.stack(kls), torch.stack(figures)


def student_state_figures_stacked(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """`student_state_figures` as one (B, T, 3) float32 tensor, last axis in STATE_FIGURES' order. Each side's
    log-softmax and probabilities are made once for the three figures (the same operations as
    `reverse_kl_full`, `forward_kl_full` and `entropy_from_logits` at temperature 1, so the same values)."""
    _check_vocab(s_logits, t_logits)
    if s_logits.shape[0] == 0:
        return s_logits.new_zeros((*s_logits.shape[:-1], len(STATE_FIGURES)), dtype=torch.float32)
    return torch.stack([_figure_rows(F.log_softmax(upcast(s_row), dim=-1), F.log_softmax(upcast(t_row), dim=-1))[2]
                        for s_row, t_row in zip(s_logits, t_logits)])


def student_state_figures(s_logits: Tensor, t_logits: Tensor) -> dict[str, Tensor]:
    """Exact per-token reverse / forward KL to the teacher and the student's entropy, at temperature 1."""
    return dict(zip(STATE_FIGURES, student_state_figures_stacked(s_logits, t_logits).unbind(-1)))
