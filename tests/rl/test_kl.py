"""KL estimators, full-vocabulary divergences and KL controllers against hand computations."""

import math

import pytest
import torch

from pipeline.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    forward_kl_full,
    generalized_jsd_full,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    reverse_kl_full,
)

LOG = math.log


def test_per_token_estimators_hand_values():
    # p = 0.5, p_ref = 0.25 -> r = p_ref / p = 0.5, log r = -log 2
    # k1 = -log r = 0.6931472; k2 = (log r)^2 / 2 = 0.2402265; k3 = (r - 1) - log r = -0.5 + 0.6931472
    lp, ref = torch.tensor([[LOG(0.5)]]), torch.tensor([[LOG(0.25)]])
    assert abs(kl_k1(lp, ref).item() - 0.6931472) < 1e-6
    assert abs(kl_k2(lp, ref).item() - 0.2402265) < 1e-6
    assert abs(kl_k3(lp, ref).item() - 0.1931472) < 1e-6
    assert abs(kl_penalty(lp, ref, "abs").item() - 0.6931472) < 1e-6
    # p = 0.25, p_ref = 0.5 -> r = 2: k1 = -log 2 < 0, k3 = 1 - log 2 = 0.3068528 > 0
    assert abs(kl_penalty(ref, lp, "k1").item() + 0.6931472) < 1e-6
    assert abs(kl_penalty(ref, lp, "k3").item() - 0.3068528) < 1e-6
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")


def test_identical_policies_have_zero_kl():
    torch.manual_seed(0)
    lp = torch.randn(3, 4)
    for kind in ("k1", "k2", "k3", "abs"):
        assert torch.equal(kl_penalty(lp, lp, kind), torch.zeros(3, 4))
    logits = torch.randn(2, 3, 5)
    for fn in (reverse_kl_full, forward_kl_full):
        assert torch.allclose(fn(logits, logits), torch.zeros(2, 3), atol=1e-6)
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert torch.allclose(generalized_jsd_full(logits, logits, beta), torch.zeros(2, 3), atol=1e-6)


def _two_token_case():
    # student p_s = [0.5, 0.5], teacher p_t = [0.9, 0.1]
    student = torch.tensor([[[0.0, 0.0]]])
    teacher = torch.tensor([[[LOG(0.9), LOG(0.1)]]])
    return student, teacher


def test_full_reverse_and_forward_kl_hand_values():
    student, teacher = _two_token_case()
    # reverse KL(p_s || p_t) = 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1) = -0.2938933 + 0.8047190 = 0.5108256
    assert abs(reverse_kl_full(student, teacher).item() - 0.5108256) < 1e-6
    # forward KL(p_t || p_s) = 0.9 log(0.9/0.5) + 0.1 log(0.1/0.5) = 0.5290080 - 0.1609438 = 0.3680642
    assert abs(forward_kl_full(student, teacher).item() - 0.3680642) < 1e-6


def test_full_kl_temperature():
    student, teacher = _two_token_case()
    # τ = 2 on the teacher logits [log .9, log .1] -> p_t ∝ [√.9, √.1] = [0.75, 0.25]; p_s stays uniform.
    # reverse KL = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25) = 0.5 (-0.4054651 + 0.6931472) = 0.1438410
    assert abs(reverse_kl_full(student, teacher, temperature=2.0).item() - 0.1438410) < 1e-6


def test_sampled_estimators_average_to_full_kl():
    # E_{a~p}[k1] = E_{a~p}[k3] = KL(p || ref): summing over the vocabulary with weights p is exact
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    lp, ref = student.log_softmax(-1), teacher.log_softmax(-1)
    full = reverse_kl_full(student, teacher)
    for kind in ("k1", "k3"):
        assert torch.allclose((lp.exp() * kl_penalty(lp, ref, kind)).sum(-1), full, atol=1e-5)


def test_generalized_jsd_hand_value_and_limits():
    student, teacher = _two_token_case()
    # β = 0.5: m = [0.7, 0.3]
    # KL(p_t || m) = 0.9 log(0.9/0.7) + 0.1 log(0.1/0.3) = 0.2261830 - 0.1098612 = 0.1163218
    # KL(p_s || m) = 0.5 log(0.5/0.7) + 0.5 log(0.5/0.3) = -0.1682361 + 0.2554128 = 0.0871767
    # JSD = 0.5 * 0.1163218 + 0.5 * 0.0871767 = 0.1017492
    assert abs(generalized_jsd_full(student, teacher, 0.5).item() - 0.1017492) < 1e-6
    # endpoints: β = 0 is forward KL, β = 1 is reverse KL (limits of JSD_β/β and JSD_β/(1-β))
    assert torch.allclose(generalized_jsd_full(student, teacher, 0.0), forward_kl_full(student, teacher))
    assert torch.allclose(generalized_jsd_full(student, teacher, 1.0), reverse_kl_full(student, teacher))
    beta = 1e-4
    near0 = generalized_jsd_full(student, teacher, beta) / beta
    near1 = generalized_jsd_full(student, teacher, 1 - beta) / beta
    assert torch.allclose(near0, forward_kl_full(student, teacher), rtol=1e-2)
    assert torch.allclose(near1, reverse_kl_full(student, teacher), rtol=1e-2)


def test_generalized_jsd_symmetry_and_bounds():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    # JSD_β(s, t) = JSD_{1-β}(t, s); at β = 0.5 it is symmetric
    for beta in (0.2, 0.5, 0.9):
        a = generalized_jsd_full(student, teacher, beta)
        b = generalized_jsd_full(teacher, student, 1 - beta)
        assert torch.allclose(a, b, atol=1e-6)
        # 0 <= JSD_β <= H(β) = -β log β - (1-β) log(1-β)
        bound = -beta * LOG(beta) - (1 - beta) * LOG(1 - beta)
        assert (a >= -1e-7).all() and (a <= bound + 1e-6).all()


