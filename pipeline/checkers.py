"""IFEval instruction checks: a thin adapter over lm-evaluation-harness's IFEval verifiers.

One module shared by the data script, the evaluation, the PPO/distillation pass rates and the
verifier reward. The verdicts are lm-evaluation-harness's (`lm_eval/tasks/ifeval`, the scorer papers
and leaderboards use; a maintained copy of Google's instruction registry, Zhou et al. 2023,
arXiv:2311.07911): ``check_record`` builds the harness's ``InputExample`` and calls its
``test_instruction_following_strict`` / ``test_instruction_following_loose``, for all 25 instruction
ids. Nothing is re-implemented here; see ``pipeline/ifeval.py`` for how the harness is loaded offline
(NLTK ``punkt_tab``) and ``docs/ifeval.md`` for what that means for the numbers.

What this module adds around the harness:

* Validation. The harness silently replaces a missing or falsy kwarg (``None``, ``0``, ``""``,
  ``[]``) by a *random* value, and raises a bare ``TypeError`` on an unknown one. ``validate_record``
  (called on every data file) and every check reject those with a message naming the file, row,
  instruction and kwarg, and an unknown instruction id with a "did you mean" suggestion. Extra kwargs
  whose value is ``None`` are ignored (the hub copy of IFEval lists every kwarg, mostly ``None``).
* Determinism: langdetect (english_lowercase / english_capital / response_language) is seeded at 0.
* Loose: ``loose=True`` is the harness's loose variant (the response as is, without its first line,
  without its last line, without both, and each with every ``*`` removed; any passing variant counts).
  Like the harness, a blank response follows no instruction.
* ``describe``: a short description, for error messages of the data script.
* Fixers (``apply_constraint`` / ``apply_constraints``, data generation only): turn a plain English answer
  into text that satisfies the instructions, for 24 of the 25 ids (``FIXABLE_IDS``; not
  ``language:response_language``). They edit the answer (a title line, a postscript, sections, paragraphs,
  highlights, placeholders, trimmed or added sentences, a JSON object, two responses ...), add no filler to
  reach an "at least" length, never use evaluation prompts, and their output is judged by the harness like
  everything else. ``INCOMPATIBLE_PAIRS`` / ``compatible`` name the combinations not to ask for together
  (the registry's ``INSTRUCTION_CONFLICTS`` plus what the fixers cannot combine).

Known gameability (the harness's verdict, kept as is for scoring): ``detectable_format:json_format``
passes any text that parses as JSON, so a whole answer wrapped in double quotes passes it (a JSON
string). ``pipeline.rewards.VerifierReward`` can refuse that for training only (``json_guard``).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "FIXABLE_IDS",
    "FIX_ORDER",
    "INCOMPATIBLE_PAIRS",
    "SUPPORTED_IDS",
    "UnknownInstructionError",
    "apply_constraint",
    "apply_constraints",
    "check_instruction",
    "check_record",
    "compatible",
    "describe",
    "validate_record",
]

LOWERCASE = "change_case:english_lowercase"
CAPITAL = "change_case:english_capital"
NO_COMMA = "punctuation:no_comma"
NUMBER_WORDS = "length_constraints:number_words"
END_CHECKER = "startend:end_checker"
KEYWORDS = "keywords:existence"
BULLETS = "detectable_format:number_bullet_lists"
QUOTATION = "startend:quotation"

RELATIONS = ("less than", "at least")


class UnknownInstructionError(ValueError):
    """An instruction id that is not one of IFEval's 25 (``SUPPORTED_IDS``).

    Attributes:
        instruction_id: the offending id.
        where: location given by the caller (e.g. ``"data/x.jsonl row 3"``), may be empty.
        suggestion: closest supported id, or ``None``.
    """

    def __init__(self, instruction_id: str, where: str = "") -> None:
        self.instruction_id = instruction_id
        self.where = where
        self.suggestion = _suggest(instruction_id)
        msg = f"unknown instruction id {instruction_id!r}"
        if self.suggestion:
            msg += f"; did you mean {self.suggestion!r}?"
        msg += " Supported ids (IFEval's, scored by lm-evaluation-harness): " + ", ".join(SUPPORTED_IDS)
        super().__init__(_at(where, msg))


# --------------------------------------------------------------------------- helpers


def _at(where: str, msg: str) -> str:
    return f"{where}: {msg}" if where else msg


def _suggest(instruction_id: object) -> str | None:
    if not isinstance(instruction_id, str):
        return None
    match = difflib.get_close_matches(instruction_id, SUPPORTED_IDS, n=1, cutoff=0.6)
    if match:
        return match[0]
    # Fall back on the part after the group, e.g. "english_lowercase" or "case:lowercase".
    names = {i.split(":", 1)[1]: i for i in SUPPORTED_IDS}
    tail = instruction_id.rsplit(":", 1)[-1]
    match = difflib.get_close_matches(tail, list(names), n=1, cutoff=0.6)
    return names[match[0]] if match else None


def count_words(text: str) -> int:
    """Count words like the harness (nltk ``RegexpTokenizer(r"\\w+")``); used by the fixers."""
    return len(re.findall(r"\w+", text))


_BULLET_STAR = re.compile(r"^\s*\*[^\*].*$", flags=re.MULTILINE)
_BULLET_DASH = re.compile(r"^\s*-.*$", flags=re.MULTILINE)


def count_bullets(text: str) -> int:
    """Count bullet lines like the harness (``*`` bullets plus ``-`` bullets); used by the fixers."""
    return len(_BULLET_STAR.findall(text)) + len(_BULLET_DASH.findall(text))


def _is_bullet_line(line: str) -> bool:
    return count_bullets(line) > 0


# --------------------------------------------------------------------------- kwargs


def _count(name: str, value: Any) -> str | None:
    # The harness drops falsy kwargs (0 included) and then draws a random count: 0 is refused.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an int, got {type(value).__name__} {value!r}"
    if value < 1:
        return (f"{name} must be >= 1, got {value} (lm-evaluation-harness drops a 0 or negative count and "
                "draws a random one)")
    return None


def _relation(name: str, value: Any) -> str | None:
    if value not in RELATIONS:
        return f"{name} must be one of {RELATIONS}, got {value!r}"
    return None


def _nonempty_str(name: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"{name} must be a non-empty string, got {value!r}"
    return None


def _pattern(name: str, value: Any) -> str | None:
    # The harness passes keywords to re.search as regular expressions.
    problem = _nonempty_str(name, value)
    if problem:
        return problem
    try:
        re.compile(value)
    except re.error as e:
        return f"{name} {value!r} is not a valid regular expression ({e}); the harness searches it as one"
    return None


def _keyword_list(name: str, value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or not value:
        return f"{name} must be a non-empty list of non-empty strings, got {value!r}"
    for k in value:
        problem = _pattern(name, k)
        if problem:
            return f"{name} must be a non-empty list of non-empty strings: {problem}"
    return None


def _letter(name: str, value: Any) -> str | None:
    # One character. A non-letter is accepted because public IFEval has two (keys 1122 '#' and 1129 '!');
    # the harness then checks a random letter instead (see check_record).
    if not isinstance(value, str) or len(value) != 1:
        return f"{name} must be one ASCII letter, got {value!r}"
    return None


def _draws_at_random(instruction_id: str, kwargs: Mapping[str, Any]) -> bool:
    letter = kwargs.get("letter", "a") if instruction_id == "keywords:letter_frequency" else "a"
    return not ("a" <= letter.lower() <= "z")


def _language(name: str, value: Any) -> str | None:
    from .ifeval import harness

    codes = harness().instructions_util.LANGUAGE_CODES
    if value not in codes:
        return f"{name} must be an ISO 639-1 code the harness knows ({', '.join(codes)}), got {value!r}"
    return None


# instruction id -> {kwarg name: validator}; every listed kwarg is required (the harness would draw a
# missing one at random). The names are the harness's `build_description` arguments.
_KWARG_SPECS: dict[str, dict[str, Callable[[str, Any], str | None]]] = {
    "change_case:capital_word_frequency": {"capital_frequency": _count, "capital_relation": _relation},
    CAPITAL: {},
    LOWERCASE: {},
    "combination:repeat_prompt": {"prompt_to_repeat": _nonempty_str},
    "combination:two_responses": {},
    "detectable_content:number_placeholders": {"num_placeholders": _count},
    "detectable_content:postscript": {"postscript_marker": _nonempty_str},
    "detectable_format:constrained_response": {},
    "detectable_format:json_format": {},
    "detectable_format:multiple_sections": {"section_spliter": _nonempty_str, "num_sections": _count},
    BULLETS: {"num_bullets": _count},
    "detectable_format:number_highlighted_sections": {"num_highlights": _count},
    "detectable_format:title": {},
    KEYWORDS: {"keywords": _keyword_list},
    "keywords:forbidden_words": {"forbidden_words": _keyword_list},
    "keywords:frequency": {"keyword": _pattern, "frequency": _count, "relation": _relation},
    "keywords:letter_frequency": {"letter": _letter, "let_frequency": _count, "let_relation": _relation},
    "language:response_language": {"language": _language},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": _count, "nth_paragraph": _count,
                                                    "first_word": _nonempty_str},
    "length_constraints:number_paragraphs": {"num_paragraphs": _count},
    "length_constraints:number_sentences": {"num_sentences": _count, "relation": _relation},
    NUMBER_WORDS: {"num_words": _count, "relation": _relation},
    NO_COMMA: {},
    END_CHECKER: {"end_phrase": _nonempty_str},
    QUOTATION: {},
}

SUPPORTED_IDS: tuple[str, ...] = tuple(sorted(_KWARG_SPECS))
"""IFEval's 25 instruction ids (lm-evaluation-harness ``instructions_registry.INSTRUCTION_DICT``)."""


