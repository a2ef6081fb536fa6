"""Dataset loading, format normalisation and the one place that applies the chat template.

Formats (detected from the columns of the first row, after a stage's `columns` mapping renames them):
- conversational: `messages` = [{role, content}, ...]; the last assistant turn is the completion.
- ShareGPT: `conversations` = [{from: human|gpt|system, value}, ...]; read as `messages`.
- prompt/completion: `prompt` (string or messages) and `completion` (string or messages).
- plain text: `text` (SFT only): the raw text, no chat template, the loss on every token.
- preference: `chosen` / `rejected` (strings or messages), with or without an explicit `prompt`;
  without one the shared leading messages of chosen and rejected are the prompt. Optional `margin`.
- ranked: `prompt`, `responses` (list) and `ranks` (list, lower is better, equal = tie); expanded
  into pairs, ties skipped unless asked for.
- prompt-only: `prompt` (string or messages), optionally IFEval-style `instruction_id_list`/`kwargs`.

Column mapping: `sft.columns: {prompt: instruction, completion: output}` (any stage) renames the
dataset's columns to these names as rows are read. A recipe's data keys are `DataSpec` strings that
carry the mapping and the hub options (`{path, config, split, revision, data_files, streaming}`), so
every reader of `load_rows(cfg.data)` gets them.

Every error names the file, the 1-based row and the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data: the message names the file, row and field."""


LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# --------------------------------------------------------------------------------------------
# Data references from a recipe
# --------------------------------------------------------------------------------------------


class DataSpec(str):
    """A recipe's data reference. As a string it is the path or `hub_id[:split]` (what messages show);
    it also carries the recipe's `DataSource` options (`source`), the stage's column mapping (`columns`:
    pipeline name -> dataset column) and the recipe key it came from (`key`, e.g. `sft.data`)."""

    def __new__(cls, value: str, source=None, columns: dict[str, str] | None = None, key: str | None = None,
                columns_key: str | None = None):
        obj = super().__new__(cls, value)
        obj.source, obj.columns, obj.key, obj.columns_key = source, dict(columns or {}), key, columns_key
        return obj

    def __reduce__(self):
        return (DataSpec, (str(self), self.source, self.columns, self.key, self.columns_key))

    def recipe_value(self):
        """What the recipe YAML says: the string, or the mapping without its unset options."""
        if self.source is None:
            return str(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self.source)}
        return {k: v for k, v in dataclasses.asdict(self.source).items() if k == "path" or v != defaults[k]}


# Which keys of each section name data, and which pipeline names its `columns` may map.
DATA_KEYS = {
    "sft": ("data", "eval_data"),
    "reward": ("data", "eval_data", "norm_prompts"),
    "ppo": ("prompts",),
    "distill": ("prompts", "heldout_prompts", "warmup_data", "extra_prompts"),
    "eval": ("prompts",),
}
STAGE_COLUMNS = {
    "sft": ("prompt", "completion", "messages", "conversations", "text"),
    "reward": ("prompt", "chosen", "rejected", "margin", "responses", "ranks"),
    "ppo": ("prompt", "messages", "conversations"),
    "distill": ("prompt", "completion", "messages", "conversations"),
}


def _source_name(src) -> str:
    """What messages call a DataSource: `org/ds[config]:split`, or the data files for a builder."""
    files = ",".join([src.data_files] if isinstance(src.data_files, str) else src.data_files or [])
    name = src.path or files
    if files and src.path in ("json", "csv", "parquet", "text", "arrow"):
        name = files
    elif files and src.path:
        name = f"{src.path} ({files})"
    if src.config:
        name += f"[{src.config}]"
    if src.split:
        name += f":{src.split}"
    return name


def _spec_for(value, stage: str, key: str, columns: dict[str, str], where: str):
    from .config import DataSource, RecipeError

    if value is None or (isinstance(value, str) and not value):
        return value
    if isinstance(value, DataSource):
        if not value.path and not value.data_files:
            raise RecipeError(f"{where}: `{stage}.{key}` needs a `path` (a hub id, local file or dataset directory, "
                              "or a builder such as `json` with `data_files`).")
        return DataSpec(_source_name(value), source=value, columns=columns, key=f"{stage}.{key}",
                        columns_key=f"{stage}.columns")
    source = getattr(value, "source", None)
    return DataSpec(str(value), source=source, columns=columns, key=f"{stage}.{key}", columns_key=f"{stage}.columns")


