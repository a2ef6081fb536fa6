"""pipeline.checkers' fixers for the 24 fixable IFEval ids, judged by lm-evaluation-harness's strict check.

Kwargs are drawn the way the harness's registry draws them (``INSTRUCTION_DICT[id](id).build_description()``
with no arguments, then ``get_instruction_args()``), from a fixed seed so every run sees the same draws.
"""

from __future__ import annotations

import collections
import json
import random

import pytest

from pipeline import checkers
from pipeline.checkers import (
    FIXABLE_IDS,
    INCOMPATIBLE_PAIRS,
    apply_constraint,
    apply_constraints,
    check_instruction,
    check_record,
    compatible,
    count_words,
)
from pipeline.ifeval import harness

TEXTS = (
    # short: five sentences, the size of the data script's content
    "Rivers shape the land over long periods of time. They carve valleys, move sediment, and feed "
    "wetlands. Floods can be destructive, but they also renew soil. People have settled along rivers for "
    "thousands of years. Today, dams and levees change how rivers behave.",
    # medium: ten sentences
    "Honeybees live in colonies that can hold tens of thousands of workers. Each colony has a single queen "
    "who lays the eggs. Worker bees gather nectar and pollen from flowers near the hive. They turn the "
    "nectar into honey and store it in wax cells. Bees talk to each other with a waggle dance. The dance "
    "shows where the best flowers are. In winter the bees cluster together to stay warm. Farmers depend on "
    "bees to pollinate many crops. Without them, apples and almonds would be rare. Keeping bees healthy "
    "helps everyone who eats fruit.",
    # long: twenty-four sentences, about three hundred words
    "Lighthouses have guided sailors along dangerous coasts for centuries. The oldest known lighthouse stood "
    "at Alexandria in ancient Egypt. Early towers burned wood or coal in open fires at the top. Later "
    "keepers used oil lamps with polished metal reflectors. A big step came with the Fresnel lens in the "
    "nineteenth century. Its rings of glass bend light into a strong narrow beam. That beam can be seen "
    "from many miles away on a clear night. Each lighthouse has its own pattern of flashes. Sailors read "
    "the pattern to know which light they are looking at. Charts list every light with its colour and its "
    "timing. Keepers once lived in small houses next to the towers. They trimmed the wicks and wound the "
    "clockwork that turned the lens. Storms could cut them off from the mainland for weeks. Some keepers "
    "kept careful logs of the weather and the passing ships. Their notes are now useful to historians. "
    "Most lights today run on electricity and need no keeper. Automatic sensors switch them on at dusk. "
    "Satellite navigation has made them less important for big ships. Small boats still rely on them when "
    "electronics fail. Many old towers have become museums or guest houses. Visitors climb the narrow "
    "stairs to enjoy the view. Painters and photographers love their bold shapes against the sea. "
    "Local groups raise money to repair the oldest ones. A lighthouse remains a symbol of safety and hope.",
)
PROMPT = "Write a short answer about rivers for a school newsletter."


def draw(instruction_id: str, rng: random.Random) -> dict:
    """Kwargs as the harness's registry draws them (redrawn when the draw is one the checkers refuse: the
    harness draws nth_paragraph up to num_paragraphs + 1)."""
    for _ in range(50):
        state = random.getstate()
        random.seed(rng.random())
        try:
            instruction = harness().registry.INSTRUCTION_DICT[instruction_id](instruction_id)
            if instruction_id == "combination:repeat_prompt":
                instruction.build_description(prompt_to_repeat=PROMPT)
            else:
                instruction.build_description()
            kwargs = {k: v for k, v in (instruction.get_instruction_args() or {}).items() if v is not None}
        finally:
            random.setstate(state)
        try:
            checkers.validate_record({"instruction_id_list": [instruction_id], "kwargs": [kwargs]})
        except ValueError:
            continue
        return kwargs
    raise AssertionError(f"no valid draw for {instruction_id}")