def _require_known(instruction_id: str, where: str = "") -> None:
    if not isinstance(instruction_id, str) or instruction_id not in _KWARG_SPECS:
        raise UnknownInstructionError(instruction_id, where)


def _clean_kwargs(
    instruction_id: str, kwargs: Mapping[str, Any] | None, where: str = ""
) -> dict[str, Any]:
    """Validate kwargs for a (known) id; drop ``None`` extras; return a clean copy."""
    _require_known(instruction_id, where)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(
            _at(where, f"{instruction_id}: kwargs must be a dict, got {type(kwargs).__name__}")
        )
    spec = _KWARG_SPECS[instruction_id]
    clean = {k: v for k, v in kwargs.items() if v is not None}
    extra = sorted(set(clean) - set(spec))
    if extra:
        expected = ", ".join(spec) or "none"
        raise ValueError(
            _at(where, f"{instruction_id}: unexpected kwarg(s) {extra} (expected: {expected})")
        )
    for name, validator in spec.items():
        if name not in clean:
            raise ValueError(_at(where, f"{instruction_id}: missing required kwarg {name!r}"))
        problem = validator(name, clean[name])
        if problem:
            raise ValueError(_at(where, f"{instruction_id}: {problem}"))
    if instruction_id == "length_constraints:nth_paragraph_first_word" and (
        clean["nth_paragraph"] > clean["num_paragraphs"]
    ):
        raise ValueError(_at(where, f"{instruction_id}: nth_paragraph ({clean['nth_paragraph']}) must be <= "
                                    f"num_paragraphs ({clean['num_paragraphs']})"))
    return clean


# --------------------------------------------------------------------------- checks (the harness's)


def check_record(
    response: str,
    instruction_id_list: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
    loose: bool = False,
    prompt: str = "",
) -> list[bool]:
    """One bool per instruction: lm-evaluation-harness's verdict (strict, or loose) on ``response``.

    Prompt-level accuracy is ``all(result)``; instruction-level accuracy averages the bools.
    ``prompt`` is passed to the harness's ``InputExample`` (no check of the 25 reads it: repeat_prompt
    takes its text from the ``prompt_to_repeat`` kwarg).

    Raises:
        ValueError: the two lists differ in length, or kwargs are invalid.
        UnknownInstructionError: an id is not one of the 25.
    """
    from .ifeval import harness

    if len(instruction_id_list) != len(kwargs_list):
        raise ValueError(
            f"{len(instruction_id_list)} instruction ids but {len(kwargs_list)} kwargs dicts"
        )
    clean = [_clean_kwargs(i, kw) for i, kw in zip(instruction_id_list, kwargs_list)]
    utils = harness().utils
    inp = utils.InputExample(key=0, instruction_id_list=list(instruction_id_list), prompt=prompt,
                             kwargs=clean)
    test = utils.test_instruction_following_loose if loose else utils.test_instruction_following_strict
    with _fixed_random(any(_draws_at_random(i, kw) for i, kw in zip(instruction_id_list, clean))):
        return [bool(x) for x in test(inp, response).follow_instruction_list]