def prepare_recipe_data(recipe, where: str) -> None:
    """After parsing: every data key becomes a DataSpec carrying its options and the stage's column
    mapping; `<stage>.columns` and `model.chat_template` are checked (so `pipeline validate` catches them)."""
    from .config import RecipeError

    for stage, keys in DATA_KEYS.items():
        section = getattr(recipe, stage, None)
        if section is None:
            continue
        columns = {}
        cmap = getattr(section, "columns", None)
        if cmap is not None:
            columns = {k: v for k, v in dataclasses.asdict(cmap).items() if v is not None}
            for name in columns:
                if name not in STAGE_COLUMNS[stage]:
                    raise RecipeError(
                        f"{where}: `{stage}.columns.{name}`: the {stage} stage reads no `{name}` column; it maps "
                        f"{', '.join(STAGE_COLUMNS[stage])}."
                    )
            for name, col in columns.items():
                if not col.strip():
                    raise RecipeError(f"{where}: `{stage}.columns.{name}` is empty; give the dataset's column name.")
        for key in keys:
            value = getattr(section, key)
            if isinstance(value, list):
                setattr(section, key, [_spec_for(v, stage, f"{key}[{i}]", columns, where) for i, v in enumerate(value)])
            else:
                setattr(section, key, _spec_for(value, stage, key, columns, where))
    template = recipe.model.chat_template
    if template is not None:
        try:
            resolve_chat_template(template)
        except DataError as e:
            raise RecipeError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


def _read_json_lines(path: Path, max_rows: int | None = None) -> list[dict]:
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
        if max_rows and len(rows) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: row {len(rows) + 1} (line {lineno}) is not valid JSON: {e.msg}.") from None
    return rows


