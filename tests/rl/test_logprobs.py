"""Log-probs, entropy and masked reductions against hand computations."""

import math

import torch
import torch.nn.functional as F

from pipeline.rl.logprobs import entropy_from_logits, logprobs_from_logits
from pipeline.rl.masks import masked_mean, masked_sum, masked_var, masked_whiten


def _manual_logprob(logits_row, token, temperature=1.0):
    # log p(a) = z_a/τ - log Σ_v exp(z_v/τ), written out with math
    z = [x / temperature for x in logits_row]
    return z[token] - math.log(sum(math.exp(x) for x in z))


def test_logprobs_match_manual_softmax():
    # one position, logits [1, 2, 3]: log Σ e^z = 3 + log(1 + e^-1 + e^-2) = 3.4076060
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    for token, expected in [(2, -0.4076060), (0, -2.4076060), (1, -1.4076060)]:
        lp = logprobs_from_logits(logits, torch.tensor([[token]]))
        assert torch.allclose(lp, torch.tensor([[expected]]), atol=1e-6)


def test_logprobs_temperature_scaling():
    # τ = 2 divides the logits: [0.5, 1.0, 1.5], log Σ e^z = 1.5 + log(1 + e^-0.5 + e^-1) = 2.1802696
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]]])
    tokens = torch.tensor([[2, 1, 0]])
    lp = logprobs_from_logits(logits, tokens, temperature=2.0)
    assert abs(lp[0, 0].item() - (1.5 - 2.1802696)) < 1e-6
    assert abs(lp[0, 1].item() - math.log(1 / 3)) < 1e-6  # uniform stays uniform
    expected = [_manual_logprob(row, tok, 2.0) for row, tok in zip(logits[0].tolist(), tokens[0].tolist())]
    assert torch.allclose(lp[0], torch.tensor(expected), atol=1e-6)


def test_logprobs_batch_float32_and_gradient_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 4))
    lp = logprobs_from_logits(logits, tokens, temperature=0.7)
    ref = F.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-6)
    (g,) = torch.autograd.grad(lp.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(g, g_ref, atol=1e-6)
    # bf16 logits are computed in float32
    assert logprobs_from_logits(logits.detach().bfloat16(), tokens).dtype == torch.float32


def test_entropy_hand_values():
    # uniform over 4: H = log 4. logits [0, log 3] -> p = [1/4, 3/4]:
    # H = -(0.25 log 0.25 + 0.75 log 0.75) = 0.5623351
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf]]])
    h = entropy_from_logits(logits)
    assert torch.allclose(h, torch.tensor([[math.log(4), 0.5623351]]), atol=1e-6)
    # τ = 2: logits [0, log(3)/2] -> p ∝ [1, √3] = [0.3660254, 0.6339746]
    p = torch.tensor([1.0, math.sqrt(3)]) / (1 + math.sqrt(3))
    h2 = entropy_from_logits(logits, temperature=2.0)
    assert abs(h2[0, 1].item() - (-(p * p.log()).sum().item())) < 1e-6
    assert abs(h2[0, 0].item() - math.log(4)) < 1e-6  # uniform is temperature-invariant


def test_entropy_gradient_finite_with_filtered_vocab():
    logits = torch.tensor([[[0.0, 1.0, -math.inf]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_mean_sum_var_hand_values():
    # counted entries: 1, 2, 3, 6 -> sum 12, mean 3,
    # squared deviations 4 + 1 + 0 + 9 = 14 -> biased var 14/4 = 3.5, unbiased 14/3
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_sum(x, mask).item() == 12.0
    assert masked_mean(x, mask).item() == 3.0
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.5]))
    assert abs(masked_var(x, mask, unbiased=False).item() - 3.5) < 1e-6
    assert abs(masked_var(x, mask).item() - 14 / 3) < 1e-6
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask: 0, not NaN


def test_masked_whiten_ignores_nan_and_inf_in_masked_slots():
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    poisoned = x.clone()
    poisoned[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), 7.0, 1e30])[
        : int((~mask).sum())
    ]
    zeroed = torch.where(mask, x, 0.0)
    for shift_mean in (True, False):
        w = masked_whiten(poisoned, mask, shift_mean=shift_mean)
        assert torch.isfinite(w).all()
        assert torch.equal(w, masked_whiten(zeroed, mask, shift_mean=shift_mean))
        assert (w[~mask] == 0).all()
    w = masked_whiten(poisoned, mask)
    counted = x[mask]
    # whitened over ALL counted tokens of the batch (unbiased var, as TRL/torchtune)
    expected = (counted - counted.mean()) / counted.std(unbiased=True)
    assert torch.allclose(w[mask], expected, atol=1e-5)
    assert abs(w[mask].mean().item()) < 1e-6
    # shift_mean=False keeps the mean
    assert abs(masked_whiten(x, mask, shift_mean=False)[mask].mean().item() - counted.mean().item()) < 1e-5