@contextlib.contextmanager
def _fixed_random(needed: bool) -> Iterator[None]:
    """A letter_frequency `letter` that is not a letter: the harness draws one with Python's global
    `random`. Draw it from a fixed seed (the global state restored after) so the verdict is reproducible."""
    if not needed:
        yield
        return
    state = random.getstate()
    random.seed(0)
    try:
        yield
    finally:
        random.setstate(state)


def check_instruction(
    instruction_id: str,
    response: str,
    kwargs: Mapping[str, Any] | None,
    *,
    loose: bool = False,
) -> bool:
    """Whether ``response`` follows one instruction: the harness's verdict (strict or loose).

    Raises:
        UnknownInstructionError: ``instruction_id`` is not one of the 25.
        ValueError: kwargs are invalid (missing/ill-typed kwarg, unexpected non-None kwarg).
    """
    return check_record(response, [instruction_id], [kwargs], loose=loose)[0]


def validate_record(record: Mapping[str, Any], where: str = "") -> None:
    """Check that a record's instructions are IFEval ids and their kwargs are valid.

    ``where`` names the location for error messages, e.g. ``"data/x.jsonl row 3"``.

    Raises:
        UnknownInstructionError: an id is not one of the 25 (message names the id, ``where``,
            a "did you mean" suggestion and the supported ids).
        ValueError: missing/ill-typed ``instruction_id_list`` or ``kwargs``, length mismatch,
            or an invalid/missing kwarg (named in the message).
    """
    if not isinstance(record, Mapping):
        raise ValueError(_at(where, f"record must be a dict, got {type(record).__name__}"))
    ids = record.get("instruction_id_list")
    kwargs_list = record.get("kwargs")
    if not isinstance(ids, list):
        raise ValueError(_at(where, "record needs 'instruction_id_list' (a list)"))
    if not isinstance(kwargs_list, list):
        raise ValueError(_at(where, "record needs 'kwargs' (a list of dicts)"))
    if len(ids) != len(kwargs_list):
        raise ValueError(
            _at(where, f"{len(ids)} instruction ids but {len(kwargs_list)} kwargs dicts")
        )
    for index, (instruction_id, kwargs) in enumerate(zip(ids, kwargs_list)):
        loc = f"{where} instruction {index}" if where else f"instruction {index}"
        _clean_kwargs(instruction_id, kwargs, loc)


def describe(instruction_id: str, kwargs: Mapping[str, Any] | None) -> str:
    """Short human-readable description, e.g. ``"at least 120 words"`` (the harness's own instruction
    text for ids outside the eight the built-in task uses)."""
    kw = _clean_kwargs(instruction_id, kwargs)
    if instruction_id == LOWERCASE:
        return "all lowercase letters"
    if instruction_id == CAPITAL:
        return "all capital letters"
    if instruction_id == NO_COMMA:
        return "no commas"
    if instruction_id == NUMBER_WORDS:
        return f"{kw['relation']} {kw['num_words']} words"
    if instruction_id == END_CHECKER:
        return f"ends with {kw['end_phrase'].strip()!r}"
    if instruction_id == KEYWORDS:
        words = ", ".join(repr(k) for k in kw["keywords"])
        return f"includes keyword{'s' if len(kw['keywords']) > 1 else ''} {words}"
    if instruction_id == BULLETS:
        n = kw["num_bullets"]
        return f"exactly {n} bullet point{'' if n == 1 else 's'}"
    if instruction_id == QUOTATION:
        return "wrapped in double quotes"
    from .ifeval import harness

    instruction = harness().registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    with _fixed_random(_draws_at_random(instruction_id, kw)):
        return instruction.build_description(**kw)


# --------------------------------------------------------------------------- fixers (data generation only)

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_LIST_MARKER = re.compile(r"^\s*(?:[*\-\u2022+]|\d+[.)])\s+")


def _append_sentence(text: str, sentence: str) -> str:
    """Append ``sentence`` after ``text``: a new paragraph after a bullet list, else inline."""
    body = text.rstrip()
    if not body:
        return sentence
    last_line = body.rsplit("\n", 1)[-1]
    if _is_bullet_line(last_line) and not sentence.lstrip().startswith(("*", "-")):
        return f"{body}\n\n{sentence}"
    if body[-1] not in ".!?:;\"')]":
        body += "."
    return f"{body} {sentence}"