def _first_rows(ds, max_rows: int | None) -> list[dict]:
    """Rows of a datasets Dataset / IterableDataset as dicts, only the first max_rows of them read out."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return list(ds.take(max_rows) if max_rows else ds)
    if max_rows and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    return ds.to_list()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _load_saved(path: Path, split: str | None, spec: str, max_rows: int | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable directories
        raise DataError(f"{spec}: could not read the saved dataset directory: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"{spec}: the saved dataset has no split `{split}`; its splits: {', '.join(ds)}.")
        ds = ds[split]
    return _first_rows(ds, max_rows)


def _load_dataset(spec: str, path: str, src, split: str | None, max_rows: int | None) -> list[dict]:
    """`datasets.load_dataset` with the recipe's options: a hub id, a local dataset directory, or a
    builder (`json`, `csv`, `parquet`) with `data_files`."""
    import datasets

    kwargs: dict[str, Any] = {"split": split or "train"}
    if src is not None:
        for ours, theirs in (("config", "name"), ("revision", "revision"), ("data_files", "data_files")):
            if getattr(src, ours) is not None:
                kwargs[theirs] = getattr(src, ours)
        if src.streaming:
            kwargs["streaming"] = True
    if not path:  # data_files only: the builder from their suffix
        files = kwargs["data_files"] if isinstance(kwargs["data_files"], list) else [kwargs["data_files"]]
        builder = LOCAL_SUFFIXES.get(Path(files[0]).suffix)
        if builder is None:
            raise DataError(f"{spec}: give `path` (e.g. `json`, `csv`, `parquet`) for data_files {files}.")
        path = builder
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, missing config, bad revision, ... all end here
        opts = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise DataError(
            f"{spec}: not a local file, and `datasets.load_dataset({path!r}, {opts})` failed: {e}"
        ) from None
    return _first_rows(ds, max_rows)


def _read_rows(spec: str, max_rows: int | None) -> list[dict]:
    src = getattr(spec, "source", None)
    if src is not None:
        target, split = src.path, src.split
    else:
        target, split = str(spec), None
    path = Path(target) if target else None
    if path is not None and (path.suffix in LOCAL_SUFFIXES or path.exists()) and not (src and src.data_files):
        if src is not None and (src.config or src.revision):
            raise DataError(f"{spec}: `config` and `revision` apply to hub datasets; {target} is local.")
        if not path.exists():
            raise DataError(f"{spec}: data file not found (relative paths are read from {Path.cwd()}).")
        if path.is_dir():
            if _is_saved_dataset(path):
                return _load_saved(path, split, spec, max_rows)
            return _load_dataset(spec, target, src, split, max_rows)
        if path.suffix in (".jsonl", ".json"):
            return _read_json_lines(path, max_rows)
        if path.suffix in LOCAL_SUFFIXES:
            import datasets

            try:
                ds = datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
            except Exception as e:  # datasets raises many types for unreadable files
                raise DataError(f"{spec}: could not read as {path.suffix[1:]}: {e}") from None
            return _first_rows(ds, max_rows)
        raise DataError(f"{spec}: unsupported file type; use .jsonl, .json, .parquet or .csv.")
    if src is None:
        target, _, split = target.partition(":")
    return _load_dataset(spec, target, src, split or None, max_rows)


def apply_columns(rows: list[dict], spec: str, columns: dict[str, str], columns_key: str | None = None) -> list[dict]:
    """Rename the dataset's columns to the pipeline's names (`columns`: pipeline name -> dataset column).
    A mapped column missing from a row is an error naming the row and both names."""
    if not columns:
        return rows
    key = columns_key or "columns"
    out = []
    for i, row in enumerate(rows, start=1):
        new = {k: v for k, v in row.items() if k not in columns.values()}
        for ours, theirs in columns.items():
            if theirs not in row:
                raise DataError(
                    f"{spec}: row {i} has no column `{theirs}`, which `{key}` maps to `{ours}`; the row's columns are "
                    f"{sorted(row)}. Fix `{key}.{ours}` or the data."
                )
            new[ours] = row[theirs]
        out.append(new)
    return out


def load_rows(spec: str, max_rows: int | None = None) -> list[dict]:
    """Rows from a local JSONL/JSON/Parquet/CSV file, a local dataset directory (`save_to_disk` or data
    files), or a hub dataset `name[:split]`; a recipe's DataSpec adds its hub options and column mapping.
    With max_rows only the first max_rows rows are read out of the dataset."""
    rows = _read_rows(spec, max_rows)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{spec}: row {i} is a {type(row).__name__}, expected a JSON object.")
    if not rows:
        raise DataError(f"{spec}: the dataset is empty.")
    rows = rows[:max_rows] if max_rows else rows
    return apply_columns(rows, spec, getattr(spec, "columns", None) or {}, getattr(spec, "columns_key", None))


def detect_format(row: dict) -> str:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"responses", "ranks"} <= keys:
        return "ranked"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    if "text" in keys:
        return "text"
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


# ShareGPT speaker names -> chat roles (`from: human|gpt|system`; a few datasets write user/assistant).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


def _sharegpt_messages(value: Any, spec: str, i: int, field: str = "conversations") -> list[dict]:
    """ShareGPT `[{from, value}, ...]` -> `[{role, content}, ...]`."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{_where(spec, i)}: `{field}` must be a non-empty list of {{from, value}} turns, "
                        f"got {type(value).__name__}.")
    msgs = []
    for j, m in enumerate(value):
        if "role" in m and "content" in m and "from" not in m:  # already role/content
            msgs.append({"role": m["role"], "content": m["content"]})
            continue
        if "from" not in m or "value" not in m:
            raise DataError(f"{_where(spec, i)}: `{field}[{j}]` needs `from` and `value` keys, got {sorted(m)}.")
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise DataError(f"{_where(spec, i)}: `{field}[{j}].from` is {m['from']!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}.")
        msgs.append({"role": role, "content": m["value"]})
    return _as_messages(msgs, spec, i, field)


def _conversation(row: dict, fmt: str, spec: str, i: int) -> list[dict]:
    if fmt == "sharegpt":
        return _sharegpt_messages(row["conversations"], spec, i)
    return _as_messages(row["messages"], spec, i, "messages")


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


_MAPPING_EXAMPLE = {"sft": "{prompt: instruction, completion: output}", "distill": "{prompt: question, completion: answer}",
                    "reward": "{prompt: question, chosen: good, rejected: bad}"}


