"""`rl.losses.topk_forward_kl`: KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest,
against hand-computed values and gradients, its limits, NaN safety, and the chunked path (`chunked_divergences`)."""

import functools
import math

import pytest
import torch

from pipeline.rl.chunked import chunked_divergence, chunked_divergences
from pipeline.rl.kl import forward_kl_full, reverse_kl_full
from pipeline.rl.losses import topk_forward_kl

# One state, a vocabulary of 4. Teacher p_t = (.5, .3, .15, .05), student p_s = (.4, .1, .3, .2); logits = log-probs.
P_T = [0.5, 0.3, 0.15, 0.05]
P_S = [0.4, 0.1, 0.3, 0.2]


def _logits(p):
    return torch.tensor([[p]], dtype=torch.float64).log()


def test_top2_with_tail_bucket_matches_hand_computation():
    # k = 2: the teacher's top tokens are 0 and 1 (.5, .3), its tail 1 - .8 = .2; the student puts .4 and .1 on
    # them, so its tail is 1 - .5 = .5. KL = .5 ln(.5/.4) + .3 ln(.3/.1) + .2 ln(.2/.5)
    #   = .5 (0.2231436) + .3 (1.0986123) + .2 (-0.9162907) = 0.1115718 + 0.3295837 - 0.1832581 = 0.2578973
    got = topk_forward_kl(_logits(P_S), _logits(P_T), k=2)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(0.2578973, abs=1e-6)
    # Coarser than the full forward KL over 4 outcomes (0.2678687 = .1115718 + .3295837 - .1039721 - .0693147).
    full = forward_kl_full(_logits(P_S), _logits(P_T)).item()
    assert full == pytest.approx(0.2678687, abs=1e-6) and got.item() < full


def test_top2_gradient_matches_hand_computation():
    # d KL / d z_v = p_s(v) - q_v on the top-k tokens, p_s(v) - q_tail * p_s(v) / s_tail on the others:
    #   v0: .4 - .5 = -.1;  v1: .1 - .3 = -.2;  v2: .3 - .2 * .3 / .5 = .18;  v3: .2 - .2 * .2 / .5 = .12
    z = _logits(P_S).requires_grad_(True)
    topk_forward_kl(z, _logits(P_T), k=2).sum().backward()
    torch.testing.assert_close(z.grad[0, 0], torch.tensor([-0.1, -0.2, 0.18, 0.12], dtype=torch.float64),
                               atol=1e-9, rtol=1e-7)


def test_gradcheck_teacher_is_constant_and_temperature_scales_both():
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 3, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 3 * torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: topk_forward_kl(x, t, k=3, temperature=0.7), (s,))
    t_leaf = t.clone().requires_grad_(True)
    topk_forward_kl(s, t_leaf, k=3).sum().backward()
    assert t_leaf.grad is None  # the teacher is a target, not trained
    # Temperature divides both sides' logits, as the main divergence does.
    torch.testing.assert_close(topk_forward_kl(s, t, k=3, temperature=2.0), topk_forward_kl(s / 2, t / 2, k=3))


def test_limits_k_covers_the_vocabulary_and_k_one():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    # k >= V: no tail, every token its own outcome: the full forward KL.
    for k in (5, 50):
        torch.testing.assert_close(topk_forward_kl(s, t, k=k), forward_kl_full(s, t))
    # k = 1: a Bernoulli KL between "the teacher's top token" and "anything else".
    q = torch.softmax(t, -1).amax(-1)
    p = torch.softmax(s, -1).gather(-1, torch.softmax(t, -1).argmax(-1, keepdim=True)).squeeze(-1)
    want = q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()
    torch.testing.assert_close(topk_forward_kl(s, t, k=1), want)
    # Equal distributions: 0.
    assert topk_forward_kl(t, t, k=2).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="k must be"):
        topk_forward_kl(s, t, k=0)


def test_teacher_without_tail_mass_gives_finite_values_and_gradients():
    # The teacher puts all its mass on 2 tokens (-inf elsewhere): the tail bucket holds 0 and adds 0.
    t = torch.tensor([[[0.0, math.log(3.0), float("-inf"), float("-inf")]]], dtype=torch.float64)
    z = _logits(P_S).requires_grad_(True)
    out = topk_forward_kl(z, t, k=2)
    out.sum().backward()
    q = [0.25, 0.75]
    want = q[0] * math.log(q[0] / 0.4) + q[1] * math.log(q[1] / 0.1)  # the tail .5 of the student costs nothing
    assert out.item() == pytest.approx(want, abs=1e-9)
    assert torch.isfinite(z.grad).all()
    # d/dz_v = p_s(v) - q_v on the top 2, p_s(v) on the others (q_tail = 0).
    torch.testing.assert_close(z.grad[0, 0], torch.tensor([0.4 - 0.25, 0.1 - 0.75, 0.3, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [0, 1, 4, 64])
def test_chunked_divergences_give_each_term_and_its_gradient(chunk_size):
    """The chunked path computes the main divergence and the top-k term from the same chunks of logits; both and
    their summed gradient equal the unchunked functions on the full logits."""
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 2, 5, 6, 9
    head = torch.nn.Linear(H, V + 3, bias=False).double()  # an output layer padded beyond the vocabulary
    with torch.no_grad():
        head.weight.mul_(5.0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    teacher = 4 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    topk = functools.partial(topk_forward_kl, k=3)

    h1 = hidden.clone().requires_grad_(True)
    rkl, tk = chunked_divergences(h1, head, teacher, [reverse_kl_full, topk], None, 0.8, chunk_size, V)
    (rkl.sum() + 0.5 * tk.sum()).backward()
    g_chunked = (h1.grad.clone(), head.weight.grad.clone())
    head.zero_grad()

    h2 = hidden.clone().requires_grad_(True)
    logits = head(h2)[..., :V]
    want_rkl, want_tk = reverse_kl_full(logits, teacher, 0.8), topk(logits, teacher, temperature=0.8)
    (want_rkl.sum() + 0.5 * want_tk.sum()).backward()
    torch.testing.assert_close(rkl, want_rkl)
    torch.testing.assert_close(tk, want_tk)
    torch.testing.assert_close(g_chunked[0], h2.grad)
    torch.testing.assert_close(g_chunked[1], head.weight.grad)
    # The one-divergence entry point is the same computation.
    with torch.no_grad():
        torch.testing.assert_close(chunked_divergence(hidden, head, teacher, None, "reverse_kl", 0.8, chunk_size, V),
                                   want_rkl.detach())
