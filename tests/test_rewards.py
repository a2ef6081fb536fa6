"""Reward math and scorers: Bradley-Terry by hand; the scorer is independent of batch position and
padding; the verifier reward is the share of IFEval instructions followed (harness verdicts)."""

import math

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline.config import ModelConfig
from pipeline.models import resolve_precision
from pipeline.rewards import RewardModelScorer, VerifierReward, WeightedSum, bradley_terry_loss


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-1) = log(1 + e) = 1.313262; mean 0.813262
    assert bradley_terry_loss(rc, rr).item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    # margin 0.5 on the first pair: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    m = torch.tensor([0.5, 0.0])
    assert bradley_terry_loss(rc, rr, m).item() == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.e)) / 2)
    # centering: (1 + 0)^2 = (0 + 1)^2 = 1, mean 1, times 0.1
    assert bradley_terry_loss(rc, rr, center_coef=0.1).item() == pytest.approx(0.813262 + 0.1, abs=1e-6)


@pytest.fixture(scope="module")
def scorer():
    from transformers import LlamaForSequenceClassification

    tok = build_tiny_tokenizer()
    cfg = build_tiny_model(tok).config
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    return RewardModelScorer(model, ModelConfig(cpu_autocast="off"), resolve_precision(ModelConfig(cpu_autocast="off")),
                             tokenizer=tok, batch_size=8)


def test_score_independent_of_batch_position_and_padding(scorer):
    prompt = [{"role": "user", "content": "write about the sea"}]
    alone = scorer.score([prompt], ["the sea is blue"])
    others = [([{"role": "user", "content": "hi"}], "yes"),
              ([{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 3}], "no " * 20)]
    for pos in range(3):
        rows = others[:pos] + [(prompt, "the sea is blue")] + others[pos:]
        for side in ("right", "left"):
            s = scorer.score_ids([scorer.encode(p, r) for p, r in rows], padding_side=side)
            torch.testing.assert_close(s[pos], alone[0], atol=1e-5, rtol=1e-5)


def test_score_is_read_at_eos_not_padding(scorer):
    ids = scorer.encode([{"role": "user", "content": "hi"}], "hello")
    assert ids[-1] == scorer.tokenizer.eos_token_id
    base = scorer.score_ids([ids])
    # A longer neighbour forces pads after this row's EOS: its score must not move.
    padded = scorer.score_ids([ids, ids + [5] * 7])
    torch.testing.assert_close(padded[0], base[0], atol=1e-5, rtol=1e-5)


def test_verifier_and_weighted_sum():
    rows = [{"prompt": [{"role": "user", "content": "x"}], "instruction_id_list": ["punctuation:no_comma",
                                                                                   "change_case:english_lowercase"],
             "kwargs": [{}, {}]}] * 3
    v = VerifierReward()
    good = "all of this answer is written in english and in lowercase letters"
    comma = "all of this answer, written in english, is in lowercase letters"
    assert v.score(rows, [good, "Not lower", comma]).tolist() == [1.0, 0.0, 0.0]
    assert VerifierReward(partial=True).score(rows, [good, "Not lower", ""]).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="instruction_id_list"):
        v.score(["plain prompt"], ["x"])
    w = WeightedSum([(2.0, v), (0.5, VerifierReward(partial=True))])
    assert w.score(rows, [good, "Not lower", comma]).tolist() == [2.5, 0.25, 0.25]


