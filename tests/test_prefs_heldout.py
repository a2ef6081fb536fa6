"""Held-out preference pairs (issue #22) from data/make_constraints.py on template content (`--skip-model`,
small counts, in tmp_path): `prefs_heldout.jsonl` is written next to the held-out prompts with the pair schema,
chosen follows every instruction and rejected fewer (the script's own judge), its prompts are held-out prompts
and never training prompts, and drawing it leaves every other file unchanged."""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.data import DataError, load_rows, preference_examples

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILES = ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl", "prompts_general.jsonl")
ARGS = ["--skip-model", "--n-sft", "40", "--n-prefs", "20", "--n-prompts", "60", "--n-heldout", "100",
        "--n-general", "10"]


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def built(mc, tmp_path_factory):
    out = tmp_path_factory.mktemp("constraints")
    stats = mc.main(ARGS + ["--out", str(out)])
    return out, stats


def test_written_next_to_heldout_with_the_pair_schema(mc, built):
    out, stats = built
    path = out / "heldout" / mc.HELDOUT_PAIRS_FILE
    rows = _read(path)
    assert len(rows) >= 60  # 100 held-out prompts; language-only rows and a few others have no pair
    assert stats["rows"]["prefs_heldout"] == len(rows)
    src = stats["pairs_heldout"]
    assert sum(v for k, v in src.items() if k.startswith("chosen_")) == len(rows)
    assert sum(v for k, v in src.items() if k.startswith("rejected_")) == len(rows)
    for r in rows:
        assert {"prompt", "chosen", "rejected", "instruction_id_list", "kwargs"} <= set(r)
        assert r["chosen_source"] in ("sample", "repaired")
        assert r["rejected_source"] in ("sample", "undone", "template")
    pairs, _ = preference_examples(load_rows(str(path)), "prefs_heldout")
    assert len(pairs) == len(rows)


def test_chosen_follows_every_instruction_and_rejected_fewer(mc, built):
    out, _ = built
    for r in _read(out / "heldout" / mc.HELDOUT_PAIRS_FILE):
        assert mc.judge(r["chosen"], r), r["prompt"]
        assert mc.n_passed(r["rejected"], r) < len(r["instruction_id_list"]), r["prompt"]
        assert not mc.length_only(r["chosen"], r["rejected"])


def test_prompts_are_heldout_and_never_training(mc, built):
    out, _ = built
    pairs = _read(out / "heldout" / mc.HELDOUT_PAIRS_FILE)
    held = {r["prompt"] for r in _read(out / "heldout" / "heldout.jsonl")}
    train = {r["prompt"] for name in TRAIN_FILES for r in _read(out / name)}
    prompts = {r["prompt"] for r in pairs}
    assert prompts <= held
    assert not prompts & train
    # Held-out topics, framings and phrasings: the pairs measure unseen wordings and topics.
    assert all(mc.leaks_heldout(p) for p in prompts)


def test_checks_catch_a_training_prompt_among_the_heldout_pairs(mc, built, tmp_path):
    out, _ = built
    pairs = _read(out / "heldout" / mc.HELDOUT_PAIRS_FILE)
    train = [(f"prompts.jsonl row {i}", r["prompt"]) for i, r in enumerate(_read(out / "prompts.jsonl"), start=1)]
    mc.check_heldout_pairs(pairs, train)
    with pytest.raises(DataError, match="prefs_heldout.jsonl row 1"):
        mc.check_heldout_pairs([{**pairs[0], "prompt": train[3][1]}], train)
    # The written-file check sees the held-out pairs' prompts too.
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    (copy / "heldout" / "heldout.jsonl").unlink()
    with open(copy / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"id": "rl-planted", "prompt": pairs[0]["prompt"], "instruction_id_list": [],
                            "kwargs": []}) + "\n")
    with pytest.raises(DataError, match="prompts.jsonl"):
        mc.check_disjoint(copy, copy / "heldout")


def test_heldout_pairs_leave_the_other_files_unchanged(mc, built, tmp_path, monkeypatch):
    """Another held-out pair generator changes only prefs_heldout.jsonl (the existing streams are untouched),
    and --heldout-out moves it with heldout.jsonl."""
    out, _ = built
    monkeypatch.setattr(mc, "HELDOUT_PAIRS_SEED_OFFSET", mc.HELDOUT_PAIRS_SEED_OFFSET + 1)
    other, held = tmp_path / "o", tmp_path / "h"
    mc.main(ARGS + ["--out", str(other), "--heldout-out", str(held)])
    for name in TRAIN_FILES:
        assert (other / name).read_bytes() == (out / name).read_bytes(), name
    assert (held / "heldout.jsonl").read_bytes() == (out / "heldout" / "heldout.jsonl").read_bytes()
    assert (held / mc.HELDOUT_PAIRS_FILE).exists() and not (other / "heldout").exists()
    assert (held / mc.HELDOUT_PAIRS_FILE).read_bytes() != (out / "heldout" / mc.HELDOUT_PAIRS_FILE).read_bytes()


SHIPPED = ROOT / "eval" / "constraints" / "prefs_heldout.jsonl"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped held-out pairs")
def test_shipped_heldout_pairs(mc):
    rows = _read(SHIPPED)
    assert len(rows) >= 80
    held = {r["prompt"] for r in _read(SHIPPED.parent / "heldout.jsonl")}
    train = {r["prompt"] for name in TRAIN_FILES for r in _read(ROOT / "data" / "constraints" / name)}
    for r in rows:
        assert r["prompt"] in held and r["prompt"] not in train
        assert mc.judge(r["chosen"], r) and mc.n_passed(r["rejected"], r) < len(r["instruction_id_list"]), r["prompt"]
    assert "sample" in {r["rejected_source"] for r in rows}