def needs_more_text(instruction_id: str, kwargs: dict, text: str) -> bool:
    """The draws no edit of ``text`` can satisfy without filler or a rewrite (the fixers raise for them)."""
    if instruction_id == "length_constraints:number_sentences":
        n = kwargs["num_sentences"]
        return n <= 1 if kwargs["relation"] == "less than" else checkers._count_sentences(text) < n
    if instruction_id == "keywords:letter_frequency" and kwargs["let_relation"] == "less than":
        first = checkers._sentences(text)[0]
        return first.lower().count(kwargs["letter"]) >= kwargs["let_frequency"]
    return False


@pytest.mark.parametrize("instruction_id", FIXABLE_IDS)
def test_fixer_passes_the_harness_over_random_draws(instruction_id):
    rng = random.Random(f"single-{instruction_id}")
    passed = 0
    for _ in range(20):
        kwargs = draw(instruction_id, rng)
        for text in TEXTS:
            try:
                out = apply_constraint(instruction_id, text, kwargs)
            except ValueError:
                assert needs_more_text(instruction_id, kwargs, text), (instruction_id, kwargs, text)
                continue
            if instruction_id == "length_constraints:number_words" and kwargs["relation"] == "at least" and (
                    count_words(text) < kwargs["num_words"]):
                assert out == text  # "at least": no filler, returned unchanged for the caller to check
                continue
            assert check_instruction(instruction_id, out, kwargs), (kwargs, out)
            passed += 1
    assert passed >= 20, passed


def test_response_language_has_no_fixer():
    assert "language:response_language" not in FIXABLE_IDS
    assert len(FIXABLE_IDS) == 24


def random_combinations(n: int, seed: str = "combinations"):
    rng = random.Random(seed)
    ids = list(FIXABLE_IDS)
    while n:
        combo = rng.sample(ids, rng.choice([2, 3]))
        if not compatible(combo):
            continue
        n -= 1
        yield combo, [draw(i, rng) for i in combo], TEXTS[n % len(TEXTS)]


def test_random_compatible_combinations_pass_or_raise():
    per_id = collections.defaultdict(lambda: [0, 0])
    passed = total = 0
    for combo, kwargs, text in random_combinations(200):
        try:
            out = apply_constraints(text, combo, kwargs)
        except ValueError:
            ok = False
        else:
            assert all(check_record(out, combo, kwargs)), (combo, kwargs, out)
            ok = True
        passed += ok
        total += 1
        for i in combo:
            per_id[i][0] += ok
            per_id[i][1] += 1
    print(f"\ncombinations passing: {passed}/{total}")
    for i, (good, n) in sorted(per_id.items()):
        print(f"  {i:48s} {good}/{n}")
    # Most failures are draws no edit reaches ("at least 400 words" from a 60-word answer): a floor, so a
    # fixer that stops composing with the others shows up here.
    assert passed / total >= 0.75, passed / total


def test_json_fixer_writes_an_object_not_a_bare_string():
    quoted = f'"{TEXTS[0]}"'
    assert check_instruction("detectable_format:json_format", quoted, {})  # the harness would accept it
    for text in (TEXTS[0], quoted, f"```json\n{quoted}\n```"):
        out = apply_constraint("detectable_format:json_format", text, {})
        assert out != quoted
        value = json.loads(out.removeprefix("```json").removesuffix("```"))
        assert isinstance(value, dict) and TEXTS[0] in json.dumps(value), out
    out = apply_constraint("detectable_format:json_format", TEXTS[0], {}, topic="rivers")
    assert json.loads(out.removeprefix("```json").removesuffix("```"))["topic"] == "Rivers"


