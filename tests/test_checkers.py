"""Tests for pipeline.checkers (IFEval-style instruction checkers and fixers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkers import (
    CHECKERS,
    FIX_ORDER,
    SUPPORTED_IDS,
    UnknownInstructionError,
    apply_constraint,
    apply_constraints,
    check_instruction,
    check_record,
    describe,
    validate_record,
)

IFEVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "ifeval"
SUBSET = IFEVAL_DIR / "subset_supported.jsonl"

LOWER = "change_case:english_lowercase"
UPPER = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
WORDS = "length_constraints:number_words"
END = "startend:end_checker"
KEYWORDS = "keywords:existence"
BULLETS = "detectable_format:number_bullet_lists"
QUOTE = "startend:quotation"

PLAIN = (
    "Rivers shape the land over long periods of time. They carve valleys, move sediment, "
    "and feed wetlands. Floods can be destructive, but they also renew soil. People have "
    "settled along rivers for thousands of years. Today, dams and levees change how rivers "
    "behave."
)


def test_registry_and_supported_ids():
    assert SUPPORTED_IDS == tuple(sorted(CHECKERS))
    assert set(SUPPORTED_IDS) == {LOWER, UPPER, NO_COMMA, WORDS, END, KEYWORDS, BULLETS, QUOTE}
    assert set(FIX_ORDER) == set(SUPPORTED_IDS)


# ----------------------------------------------------------------------- checkers


@pytest.mark.parametrize(
    "instruction_id, kwargs, text",
    [
        (LOWER, {}, "hello world, all lowercase."),
        (LOWER, {}, "123 abc"),
        (UPPER, {}, "HELLO WORLD!"),
        (UPPER, {}, "NUMBERS 123 ARE FINE"),
        (NO_COMMA, {}, "No commas here."),
        (NO_COMMA, {}, "Semicolons; dashes - fine"),
        (WORDS, {"relation": "at least", "num_words": 3}, "one two three"),  # boundary
        (WORDS, {"relation": "at least", "num_words": 2}, "it's fine"),  # it, s, fine
        (WORDS, {"relation": "less than", "num_words": 4}, "one two three"),
        (WORDS, {"relation": "less than", "num_words": 1}, "!!!"),
        (END, {"end_phrase": "Peace!"}, "Goodbye. Peace!"),
        (END, {"end_phrase": "Peace!"}, '"Goodbye. peace!"  \n'),  # quote, whitespace, case
        (END, {"end_phrase": " Is there anything else? "}, "ok. is there anything else?"),
        (KEYWORDS, {"keywords": ["python", "java"]}, "I like Python and JAVA."),
        (KEYWORDS, {"keywords": ["c++"]}, "Written in C++ mostly."),  # escaped, literal
        (BULLETS, {"num_bullets": 2}, "* one\n* two"),
        (BULLETS, {"num_bullets": 3}, "Intro\n* one\n- two\n  * three\n**bold** line"),
        (BULLETS, {"num_bullets": 0}, "No bullets. **Bold** only."),
        (QUOTE, {}, '"quoted"'),
        (QUOTE, {}, '  "multi\nline"\n'),
    ],
)
def test_checker_true(instruction_id, kwargs, text):
    assert CHECKERS[instruction_id](text, kwargs)
    assert check_instruction(instruction_id, text, kwargs)


@pytest.mark.parametrize(
    "instruction_id, kwargs, text",
    [
        (LOWER, {}, "Hello world"),
        (LOWER, {}, "123 !!!"),  # no cased letter: islower() is False
        (LOWER, {}, ""),
        (UPPER, {}, "HELLO world"),
        (UPPER, {}, ""),
        (NO_COMMA, {}, "one, two"),
        (NO_COMMA, {}, "1,000"),
        (WORDS, {"relation": "at least", "num_words": 4}, "one two three"),  # boundary
        (WORDS, {"relation": "less than", "num_words": 3}, "one two three"),  # boundary
        (WORDS, {"relation": "at least", "num_words": 1}, ""),
        (END, {"end_phrase": "Peace!"}, "Peace! Goodbye."),
        (END, {"end_phrase": "Peace!"}, "Peace"),
        (KEYWORDS, {"keywords": ["python", "java"]}, "Only Python here."),
        (KEYWORDS, {"keywords": ["c++"]}, "Written in ccc."),  # unescaped regex would match
        (BULLETS, {"num_bullets": 2}, "* one\n* two\n- three"),
        (BULLETS, {"num_bullets": 2}, "* one\n**two** not a bullet"),
        (BULLETS, {"num_bullets": 1}, "1. numbered lists do not count"),
        (QUOTE, {}, '"'),
        (QUOTE, {}, '"unclosed'),
        (QUOTE, {}, ""),
    ],
)
def test_checker_false(instruction_id, kwargs, text):
    assert not check_instruction(instruction_id, text, kwargs)


def test_blank_response_never_follows():
    # Raw checker says "no comma found"; evaluation semantics require a non-blank response.
    assert CHECKERS[NO_COMMA]("", {})
    assert not check_instruction(NO_COMMA, "", {})
    assert not check_instruction(NO_COMMA, "  \n ", {})
    assert check_record("   ", [NO_COMMA, BULLETS], [{}, {"num_bullets": 0}]) == [False, False]


def test_none_extra_kwargs_ignored():
    kwargs = {"relation": "at least", "num_words": 2, "keywords": None, "end_phrase": None}
    assert check_instruction(WORDS, "one two", kwargs)
    assert check_instruction(NO_COMMA, "ok", {"num_words": None})


def test_unexpected_non_none_kwarg_rejected():
    with pytest.raises(ValueError, match="num_word"):
        check_instruction(WORDS, "x", {"relation": "at least", "num_word": 3, "num_words": 3})


def test_check_record_strict_and_loose():
    response = "Sure! Here is my answer:\n* first point\n* second point\nHope this helps, bye"
    ids = [NO_COMMA, BULLETS, UPPER, LOWER]
    kwargs = [{}, {"num_bullets": 2}, {}, {}]
    assert check_record(response, ids, kwargs) == [False, True, False, False]
    # Loose: dropping the last line removes the comma; dropping both the first and the last
    # line leaves only lowercase bullets; nothing makes it all capitals.
    assert check_record(response, ids, kwargs, loose=True) == [True, True, False, True]


def test_loose_star_removal_and_first_line():
    response = "**Title**\nthe body is all lowercase."
    assert not check_instruction(LOWER, response, {})
    assert check_instruction(LOWER, response, {}, loose=True)  # first line removed
    bullets = "* a\n* b\n* c"
    assert check_instruction(BULLETS, bullets, {"num_bullets": 0}, loose=True)  # '*' removed
    assert not check_instruction(BULLETS, bullets, {"num_bullets": 0})


def test_loose_ignores_blank_variants():
    # Removing first and last line of a 2-line text leaves "", which must not pass no_comma.
    assert not check_instruction(NO_COMMA, "a, b\nc, d", {}, loose=True)


def test_check_record_length_mismatch():
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        check_record("x", [NO_COMMA, LOWER], [{}])


# ----------------------------------------------------------------------- validation


def test_unknown_id_error_names_id_where_and_suggestion():
    record = {"instruction_id_list": ["change_case:english_lowercas"], "kwargs": [{}]}
    with pytest.raises(UnknownInstructionError) as info:
        validate_record(record, where="data/x.jsonl row 3")
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    assert "'change_case:english_lowercas'" in msg
    assert "data/x.jsonl row 3" in msg
    assert "did you mean 'change_case:english_lowercase'?" in msg
    for supported in SUPPORTED_IDS:
        assert supported in msg
    assert err.suggestion == LOWER and err.instruction_id == "change_case:english_lowercas"


def test_unknown_id_suggestion_from_name_only_and_upstream_note():
    with pytest.raises(UnknownInstructionError, match="did you mean 'punctuation:no_comma'"):
        check_instruction("no_comma", "x", {})
    with pytest.raises(UnknownInstructionError, match="outside our supported subset"):
        describe("keywords:forbidden_words", {"forbidden_words": ["a"]})
    with pytest.raises(UnknownInstructionError) as info:
        apply_constraint("zzz:qqq", "x", {})
    assert info.value.suggestion is None and "did you mean" not in str(info.value)


def test_missing_kwarg_error_names_it():
    record = {"instruction_id_list": [NO_COMMA, WORDS], "kwargs": [{}, {"relation": "at least"}]}
    with pytest.raises(ValueError, match="missing required kwarg 'num_words'") as info:
        validate_record(record, where="f.jsonl row 7")
    assert "f.jsonl row 7" in str(info.value) and WORDS in str(info.value)
    with pytest.raises(ValueError, match="'end_phrase'"):
        check_instruction(END, "x", {"end_phrase": None})


@pytest.mark.parametrize(
    "instruction_id, kwargs, fragment",
    [
        (WORDS, {"relation": "at most", "num_words": 3}, "relation"),
        (WORDS, {"relation": "at least", "num_words": "3"}, "num_words must be an int"),
        (BULLETS, {"num_bullets": -1}, "num_bullets must be >= 0"),
        (KEYWORDS, {"keywords": []}, "keywords"),
        (KEYWORDS, {"keywords": "python"}, "keywords"),
        (END, {"end_phrase": "  "}, "end_phrase"),
    ],
)
def test_invalid_kwargs(instruction_id, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_record({"instruction_id_list": [instruction_id], "kwargs": [kwargs]})


def test_validate_record_shape_errors():
    with pytest.raises(ValueError, match="1 instruction ids but 2 kwargs"):
        validate_record({"instruction_id_list": [NO_COMMA], "kwargs": [{}, {}]}, "r1")
    with pytest.raises(ValueError, match="instruction_id_list"):
        validate_record({"kwargs": []})
    with pytest.raises(ValueError, match="kwargs"):
        validate_record({"instruction_id_list": [NO_COMMA]})


@pytest.mark.skipif(not SUBSET.exists(), reason="shared/ifeval not available")
def test_every_supported_subset_record_validates():
    # Read-only use of evaluation data: validation only, never training.
    lines = SUBSET.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 131
    for row, line in enumerate(lines, start=1):
        record = json.loads(line)
        validate_record(record, where=f"{SUBSET.name} row {row}")
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            assert describe(instruction_id, kwargs)


# ----------------------------------------------------------------------- describe


@pytest.mark.parametrize(
    "instruction_id, kwargs, expected",
    [
        (WORDS, {"relation": "at least", "num_words": 120}, "at least 120 words"),
        (WORDS, {"relation": "less than", "num_words": 50}, "less than 50 words"),
        (BULLETS, {"num_bullets": 1}, "exactly 1 bullet point"),
        (BULLETS, {"num_bullets": 3}, "exactly 3 bullet points"),
        (END, {"end_phrase": "Peace!"}, "ends with 'Peace!'"),
        (KEYWORDS, {"keywords": ["a", "b"]}, "includes keywords 'a', 'b'"),
        (NO_COMMA, {}, "no commas"),
        (LOWER, {}, "all lowercase letters"),
        (UPPER, {}, "all capital letters"),
        (QUOTE, {}, "wrapped in double quotes"),
    ],
)
def test_describe(instruction_id, kwargs, expected):
    assert describe(instruction_id, kwargs) == expected


# ----------------------------------------------------------------------- fixers

FIX_CASES = [
    (LOWER, {}),
    (UPPER, {}),
    (NO_COMMA, {}),
    (WORDS, {"relation": "less than", "num_words": 30}),
    (WORDS, {"relation": "less than", "num_words": 5}),  # cuts inside the first sentence
    (WORDS, {"relation": "at least", "num_words": 20}),
    (END, {"end_phrase": "Is there anything else I can help with?"}),
    (KEYWORDS, {"keywords": ["river", "hydrology", "salmon"]}),
    (BULLETS, {"num_bullets": 3}),  # merge sentences
    (BULLETS, {"num_bullets": 9}),  # split sentences
    (BULLETS, {"num_bullets": 0}),
    (QUOTE, {}),
]


@pytest.mark.parametrize("instruction_id, kwargs", FIX_CASES)
def test_apply_constraint_passes_checker(instruction_id, kwargs):
    out = apply_constraint(instruction_id, PLAIN, kwargs)
    assert check_instruction(instruction_id, out, kwargs), out


def test_apply_constraint_details():
    assert apply_constraint(NO_COMMA, "a, b,c ,d,\ne", {}) == "a b c d\ne"
    out = apply_constraint(END, "Hello there", {"end_phrase": "Peace!"})
    assert out == "Hello there. Peace!"
    assert apply_constraint(END, "Done. Peace!", {"end_phrase": "peace!"}) == "Done. Peace!"
    out = apply_constraint(KEYWORDS, "About rivers.", {"keywords": ["Rivers", "fish"]})
    assert out == "Fish is worth a mention. About rivers."
    # Two missing words: one of the lead sentences, words in the prompt's order, first capitalised.
    out = apply_constraint(KEYWORDS, "About rivers.", {"keywords": ["fish", "boats"]})
    assert out.startswith("Fish and boats ") and out.endswith(". About rivers."), out
    # Before a bullet list the lead goes on its own line, so the bullet count is unchanged.
    out = apply_constraint(KEYWORDS, "* a\n* b", {"keywords": ["fish"]})
    assert out == "Fish is worth a mention.\n* a\n* b"
    assert apply_constraint(BULLETS, out, {"num_bullets": 2}) == out
    assert apply_constraint(QUOTE, "  hi  ", {}) == '"hi"'
    out = apply_constraint(BULLETS, "One. Two. Three. Four.", {"num_bullets": 2})
    assert out == "* One. Two.\n* Three. Four."
    out = apply_constraint(WORDS, "One two. Three four. Five six.", {"relation": "less than",
                                                                      "num_words": 5})
    assert out == "One two. Three four."
    # "at least" never pads: unchanged, caller checks.
    short = "too short"
    assert apply_constraint(WORDS, short, {"relation": "at least", "num_words": 100}) == short


def test_apply_constraint_infeasible_raises():
    with pytest.raises(ValueError):
        apply_constraint(LOWER, "123 !!!", {})
    with pytest.raises(ValueError):
        apply_constraint(BULLETS, "two words", {"num_bullets": 3})
    with pytest.raises(ValueError):
        apply_constraint(WORDS, "some text", {"relation": "less than", "num_words": 1})


def test_quotation_keeps_bullets_and_end_phrase():
    kwargs_b = {"num_bullets": 3}
    out = apply_constraints(PLAIN, [QUOTE, BULLETS, END], [{}, kwargs_b, {"end_phrase": "Bye."}])
    assert out.startswith('"\n* ')
    assert check_record(out, [QUOTE, BULLETS, END], [{}, kwargs_b, {"end_phrase": "Bye."}]) == [
        True,
        True,
        True,
    ]


@pytest.mark.parametrize(
    "ids, kwargs",
    [
        ([KEYWORDS, WORDS, NO_COMMA], [{"keywords": ["salmon", "hydrology"]},
                                       {"relation": "at least", "num_words": 30}, {}]),
        ([BULLETS, LOWER], [{"num_bullets": 3}, {}]),
        ([QUOTE, BULLETS], [{}, {"num_bullets": 8}]),
        ([BULLETS, WORDS], [{"num_bullets": 4}, {"relation": "less than", "num_words": 20}]),
        ([KEYWORDS, WORDS], [{"keywords": ["friends", "hanson"]},
                             {"relation": "less than", "num_words": 15}]),
        ([UPPER, END], [{}, {"end_phrase": "What would happen next?"}]),
        ([NO_COMMA, END, UPPER, KEYWORDS, QUOTE],
         [{}, {"end_phrase": "in India."}, {}, {"keywords": ["monsoon"]}, {}]),
        ([QUOTE, WORDS, QUOTE], [{}, {"relation": "at least", "num_words": 10}, {}]),
        ([WORDS, WORDS], [{"relation": "at least", "num_words": 10},
                          {"relation": "less than", "num_words": 25}]),
    ],
)
def test_apply_constraints_combinations(ids, kwargs):
    out = apply_constraints(PLAIN, ids, kwargs)
    assert all(check_record(out, ids, kwargs)), out


def test_apply_constraints_conflicts_raise():
    with pytest.raises(ValueError, match="cannot satisfy"):
        apply_constraints(PLAIN, [LOWER, UPPER], [{}, {}])
    with pytest.raises(ValueError, match="ends with"):
        apply_constraints(PLAIN, [NO_COMMA, END], [{}, {"end_phrase": "Yes Mom, I am Dave."}])