def _check_format(rows: list[dict], spec: str, allowed: tuple[str, ...], purpose: str, section: str) -> str:
    fmt = detect_format(rows[0])
    if fmt not in allowed:
        key = getattr(spec, "key", None)
        section = key.split(".")[0] if key else section
        raise DataError(
            f"{spec}: row 1 has fields {sorted(rows[0])}, which is the `{fmt}` format; {purpose} needs one of: "
            + "; ".join(_FORMAT_HELP[a] for a in allowed)
            + f". Columns under other names can be mapped in the recipe, e.g. `{section}.columns: "
            f"{_MAPPING_EXAMPLE.get(section, _MAPPING_EXAMPLE['sft'])}`."
        )
    return fmt


_FORMAT_HELP = {
    "messages": "`messages` (conversational)",
    "sharegpt": "`conversations` (ShareGPT)",
    "text": "`text` (plain text, SFT only)",
    "prompt_completion": "`prompt` + `completion`",
    "preference": "`chosen` + `rejected` (optional `prompt`)",
    "ranked": "`prompt` + `responses` + `ranks`",
    "prompt_only": "`prompt`",
}


def sft_examples(rows: list[dict], spec: str, allow_text: bool | None = None) -> list[dict]:
    """-> [{"prompt": messages, "completion": str}], or [{"text": str}] for plain text (trained on every
    token, no chat template). Plain text is SFT's own: by default it is allowed unless `spec` is a
    recipe key outside `sft` (e.g. `distill.warmup_data`, whose demonstrations need a prompt)."""
    key = getattr(spec, "key", None)
    if allow_text is None:
        allow_text = key is None or key.startswith("sft.")
    allowed = ("messages", "sharegpt", "prompt_completion") + (("text",) if allow_text else ())
    purpose = "SFT" if allow_text else f"`{key}` (prompt + completion demonstrations)" if key else "this"
    fmt = _check_format(rows, spec, allowed, purpose, "sft")
    out = []
    for i, row in enumerate(rows, start=1):
        if fmt in ("messages", "sharegpt"):
            field = "messages" if fmt == "messages" else "conversations"
            _require(row, (field,), spec, i, fmt)
            msgs = _conversation(row, fmt, spec, i)
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError(f"{_where(spec, i)}: `{field}` must end with an `assistant` message after a prompt.")
            out.append({"prompt": msgs[:-1], "completion": msgs[-1]["content"]})
        elif fmt == "text":
            _require(row, ("text",), spec, i, fmt)
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise DataError(f"{_where(spec, i)}: field `text` must be a non-empty string.")
            out.append({"text": row["text"]})
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
    fmt = _check_format(rows, spec, ("preference", "ranked"), "reward modelling", "reward")
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
        if fmt in ("messages", "sharegpt"):
            msgs = _conversation(row, fmt, spec, i)
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            if not prompt:
                raise DataError(f"{_where(spec, i)}: the conversation has only an assistant turn, no prompt.")
        elif fmt in ("prompt_only", "prompt_completion", "ranked") or (fmt == "preference" and "prompt" in row):
            prompt = _as_messages(row["prompt"], spec, i, "prompt")
        else:
            raise DataError(f"{_where(spec, i)}: no `prompt` (or `messages` / `conversations`) field; fields are "
                            f"{sorted(row)}. Map your column with `columns: {{prompt: <column>}}` in the stage's section.")
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


# `model.chat_template` names. ChatML as in OpenAI's ChatML format and Qwen/SmolLM tokenizers (needs the
# `<|im_start|>` / `<|im_end|>` tokens); zephyr as HuggingFaceH4/zephyr-7b-beta's tokenizer_config.json,
# which ends every turn with the tokenizer's own EOS, so it suits any base model's vocabulary.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}
# Tokens a named template needs as single tokens of the vocabulary.
CHAT_TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}


def resolve_chat_template(value: str) -> str:
    """`model.chat_template` -> template text: a name from CHAT_TEMPLATES, a `.jinja` file, or the text."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if path.suffix in (".jinja", ".j2") or path.is_file():
        if not path.is_file():
            raise DataError(f"`model.chat_template`: template file {value} not found.")
        return path.read_text(encoding="utf-8")
    raise DataError(
        f"`model.chat_template`: {value!r} is not a template name ({', '.join(CHAT_TEMPLATES)}), a .jinja file "
        "or Jinja template text."
    )


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


def text_token_ids(tokenizer, text: str) -> list[int]:
    """A plain-text SFT row: the raw text (no chat template) with the tokenizer's own special tokens
    (e.g. BOS), ending at EOS so the model learns where a document stops."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids if ids and ids[-1] == eos else ids + [eos]


