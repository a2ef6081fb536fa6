"""data/make_constraints.py on template content (`--skip-model`, small counts, in tmp_path): all 25 ids,
balanced and never conflicting, feasible kwargs, held-out pools unseen in training, the IFEval guard, and
pairs whose chosen follows more instructions than the rejected."""

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import load_make_constraints
from pipeline import checkers
from pipeline.checkers import FIXABLE_IDS, check_record, validate_record
from pipeline.data import DataError, load_rows, preference_examples, prompt_examples, sft_examples

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILES = ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl", "prompts_general.jsonl")


@pytest.fixture(scope="module")
def built(mc, tmp_path_factory):
    out = tmp_path_factory.mktemp("constraints")
    stats = mc.main(["--skip-model", "--out", str(out), "--n-sft", "60", "--n-prefs", "30", "--n-prompts", "80",
                     "--n-heldout", "100", "--n-general", "12"])
    rows = {name: [json.loads(x) for x in (out / name).read_text().splitlines()] for name in TRAIN_FILES}
    rows["heldout"] = [json.loads(x) for x in (out / "heldout" / "heldout.jsonl").read_text().splitlines()]
    return out, stats, rows


def _with_ids(rows):
    return [r for name, rs in rows.items() for r in rs if r.get("instruction_id_list")]


def test_files_load_in_their_formats(built):
    out, stats, rows = built
    assert len(sft_examples(load_rows(str(out / "sft.jsonl")), "sft")) == len(rows["sft.jsonl"]) > 0
    pairs, _ = preference_examples(load_rows(str(out / "prefs.jsonl")), "prefs")
    assert pairs
    for name in ("prompts.jsonl", "prompts_general.jsonl", "heldout/heldout.jsonl"):
        assert prompt_examples(load_rows(str(out / name)), name)
    general = prompt_examples(load_rows(str(out / "prompts_general.jsonl")), "general")
    assert len(general) == 12 and all(ex["instruction_id_list"] == [] for ex in general)
    for r in _with_ids(rows):
        validate_record(r)
    # --out elsewhere never touches the shipped held-out file.
    assert stats["heldout_out"] == str(out / "heldout")


def test_all_25_ids_balanced_and_never_conflicting(mc, built):
    _, _, rows = built
    ids = mc.all_ids()
    assert len(ids) == 25
    conflicts = mc.conflict_pairs()
    for r in _with_ids(rows):
        got = r["instruction_id_list"]
        assert 1 <= len(got) <= 3 and len(set(got)) == len(got)
        assert not any(frozenset((a, b)) in conflicts for a in got for b in got if a != b), got
    for split in ("prompts.jsonl", "heldout"):
        c = Counter(i for r in rows[split] for i in r["instruction_id_list"])
        assert set(c) == set(ids), split
        assert max(c.values()) - min(c.values()) <= 2, (split, c)  # least-used first
    sizes = Counter(len(r["instruction_id_list"]) for r in rows["prompts.jsonl"] + rows["heldout"])
    assert sizes[1] > sizes[2] > sizes[3] > 0
    # Every held-out id at least 4 times (the script asserts it too).
    assert min(Counter(i for r in rows["heldout"] for i in r["instruction_id_list"]).values()) >= 4


def test_kwargs_are_feasible_in_a_short_answer(built):
    _, _, rows = built
    for r in _with_ids(rows):
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            if iid == "length_constraints:number_words":
                assert kw["num_words"] <= (120 if kw["relation"] == "less than" else 60)
            for key, most in (("num_sentences", 6), ("num_paragraphs", 4), ("num_sections", 4), ("num_highlights", 3),
                              ("num_placeholders", 3), ("num_bullets", 5), ("capital_frequency", 6)):
                if key in kw:
                    assert 1 <= kw[key] <= most, (iid, kw)
            if iid == "keywords:letter_frequency" and kw["let_relation"] == "less than":
                assert kw["letter"] in "qzxj"
            if iid == "keywords:forbidden_words":
                task_words = set(r["prompt"].lower().split(".")[0].split())
                assert not task_words & {w.lower() for w in kw["forbidden_words"]}