def _join_words(words: Sequence[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


# What a fixer may know besides its own kwargs (set by apply_constraint/apply_constraints): the caller's
# ``topic`` and the ``ids`` of the whole record, so a fixer can keep what another instruction needs.
_FIX_CONTEXT: contextvars.ContextVar[dict] = contextvars.ContextVar("fix_context", default={})


def _fix_lowercase(text: str, kw: dict) -> str:
    return text.lower()


def _fix_capital(text: str, kw: dict) -> str:
    return text.upper()


def _fix_no_comma(text: str, kw: dict) -> str:
    # Commas before a line end vanish; other commas become one space ("a, b" -> "a b").
    # Only spaces/tabs are consumed so line structure (bullets) is kept.
    text = re.sub(r"[ \t]*,[ \t]*(?=\n|$)", "", text)
    return re.sub(r"[ \t]*,[ \t]*", " ", text)


def _fix_number_words(text: str, kw: dict) -> str:
    limit = kw["num_words"]
    if kw["relation"] == "at least" or count_words(text) < limit:
        return text  # "at least": caller must check; we never pad with filler.
    if limit <= 1:
        raise ValueError(f"cannot trim text to less than {limit} words and keep it non-empty")
    # Prefer cutting at the latest sentence end or line end that is under the limit.
    cuts = {m.end() for m in _SENTENCE_END.finditer(text)}
    cuts |= {m.start() for m in re.finditer(r"\n", text)}
    for cut in sorted(cuts, reverse=True):
        head = text[:cut].rstrip()
        if head.strip() and count_words(head) < limit:
            return head
    # First sentence alone is too long: keep the first limit-1 words.
    words = list(re.finditer(r"\w+", text))
    return text[: words[limit - 2].end()].rstrip()


def _fix_end(text: str, kw: dict) -> str:
    if check_instruction(END_CHECKER, text, kw):
        return text
    return _append_sentence(text, kw["end_phrase"].strip())


_KEYWORD_LEADS = (
    "{words} both come to mind here.",
    "{words} are worth a mention.",
    "{words} belong in this picture too.",
)
_KEYWORD_LEAD_ONE = "{words} is worth a mention."


def _fix_keywords(text: str, kw: dict) -> str:
    # The missing keywords open the text in a short lead sentence: copying the prompt's quoted words
    # right at the start is what a small model learns from demonstrations; a sentence tacked on at
    # the end was copied as a template with the wrong words. The lead varies with the words
    # (deterministically, so the data script stays reproducible).
    missing = [
        k for k in kw["keywords"] if not re.search(re.escape(k), text, flags=re.IGNORECASE)
    ]
    if not missing:
        return text
    words = _join_words(missing)
    words = words[:1].upper() + words[1:]
    if len(missing) == 1:
        lead = _KEYWORD_LEAD_ONE.format(words=words)
    else:
        pick = sum(map(ord, "".join(missing))) % len(_KEYWORD_LEADS)
        lead = _KEYWORD_LEADS[pick].format(words=words)
    body = text.strip()
    if not body:
        return lead
    # Before a list the lead gets a line of its own, so the bullet count does not change.
    sep = "\n" if _is_bullet_line(body.split("\n", 1)[0]) else " "
    return f"{lead}{sep}{body}"


def _fix_bullets(text: str, kw: dict) -> str:
    n = kw["num_bullets"]
    if check_instruction(BULLETS, text, kw):
        return text
    units: list[str] = []
    for line in text.splitlines():
        line = _LIST_MARKER.sub("", line).strip()
        if line:
            units.extend(s.strip() for s in _SENTENCE_SPLIT.split(line) if s.strip())
    if n == 0:
        return " ".join(units)
    if not units:
        raise ValueError(f"cannot make {n} bullet points from empty text")
    # Too few sentences: split the longest at its middle word; too many: merge into n balanced groups.
    bullets = ["* " + " ".join(group) for group in _groups(units, n)]
    return "\n".join(bullets)


def _fix_quotation(text: str, kw: dict) -> str:
    if check_instruction(QUOTATION, text, kw):
        return text
    body = text.strip()
    # Keep a leading bullet on its own line so the bullet count does not change.
    opening = '"\n' if body[:1] in ("*", "-") else '"'
    return f"{opening}{body}\""


# ----- fixers for the other ids (data generation only; every output is judged by the harness)

TITLE = "detectable_format:title"
POSTSCRIPT = "detectable_content:postscript"
PLACEHOLDERS = "detectable_content:number_placeholders"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
SECTIONS = "detectable_format:multiple_sections"
PARAGRAPHS = "length_constraints:number_paragraphs"
NTH_PARAGRAPH = "length_constraints:nth_paragraph_first_word"
SENTENCES = "length_constraints:number_sentences"
LETTERS = "keywords:letter_frequency"
CAPITAL_WORDS = "change_case:capital_word_frequency"
FREQUENCY = "keywords:frequency"
FORBIDDEN = "keywords:forbidden_words"
JSON_FORMAT = "detectable_format:json_format"
CONSTRAINED = "detectable_format:constrained_response"
TWO_RESPONSES = "combination:two_responses"
REPEAT_PROMPT = "combination:repeat_prompt"
LANGUAGE = "language:response_language"

_STOPWORDS = frozenset(
    "a an the and or but of in on at to for from with by as is are was were be been being it its this that "
    "these those they them their there here have has had do does did not no so if than then very can could "
    "will would should may might also about into over under more most many much some such other each every "
    "one two all any you your we our he she his her i my me what which who when where why how just only "
    "often always while because during between through after before".split())
_PARAGRAPH_DIVIDER = "\n\n***\n\n"
_DISCOURSE_WORDS = frozenset(
    "however moreover furthermore also additionally finally first firstly second secondly third lastly then "
    "therefore thus so still yet indeed overall meanwhile besides instead today now and but next later "
    "similarly likewise consequently hence nevertheless nonetheless otherwise sometimes usually often "
    "surprisingly interestingly importantly ultimately generally basically honestly".split())


def _pick(options: Sequence[str], seed_text: str) -> str:
    """A deterministic choice (the data script must stay reproducible), varied with the text."""
    return options[sum(map(ord, seed_text)) % len(options)]


def _cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.strip()) if s.strip()]


def _count_sentences(text: str) -> int:
    from .ifeval import harness

    return harness().instructions_util.count_sentences(text)


def _count_capital_words(text: str) -> int:
    from .ifeval import harness

    return sum(1 for w in harness().instructions_util.nltk.word_tokenize(text) if w.isupper())