def test_full_divergences_reject_mismatched_vocab():
    with pytest.raises(ValueError, match="shared vocabulary"):
        reverse_kl_full(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


def test_full_divergences_work_row_by_row_with_bf16_and_grad():
    torch.manual_seed(3)
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5)
    out = reverse_kl_full(student.bfloat16(), teacher.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    generalized_jsd_full(student, teacher, 0.3).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_adaptive_controller_moves_towards_target():
    # Ziegler et al.: e = clip(KL/target - 1, ±0.2); β *= 1 + e * n_steps / horizon
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=100)  # e = clip(1.0) = 0.2 -> β = 0.1 * 1.002
    assert abs(ctl.value - 0.1002) < 1e-12
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(current_kl=3.0, n_steps=100)  # e = clip(-0.5) = -0.2 -> β = 0.1 * 0.998
    assert abs(ctl.value - 0.0998) < 1e-12
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(current_kl=6.6, n_steps=1000)  # e = 0.1 (inside the clip) -> β = 0.1 * 1.01
    assert abs(ctl.value - 0.101) < 1e-12


def test_fixed_controller_never_moves_and_state_round_trips():
    fixed = FixedKLController(kl_coef=0.05)
    for kl in (0.0, 1.0, 100.0):
        fixed.update(kl, n_steps=1000)
    assert fixed.value == 0.05

    ctl = AdaptiveKLController(0.1, 6.0, 100)
    for _ in range(5):
        ctl.update(20.0, n_steps=10)
    resumed = AdaptiveKLController(0.1, 6.0, 100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value != 0.1
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_student_state_figures_equal_the_separate_functions():
    """The stacked figures share each side's log-softmax; the values are those of reverse_kl_full,
    forward_kl_full and entropy_from_logits, bit for bit, with -inf (filtered) logits on either side."""
    from pipeline.rl.kl import STATE_FIGURES, student_state_figures, student_state_figures_stacked
    from pipeline.rl.logprobs import entropy_from_logits

    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 40) * 4, torch.randn(3, 5, 40) * 4
    s[0, 1, :7] = float("-inf")
    t[2, 3, 5:9] = float("-inf")
    for dtype in (torch.float32, torch.bfloat16):
        sd, td = s.to(dtype), t.to(dtype)
        stacked = student_state_figures_stacked(sd, td)
        assert stacked.shape == (3, 5, 3) and stacked.dtype == torch.float32
        expected = {"reverse_kl": reverse_kl_full(sd, td), "forward_kl": forward_kl_full(sd, td),
                    "entropy": entropy_from_logits(sd)}
        assert not torch.isnan(stacked).any()  # inf where one side gives 0 to a token the other does not
        for i, name in enumerate(STATE_FIGURES):
            assert torch.equal(stacked[..., i], expected[name])
            assert torch.equal(student_state_figures(sd, td)[name], expected[name])


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_full_kl_matches_autograd_composition(name, temperature):
    """reverse_kl_full / forward_kl_full run a closed-form backward (kl.py); values and gradients equal autograd's
    through the plain composition (`_kl_rows` of the two log-softmaxes) in float64, with -inf (filtered) student
    logits, and torch.autograd.gradcheck passes."""
    from pipeline.rl.kl import _kl_rows

    torch.manual_seed(0)
    s = (torch.randn(3, 5, 30, dtype=torch.float64) * 3)
    s[1, 2, :4] = float("-inf")
    t = torch.randn(3, 5, 30, dtype=torch.float64) * 3
    fused = {"reverse_kl": reverse_kl_full, "forward_kl": forward_kl_full}[name]
    ours_in = s.clone().requires_grad_(True)
    ours = fused(ours_in, t, temperature)
    ref_in = s.clone().requires_grad_(True)
    lp_s = torch.log_softmax(ref_in / temperature, -1)
    lp_t = torch.log_softmax(t / temperature, -1)
    ref = _kl_rows(lp_s, lp_t) if name == "reverse_kl" else _kl_rows(lp_t, lp_s)
    finite = torch.isfinite(ref)
    assert finite.sum() >= 14 and torch.equal(torch.isfinite(ours), finite)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=0, atol=1e-12)
    w = torch.randn(3, 5, dtype=torch.float64)
    (ours[finite] * w[finite]).sum().backward()
    (ref[finite] * w[finite]).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-10)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: fused(a, y, temperature), (x,))


def test_full_kl_keeps_the_teachers_gradient_when_it_has_one():
    """A teacher side with requires_grad (not the pipeline's use) takes autograd's composition: gradients to both."""
    s = torch.randn(2, 3, 10, requires_grad=True)
    t = torch.randn(2, 3, 10, requires_grad=True)
    (reverse_kl_full(s, t).sum() + forward_kl_full(s, t).sum()).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_reverse_kl_with_figures_equals_the_separate_functions():
    from pipeline.rl.kl import reverse_kl_with_figures, student_state_figures_stacked

    torch.manual_seed(1)
    s = torch.randn(2, 4, 25, dtype=torch.float64) * 3
    s[0, 0, :5] = float("-inf")
    t = torch.randn(2, 4, 25, dtype=torch.float64) * 3
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    kl, figures = reverse_kl_with_figures(a, t)
    assert not figures.requires_grad
    torch.testing.assert_close(kl, reverse_kl_full(b, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(figures, student_state_figures_stacked(s, t), rtol=0, atol=1e-12)
    w = torch.randn(2, 4, dtype=torch.float64)
    (kl * w).sum().backward()
    (reverse_kl_full(b, t) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="temperature 1"):
        reverse_kl_with_figures(a, t, temperature=0.5)
