"""The shipped task data (written by `python data/make_constraints.py`): every file loads in its format,
the 25 instruction ids are covered, demonstrations and chosen responses pass the harness, rejected ones
follow fewer instructions, and held-out topics/phrasings and IFEval prompts never occur in training.

Row counts are checked as minimums only, so the tests hold for any regeneration with the default sizes."""

from collections import Counter
from pathlib import Path

import pytest

from conftest import load_make_constraints
from pipeline.checkers import FIXABLE_IDS, check_record, validate_record
from pipeline.data import load_rows, preference_examples, prompt_examples, sft_examples

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "constraints"
HELDOUT = ROOT / "eval" / "constraints" / "heldout.jsonl"
TRAIN_FILES = ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl", "prompts_general.jsonl")


def _rows(name):
    return load_rows(str(DATA / name))


def test_files_load_in_their_formats():
    assert len(sft_examples(_rows("sft.jsonl"), "sft")) >= 300
    pairs, _ = preference_examples(_rows("prefs.jsonl"), "prefs")
    assert len(pairs) >= 200
    ranked, _ = preference_examples(_rows("prefs_ranked.jsonl"), "ranked")
    assert ranked
    assert len(prompt_examples(_rows("prompts.jsonl"), "prompts")) >= 300
    general = prompt_examples(_rows("prompts_general.jsonl"), "general")
    assert len(general) >= 150 and all(ex["instruction_id_list"] == [] for ex in general)
    held = prompt_examples(load_rows(str(HELDOUT)), "heldout")
    assert len(held) >= 100 and all(ex.get("instruction_id_list") for ex in held)
    for name in ("sft.jsonl", "prefs.jsonl", "prompts.jsonl"):
        for i, row in enumerate(_rows(name), start=1):
            validate_record(row, where=f"{name} row {i}")


def test_all_25_ids_covered():
    ids = set(load_make_constraints().all_ids())
    assert len(ids) == 25
    rl = Counter(i for r in _rows("prompts.jsonl") for i in r["instruction_id_list"])
    assert set(rl) == ids and min(rl.values()) >= 8
    held = Counter(i for r in load_rows(str(HELDOUT)) for i in r["instruction_id_list"])
    assert set(held) == ids and min(held.values()) >= 4
    sft = {i for r in _rows("sft.jsonl") for i in r["instruction_id_list"]}
    assert sft <= set(FIXABLE_IDS)  # ids without a fixer get no demonstrations
    assert len(sft) >= len(set(FIXABLE_IDS) & ids) - 2  # nearly every fixable id has some


def test_demonstrations_and_pairs_are_judged_correctly():
    from pipeline.format_probe import add_format

    for row in _rows("sft.jsonl"):
        assert all(check_record(row["completion"], row["instruction_id_list"], row["kwargs"])), row["prompt"]
    sources = set()
    for row in _rows("prefs.jsonl"):
        chosen = check_record(row["chosen"], row["instruction_id_list"], row["kwargs"])
        rejected = check_record(row["rejected"], row["instruction_id_list"], row["kwargs"])
        sources.add(row["rejected_source"])
        if row["rejected_source"].startswith("unrequested_"):  # chosen plus a format the prompt did not ask for
            name = row["rejected_source"].removeprefix("unrequested_")
            assert all(chosen) and row["rejected"] == add_format(name, row["chosen"]), row["prompt"]
            continue
        assert all(chosen) and sum(chosen) > sum(rejected), row["prompt"]
    assert "sample" in sources, "pairs come from real model samples, not only templates"


def test_repeat_prompt_kwargs_match_the_prompt():
    for name in ("sft.jsonl", "prefs.jsonl", "prompts.jsonl"):
        for row in _rows(name):
            for iid, kw in zip(row["instruction_id_list"], row["kwargs"]):
                if iid == "combination:repeat_prompt":
                    assert row["prompt"].startswith(kw["prompt_to_repeat"]), row["prompt"]


def test_pools_are_disjoint_and_heldout_unseen():
    mod = load_make_constraints()
    assert not set(mod.TRAIN_TOPICS) & set(mod.HELDOUT_TOPICS)
    assert not set(mod.TRAIN_TASKS) & set(mod.HELDOUT_TASKS)
    for iid, (train, held) in mod.PHRASINGS.items():
        assert not set(train) & set(held), iid
    mod.check_disjoint(DATA, HELDOUT.parent)  # held-out topics, framings, phrasings, prompts; IFEval openings
    train_prompts = {r["prompt"] for name in TRAIN_FILES for r in _rows(name)}
    assert not train_prompts & {r["prompt"] for r in load_rows(str(HELDOUT))}


@pytest.mark.skipif(not (ROOT / "eval" / "ifeval" / "input_data.jsonl").exists(), reason="no IFEval copy")
def test_ifeval_is_evaluation_only():
    ifeval = {r["prompt"] for r in load_rows(str(ROOT / "eval" / "ifeval" / "input_data.jsonl"))}
    assert len(ifeval) == 541
    for name in TRAIN_FILES:
        assert not ifeval & {r["prompt"] for r in _rows(name)}
