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
* Fixers (``apply_constraint`` / ``apply_constraints``, data generation only): turn plain text into
  text that satisfies one of the eight instruction ids the built-in task trains on. They never use
  evaluation prompts, and their output is judged by the harness like everything else.

Known gameability (the harness's verdict, kept as is for scoring): ``detectable_format:json_format``
passes any text that parses as JSON, so a whole answer wrapped in double quotes passes it (a JSON
string). ``pipeline.rewards.VerifierReward`` can refuse that for training only (``json_guard``).
"""

from __future__ import annotations

import contextlib
import difflib
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "FIXABLE_IDS",
    "FIX_ORDER",
    "SUPPORTED_IDS",
    "UnknownInstructionError",
    "apply_constraint",
    "apply_constraints",
    "check_instruction",
    "check_record",
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
    # Too few sentences: split the longest unit at its middle word until we have n.
    while len(units) < n:
        i = max(range(len(units)), key=lambda j: len(units[j].split()))
        parts = units[i].split()
        if len(parts) < 2:
            raise ValueError(f"text has too few words for {n} bullet points")
        half = len(parts) // 2
        units[i : i + 1] = [" ".join(parts[:half]), " ".join(parts[half:])]
    # Too many: merge consecutive sentences into n balanced groups.
    q, r = divmod(len(units), n)
    bullets, start = [], 0
    for b in range(n):
        size = q + (1 if b < r else 0)
        bullets.append("* " + " ".join(units[start : start + size]))
        start += size
    return "\n".join(bullets)


def _fix_quotation(text: str, kw: dict) -> str:
    if check_instruction(QUOTATION, text, kw):
        return text
    body = text.strip()
    # Keep a leading bullet on its own line so the bullet count does not change.
    opening = '"\n' if body[:1] in ("*", "-") else '"'
    return f"{opening}{body}\""


_FIXERS: dict[str, Callable[[str, dict], str]] = {
    LOWERCASE: _fix_lowercase,
    CAPITAL: _fix_capital,
    NO_COMMA: _fix_no_comma,
    NUMBER_WORDS: _fix_number_words,
    END_CHECKER: _fix_end,
    KEYWORDS: _fix_keywords,
    BULLETS: _fix_bullets,
    QUOTATION: _fix_quotation,
}

FIX_ORDER: tuple[str, ...] = (
    NUMBER_WORDS,  # trimming first: later fixers never remove words ...
    BULLETS,  # ... and re-bulleting keeps the word count
    KEYWORDS,
    END_CHECKER,
    LOWERCASE,  # case after the text is final (keyword/end checks are case-insensitive)
    CAPITAL,
    NO_COMMA,  # after anything that may add commas
    QUOTATION,  # last: wraps everything
)
"""Order in which ``apply_constraints`` applies fixers."""

FIXABLE_IDS: tuple[str, ...] = tuple(sorted(_FIXERS))
"""The instruction ids the fixers can satisfy (the built-in task's eight)."""


def _require_fixable(instruction_id: str) -> None:
    if instruction_id not in _FIXERS:
        raise ValueError(f"no fixer for {instruction_id!r}: data generation supports {', '.join(FIXABLE_IDS)}")


def apply_constraint(instruction_id: str, text: str, kwargs: Mapping[str, Any] | None) -> str:
    """Turn plain ``text`` into text that satisfies one instruction (for data generation).

    Returns text passing ``check_instruction``, except for ``number_words`` with
    ``"at least"``, which returns ``text`` unchanged (no filler is added; the caller checks).

    Raises:
        ValueError: the instruction cannot be satisfied from this text (e.g. lowercase of a
            text without letters, fewer words than bullets, "less than 1 word").
        UnknownInstructionError: ``instruction_id`` is not supported.
    """
    clean = _clean_kwargs(instruction_id, kwargs)
    _require_fixable(instruction_id)
    out = _FIXERS[instruction_id](text, clean)
    at_least = instruction_id == NUMBER_WORDS and clean["relation"] == "at least"
    if not at_least and not check_instruction(instruction_id, out, clean):
        raise ValueError(f"cannot satisfy {describe(instruction_id, clean)!r} for this text")
    return out


def apply_constraints(
    text: str,
    instruction_id_list: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
) -> str:
    """Apply every instruction of a record to ``text`` in ``FIX_ORDER``, then recheck all.

    Order: length, bullets, keywords, end phrase, case, no comma, quotation. For
    ``"less than"`` word limits the trim target is tightened and retried when later fixers
    (keywords sentence, end phrase) push the count over the limit.

    Raises:
        ValueError: the instructions cannot all be satisfied (conflicting instructions such
            as lowercase + capital, an end phrase with a comma + no comma, or an
            ``"at least"`` word count the text does not reach); the message lists them.
    """
    record = {"instruction_id_list": list(instruction_id_list), "kwargs": list(kwargs_list)}
    validate_record(record)
    for instruction_id in instruction_id_list:
        _require_fixable(instruction_id)
    items = [(i, _clean_kwargs(i, kw)) for i, kw in zip(instruction_id_list, kwargs_list)]
    items.sort(key=lambda item: FIX_ORDER.index(item[0]))  # stable for repeated ids
    # Trim target per "less than" item; tightened when later fixers add words.
    targets = {
        k: kw["num_words"]
        for k, (i, kw) in enumerate(items)
        if i == NUMBER_WORDS and kw["relation"] == "less than"
    }
    out, failed = text, list(range(len(items)))
    for _ in range(8):
        out, after_trim = text, {}
        for k, (instruction_id, kw) in enumerate(items):
            if k in targets:
                kw = {**kw, "num_words": targets[k]}
            out = _FIXERS[instruction_id](out, kw)
            if k in targets:
                after_trim[k] = count_words(out)
        failed = [k for k, (i, kw) in enumerate(items) if not check_instruction(i, out, kw)]
        retry = [k for k in failed if k in targets]
        if not failed or len(retry) != len(failed):
            break
        for k in retry:
            added = count_words(out) - after_trim[k]
            targets[k] = min(targets[k] - 1, items[k][1]["num_words"] - added)
        if min(targets[k] for k in retry) <= 1:
            break
    if not failed:
        return out
    failed_desc = [describe(*items[k]) for k in failed]
    raise ValueError(f"cannot satisfy all instructions; failing: {failed_desc}")