def sft_token_parts(tokenizer, ex: dict) -> tuple[list[int], list[int]]:
    """(masked prompt ids, trained ids) of one SFT example; plain text has no masked part."""
    if "text" in ex:
        return [], text_token_ids(tokenizer, ex["text"])
    return prompt_token_ids(tokenizer, ex["prompt"]), completion_token_ids(tokenizer, ex["prompt"], ex["completion"])


def tokenize_sft(tokenizer, examples: list[dict], max_seq_len: int, completion_only: bool = True):
    """-> (rows with input_ids and completion_mask, TokenizeStats). Prompt tokens get mask 0, the
    response tokens through EOS get 1 (plain-text rows: every token gets 1). Rows whose response is
    truncated away are counted and dropped, never trained as a zero loss."""
    stats = TokenizeStats()
    out = []
    for ex in examples:
        stats.rows += 1
        p, c = sft_token_parts(tokenizer, ex)
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


# --------------------------------------------------------------------------------------------
# `pipeline data`: what a stage will read, tokenized and rendered with its loss mask
# --------------------------------------------------------------------------------------------

# Which reader a data key goes through: SFT demonstrations, preference pairs or prompts.
KEY_KINDS = {
    "sft.data": "sft", "sft.eval_data": "sft", "distill.warmup_data": "sft",
    "reward.data": "pairs", "reward.eval_data": "pairs",
}
MASK_OPEN, MASK_CLOSE = "[[", "]]"


def length_stats(values: list[int]) -> dict[str, float]:
    """min / median / p95 (nearest rank) / max of token counts."""
    v = sorted(values)
    n = len(v)
    median = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"min": v[0], "median": median, "p95": v[max(0, math.ceil(0.95 * n) - 1)], "max": v[-1]}


