"""Returns, GAE, REINFORCE and RLOO against hand computations and a plain-Python loop."""

import pytest
import torch

from pipeline.rl.advantages import (
    discounted_returns,
    gae,
    reinforce_advantages,
    rloo_advantages,
    rloo_token_advantages,
    spread_over_tokens,
    token_level_rewards,
)

NAN, INF = float("nan"), float("inf")


def _prefix_mask(lengths, T):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _gae_double_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE per sequence: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t, V_L = 0."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = lengths[b]
        deltas = [
            rewards[b][t] + gamma * (values[b][t + 1] if t + 1 < L else 0.0) - values[b][t] for t in range(L)
        ]
        for t in range(L):
            adv[b][t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t))
    return torch.tensor(adv)


def _random_case(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[0], lengths[1] = T, 1  # always cover a full row and a single-token row
    mask = _prefix_mask(lengths, T)
    # garbage in padding must not matter
    rewards[~mask], values[~mask] = NAN, INF
    return rewards, values, mask, lengths


def test_gae_hand_values():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = λ = 1
    # δ = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]
    # A = [0.5, 0.4, 0.3] (= reward-to-go 1 minus V); returns = A + V = [1, 1, 1]
    rewards = torch.tensor([[0.0, 0.0, 1.0, NAN]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # γ = 0.5, λ = 0.5: δ = [0 + 0.3 - 0.5, 0 + 0.35 - 0.6, 1 - 0.7] = [-0.2, -0.25, 0.3]
    # A_2 = 0.3; A_1 = -0.25 + 0.25 * 0.3 = -0.175; A_0 = -0.2 + 0.25 * -0.175 = -0.24375
    adv, _ = gae(rewards, values, mask, gamma=0.5, gae_lambda=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.24375, -0.175, 0.3, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_double_loop(seed, gamma, lam):
    rewards, values, mask, lengths = _random_case(seed)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = _gae_double_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    assert torch.allclose(ret[mask], (expected + values.nan_to_num(posinf=0.0))[mask], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_limits(seed):
    rewards, values, mask, _ = _random_case(seed)
    # γ = λ = 1: A = reward-to-go - V (Monte Carlo)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    rtg = discounted_returns(rewards, mask, 1.0)
    assert torch.allclose(adv, torch.where(mask, rtg - values, 0.0), atol=1e-5)
    assert torch.allclose(ret, rtg, atol=1e-5)
    # λ = 0: A = δ_t = r_t + γ V_{t+1} - V_t, with V = 0 past the end
    gamma = 0.9
    adv0, _ = gae(rewards, values, mask, gamma, 0.0)
    v = torch.where(mask, values, 0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    delta = torch.where(mask, rewards + gamma * next_v - values, 0.0)
    assert torch.allclose(adv0, delta, atol=1e-6)


def test_discounted_returns_hand_values_stop_at_end():
    # row 0: r = [1, 2, 3], γ = 0.5 -> G = [1 + 0.5*(2 + 0.5*3), 2 + 0.5*3, 3] = [2.75, 3.5, 3]
    # row 1: only 2 valid tokens; the 100 in padding must not flow back: G = [1 + 0.5*2, 2, 0] = [2, 2, 0]
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    g = discounted_returns(rewards, mask, 0.5)
    assert torch.allclose(g, torch.tensor([[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]]))


def test_reinforce_advantages_baselines():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 3.0, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # reward-to-go (γ = 1): [[1, 1, 1], [3, 3, 0]]; batch mean over 5 counted tokens = 9/5 = 1.8
    none = reinforce_advantages(rewards, mask, 1.0, "none")
    assert torch.allclose(none, torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 0.0]]))
    mean = reinforce_advantages(rewards, mask, 1.0, "batch_mean")
    assert torch.allclose(mean, torch.tensor([[-0.8, -0.8, -0.8], [1.2, 1.2, 0.0]]))
    # A given mean (e.g. over all processes' rows) replaces the local one: 2.0 -> [[-1]*3, [1, 1, 0]]
    given = reinforce_advantages(rewards, mask, 1.0, "batch_mean", mean=lambda x, m: 2.0)
    assert torch.allclose(given, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError):
        reinforce_advantages(rewards, mask, 1.0, "critic")


def test_rloo_hand_values_k3():
    # prompt 1 scores [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> A = [-3, -1.5, 4.5]
    # prompt 2 scores [0, 0, 3]: baselines 1.5, 1.5, 0 -> A = [-1.5, -1.5, 3]
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    adv = rloo_advantages(scores, k=3)
    assert torch.allclose(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # equivalently k/(k-1) * (s - group mean)
    grouped = scores.view(2, 3)
    assert torch.allclose(adv, (1.5 * (grouped - grouped.mean(-1, keepdim=True))).view(-1))
    with pytest.raises(ValueError):
        rloo_advantages(scores, k=4)
    with pytest.raises(ValueError):
        rloo_advantages(scores, k=1)


def test_spread_over_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = spread_over_tokens(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_rloo_token_advantages_hand_values():
    # k = 3 samples of one prompt; per-token rewards = -KL penalty plus the score at the last token
    rewards = torch.tensor(
        [
            [-0.1, -0.1, 1.0],  # sequence return 0.8; reward-to-go [0.8, 0.9, 1.0]
            [-0.2, 2.0, NAN],  # sequence return 1.8; reward-to-go [1.8, 2.0, -]
            [0.0, 0.0, 0.3],  # sequence return 0.3; reward-to-go [0.3, 0.3, 0.3]
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    # LOO baselines of the sequence returns: (1.8+0.3)/2 = 1.05, (0.8+0.3)/2 = 0.55, (0.8+1.8)/2 = 1.3
    adv = rloo_token_advantages(rewards, mask, k=3)
    expected = torch.tensor([[-0.25, -0.15, -0.05], [1.25, 1.45, 0.0], [-1.0, -1.0, -1.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    # at t = 0 it is the sequence-level RLOO advantage of the sequence returns
    assert torch.allclose(adv[:, 0], rloo_advantages(torch.tensor([0.8, 1.8, 0.3]), 3), atol=1e-6)


def test_token_level_rewards_score_at_last_valid_token():
    # score goes on the last valid token (the EOS), never on padding; -kl_coef * kl on every counted token
    kl = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, NAN], [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    scores = torch.tensor([5.0, 7.0, NAN])
    r = token_level_rewards(scores, kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.1, -0.2, 5.0 - 0.3], [-0.1, 7.0 - 0.1, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(r, expected)
