"""PPO losses: clipping gradients, value clipping, accumulation invariance, NaN safety."""

import math

import torch

from pipeline.rl.losses import entropy_bonus, explained_variance, kl_loss, policy_loss, value_loss

NAN, INF = float("nan"), float("inf")
EPS = 0.2


def _grad_of_policy_loss(ratio, advantage):
    """d loss / d logprob for one token with the given ratio and advantage."""
    logprobs = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-math.log(ratio)]])  # ratio = exp(0 - old)
    loss, _ = policy_loss(logprobs, old, torch.tensor([[advantage]]), torch.tensor([[True]]), EPS)
    (g,) = torch.autograd.grad(loss, logprobs)
    return loss.item(), g.item()


def test_clipped_policy_gradient_is_zero_exactly_where_clipped():
    # A > 0, ratio 1.5 > 1 + ε: objective clipped at (1 + ε) A -> loss = -1.2, gradient 0
    loss, g = _grad_of_policy_loss(1.5, 1.0)
    assert abs(loss + 1.2) < 1e-6 and g == 0.0
    # A < 0, ratio 0.5 < 1 - ε: clipped at (1 - ε) A -> loss = 0.8, gradient 0
    loss, g = _grad_of_policy_loss(0.5, -1.0)
    assert abs(loss - 0.8) < 1e-6 and g == 0.0
    # other side: A < 0 with ratio 1.5 is NOT clipped: loss = -A r = 1.5, d/dlogp = -A r = 1.5
    loss, g = _grad_of_policy_loss(1.5, -1.0)
    assert abs(loss - 1.5) < 1e-6 and abs(g - 1.5) < 1e-6
    # A > 0 with ratio 0.5 is NOT clipped: loss = -0.5, d/dlogp = -A r = -0.5
    loss, g = _grad_of_policy_loss(0.5, 1.0)
    assert abs(loss + 0.5) < 1e-6 and abs(g + 0.5) < 1e-6


def test_policy_loss_stats():
    # ratios [1.5, 1.0, 0.9] over 3 counted tokens: one outside [0.8, 1.2] -> clipfrac 1/3
    logprobs = torch.tensor([[math.log(1.5), 0.0, math.log(0.9), NAN]])
    old = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    _, stats = policy_loss(logprobs, old, torch.ones(1, 4), mask, EPS)
    assert abs(stats["clipfrac"].item() - 1 / 3) < 1e-6
    assert abs(stats["ratio_mean"].item() - (1.5 + 1.0 + 0.9) / 3) < 1e-6
    # approx_kl = mean of (r - 1) - log r
    k3 = [(r - 1) - math.log(r) for r in (1.5, 1.0, 0.9)]
    assert abs(stats["approx_kl"].item() - sum(k3) / 3) < 1e-6
    assert all(not v.requires_grad for v in stats.values())


def test_value_loss_clip_hand_values():
    # V_old = 0, ε_v = 0.2
    # token 1: V = 0.5, R = 1: unclipped (0.5-1)^2 = 0.25, clipped V = 0.2: (0.2-1)^2 = 0.64 -> max 0.64
    # token 2: V = 0.5, R = 0: unclipped 0.25, clipped (0.2-0)^2 = 0.04 -> max 0.25
    # loss = 0.5 * (0.64 + 0.25) / 2 = 0.2225
    values = torch.tensor([[0.5, 0.5, NAN]])
    old_values = torch.tensor([[0.0, 0.0, NAN]])
    returns = torch.tensor([[1.0, 0.0, INF]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_coef_v=0.2)
    assert abs(loss.item() - 0.2225) < 1e-6
    assert abs(stats["vf_clipfrac"].item() - 0.5) < 1e-6
    # unclipped: 0.5 * (0.25 + 0.25) / 2 = 0.125
    loss, _ = value_loss(values, old_values, returns, mask, clip_coef_v=None)
    assert abs(loss.item() - 0.125) < 1e-6


def test_entropy_bonus_and_kl_loss_hand_values():
    mask = torch.tensor([[1, 1, 0]])
    # mean entropy over counted tokens: (1 + 2) / 2
    assert entropy_bonus(torch.tensor([[1.0, 2.0, NAN]]), mask).item() == 1.5
    # k3 with p = 0.5, p_ref = 0.25: 0.1931472 on both counted tokens
    lp = torch.tensor([[math.log(0.5), math.log(0.5), NAN]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25), -INF]])
    assert abs(kl_loss(lp, ref, mask).item() - 0.1931472) < 1e-6
    assert abs(kl_loss(lp, ref, mask, kind="k1").item() - math.log(2)) < 1e-6
    # normaliser from the caller: sum 2 * 0.1931472 / 4
    assert abs(kl_loss(lp, ref, mask, loss_norm_tokens=4).item() - 0.0965736) < 1e-6


def test_explained_variance():
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, NAN]])
    assert explained_variance(returns, returns, mask).item() == 1.0  # perfect critic
    # V = mean(R) = 2 -> Var[R - V] = Var[R] -> 0
    assert abs(explained_variance(torch.full((1, 4), 2.0), returns, mask).item()) < 1e-6
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask).item())  # Var[R] = 0


def _random_minibatch(seed, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    old = torch.randn(B, T, generator=g) - 1.0
    logprobs = old + 0.3 * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    values, old_values, returns = (torch.randn(B, T, generator=g) for _ in range(3))
    return logprobs, old, advantages, values, old_values, returns, mask


def _losses(lp, old, adv, v, old_v, ret, mask, n_tokens):
    pg, _ = policy_loss(lp, old, adv, mask, EPS, loss_norm_tokens=n_tokens)
    vf, _ = value_loss(v, old_v, ret, mask, 0.2, loss_norm_tokens=n_tokens)
    return pg + 0.5 * vf - 0.01 * entropy_bonus(-lp, mask, n_tokens)


def test_gradient_accumulation_invariance():
    for seed in range(3):
        lp, old, adv, v, old_v, ret, mask = _random_minibatch(seed)
        lp.requires_grad_(True)
        v.requires_grad_(True)
        full = _losses(lp, old, adv, v, old_v, ret, mask, n_tokens=None)
        g_full = torch.autograd.grad(full, (lp, v))
        for splits in ([3, 3], [1, 2, 3]):
            n_tokens = mask.sum()  # total counted tokens in the whole minibatch
            parts = zip(*(t.split(splits) for t in (lp, old, adv, v, old_v, ret, mask)))
            accumulated = sum(_losses(*part, n_tokens=n_tokens) for part in parts)
            g_acc = torch.autograd.grad(accumulated, (lp, v))
            assert torch.allclose(accumulated, full, rtol=1e-6)
            for a, b in zip(g_acc, g_full):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_nan_in_masked_slots_does_not_poison_loss_or_gradient():
    lp, old, adv, v, old_v, ret, mask = _random_minibatch(0)
    mask[0, -1] = False
    for t, bad in ((lp, NAN), (old, INF), (adv, NAN), (v, INF), (old_v, NAN), (ret, -INF)):
        t[~mask] = bad
    lp.requires_grad_(True)
    v.requires_grad_(True)
    loss = _losses(lp, old, adv, v, old_v, ret, mask, n_tokens=None)
    loss = loss + kl_loss(lp, old, mask, "k3")
    loss.backward()
    assert torch.isfinite(loss)
    for leaf in (lp, v):
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad[~mask] == 0).all()  # masked tokens get exactly zero gradient
    _, stats = policy_loss(lp, old, adv, mask, EPS)
    assert all(torch.isfinite(s) for s in stats.values())