def render_masked(tokenizer, ids: list[int], mask: list[int], dim: bool = False) -> str:
    """Decoded tokens, the masked (untrained) spans inside [[ ]] (and dim on a terminal), trained spans plain."""
    out, start = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or mask[j] != mask[start]:
            text = tokenizer.decode(ids[start:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if not mask[start]:
                text = MASK_OPEN + text + MASK_CLOSE
                if dim:
                    text = "\x1b[2m" + text + "\x1b[0m"
            out.append(text)
            start = j
    return "".join(out)


def data_key(recipe, stage: str | None, key: str | None) -> tuple[str, str, Any]:
    from .config import RecipeError

    where = recipe.source or "<recipe>"
    stages = [s for s in recipe.stages if s in DATA_KEYS] or [s for s in DATA_KEYS if getattr(recipe, s, None)]
    stage = stage or (stages[0] if stages else None)
    if stage not in DATA_KEYS:
        raise RecipeError(f"{where}: --stage {stage!r}: choose one of {', '.join(DATA_KEYS)}.")
    section = getattr(recipe, stage, None)
    if section is None:
        raise RecipeError(f"{where}: the recipe has no `{stage}` section.")
    key = key or DATA_KEYS[stage][0]
    if key not in DATA_KEYS[stage]:
        raise RecipeError(f"{where}: --key {key!r}: `{stage}` reads data from {', '.join(DATA_KEYS[stage])}.")
    spec = getattr(section, key)
    if isinstance(spec, list):
        spec = spec[0] if spec else None
    if not spec:
        raise RecipeError(f"{where}: `{stage}.{key}` is not set.")
    return stage, key, spec


def inspect_data(recipe, tokenizer, stage: str | None = None, key: str | None = None, show: int = 1,
                 max_rows: int | None = None, color: bool = False) -> str:
    """The report `pipeline data` prints: detected format, rows, token-length statistics and `show`
    examples rendered exactly as the stage tokenizes them, with the loss mask marked."""
    stage, key, spec = data_key(recipe, stage, key)
    section = getattr(recipe, stage)
    max_rows = max_rows or (getattr(section, "max_rows", None) if key == "data" else None)
    rows = load_rows(spec, max_rows)
    fmt = detect_format(rows[0])
    kind = KEY_KINDS.get(f"{stage}.{key}", "prompts")
    max_len = getattr(section, "max_seq_len", None)
    lines = [f"{stage}.{key}: {spec}" + (f" (columns: {spec.columns})" if getattr(spec, "columns", None) else ""),
             f"format: {fmt} ({_FORMAT_HELP.get(fmt, fmt)})"]
    parts: dict[str, list[int]] = {}
    rendered: list[str] = []
    over, over_line = 0, None
    if kind == "sft":
        examples = sft_examples(rows, spec)
        lines.append(f"rows: {len(rows)} -> {len(examples)} examples")
        lost = 0
        for n, ex in enumerate(examples):
            p, c = sft_token_parts(tokenizer, ex)
            parts.setdefault("prompt (masked)", []).append(len(p))
            parts.setdefault("completion (trained)", []).append(len(c))
            parts.setdefault("total", []).append(len(p) + len(c))
            if max_len and len(p) + len(c) > max_len:
                over += 1
                lost += len(p) >= max_len
            if n < show:
                mask = [1] * len(p + c) if "text" in ex else [0] * len(p) + [1] * len(c)
                ids = p + c
                head = f"--- example {n + 1}: {len(p)} masked + {len(c)} trained tokens"
                if max_len and len(ids) > max_len:
                    head += f"; sft.max_seq_len={max_len} cuts the last {len(ids) - max_len}"
                rendered.append(head + " ---\n" + render_masked(tokenizer, ids, mask, color))
        if max_len:
            over_line = (f"longer than {stage}.max_seq_len={max_len}: {over} (truncated; {lost} of them keep no "
                         "response token and are dropped)")
    elif kind == "pairs":
        examples, ties = preference_examples(rows, spec, getattr(section, "keep_ties", False))
        lines.append(f"rows: {len(rows)} -> {len(examples)} pairs ({ties} ties skipped)")
        for n, ex in enumerate(examples):
            p = prompt_token_ids(tokenizer, ex["prompt"])
            c = completion_token_ids(tokenizer, ex["prompt"], ex["chosen"])
            r = completion_token_ids(tokenizer, ex["prompt"], ex["rejected"])
            parts.setdefault("prompt", []).append(len(p))
            parts.setdefault("chosen", []).append(len(c))
            parts.setdefault("rejected", []).append(len(r))
            over += bool(max_len and len(p) + max(len(c), len(r)) > max_len)
            if n < show:
                rendered.append(
                    f"--- pair {n + 1} (the reward model scores the whole sequence; the prompt is in "
                    f"{MASK_OPEN} {MASK_CLOSE}) ---\nchosen:\n" + render_masked(tokenizer, p + c, [0] * len(p) + [1] * len(c), color)
                    + "\nrejected:\n" + render_masked(tokenizer, p + r, [0] * len(p) + [1] * len(r), color))
        if max_len:
            over_line = f"pairs longer than {stage}.max_seq_len={max_len}: {over} (dropped by the reward stage)"
    else:
        examples = prompt_examples(rows, spec)
        lines.append(f"rows: {len(rows)} -> {len(examples)} prompts")
        for n, ex in enumerate(examples):
            p = prompt_token_ids(tokenizer, ex["prompt"])
            parts.setdefault("prompt", []).append(len(p))
            if n < show:
                rendered.append(f"--- prompt {n + 1}: {len(p)} tokens, as generation sees it ---\n"
                                + tokenizer.decode(p, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        max_new = getattr(section, "max_new_tokens", None)
        over_line = f"responses: up to {max_new} sampled tokens ({stage}.max_new_tokens)" if max_new else None
    width = max(len(k) for k in parts)
    lines.append(f"{'tokens':<{width}}  {'min':>6} {'median':>7} {'p95':>6} {'max':>6}")
    for name, values in parts.items():
        st = length_stats(values)
        lines.append(f"{name:<{width}}  {st['min']:>6} {st['median']:>7g} {st['p95']:>6} {st['max']:>6}")
    if over_line:
        lines.append(over_line)
    if rendered and kind == "sft":
        lines.append(f"loss mask: {MASK_OPEN}masked, not trained{MASK_CLOSE}, trained tokens plain")
    lines.extend(rendered)
    return "\n".join(lines)
