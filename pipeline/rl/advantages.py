"""Returns and advantages over response tokens.

Layout: rewards / values / mask are (B, T) over the response only. Valid tokens of row b are a
contiguous prefix [0, L_b) followed by masked padding (mask True = a token that counts). The
episode ends after the last valid token, so V(s_{L_b}) = 0 and no sum crosses into padding.
(The loops below treat any masked slot as an episode boundary, so they also stay correct for
other mask layouts.) Masked slots may hold NaN/inf; outputs are 0 there.

Per-sequence tensors: scores (B,), e.g. the reward-model score of each response.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from pipeline.rl.masks import masked_mean

Tensor = torch.Tensor


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def token_level_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO's per-token reward: -kl_coef * kl_t everywhere, plus the score at the last valid token.

    scores (B,), kl (B, T), mask (B, T) -> rewards (B, T). Rows with no valid token get no score.
    """
    # the score belongs to the EOS token itself, not the pad after it (docs/implementation_details.md)
    mask = mask.bool()
    rewards = _zero_masked(-kl_coef * kl, mask)
    last = (mask.sum(-1) - 1).clamp(min=0)  # (B,) index of the last valid token (prefix spans)
    scores = torch.where(mask.any(-1), scores.to(rewards.dtype), 0.0)
    score_at_last = torch.zeros_like(rewards).scatter(-1, last.unsqueeze(-1), scores.unsqueeze(-1))
    return rewards + score_at_last


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go G_t = sum_{t' >= t} gamma^(t'-t) r_t' within the valid span. (B, T) -> (B, T)."""
    mask = mask.bool()
    rewards = _zero_masked(rewards, mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0]) if rewards.shape[1] else None
    for t in reversed(range(rewards.shape[1])):
        # a masked slot resets the running sum: returns never cross the end of the episode
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, 0.0)
        returns[:, t] = running
    return returns


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016). (B, T) x3 -> advantages, returns (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V_{t+1} = 0 after the last valid token;
    A_t = delta_t + gamma * lambda * A_{t+1};  returns = A + V (the critic's target).
    lambda = 0: A = delta (TD(0)); lambda = 1: A = reward-to-go - V (Monte Carlo).
    """
    mask = mask.bool()
    rewards, values = _zero_masked(rewards, mask), _zero_masked(values, mask)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0]) if T else None
    for t in reversed(range(T)):
        # a masked next slot reads as V = 0 (values were zeroed there): the episode has ended
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        # cleanrl's lastgaelam; reset to 0 on masked slots so it never crosses into padding
        lastgaelam = torch.where(mask[:, t], delta + gamma * gae_lambda * lastgaelam, 0.0)
        advantages[:, t] = lastgaelam
    returns = _zero_masked(advantages + values, mask)
    return advantages, returns


def _no_baseline(returns: Tensor, mask: Tensor) -> Tensor:
    return torch.zeros((), dtype=returns.dtype, device=returns.device)


REINFORCE_BASELINES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "none": _no_baseline,
    # a constant baseline (mean reward-to-go over all counted tokens): lowers variance, no bias
    "batch_mean": masked_mean,
}


def reinforce_advantages(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, baseline: str = "none",
    mean: Optional[Callable[[Tensor, Tensor], Any]] = None,
) -> Tensor:
    """REINFORCE with reward-to-go (causality) minus a baseline. (B, T) -> (B, T).

    baseline: "none" | "batch_mean" (masked mean of the reward-to-go over the whole batch).
    mean: the masked mean used by "batch_mean" (default: over this tensor; under several processes,
    one over the whole global batch).
    """
    if baseline not in REINFORCE_BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {sorted(REINFORCE_BASELINES)}")
    returns = discounted_returns(rewards, mask, gamma)
    reduce = mean if (mean is not None and baseline == "batch_mean") else REINFORCE_BASELINES[baseline]
    return _zero_masked(returns - reduce(returns, mask), mask)


def _leave_one_out_baseline(scores: Tensor, k: int) -> Tensor:
    """(B,) with k contiguous samples per prompt -> (B,) mean of the other k-1 samples' scores."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    if scores.shape[0] % k:
        raise ValueError(f"batch size {scores.shape[0]} is not a multiple of k={k}")
    grouped = scores.view(-1, k)  # (n_prompts, k): samples of one prompt are contiguous
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return baseline.reshape(-1)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """RLOO: A_i = s_i - mean_{j != i} s_j within each prompt's k samples. (B,) -> (B,).

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs". Equals k / (k - 1) * (s_i - mean_j s_j). B = n_prompts * k with
    the k samples of a prompt contiguous.
    """
    return scores - _leave_one_out_baseline(scores, k)


def spread_over_tokens(seq_values: Tensor, mask: Tensor) -> Tensor:
    """Give every counted token its sequence's value (e.g. an RLOO advantage). (B,), (B, T) -> (B, T)."""
    return _zero_masked(seq_values.unsqueeze(-1).expand(mask.shape), mask)


def rloo_token_advantages(rewards: Tensor, mask: Tensor, k: int, gamma: float = 1.0) -> Tensor:
    """RLOO with per-token rewards (e.g. score at EOS plus a per-token KL penalty). (B, T) -> (B, T).

    A_{i,t} = G_{i,t} - b_i, where G_{i,t} is sample i's reward-to-go from t and b_i is the mean
    *sequence* return G_{j,0} of the other k-1 samples of the same prompt.
    Why: b_i depends only on the other samples, which are independent of sample i's actions, so
    the gradient stays unbiased; the reward-to-go keeps causality (a token is not credited with
    KL penalties paid before it). At t = 0 this is rloo_advantages of the sequence returns. The
    baseline is constant along the sequence, so it is a weaker baseline at late tokens when
    rewards are spread over time; with the score at EOS dominating, G_{i,t} ~ G_{i,0}.
    """
    mask = mask.bool()
    returns = discounted_returns(rewards, mask, gamma)  # (B, T)
    # sequence return = discounted sum from the first token (= returns[:, 0] for prefix spans)
    discounts = gamma ** torch.arange(rewards.shape[1], dtype=returns.dtype, device=returns.device)
    seq_returns = _zero_masked(rewards * discounts, mask).sum(-1)  # (B,)
    baseline = _leave_one_out_baseline(seq_returns, k)  # (B,)
    return _zero_masked(returns - baseline.unsqueeze(-1), mask)