def test_partial_reward_is_the_share_of_instructions_followed():
    ids = ["punctuation:no_comma", "startend:end_checker", "length_constraints:number_words",
           "detectable_format:title"]
    kwargs = [{}, {"end_phrase": "Bye."}, {"relation": "at least", "num_words": 6}, {}]
    row = {"prompt": [{"role": "user", "content": "x"}], "instruction_id_list": ids, "kwargs": kwargs}
    responses = ["<<Note>>\nThe sea is calm today. Bye.",   # all four
                 "<<Note>>\nThe sea, calm. Bye.",            # comma and too short: 2 of 4
                 "The sea is calm, today, truly.",            # only the word count: 1 of 4
                 "Hi, there"]                                  # none
    scores = VerifierReward(partial=True).score([row] * 4, responses).tolist()
    assert scores == [1.0, 0.5, 0.25, 0.0]
    assert VerifierReward().score([row] * 4, responses).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_json_guard_refuses_a_quoted_answer_in_the_reward_only():
    from pipeline.checkers import check_record
    from pipeline.rewards import json_container

    row = {"prompt": "x", "instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]}
    quoted = '"Here is my answer, all of it inside one pair of quotes."'
    assert check_record(quoted, row["instruction_id_list"], row["kwargs"]) == [True]  # the harness's verdict
    guarded, plain = VerifierReward(), VerifierReward(json_guard=False)
    assert guarded.score([row], [quoted]).tolist() == [0.0]
    assert plain.score([row], [quoted]).tolist() == [1.0]
    for ok in ('{"answer": "yes"}', '```json\n[1, 2]\n```'):
        assert guarded.score([row], [ok]).tolist() == [1.0], ok
    assert not json_container("42") and not json_container("null") and json_container(" {} ")


def test_build_reward_passes_verifier_partial_from_the_recipe():
    from types import SimpleNamespace

    from pipeline.config import ModelConfig, RewardSourceConfig
    from pipeline.rewards import build_reward

    recipe = SimpleNamespace(model=ModelConfig())
    dense = build_reward([RewardSourceConfig(kind="verifier", partial=True)], "reward", recipe)
    strict = build_reward([RewardSourceConfig(kind="verifier")], "reward", recipe)
    assert isinstance(dense, VerifierReward) and dense.partial
    assert isinstance(strict, VerifierReward) and not strict.partial


def test_weighted_sum_keeps_each_source_score_apart():
    class Const:
        def __init__(self, v):
            self.v = v

        def score(self, prompts, responses):
            return torch.full((len(responses),), self.v)

    ws = WeightedSum([(0.5, Const(2.0)), (2.0, Const(-1.0))], normalize=False)
    total = ws.score(["p", "q"], ["a", "b"])
    assert torch.allclose(total, torch.tensor([-1.0, -1.0]))  # 0.5 * 2 + 2 * -1
    assert set(ws.last_components) == {"rm", "rm_2"}
    assert torch.equal(ws.last_components["rm"], torch.tensor([2.0, 2.0]))
    assert torch.equal(ws.last_components["rm_2"], torch.tensor([-1.0, -1.0]))


def test_echo_guard_gives_no_credit_for_copying_the_prompt_unless_asked():
    from pipeline.rewards import echoes_prompt

    ask = ('Draft a toast for a party in honour of the violin. A reader should be able to find "duty" and '
           '"reference" in what you write.')
    row = {"prompt": [{"role": "user", "content": ask}], "instruction_id_list": ["keywords:existence"],
           "kwargs": [{"keywords": ["duty", "reference"]}]}
    echo = ask  # passes the harness's check by copying the keywords from the prompt
    honest = "To the violin, our duty and our reference: may it sing for a hundred years more."
    assert VerifierReward(echo_guard=False).score([row] * 2, [echo, honest]).tolist() == [1.0, 1.0]
    assert VerifierReward().score([row] * 2, [echo, honest]).tolist() == [0.0, 1.0]
    # 8 consecutive words (case and punctuation ignored) make an echo; 7 do not
    assert echoes_prompt(ask, "Well... a READER should be able to find DUTY, and then more.")
    assert not echoes_prompt(ask, "a reader should be able to find it")
    # repeating the request is the instruction itself for combination:repeat_prompt
    rep = {**row, "instruction_id_list": ["combination:repeat_prompt"],
           "kwargs": [{"prompt_to_repeat": ask}]}
    assert VerifierReward().score([rep], [ask + " Cheers to the violin!"]).tolist() == [1.0]
