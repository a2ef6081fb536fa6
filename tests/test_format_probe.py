"""The unrequested-format probe and pairs (pipeline/format_probe.py): hand-checked transforms, which formats a
prompt leaves unrequested, a scorer that pays for a marker measured at 1.0 and one that does not at 0.0."""

import random

import torch

from pipeline.format_probe import FORMATS, add_format, format_bias, format_negative_pairs, unrequested


def test_transforms_by_hand():
    assert add_format("quotes", " a b ") == '"a b"'
    assert add_format("upper", "Hi there") == "HI THERE"
    assert add_format("lower", "Hi there") == "hi there"
    assert add_format("lower", "already lower") is None  # no change: no pair, no probe row
    assert add_format("title", "x") == "<<A Short Answer>>\n\nx"
    assert add_format("postscript", "x") == "x\n\nP.S. I hope this helps."
    assert add_format("placeholders", "x.") == "x. You can reach [name] at [email] or visit [address] for more."


def test_unrequested_leaves_out_what_the_prompt_asked_for_or_would_break():
    assert unrequested([]) == list(FORMATS)
    assert "quotes" not in unrequested(["startend:quotation"])
    assert "quotes" not in unrequested(["detectable_format:json_format"])  # a quoted reply parses as JSON
    assert {"upper", "lower"}.isdisjoint(unrequested(["change_case:english_lowercase"]))
    assert "postscript" not in unrequested(["startend:end_checker"])  # a P.S. would move the end phrase
    assert unrequested(["detectable_format:title"]) == ["quotes", "upper", "lower", "postscript", "placeholders"]
    assert "placeholders" not in unrequested(["length_constraints:number_words"])  # it adds words


class MarkerScorer:
    """Scores a response by whether it carries `marker` (the biased reward model)."""

    def __init__(self, test):
        self.test = test

    def score(self, prompts, responses):
        return torch.tensor([float(self.test(r)) for r in responses])


def test_format_bias_measures_a_scorer_that_pays_for_markers():
    rows = [{"prompt": f"p{i}", "response": f"Answer number {i}.", "instruction_id_list": []} for i in range(6)]
    rows.append({"prompt": "q", "response": "Quoted as asked.", "instruction_id_list": ["startend:quotation"]})
    pays = format_bias(MarkerScorer(lambda r: r != r.strip() or r.startswith(('"', "<<")) or "P.S." in r
                                    or "[name]" in r or r.isupper() or r.islower()), rows)
    assert pays["rm/format_bias"] == 1.0 and set(pays) == {f"rm/format_bias/{n}" for n in FORMATS} | {"rm/format_bias"}
    fair = format_bias(MarkerScorer(lambda r: 0.0), rows)
    assert fair["rm/format_bias"] == 0.0  # ties are not preferences
    assert format_bias(MarkerScorer(lambda r: 0.0), []) == {}


def test_format_negative_pairs_one_format_per_row_and_only_unrequested():
    prefs = [{"prompt": f"p{i}", "chosen": f"Answer {i}.", "rejected": "x", "instruction_id_list": ids, "kwargs": [{}]}
             for i, ids in enumerate([[], ["startend:quotation"], [], ["detectable_format:title"], [], []] * 3)]
    pairs = format_negative_pairs(prefs, random.Random(0), per_format=2)
    assert len(pairs) == 10 and len({p["prompt"] for p in pairs}) == 10
    for p in pairs:
        name = p["rejected_source"].removeprefix("unrequested_")
        src = next(r for r in prefs if r["prompt"] == p["prompt"])
        assert name in unrequested(src["instruction_id_list"])
        assert p["chosen"] == src["chosen"] and p["rejected"] == add_format(name, src["chosen"])
    assert pairs == format_negative_pairs(prefs, random.Random(0), per_format=2)  # deterministic for a seed
    assert not any(p["rejected_source"] == "unrequested_placeholders" for p in pairs)  # probe only