def _count_regex(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def _topic_words(text: str, kw: dict) -> str:
    """A short title-like name for what the text is about: the caller's topic when given, else the text's
    most frequent content word (ties: the earliest)."""
    topic = (_FIX_CONTEXT.get().get("topic") or "").strip()
    if topic:
        return " ".join(w if w.isupper() else _cap_first(w) for w in topic.split())
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z'-]+", text) if len(w) > 3 and w.lower() not in _STOPWORDS]
    if not words:
        return "A Short Answer"
    counts: dict[str, int] = {}
    for w in words:
        counts[w.lower()] = counts.get(w.lower(), 0) + 1
    best = max(counts, key=lambda w: (counts[w], -[x.lower() for x in words].index(w)))
    return _cap_first(best)


def _units(text: str) -> list[str]:
    """Text broken into re-flowable units: a bullet line is one unit, other lines are split into sentences.
    Paragraph dividers (``***``) and section headers are dropped (the structure fixers rebuild them)."""
    units: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or re.fullmatch(r"\*{3,}", stripped):
            continue
        if _is_bullet_line(line):
            units.append(stripped)
        else:
            units.extend(_sentences(stripped))
    return units


def _groups(units: list[str], n: int) -> list[list[str]]:
    """``units`` in ``n`` balanced consecutive groups; the longest non-bullet unit is split at its middle
    word while there are fewer units than groups."""
    units = list(units)
    if not units:
        raise ValueError(f"cannot make {n} parts from empty text")
    while len(units) < n:
        splittable = [j for j in range(len(units)) if not _is_bullet_line(units[j]) and len(units[j].split()) > 1]
        if not splittable:
            raise ValueError(f"text has too few words for {n} parts")
        i = max(splittable, key=lambda j: len(units[j].split()))
        parts = units[i].split()
        half = len(parts) // 2
        units[i: i + 1] = [" ".join(parts[:half]), " ".join(parts[half:])]
    q, r = divmod(len(units), n)
    groups, start = [], 0
    for b in range(n):
        size = q + (1 if b < r else 0)
        groups.append(units[start: start + size])
        start += size
    return groups


def _render(group: list[str]) -> str:
    """Join units: a bullet line keeps a line of its own, sentences run on."""
    out = ""
    for unit in group:
        if not out:
            out = unit
        elif _is_bullet_line(unit) or _is_bullet_line(out.rsplit("\n", 1)[-1]):
            out += "\n" + unit
        else:
            out += " " + unit
    return out


def _fix_title(text: str, kw: dict) -> str:
    if check_instruction(TITLE, text, {}):
        return text
    # One newline, not a blank line: the title does not count as a paragraph of its own.
    return f"<<{_topic_words(text, kw)}>>\n{text.strip()}"


_POSTSCRIPTS = (
    "Thanks for reading.",
    "I hope this was helpful.",
    "There is always more to learn about this.",
    "Let me know if you would like more detail.",
)


def _fix_postscript(text: str, kw: dict) -> str:
    if check_instruction(POSTSCRIPT, text, {"postscript_marker": kw["postscript_marker"]}):
        return text
    body = text.rstrip()
    # A text in \n\n paragraphs (or one that must keep its \n\n paragraph count) gets its postscript on a
    # line of its own inside the last paragraph, so the paragraph count does not change.
    sep = "\n" if "\n\n" in body or NTH_PARAGRAPH in _FIX_CONTEXT.get().get("ids", ()) else "\n\n"
    return f"{body}{sep}{kw['postscript_marker'].strip()} {_pick(_POSTSCRIPTS, body)}"


_PLACEHOLDER_PARTS = (
    "You can reach [name]", " at [email]", " or visit [address]", " on [date]", " at [time]",
    " and ask for [contact person]", " about [subject]", " with [reference number]",
)


def _fix_placeholders(text: str, kw: dict) -> str:
    n = kw["num_placeholders"]
    have = len(re.findall(r"\[.*?\]", text))
    if have >= n:
        return text
    need = n - have
    parts = list(_PLACEHOLDER_PARTS[:need])
    parts += [f" and [detail {k}]" for k in range(len(parts) + 1, need + 1)]
    return _append_sentence(text, "".join(parts) + " for more.")


def _fix_highlights(text: str, kw: dict) -> str:
    """Put single asterisks (``*like this*``, the markdown the instructions themselves show) around whole
    sentences, spread over the answer; short answers fall back to clauses, then to a sentence after its first
    word. The final punctuation stays outside, so sentence counters see the same sentences. A highlight never
    opens a line: ``*`` there would make the line a bullet (and after a list marker the harness pairs the
    marker's ``*`` with the highlight's)."""
    n = kw["num_highlights"]
    if check_instruction(HIGHLIGHTS, text, kw):
        return text
    lines = text.split("\n")

    def spans(pattern: str, skip_first_word: bool = False) -> list[tuple[int, int, int]]:  # (line, start, end)
        out = []
        for li, line in enumerate(lines):
            lead = len(line) - len(_LIST_MARKER.sub("", line)) if _is_bullet_line(line) else 0
            lead += len(line[lead:]) - len(line[lead:].lstrip())
            for m in re.finditer(pattern, line[lead:]):
                piece = m.group(0)
                body = piece.rstrip(" .!?,;:")
                start = lead + m.start() + (len(body) - len(body.lstrip()))
                body = body.strip()
                if skip_first_word and start == lead:
                    first = re.match(r"\S+\s+", body)
                    if first is None:
                        continue
                    start, body = start + first.end(), body[first.end():]
                if (start == lead or len(re.findall(r"[A-Za-z0-9]+", body)) < 2
                        or any(c in body for c in "*[]<>")):
                    continue
                out.append((li, start, start + len(body)))
        return out

    candidates = spans(r"[^.!?]+[.!?]*")  # sentences after the first of their line
    if len(candidates) < n:
        candidates = spans(r"[^.!?,;:]+[.!?,;:]*")  # clauses
    if len(candidates) < n:
        candidates = spans(r"[^.!?]+[.!?]*", skip_first_word=True)  # every sentence, from its second word
    if len(candidates) < n:
        raise ValueError(f"text has too few sentences or clauses for {n} highlighted sections")
    chosen = sorted({candidates[round(j * (len(candidates) - 1) / max(n - 1, 1))] for j in range(n)})
    for li, start, end in sorted(chosen, reverse=True):
        line = lines[li]
        lines[li] = f"{line[:start]}*{line[start:end]}*{line[end:]}"
    return "\n".join(lines)


def _fix_sections(text: str, kw: dict) -> str:
    n, spliter = kw["num_sections"], kw["section_spliter"].strip()
    groups = _groups(_units(text), n)
    return "\n\n".join(f"{spliter} {k}\n{_render(g)}" for k, g in enumerate(groups, start=1))


def _fix_paragraphs(text: str, kw: dict) -> str:
    if check_instruction(PARAGRAPHS, text, kw):
        return text
    return _PARAGRAPH_DIVIDER.join(_render(g) for g in _groups(_units(text), kw["num_paragraphs"]))


_FIRST_WORD_LEADS = ("{w} belongs here too.", "{w} comes to mind here.", "{w} is part of this as well.")


def _start_with(paragraph: str, word: str) -> str:
    if re.match(rf"['\"]*{re.escape(word)}(?:[\s.,?!'\"]|$)", paragraph, flags=re.IGNORECASE):
        return paragraph
    w = _cap_first(word)
    if word.lower() in _DISCOURSE_WORDS and not _is_bullet_line(paragraph.split("\n", 1)[0]):
        rest = paragraph if re.match(r"[A-Z]{2,}\b|I\b", paragraph) else paragraph[:1].lower() + paragraph[1:]
        return f"{w}, {rest}"
    lead = _pick(_FIRST_WORD_LEADS, word).format(w=w)
    sep = "\n" if _is_bullet_line(paragraph.split("\n", 1)[0]) else " "
    return f"{lead}{sep}{paragraph}"


def _fix_nth_paragraph(text: str, kw: dict) -> str:
    n, nth, word = kw["num_paragraphs"], kw["nth_paragraph"], kw["first_word"].strip()
    paragraphs = [_render(g) for g in _groups(_units(text), n)]
    paragraphs[nth - 1] = _start_with(paragraphs[nth - 1], word)
    return "\n\n".join(paragraphs)


def _cut_to(text: str, ok: Callable[[str], bool]) -> str:
    """The longest prefix of ``text`` ending at a sentence or line end for which ``ok`` holds."""
    if ok(text):
        return text
    cuts = {m.end() for m in _SENTENCE_END.finditer(text)} | {m.start() for m in re.finditer(r"\n", text)}
    for cut in sorted(cuts, reverse=True):
        head = text[:cut].rstrip()
        if head.strip() and ok(head):
            return head
    raise ValueError("no whole-sentence prefix of the text satisfies the instruction")


def _fix_sentences(text: str, kw: dict) -> str:
    n = kw["num_sentences"]
    if kw["relation"] == "less than":
        if n <= 1:
            raise ValueError("cannot write less than 1 sentence and keep the text non-empty")
        return _cut_to(text, lambda t: _count_sentences(t) < n)
    if _count_sentences(text) >= n:
        return text
    # More sentences without filler: a semicolon becomes a full stop.
    text = re.sub(r"\s*;\s+([a-z])", lambda m: ". " + m.group(1).upper(), text)
    return text  # the caller checks; no filler is added


def _fix_letters(text: str, kw: dict) -> str:
    letter, n = kw["letter"].lower(), kw["let_frequency"]
    if not ("a" <= letter <= "z"):
        raise ValueError(f"letter {letter!r} is not a letter (the harness would check a random one)")
    have = text.lower().count(letter)
    if kw["let_relation"] == "less than":
        return _cut_to(text, lambda t: t.lower().count(letter) < n)
    if have >= n:
        return text
    from .ifeval import harness

    pool = sorted({w for w in harness().instructions_util.WORD_LIST if letter in w},
                  key=lambda w: (-w.count(letter), w))
    if not pool:
        raise ValueError(f"no word with the letter {letter!r} to add")
    words: list[str] = []
    need = n - have - 1  # the sentence names the letter once
    for w in pool:
        if need <= 0:
            break
        words.append(w)
        need -= w.count(letter)
    if need > 0:
        raise ValueError(f"cannot reach {n} letters {letter!r}")
    return _append_sentence(text, f"Some words with the letter {letter}: {_join_words(words)}.")


_FREQUENCY_LEADS = ("{K} is worth a mention.", "{K} matters here too.", "It all comes back to {k}.")


def _drop_or_replace(text: str, pattern: str, allowed: int) -> str:
    """Fewer than ``allowed``+1 matches of ``pattern``: drop trailing sentences that contain it while
    more than one sentence is left, then replace the remaining whole-word matches."""
    def over(t: str) -> bool:
        return _count_regex(pattern, t) > allowed

    if not over(text):
        return text
    sentences = _sentences(text) if "\n" not in text.strip() else None
    if sentences and len(sentences) > 1:
        keep = list(sentences)
        for j in range(len(keep) - 1, -1, -1):
            if not over(" ".join(keep)) or len(keep) == 1:
                break
            if re.search(pattern, keep[j], flags=re.IGNORECASE):
                del keep[j]
        text = " ".join(keep)
    # What is left: the word that contains a match (the harness counts "guide" in "guided") is replaced.
    return _replace_words(text, [r"\w*(?:" + pattern + r")\w*"], allowed)


def _replace_words(text: str, patterns: Sequence[str], keep: int = 0) -> str:
    """Replace whole-word matches (after the first ``keep``) with a pronoun, with its determiner."""
    for pattern in patterns:
        seen = 0

        def sub(m: re.Match) -> str:
            nonlocal seen
            seen += 1
            if seen <= keep:
                return m.group(0)
            word = m.group("w")
            plural = word.lower().endswith("s") and not word.lower().endswith("ss")
            out = "these" if plural else ("this" if m.group("det") else "it")
            return _cap_first(out) if m.group(0)[:1].isupper() else out

        det = r"(?P<det>\b(?:the|a|an|this|that|these|those|its|their|our|your|his|her|my)\s+)?"
        text = re.sub(det + r"(?P<w>\b" + pattern + r"\b(?:'s)?)", sub, text, flags=re.IGNORECASE)
    return text


def _fix_frequency(text: str, kw: dict) -> str:
    keyword, n = kw["keyword"].strip(), kw["frequency"]
    pattern = keyword
    if kw["relation"] == "less than":
        return _drop_or_replace(text, pattern, n - 1)
    have = _count_regex(pattern, text)
    if have >= n:
        return text
    leads = [_FREQUENCY_LEADS[(j + sum(map(ord, keyword))) % len(_FREQUENCY_LEADS)] for j in range(n - have)]
    lead = " ".join(x.format(K=_cap_first(keyword), k=keyword) for x in leads)
    body = text.strip()
    sep = "\n" if body and _is_bullet_line(body.split("\n", 1)[0]) else " "
    return f"{lead}{sep}{body}" if body else lead


def _fix_forbidden(text: str, kw: dict) -> str:
    return _replace_words(text, [w.strip() for w in kw["forbidden_words"]])


def _fix_capital_words(text: str, kw: dict) -> str:
    n = kw["capital_frequency"]
    if check_instruction(CAPITAL_WORDS, text, kw):
        return text
    if kw["capital_relation"] == "less than":
        # Words in capitals (acronyms, shouting) beyond the allowance get an initial capital only.
        # A sentence-initial "A" counts as a word in capitals too: it becomes "One" ("One big step ...").
        out = text
        for m in reversed(list(re.finditer(r"\b[A-Z][A-Z']*[A-Z]\b|(?<![\w'])A(?= [a-z])", text))):
            word = "One" if m.group(0) == "A" else m.group(0).capitalize()
            out = out[: m.start()] + word + out[m.end():]
            if _count_capital_words(out) < n:
                return out
        return out
    # "at least": emphasise content words in capitals, longest first, then any word.
    words = list(re.finditer(r"(?<![\[<*\w])[A-Za-z]+(?![\w\]>])", text))
    order = sorted(words, key=lambda m: (m.group(0).lower() in _STOPWORDS, -len(m.group(0)), m.start()))
    chars = list(text)
    for m in order:
        if m.group(0).isupper():
            continue
        chars[m.start(): m.end()] = list(m.group(0).upper())
        if _count_capital_words("".join(chars)) >= n:
            break
    return "".join(chars)


def _answer(text: str, kw: dict) -> str:
    return _pick(("My answer is yes.", "My answer is no.", "My answer is maybe."), text)


def _fix_constrained(text: str, kw: dict) -> str:
    if check_instruction(CONSTRAINED, text, {}):
        return text
    return f"{_answer(text, kw)} {text.strip()}".strip()


def _json_object(text: str) -> dict | None:
    """The JSON object ``text`` holds (bare or in a ```json block, as the harness reads it), else None."""
    body = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(prefix)
    try:
        value = json.loads(body.removesuffix("```").strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _fix_json(text: str, kw: dict) -> str:
    body = text.strip()
    if _json_object(body) is not None:
        return body
    # Always an object: a bare JSON string ('"the answer"') passes the harness's check but is no JSON answer.
    obj = {"topic": _topic_words(body, kw), "answer": body}
    return "```json\n" + json.dumps(obj, indent=2, ensure_ascii=False) + "\n```"


def _fix_two_responses(text: str, kw: dict) -> str:
    if check_instruction(TWO_RESPONSES, text, {}):
        return text
    units = _units(text)
    if len(units) < 2:
        raise ValueError("cannot make two different responses from a single sentence")
    first, second = _groups(units, 2)
    head = ""
    lines = text.strip().split("\n")
    if re.fullmatch(r"<<[^\n]+>>", lines[0].strip()):
        head = lines[0].strip() + "\n"  # a title stays on top of the first response
        first, second = _groups(_units("\n".join(lines[1:])), 2)
    return f"{head}{_render(first)}\n\n******\n\n{_render(second)}"


def _fix_repeat_prompt(text: str, kw: dict) -> str:
    prompt = kw["prompt_to_repeat"].strip()
    if text.strip().lower().startswith(prompt.lower()):
        return text
    return f"{prompt}\n\n{text.strip()}"


_FIXERS: dict[str, Callable[[str, dict], str]] = {
    LOWERCASE: _fix_lowercase,
    CAPITAL: _fix_capital,
    NO_COMMA: _fix_no_comma,
    NUMBER_WORDS: _fix_number_words,
    END_CHECKER: _fix_end,
    KEYWORDS: _fix_keywords,
    BULLETS: _fix_bullets,
    QUOTATION: _fix_quotation,
    TITLE: _fix_title,
    POSTSCRIPT: _fix_postscript,
    PLACEHOLDERS: _fix_placeholders,
    HIGHLIGHTS: _fix_highlights,
    SECTIONS: _fix_sections,
    PARAGRAPHS: _fix_paragraphs,
    NTH_PARAGRAPH: _fix_nth_paragraph,
    SENTENCES: _fix_sentences,
    LETTERS: _fix_letters,
    CAPITAL_WORDS: _fix_capital_words,
    FREQUENCY: _fix_frequency,
    FORBIDDEN: _fix_forbidden,
    JSON_FORMAT: _fix_json,
    CONSTRAINED: _fix_constrained,
    TWO_RESPONSES: _fix_two_responses,
    REPEAT_PROMPT: _fix_repeat_prompt,
}

FIX_ORDER: tuple[str, ...] = (
    # 1. content: trims first (later fixers never remove sentences), then what adds sentences or words
    NUMBER_WORDS,
    SENTENCES,
    LETTERS,
    FREQUENCY,
    PLACEHOLDERS,
    # 2. structure: the list, then highlights inside it, then sections / paragraphs regroup whole lines
    BULLETS,
    KEYWORDS,  # a lead sentence (on its own line before a list)
    HIGHLIGHTS,
    SECTIONS,
    PARAGRAPHS,
    NTH_PARAGRAPH,
    TITLE,  # a first line of its own
    # 3. the end of the answer
    POSTSCRIPT,
    END_CHECKER,  # after the postscript: nothing may follow the end phrase
    FORBIDDEN,  # after everything that adds words (a title, a postscript)
    CONSTRAINED,
    REPEAT_PROMPT,  # before case: the harness compares the repeated prompt case-insensitively
    # 4. whole-text rewrites
    CAPITAL_WORDS,
    LOWERCASE,
    CAPITAL,
    NO_COMMA,  # after anything that may add commas
    # 5. wrappers, outermost last
    TWO_RESPONSES,
    JSON_FORMAT,
    QUOTATION,
)
"""Order in which ``apply_constraints`` applies fixers."""

FIXABLE_IDS: tuple[str, ...] = tuple(sorted(_FIXERS))
"""The instruction ids the fixers can satisfy: 24 of IFEval's 25. ``language:response_language`` has no
fixer: it asks for a whole answer in another language, which an edit of an English answer cannot give
honestly (that needs a translation model)."""


def _registry_conflicts() -> frozenset[frozenset[str]]:
    from .ifeval import harness

    conflicts = getattr(harness().registry, "INSTRUCTION_CONFLICTS", {})
    return frozenset(frozenset((a, b)) for a, others in conflicts.items() for b in others
                     if a != b and a in _KWARG_SPECS and b in _KWARG_SPECS)


# Pairs the registry allows that no edit satisfies: lowercase turns every section header ("Section",
# "SECTION", ...: the harness splits on the spliter case-sensitively) into one that no longer counts.
# Pairs that fail only for some kwargs are not listed (apply_constraints raises for those): english_capital
# with the spliter "Section"; a title with nth_paragraph_first_word's paragraph 1; no_comma with a prompt to
# repeat that has a comma.
_FIXER_CONFLICTS: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in (
    (LOWERCASE, SECTIONS),
))


_INCOMPATIBLE: frozenset[frozenset[str]] | None = None


def __getattr__(name: str) -> Any:
    # INCOMPATIBLE_PAIRS reads the harness's registry, imported lazily like every other use of it.
    if name == "INCOMPATIBLE_PAIRS":
        global _INCOMPATIBLE
        if _INCOMPATIBLE is None:
            _INCOMPATIBLE = _registry_conflicts() | _FIXER_CONFLICTS
        return _INCOMPATIBLE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compatible(instruction_id_list: Sequence[str]) -> bool:
    """Whether ``apply_constraints`` may be asked for these ids together: no pair in ``INCOMPATIBLE_PAIRS``
    (the registry's ``INSTRUCTION_CONFLICTS``, made symmetric, plus the pairs the fixers cannot combine), no
    id twice (the registry lists every id as conflicting with itself), and every id fixable."""
    ids = list(instruction_id_list)
    if len(set(ids)) != len(ids) or any(i not in _FIXERS for i in ids):
        return False
    pairs = __getattr__("INCOMPATIBLE_PAIRS")
    return not any(frozenset((a, b)) in pairs for k, a in enumerate(ids) for b in ids[k + 1:])


def _require_fixable(instruction_id: str) -> None:
    if instruction_id not in _FIXERS:
        raise ValueError(f"no fixer for {instruction_id!r}: data generation supports {', '.join(FIXABLE_IDS)}")


# "less than" counts whose budget apply_constraints tightens when later fixers add to the count:
# id -> (count kwarg, relation kwarg, counter).
_BUDGETS: dict[str, tuple[str, str, Callable[[str, dict], int]]] = {
    NUMBER_WORDS: ("num_words", "relation", lambda t, kw: count_words(t)),
    SENTENCES: ("num_sentences", "relation", lambda t, kw: _count_sentences(t)),
    LETTERS: ("let_frequency", "let_relation", lambda t, kw: t.lower().count(kw["letter"].lower())),
    FREQUENCY: ("frequency", "relation", lambda t, kw: _count_regex(kw["keyword"].strip(), t)),
}


def apply_constraint(instruction_id: str, text: str, kwargs: Mapping[str, Any] | None, *,
                     topic: str | None = None) -> str:
    """Turn plain ``text`` into text that satisfies one instruction (for data generation).

    ``topic`` (optional, e.g. ``"honeybees"``) names the title (``detectable_format:title``) and the JSON
    object's ``topic`` field; without it they are taken from the text's most frequent content word.

    Returns text passing ``check_instruction``, except for ``number_words`` with
    ``"at least"``, which returns ``text`` unchanged (no filler is added; the caller checks).

    Raises:
        ValueError: the instruction cannot be satisfied from this text (e.g. lowercase of a
            text without letters, fewer words than bullets, "less than 1 word", "at least 20
            sentences" from five), or the id has no fixer (``language:response_language``).
        UnknownInstructionError: ``instruction_id`` is not one of the 25.
    """
    clean = _clean_kwargs(instruction_id, kwargs)
    _require_fixable(instruction_id)
    token = _FIX_CONTEXT.set({"topic": topic, "ids": frozenset([instruction_id])})
    try:
        out = _FIXERS[instruction_id](text, clean)
    finally:
        _FIX_CONTEXT.reset(token)
    at_least = instruction_id == NUMBER_WORDS and clean["relation"] == "at least"
    if not at_least and not check_instruction(instruction_id, out, clean):
        raise ValueError(f"cannot satisfy {describe(instruction_id, clean)!r} for this text")
    return out


def apply_constraints(
    text: str,
    instruction_id_list: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
    *,
    topic: str | None = None,
) -> str:
    """Apply every instruction of a record to ``text`` in ``FIX_ORDER``, then recheck all.

    Order: content (length, sentence, letter and keyword counts, placeholders), structure (bullets,
    keywords, highlights, sections, paragraphs, title), the end (postscript, end phrase), forbidden words,
    the constrained answer, the repeated prompt, case, no comma, then the wrappers (two responses, JSON,
    quotation). For ``"less than"`` counts (words, sentences, letters, keyword frequency) the target is
    tightened and retried when later fixers (a keyword sentence, a postscript, an end phrase) push the
    count over the limit. ``topic``: see ``apply_constraint``.

    Raises:
        ValueError: the instructions cannot all be satisfied (conflicting instructions such
            as lowercase + capital, an end phrase with a comma + no comma, or an
            ``"at least"`` word count the text does not reach); the message lists them.
            ``compatible`` tells in advance which combinations are never attempted by the data script.
    """
    record = {"instruction_id_list": list(instruction_id_list), "kwargs": list(kwargs_list)}
    validate_record(record)
    for instruction_id in instruction_id_list:
        _require_fixable(instruction_id)
    items = [(i, _clean_kwargs(i, kw)) for i, kw in zip(instruction_id_list, kwargs_list)]
    items.sort(key=lambda item: FIX_ORDER.index(item[0]))  # stable for repeated ids
    ids = frozenset(instruction_id_list)  # fixers may keep what another instruction needs
    # Target per "less than" budget item; tightened when later fixers add to the count.
    targets = {
        k: kw[_BUDGETS[i][0]]
        for k, (i, kw) in enumerate(items)
        if i in _BUDGETS and kw[_BUDGETS[i][1]] == "less than"
    }
    token = _FIX_CONTEXT.set({"topic": topic, "ids": ids})
    try:
        out, failed = _apply_items(text, items, targets)
    finally:
        _FIX_CONTEXT.reset(token)
    if not failed:
        return out
    failed_desc = [describe(*items[k]) for k in failed]
    raise ValueError(f"cannot satisfy all instructions; failing: {failed_desc}")


def _apply_items(text: str, items: list[tuple[str, dict]], targets: dict[int, int]) -> tuple[str, list[int]]:
    """Run the fixers in order (retrying with tightened "less than" targets); return the text and the
    indices of the items it fails."""
    out, failed = text, list(range(len(items)))
    for _ in range(8):
        out, after_fix = text, {}
        try:
            for k, (instruction_id, kw) in enumerate(items):
                if k in targets:
                    kw = {**kw, _BUDGETS[instruction_id][0]: targets[k]}
                out = _FIXERS[instruction_id](out, kw)
                if k in targets:
                    after_fix[k] = _BUDGETS[instruction_id][2](out, kw)
        except ValueError as e:
            raise ValueError(f"cannot satisfy all instructions: {e}") from None
        failed = [k for k, (i, kw) in enumerate(items) if not check_instruction(i, out, kw)]
        retry = [k for k in failed if k in targets]
        if not failed or len(retry) != len(failed):
            break
        for k in retry:
            name, _, counter = _BUDGETS[items[k][0]]
            added = counter(out, items[k][1]) - after_fix[k]
            targets[k] = min(targets[k] - 1, items[k][1][name] - added)
        if min(targets[k] for k in retry) <= 1:
            break
    return out, failed