def test_repeat_prompt_repeats_the_task(built):
    _, _, rows = built
    found = 0
    for r in _with_ids(rows):
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            if iid == "combination:repeat_prompt":
                found += 1
                task = kw["prompt_to_repeat"]
                assert r["prompt"].startswith(task) and "\n" not in task
                assert r["instruction_id_list"][-1] == iid  # the instruction to repeat comes last, on its own line
                assert "\n" in r["prompt"][len(task):]
                # A response that repeats the request and answers it passes.
                assert check_record(r["prompt"].split("\n")[0] + "\nAn answer.", [iid], [kw])[0]
    assert found


def test_heldout_pools_unseen_in_training(mc, built):
    out, _, rows = built
    assert not set(mc.TRAIN_TOPICS) & set(mc.HELDOUT_TOPICS)
    assert not set(mc.TRAIN_TASKS) & set(mc.HELDOUT_TASKS)
    assert not set(mc.TRAIN_QUESTIONS) & set(mc.HELDOUT_QUESTIONS)
    for iid, (train, held) in mc.PHRASINGS.items():
        assert len(train) >= 4 and len(held) >= 2, iid
        assert not set(train) & set(held), iid
    assert set(mc.PHRASINGS) == set(mc.all_ids())
    train_prompts = [r["prompt"] for name in TRAIN_FILES for r in rows[name]]
    assert not set(train_prompts) & {r["prompt"] for r in rows["heldout"]}
    assert not any(mc.leaks_heldout(p) for p in train_prompts)
    mc.check_disjoint(out, out / "heldout")
    # Held-out prompts use only held-out phrasings: never the registry's own text.
    for r in rows["heldout"][:30]:
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            inst = mc.harness().registry.INSTRUCTION_DICT[iid](iid)
            assert inst.build_description(**kw) not in r["prompt"], (iid, r["prompt"])


def test_training_mixes_registry_text_and_own_phrasings(built):
    _, stats, _ = built
    src = stats["phrasing_sources_train"]
    share = src["registry"] / (src["registry"] + src["train"])
    assert 0.25 < share < 0.55, src


@pytest.mark.parametrize("plant", ["heldout_topic", "ifeval"])
def test_check_disjoint_catches_a_planted_prompt(mc, built, tmp_path, plant):
    out, _, _ = built
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    if plant == "ifeval":
        ifeval = json.loads((ROOT / "eval" / "ifeval" / "input_data.jsonl").read_text().splitlines()[7])
        prompt = "Please help. " + ifeval["prompt"]
    else:
        prompt = f"Write a short poem about {mc.HELDOUT_TOPICS[3]}."
    with open(copy / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"id": "rl-planted", "prompt": prompt, "instruction_id_list": [], "kwargs": []}) + "\n")
    with pytest.raises(DataError) as e:
        mc.check_disjoint(copy, copy / "heldout")
    assert "prompts.jsonl" in str(e.value)
    if plant == "ifeval":
        assert str(ifeval["key"]) in str(e.value)


def test_sft_rows_pass_and_use_only_fixable_ids(built):
    _, stats, rows = built
    assert rows["sft.jsonl"]
    for r in rows["sft.jsonl"]:
        assert set(r["instruction_id_list"]) <= set(FIXABLE_IDS)
        assert all(check_record(r["completion"], r["instruction_id_list"], r["kwargs"])), r["prompt"]


def test_pairs_chosen_follows_more_than_rejected_and_not_length_only(mc, built):
    _, _, rows = built
    assert rows["prefs.jsonl"]
    for r in rows["prefs.jsonl"]:
        if r["rejected_source"].startswith("unrequested_"):
            continue  # test_format_negatives_add_only_an_unrequested_format
        c = sum(check_record(r["chosen"], r["instruction_id_list"], r["kwargs"]))
        j = sum(check_record(r["rejected"], r["instruction_id_list"], r["kwargs"]))
        assert c == len(r["instruction_id_list"]) > j, r["prompt"]
        assert not mc.length_only(r["chosen"], r["rejected"])


