"""Dataset loading, format normalisation and the one place that applies the chat template.

Formats (detected from the columns of the first row):
- conversational: `messages` = [{role, content}, ...]; the last assistant turn is the completion.
- prompt/completion: `prompt` (string or messages) and `completion` (string or messages).
- preference: `chosen` / `rejected` (strings or messages), with or without an explicit `prompt`;
  without one the shared leading messages of chosen and rejected are the prompt. Optional `margin`.
- ranked: `prompt`, `responses` (list) and `ranks` (list, lower is better, equal = tie); expanded
  into pairs, ties skipped unless asked for.
- prompt-only: `prompt` (string or messages), optionally IFEval-style `instruction_id_list`/`kwargs`.

Every error names the file, the 1-based row and the field.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data: the message names the file, row and field."""


LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


def _read_json_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8.") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}.") from None
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {len(rows) + 1} (line {lineno}) is not valid JSON: {e.msg}.") from None
    return rows


def load_rows(spec: str, max_rows: int | None = None) -> list[dict]:
    """Rows from a local JSONL/JSON/Parquet/CSV file, or a hub dataset `name[:split]`."""
    path = Path(spec)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise DataError(f"{spec}: data file not found (relative paths are read from {Path.cwd()}).")
        if path.suffix in (".jsonl", ".json"):
            rows = _read_json_lines(path)
        elif path.suffix in LOCAL_SUFFIXES:
            import datasets

            try:
                ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
            except Exception as e:  # datasets raises many types for unreadable files
                raise DataError(f"{spec}: could not read as {path.suffix[1:]}: {e}") from None
            rows = list(ds)
        else:
            raise DataError(f"{spec}: unsupported file type; use .jsonl, .json, .parquet or .csv.")
    else:
        import datasets

        name, _, split = spec.partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:
            raise DataError(f"{spec}: not a local file, and loading it as a hub dataset failed: {e}") from None
        rows = list(ds)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{spec}: row {i} is a {type(row).__name__}, expected a JSON object.")
    if not rows:
        raise DataError(f"{spec}: the dataset is empty.")
    return rows[:max_rows] if max_rows else rows


def detect_format(row: dict) -> str:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"responses", "ranks"} <= keys:
        return "ranked"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    return "unknown"


# --------------------------------------------------------------------------------------------
# Normalising rows
# --------------------------------------------------------------------------------------------


def _where(spec: str, i: int) -> str:
    return f"{spec}: row {i}"


def _as_messages(value: Any, spec: str, i: int, field: str, role: str = "user") -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{_where(spec, i)}: field `{field}` is empty.")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for j, m in enumerate(value):
            if "role" not in m or "content" not in m:
                raise DataError(f"{_where(spec, i)}: `{field}[{j}]` needs `role` and `content` keys, got {sorted(m)}.")
            if not isinstance(m["content"], str):
                raise DataError(f"{_where(spec, i)}: `{field}[{j}].content` must be a string.")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(
        f"{_where(spec, i)}: field `{field}` must be a non-empty string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}."
    )


def _as_text(value: Any, spec: str, i: int, field: str) -> str:
    """A completion: a string, or messages whose last one is the assistant's reply."""
    if isinstance(value, str):
        text = value
    else:
        msgs = _as_messages(value, spec, i, field, role="assistant")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{_where(spec, i)}: the last message of `{field}` must have role `assistant`.")
        text = msgs[-1]["content"]
    if not text.strip():
        # A zero-length response trains nothing but EOS and scores nothing: almost always a data bug.
        raise DataError(f"{_where(spec, i)}: field `{field}` is an empty response; give the response text.")
    return text


def _require(row: dict, fields: tuple[str, ...], spec: str, i: int, fmt: str) -> None:
    for f in fields:
        if f not in row or row[f] is None:
            raise DataError(f"{_where(spec, i)}: missing field `{f}` (format {fmt} needs {', '.join(fields)}).")


def _check_format(rows: list[dict], spec: str, allowed: tuple[str, ...], purpose: str) -> str:
    fmt = detect_format(rows[0])
    if fmt not in allowed:
        raise DataError(
            f"{spec}: row 1 has fields {sorted(rows[0])}, which is the `{fmt}` format; {purpose} needs one of: "
            + "; ".join(_FORMAT_HELP[a] for a in allowed)
            + "."
        )
    return fmt


