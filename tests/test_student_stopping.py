"""Two knobs for a cut student that does not stop (issue #20): `distill.eos_weight` (`rl.losses.eos_state_weights`:
per-state weights 1 + (w - 1) p_teacher(EOS), against hand-computed values, and their effect on the loss of tiny
random models, both logits paths) and `distill.student_temperature` (the student's own rollouts sampled at their own
temperature)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import RecipeError
from pipeline.rl import masked_sum
from pipeline.rl.losses import eos_state_weights
from pipeline.onpolicy import Throughput, response_logits
from pipeline.rl.losses import divergence_fn, topk_forward_kl
from pipeline.stages.distill import Distill, make_loss_fn, make_rollout
from test_student_options import PREC, PROMPTS, cfg_for, pair


def test_weights_match_hand_computation():
    # Two states over a vocabulary of 3, EOS = token 2. Teacher p = (.5, .3, .2) and (.1, .1, .8).
    t = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]]).log()
    w = eos_state_weights(t, eos_id=2, weight=5.0)
    # 1 + 4 * .2 = 1.8 and 1 + 4 * .8 = 4.2
    torch.testing.assert_close(w, torch.tensor([[1.8, 4.2]]))
    # weight 0 drops the stopping states' share: 1 - .2 = .8 and 1 - .8 = .2
    torch.testing.assert_close(eos_state_weights(t, 2, 0.0), torch.tensor([[0.8, 0.2]]))
    # weight 1: no reweighting
    torch.testing.assert_close(eos_state_weights(t, 2, 1.0), torch.ones(1, 2))


def test_weights_use_the_temperature_and_shifted_logits():
    # Logits shifted by a constant give the same softmax; at temperature 2, p = softmax(log p / 2) ~ sqrt(p):
    # state 1: sqrt(.5), sqrt(.3), sqrt(.2) -> p_eos = .4472 / (.7071 + .5477 + .4472) = 0.26275
    t = torch.tensor([[[0.5, 0.3, 0.2]]]).log() + 7.0
    w = eos_state_weights(t, 2, 3.0, temperature=2.0)
    p = math.sqrt(0.2) / (math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2))
    assert p == pytest.approx(0.26275, abs=1e-5)
    assert w.item() == pytest.approx(1 + 2 * p, abs=1e-6)
    assert w.dtype == torch.float32 and not w.requires_grad


def test_negative_weight_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        eos_state_weights(torch.zeros(1, 1, 3), 2, -1.0)


@pytest.mark.parametrize("chunk", [0, 5])
def test_eos_weight_reweights_each_states_loss(chunk):
    """The weighted loss is sum over states of w * (divergence + coef * top-k term) / n_tokens, with w from the
    teacher's logits; eos_weight 1 leaves the loss as it was."""
    torch.manual_seed(0)
    models = pair()
    kw = dict(logits_chunk_size=chunk, topk_forward_kl_coef=0.5, topk_forward_kl_k=3)
    batch, _ = make_rollout(models, PROMPTS[:4], cfg_for(**kw), 0.0, PREC, Throughput(),
                            torch.Generator().manual_seed(0), student_pass=False)
    n = float(batch.n_tokens) + 3.0
    loss_off, stats_off = make_loss_fn(models, cfg_for(**kw), PREC)(batch, n)
    loss_one, _ = make_loss_fn(models, cfg_for(eos_weight=1.0, **kw), PREC)(batch, n)
    assert loss_one.item() == pytest.approx(loss_off.item(), rel=1e-6)
    loss_on, stats_on = make_loss_fn(models, cfg_for(eos_weight=20.0, **kw), PREC)(batch, n)
    w = eos_state_weights(batch.teacher_logits[..., :models.vocab_size], models.tokenizer.eos_token_id, 20.0)
    mask = batch.response_mask.bool()
    assert float((w[mask] - 1).max()) > 1e-3  # the teacher puts some mass on EOS: the weights are not all 1
    # Each state's unweighted loss (divergence + 0.5 x top-k term), from the student's logits; the weighted loss is
    # their w-weighted sum / n, not a common factor on the whole.
    with torch.no_grad():
        logits = response_logits(models.student, batch)[..., :models.vocab_size]
        t = batch.teacher_logits[..., :models.vocab_size]
        per_state = divergence_fn("reverse_kl")(logits, t) + 0.5 * topk_forward_kl(logits, t, k=3)
    assert float(masked_sum(per_state, mask)) / n == pytest.approx(loss_off.item(), rel=1e-4)
    assert loss_on.item() == pytest.approx(float(masked_sum(per_state * w, mask)) / n, rel=1e-4)
    assert loss_on.item() > loss_off.item()  # weights >= 1 with some > 1
    assert "eos_state_weight" in stats_on and "eos_state_weight" not in stats_off
    assert float(stats_on["divergence"]) == pytest.approx(float(stats_off["divergence"]), rel=1e-5)


def test_eos_weight_needs_the_full_estimator():
    with pytest.raises(RecipeError, match="eos_weight.*estimator: full"):
        Distill(pair(), PROMPTS, cfg_for(eos_weight=3.0, estimator="sampled"), PREC)
    with pytest.raises(RecipeError, match="eos_weight. must be >= 0"):
        Distill(pair(), PROMPTS, cfg_for(eos_weight=-1.0), PREC)


# ------------------------------------------------------------------------------ the student's rollout temperature


def _student_texts(cfg, seed):
    torch.manual_seed(0)
    models = pair()
    torch.manual_seed(seed)  # the sampler draws from the global generator
    batch, info = make_rollout(models, PROMPTS[:4], cfg, 0.0, PREC, Throughput(), torch.Generator().manual_seed(0),
                               student_pass=False)
    assert not batch.from_teacher.any()
    return [r.tolist() for r in batch.response_ids]


def test_student_temperature_sets_the_students_sampling_only():
    """At student_temperature 0.01 the student's rollouts are its argmax path whatever the seed; at the loss's
    temperature (1.0) two seeds give different samples."""
    hot = cfg_for(temperature=1.0)
    cold = cfg_for(temperature=1.0, student_temperature=0.01)
    assert _student_texts(hot, 1) != _student_texts(hot, 2)
    assert _student_texts(cold, 1) == _student_texts(cold, 2)


def test_student_temperature_is_checked():
    with pytest.raises(RecipeError, match="student_temperature. must be > 0"):
        Distill(pair(), PROMPTS, cfg_for(student_temperature=0.0), PREC)
    with pytest.raises(RecipeError, match="student_temperature.*estimator: full"):
        Distill(pair(), PROMPTS, cfg_for(student_temperature=0.1, estimator="sampled"), PREC)