def test_fixer_outputs_in_detail():
    text = TEXTS[0]
    assert apply_constraint("detectable_format:title", text, {}, topic="the river delta").startswith(
        "<<The River Delta>>\nRivers shape")
    assert apply_constraint("detectable_format:title", text, {}).startswith("<<Rivers>>\n")
    out = apply_constraint("detectable_content:postscript", text, {"postscript_marker": "P.P.S"})
    assert out.startswith(text) and out.split("\n\n")[-1].startswith("P.P.S ")
    out = apply_constraint("length_constraints:number_paragraphs", text, {"num_paragraphs": 3})
    assert out.count("\n\n***\n\n") == 2
    out = apply_constraint("detectable_format:multiple_sections", text,
                           {"section_spliter": "SECTION", "num_sections": 2})
    assert out.startswith("SECTION 1\nRivers") and "\n\nSECTION 2\n" in out
    kw = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}
    out = apply_constraint("length_constraints:nth_paragraph_first_word", text, kw)
    assert out.split("\n\n")[1].startswith("However, ")
    out = apply_constraint("combination:two_responses", text, {})
    first, second = out.split("\n\n******\n\n")
    assert first.startswith("Rivers shape") and second.endswith("rivers behave.") and first != second
    out = apply_constraint("combination:repeat_prompt", text, {"prompt_to_repeat": PROMPT})
    assert out == f"{PROMPT}\n\n{text}"
    out = apply_constraint("detectable_format:constrained_response", text, {})
    assert out.split(". ", 1)[0] + "." in ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    out = apply_constraint("keywords:forbidden_words", text, {"forbidden_words": ["rivers", "soil"]})
    assert out.startswith("These shape the land") and "renew it." in out
    out = apply_constraint("detectable_content:number_placeholders", text, {"num_placeholders": 2})
    assert out == text + " You can reach [name] at [email] for more."
    out = apply_constraint("detectable_format:number_highlighted_sections", text, {"num_highlights": 2})
    # whole sentences in single asterisks, the final punctuation outside, never at the start of a line: the
    # second sentence and the last for two
    assert out.replace("*", "") == text and out.count("*") == 4 and not out.startswith("*")
    assert out.startswith("Rivers shape the land over long periods of time. *They carve valleys, move sediment, and ")
    assert out.endswith(" *Today, dams and levees change how rivers behave*.")
    out = apply_constraint("length_constraints:number_sentences", text, {"num_sentences": 3,
                                                                           "relation": "less than"})
    assert text.startswith(out) and out.endswith("feed wetlands.")
    out = apply_constraint("keywords:frequency", text, {"keyword": "rivers", "frequency": 1,
                                                        "relation": "less than"})
    assert "river" not in out.lower()


def test_highlights_and_bullets_compose():
    ids = ["detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
           "length_constraints:number_paragraphs", "startend:end_checker"]
    kwargs = [{"num_bullets": 4}, {"num_highlights": 3}, {"num_paragraphs": 2}, {"end_phrase": "Any other questions?"}]
    out = apply_constraints(TEXTS[1], ids, kwargs)
    assert all(check_record(out, ids, kwargs)), out


def test_less_than_budgets_are_tightened_for_later_additions():
    # The keyword lead and the postscript add a sentence each after the trim; the trim target tightens.
    ids = ["length_constraints:number_sentences", "keywords:existence", "detectable_content:postscript"]
    kwargs = [{"num_sentences": 5, "relation": "less than"}, {"keywords": ["salmon"]},
              {"postscript_marker": "P.S."}]
    out = apply_constraints(TEXTS[1], ids, kwargs)
    assert all(check_record(out, ids, kwargs)), out


def test_incompatible_pairs():
    conflicts = harness().registry.INSTRUCTION_CONFLICTS
    for a, others in conflicts.items():
        for b in others:
            if a != b:
                assert frozenset((a, b)) in INCOMPATIBLE_PAIRS  # the registry's, made symmetric
    assert frozenset(("change_case:english_lowercase", "detectable_format:multiple_sections")) in INCOMPATIBLE_PAIRS
    assert not compatible(["detectable_format:json_format", "punctuation:no_comma"])
    assert not compatible(["punctuation:no_comma", "punctuation:no_comma"])
    assert not compatible(["language:response_language"])
    assert compatible(["detectable_format:json_format", "keywords:existence"])
    assert compatible(["detectable_format:title", "detectable_content:postscript", "startend:end_checker"])


def test_combination_a_fixer_cannot_meet_raises():
    # nth_paragraph_first_word's paragraph 1 must start with the word; the title line comes first.
    with pytest.raises(ValueError, match="cannot satisfy"):
        apply_constraints(TEXTS[0], ["detectable_format:title", "length_constraints:nth_paragraph_first_word"],
                          [{}, {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "dog"}])
