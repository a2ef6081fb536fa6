"""pipeline.checkers: lm-evaluation-harness's IFEval verdicts for all 25 instruction ids (hand-written
responses, one passing and one failing per id, strict; loose cases), validation errors, fixers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.checkers import (
    FIX_ORDER,
    FIXABLE_IDS,
    SUPPORTED_IDS,
    UnknownInstructionError,
    apply_constraint,
    apply_constraints,
    check_instruction,
    check_record,
    describe,
    validate_record,
)

IFEVAL_FILE = Path(__file__).resolve().parents[1] / "eval" / "ifeval" / "input_data.jsonl"

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


def test_supported_ids_are_the_harness_registry():
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    assert len(SUPPORTED_IDS) == 25
    assert set(SUPPORTED_IDS) == set(INSTRUCTION_DICT)
    assert set(FIX_ORDER) == set(FIXABLE_IDS) == set(SUPPORTED_IDS) - {"language:response_language"}


# ----------------------------------------------------------------------- the 25 ids, strict
# (id, kwargs, a response that follows it, a response that does not), written by hand.
CASES = [
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "The NASA team met the FBI agents today.", "The team met the agents today."),
    (UPPER, {}, "THIS IS A SHORT ANSWER WRITTEN IN ENGLISH ABOUT THE WEATHER TODAY.",
     "This is a short answer written in English about the weather today."),
    (LOWER, {}, "this is a short answer written in english about the weather today.",
     "This is a short answer written in English about the weather today."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about the sea."},
     "Write a poem about the sea. The sea is wide and blue.", "Here is a poem about the sea."),
    ("combination:two_responses", {}, "The first answer is short.\n******\nThe second answer is different.",
     "The same answer.\n******\nThe same answer."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], please meet me at [address].", "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Thanks for reading.\nP.S. I will call you tomorrow.", "Thanks for reading. I will call you tomorrow."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, definitely."),
    ("detectable_format:json_format", {}, '```json\n{"name": "Ada", "age": 36}\n```', "name: Ada, age: 36"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe intro.\nSection 2\nThe details.", "The intro.\nThe details."),
    (BULLETS, {"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "This has *one part* and *another part* highlighted.", "Only *one part* is highlighted here."),
    ("detectable_format:title", {}, "<<A Song of the Sea>>\nThe waves roll in.",
     "A Song of the Sea\nThe waves roll in."),
    (KEYWORDS, {"keywords": ["ocean", "whale"]}, "The whale swam across the Ocean.",
     "The whale swam across the sea."),
    ("keywords:forbidden_words", {"forbidden_words": ["ocean"]}, "The whale swam across the oceanic trench.",
     "The OCEAN is big."),
    ("keywords:frequency", {"keyword": "sea", "frequency": 3, "relation": "at least"},
     "The sea, the sea, and the sea again.", "The sea is calm today."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Jazz is lively.", "A lazy cat sleeps."),
    ("language:response_language", {"language": "fr"},
     "Bonjour, je suis très heureux de vous rencontrer aujourd'hui. Le temps est magnifique.",
     "Hello, I am very happy to meet you today. The weather is wonderful."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "The first paragraph.\n\nHowever, the second one differs.", "The first paragraph.\n\nBut the second one differs."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First paragraph.\n***\nSecond paragraph.",
     "First paragraph.\n\nSecond paragraph."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "The sea is calm. The sky is blue.", "The sea is calm. The sky is blue. The sun is out. Birds sing."),
    (WORDS, {"relation": "at least", "num_words": 5}, "one two three four five", "one two three four"),
    (NO_COMMA, {}, "There are no commas here.", "Yes, there is one."),
    (END, {"end_phrase": "Any other questions?"}, '"That is all. any other questions?"',
     "Any other questions? That is all."),
    (QUOTE, {}, '  "Wrapped in double quotes."\n', 'Not wrapped."'),
]


def test_every_id_has_a_case():
    assert sorted(c[0] for c in CASES) == list(SUPPORTED_IDS)


@pytest.mark.parametrize("instruction_id, kwargs, good, bad", CASES, ids=[c[0] for c in CASES])
def test_harness_verdict_strict(instruction_id, kwargs, good, bad):
    assert check_instruction(instruction_id, good, kwargs) is True
    assert check_instruction(instruction_id, bad, kwargs) is False
    assert check_record(good, [instruction_id, NO_COMMA], [kwargs, {}])[0] is True


def test_a_quoted_answer_passes_the_harness_json_check():
    # Known gameability of IFEval's JsonFormat (kept: it is the harness's verdict); the reward guards it.
    assert check_instruction("detectable_format:json_format", '"The whole answer, in quotes."', {})


def test_harness_quirks_kept():
    # Keywords are regular expressions in the harness (not escaped): "a.c" matches "abc"; a keyword that
    # does not compile is refused with a clear error instead of a crash.
    assert check_instruction(KEYWORDS, "Learn your abc.", {"keywords": ["a.c"]})
    with pytest.raises(ValueError, match="regular expression"):
        check_instruction(KEYWORDS, "[oops", {"keywords": ["[oops"]})
    # english_lowercase also asks langdetect for English: lowercase non-English text fails.
    assert not check_instruction(LOWER, "je suis très heureux de vous rencontrer aujourd'hui.", {})
    # A 0 count is dropped by the harness (then drawn at random): refused here.
    with pytest.raises(ValueError, match="num_bullets must be >= 1"):
        check_instruction(BULLETS, "no bullets", {"num_bullets": 0})


def test_blank_response_never_follows():
    assert check_instruction(NO_COMMA, "   \n", {}) is False
    assert check_record("", [NO_COMMA, QUOTE], [{}, {}], loose=True) == [False, False]


# ----------------------------------------------------------------------- loose


def test_check_record_strict_and_loose():
    response = "Sure! Here is my answer:\n* first point\n* second point\nHope this helps, bye"
    ids = [NO_COMMA, BULLETS, UPPER, LOWER]
    kwargs = [{}, {"num_bullets": 2}, {}, {}]
    assert check_record(response, ids, kwargs) == [False, True, False, False]
    # Loose: dropping the last line removes the comma; dropping both the first and the last
    # line leaves only lowercase bullets; nothing makes it all capitals.
    assert check_record(response, ids, kwargs, loose=True) == [True, True, False, True]


@pytest.mark.parametrize("instruction_id, kwargs, text", [
    (LOWER, {}, "**A Title**\nthe body of this answer is written in english and all lowercase."),  # first line
    (END, {"end_phrase": "Any other questions?"}, "That is all. Any other questions?\nHope this helps."),  # last
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),  # first line
    ("detectable_format:title", {}, "Sure!\n<<Title>>\nText\nBye"),  # no change needed: strict passes too
])
def test_loose_cases(instruction_id, kwargs, text):
    assert check_instruction(instruction_id, text, kwargs, loose=True)
    assert check_instruction(instruction_id, text, kwargs) == (instruction_id == "detectable_format:title")


def test_loose_ignores_blank_variants():
    # Removing first and last line of a 2-line text leaves "", which must not pass no_comma.
    assert not check_instruction(NO_COMMA, "a, b\nc, d", {}, loose=True)


def test_none_extra_kwargs_ignored():
    kwargs = {"relation": "at least", "num_words": 2, "keywords": None, "end_phrase": None}
    assert check_instruction(WORDS, "one two", kwargs)
    assert check_instruction(NO_COMMA, "ok", {"num_words": None})


def test_letter_that_is_not_a_letter_is_reproducible():
    # Public IFEval keys 1122 and 1129 have letter '#' and '!': the harness draws a random letter.
    kw = {"letter": "#", "let_frequency": 3, "let_relation": "less than"}
    text = "abcdefghijklmnopqrstuvwxyz " * 2
    import random

    random.seed(123)
    state = random.getstate()
    assert len({tuple(check_record(text, ["keywords:letter_frequency"], [kw])) for _ in range(5)}) == 1
    assert describe("keywords:letter_frequency", kw) == describe("keywords:letter_frequency", kw)
    assert random.getstate() == state  # the caller's random numbers are untouched


# ----------------------------------------------------------------------- validation


def test_unexpected_non_none_kwarg_rejected():
    with pytest.raises(ValueError, match="num_word"):
        check_instruction(WORDS, "x", {"relation": "at least", "num_word": 3, "num_words": 3})


def test_check_record_length_mismatch():
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        check_record("x", [NO_COMMA, LOWER], [{}])


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


def test_unknown_id_suggestion_from_name_only():
    with pytest.raises(UnknownInstructionError, match="did you mean 'punctuation:no_comma'"):
        check_instruction("no_comma", "x", {})
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
        (BULLETS, {"num_bullets": -1}, "num_bullets must be >= 1"),
        (KEYWORDS, {"keywords": []}, "keywords"),
        (KEYWORDS, {"keywords": "python"}, "keywords"),
        (END, {"end_phrase": "  "}, "end_phrase"),
        ("language:response_language", {"language": "xx"}, "ISO 639-1"),
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 2, "let_relation": "at least"}, "letter"),
        ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 3,
                                                         "first_word": "so"}, "nth_paragraph"),
        ("combination:repeat_prompt", {}, "prompt_to_repeat"),
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


def test_every_public_ifeval_record_validates():
    # Read-only use of evaluation data: validation only, never training.
    lines = IFEVAL_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 541
    for row, line in enumerate(lines, start=1):
        record = json.loads(line)
        validate_record(record, where=f"{IFEVAL_FILE.name} row {row}")
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
        ("keywords:forbidden_words", {"forbidden_words": ["b", "a"]},
         "Do not include keywords ['a', 'b'] in the response."),  # the harness's own text
    ],
)
def test_describe(instruction_id, kwargs, expected):
    assert describe(instruction_id, kwargs) == expected


def test_no_fixer_for_response_language():
    with pytest.raises(ValueError, match="no fixer"):
        apply_constraint("language:response_language", "x", {"language": "fr"})

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