_FORMAT_HELP = {
    "messages": "`messages` (conversational)",
    "prompt_completion": "`prompt` + `completion`",
    "preference": "`chosen` + `rejected` (optional `prompt`)",
    "ranked": "`prompt` + `responses` + `ranks`",
    "prompt_only": "`prompt`",
}


def sft_examples(rows: list[dict], spec: str) -> list[dict]:
    """-> [{"prompt": messages, "completion": str}]"""
    fmt = _check_format(rows, spec, ("messages", "prompt_completion"), "SFT")
    out = []
    for i, row in enumerate(rows, start=1):
        if fmt == "messages":
            _require(row, ("messages",), spec, i, fmt)
            msgs = _as_messages(row["messages"], spec, i, "messages")
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError(f"{_where(spec, i)}: `messages` must end with an `assistant` message after a prompt.")
            out.append({"prompt": msgs[:-1], "completion": msgs[-1]["content"]})
        else:
            _require(row, ("prompt", "completion"), spec, i, fmt)
            out.append({
                "prompt": _as_messages(row["prompt"], spec, i, "prompt"),
                "completion": _as_text(row["completion"], spec, i, "completion"),
            })
    return out


def _split_implicit_prompt(chosen: list[dict], rejected: list[dict], spec: str, i: int):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            f"{_where(spec, i)}: no `prompt` field, and `chosen`/`rejected` share no leading messages to use as one."
        )
    return chosen[:n], chosen[n:], rejected[n:]


def expand_ranking(responses: list[str], ranks: list[float], keep_ties: bool = False) -> list[tuple[int, int, bool]]:
    """A ranking (lower rank = better) -> pairs (better, worse, is_tie). D > C > A = B gives
    D>C, D>A, D>B, C>A, C>B and the tie A=B, which is skipped unless keep_ties."""
    pairs = []
    for a, b in itertools.combinations(range(len(responses)), 2):
        if ranks[a] == ranks[b]:
            if keep_ties:
                pairs.append((a, b, True))
        elif ranks[a] < ranks[b]:
            pairs.append((a, b, False))
        else:
            pairs.append((b, a, False))
    return pairs


def preference_examples(rows: list[dict], spec: str, keep_ties: bool = False) -> tuple[list[dict], int]:
    """-> ([{"prompt": messages, "chosen": str, "rejected": str, "margin": float|None, "tie": bool}], n_ties_skipped)"""
    fmt = _check_format(rows, spec, ("preference", "ranked"), "reward modelling")
    out, skipped = [], 0
    for i, row in enumerate(rows, start=1):
        margin = row.get("margin")
        if margin is not None and not isinstance(margin, (int, float)):
            raise DataError(f"{_where(spec, i)}: `margin` must be a number, got {margin!r}.")
        if fmt == "ranked":
            _require(row, ("prompt", "responses", "ranks"), spec, i, fmt)
            resp, ranks = row["responses"], row["ranks"]
            if not isinstance(resp, list) or not isinstance(ranks, list) or len(resp) != len(ranks) or len(resp) < 2:
                raise DataError(f"{_where(spec, i)}: `responses` and `ranks` must be lists of the same length (>= 2).")
            prompt = _as_messages(row["prompt"], spec, i, "prompt")
            texts = [_as_text(r, spec, i, f"responses[{j}]") for j, r in enumerate(resp)]
            pairs = expand_ranking(texts, ranks, keep_ties=keep_ties)
            n_all = len(resp) * (len(resp) - 1) // 2
            skipped += n_all - len(pairs)
            for a, b, tie in pairs:
                out.append({"prompt": prompt, "chosen": texts[a], "rejected": texts[b], "margin": None, "tie": tie})
            continue
        _require(row, ("chosen", "rejected"), spec, i, fmt)
        if "prompt" in row and row["prompt"] is not None:
            prompt = _as_messages(row["prompt"], spec, i, "prompt")
            chosen = _as_text(row["chosen"], spec, i, "chosen")
            rejected = _as_text(row["rejected"], spec, i, "rejected")
        else:
            c = _as_messages(row["chosen"], spec, i, "chosen", role="assistant")
            r = _as_messages(row["rejected"], spec, i, "rejected", role="assistant")
            prompt, c_rest, r_rest = _split_implicit_prompt(c, r, spec, i)
            chosen, rejected = c_rest[-1]["content"], r_rest[-1]["content"]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin, "tie": False})
    return out, skipped