def test_format_negatives_add_only_an_unrequested_format(built):
    from pipeline.format_probe import FORMATS, add_format, unrequested

    _, stats, rows = built
    prefs = rows["prefs.jsonl"]
    negatives = [r for r in prefs if r["rejected_source"].startswith("unrequested_")]
    assert negatives and prefs[-len(negatives):] == negatives  # appended after the sampled pairs
    assert {r["rejected_source"] for r in negatives} <= {f"unrequested_{n}" for n in FORMATS}
    for r in negatives:
        name = r["rejected_source"].removeprefix("unrequested_")
        assert name in unrequested(r["instruction_id_list"]) and r["rejected"] == add_format(name, r["chosen"])
        assert all(check_record(r["chosen"], r["instruction_id_list"], r["kwargs"]))
    assert sum(v for k, v in stats["pairs"].items() if k.startswith("unrequested_")) == len(negatives)


def test_length_only():
    mc = load_make_constraints()
    assert mc.length_only("One two three. Four.", "One two three.")
    assert mc.length_only("One two.", "One two. Thanks for reading.")
    assert not mc.length_only("one two three.", "One two three.")  # a case change is not length
    assert not mc.length_only("One two three.", "One three two.")


def test_conflicts_include_checkers_pairs(mc, monkeypatch):
    a, b = "punctuation:no_comma", "startend:quotation"
    assert frozenset((a, b)) not in mc.conflict_pairs()
    monkeypatch.setattr(checkers, "INCOMPATIBLE_PAIRS", [(a, b)], raising=False)
    assert frozenset((a, b)) in mc.conflict_pairs()
    # The registry's conflicts are made symmetric (it lists lowercase -> capital only one way round).
    assert frozenset(("change_case:english_capital", "change_case:capital_word_frequency")) in mc.conflict_pairs()


def test_prompts_are_deterministic_for_a_seed(mc):
    conflicts = mc.conflict_pairs()

    def draw(seed):
        gen, counts = random.Random(seed), Counter()
        return [mc.make_prompt(gen, False, counts, mc.all_ids(), conflicts)["prompt"] for _ in range(20)]

    random.seed(123)
    first = draw(5)
    random.seed(999)  # the registry draws with the global random: the script must not depend on its state
    assert draw(5) == first and draw(6) != first


def test_every_phrasing_fills_from_registry_kwargs(mc):
    gen = random.Random(0)
    for iid, (train, held) in mc.PHRASINGS.items():
        kwargs, text = mc.registry_draw(iid, gen, False, "Describe the moon.")
        assert text
        for template in train + held:
            filled = template.format(**mc.fill_values(kwargs))
            assert "{" not in filled.replace("{}", ""), (iid, template)


def test_content_cut_skips_loops_and_stray_quotes():
    mc = load_make_constraints()
    looped = ("Caves are big rooms. They are made of walls and floors that are made of walls. "
              "They are made of walls and floors that are made of walls and rock. Bats live there. Bats live there.")
    assert mc.whole_sentences(looped) == ("Caves are big rooms. They are made of walls and floors that are made "
                                          "of walls. Bats live there.")
    assert mc.whole_sentences('He said "go." It was late." Then') == 'He said "go." It was late.'
    assert mc.whole_sentences("One two three. Four five six.", max_words=4) == "One two three."


def test_content_limits_fit_the_instructions():
    mc = load_make_constraints()
    rec = lambda ids, kws: {"instruction_id_list": ids, "kwargs": kws}  # noqa: E731
    assert mc.content_limits(rec([mc.LOWER], [{}])) == {"max_sentences": 4, "max_words": 60}
    assert mc.content_limits(rec([mc.WORDS], [{"relation": "at least", "num_words": 60}]))["max_words"] >= 60
    assert mc.content_limits(rec([mc.WORDS], [{"relation": "less than", "num_words": 30}]))["max_words"] == 60
    assert mc.content_limits(rec([mc.BULLETS], [{"num_bullets": 5}]))["max_sentences"] == 5
    assert mc.content_limits(rec([mc.SENTENCES], [{"relation": "at least", "num_sentences": 6}]))["max_sentences"] == 6
    assert mc.content_limits(rec([mc.SECTIONS], [{"section_spliter": "Section", "num_sections": 5}]))[
        "max_sentences"] == 5