def prompt_examples(rows: list[dict], spec: str) -> list[dict]:
    """-> [{"prompt": messages, "instruction_id_list": [...]?, "kwargs": [...]?, ...}] from any format."""
    out = []
    for i, row in enumerate(rows, start=1):
        fmt = detect_format(row)
        if fmt == "messages":
            msgs = _as_messages(row["messages"], spec, i, "messages")
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        elif fmt in ("prompt_only", "prompt_completion", "ranked") or (fmt == "preference" and "prompt" in row):
            prompt = _as_messages(row["prompt"], spec, i, "prompt")
        else:
            raise DataError(f"{_where(spec, i)}: no `prompt` (or `messages`) field; fields are {sorted(row)}.")
        ex = {"prompt": prompt}
        if "instruction_id_list" in row:
            ids, kwargs = row["instruction_id_list"], row.get("kwargs")
            if kwargs is None:
                kwargs = [{} for _ in ids]
            if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
                raise DataError(f"{_where(spec, i)}: `instruction_id_list` and `kwargs` must be lists of equal length.")
            from .checkers import validate_record

            rec = {"prompt": prompt[-1]["content"], "instruction_id_list": ids, "kwargs": kwargs}
            try:
                validate_record(rec, where=_where(spec, i))
            except ValueError as e:
                raise DataError(str(e)) from None
            ex["instruction_id_list"], ex["kwargs"] = ids, kwargs
        for k in ("key", "id"):
            if k in row:
                ex[k] = row[k]
        out.append(ex)
    return out


# --------------------------------------------------------------------------------------------
# The chat template: the one place prompts and responses are turned into text and tokens
# --------------------------------------------------------------------------------------------


def render_prompt(tokenizer, prompt: list[dict] | str) -> str:
    """The prompt as the model sees it at generation time (with the assistant turn opened)."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tokenizer, prompt: list[dict] | str) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def completion_token_ids(tokenizer, prompt: list[dict] | str, completion: str) -> list[int]:
    """Tokens of the assistant reply as the chat template writes it, ending at (and including) EOS.

    Anything the template adds after the end-of-turn token (e.g. a newline) is dropped: generation
    stops at EOS, so training, scoring and sampling all see responses that end exactly there.
    """
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    p_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": completion}], tokenize=False
    )
    if full.startswith(p_text):
        c_text = full[len(p_text):]
        ids = tokenizer(c_text, add_special_tokens=False)["input_ids"]
    else:  # templates that rewrite earlier turns: fall back to the raw reply
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    else:
        ids = ids + [eos]
    return ids


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    no_trainable_tokens: int = 0

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.rows} rows kept; {self.truncated} truncated to the max length; "
            f"{self.no_trainable_tokens} dropped because no response token was left after truncation"
        )


def tokenize_sft(tokenizer, examples: list[dict], max_seq_len: int, completion_only: bool = True):
    """-> (rows with input_ids and completion_mask, TokenizeStats). Prompt tokens get mask 0, the
    response tokens through EOS get 1. Rows whose response is truncated away are counted and dropped,
    never trained as a zero loss."""
    stats = TokenizeStats()
    out = []
    for ex in examples:
        stats.rows += 1
        p = prompt_token_ids(tokenizer, ex["prompt"])
        c = completion_token_ids(tokenizer, ex["prompt"], ex["completion"])
        ids = (p + c)[:max_seq_len]
        mask = ([0 if completion_only else 1] * len(p) + [1] * len(c))[:max_seq_len]
        if len(p) + len(c) > max_seq_len:
            stats.truncated += 1
        if len(ids) <= len(p):
            stats.no_trainable_tokens += 1
            continue
        stats.kept += 1
        out.append({"input_ids": ids, "completion_mask": mask})
    return out, stats
