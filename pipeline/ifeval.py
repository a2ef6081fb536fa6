"""IFEval through lm-evaluation-harness: its verifiers, its scorer, offline.

IFEval (Zhou et al. 2023, arXiv:2311.07911) scores a response with deterministic checkers, one per
instruction id. The scorer papers and leaderboards use is lm-evaluation-harness's `ifeval` task
(`lm_eval/tasks/ifeval/`, a maintained copy of Google's instruction registry). This module is the
project's one door to it:

- `harness()`: the harness's `instructions_registry`, `instructions_util` and `utils` modules,
  imported without any network access (see the sentence tokenizer below). `pipeline.checkers` (the
  verifier reward and every pass rate) calls `utils.test_instruction_following_strict/_loose`.
- `run_harness(...)`: the real harness run, `lm_eval.simple_evaluate(model="hf", ...)` on the
  541 public prompts in `eval/ifeval/input_data.jsonl` (a local task config pointing the harness's
  own `ifeval.yaml` at that file instead of the hub dataset `google/IFEval`), greedy decoding with
  the model's chat template. `ifeval_set(...)` turns it into a prompt set of the eval stage's
  `results.json`: prompt- and instruction-level accuracy, strict and loose, per-prompt verdicts.
- `find_ifeval_prompts(...)` / `assert_no_ifeval_prompts(...)`: the training data must never carry
  an IFEval prompt (contamination guard used by `data/make_constraints.py`).

Sentence tokenizer (NLTK `punkt_tab`). Two IFEval checks tokenize with NLTK's Punkt model:
`length_constraints:number_sentences` (sentence count) and `change_case:capital_word_frequency`
(`nltk.word_tokenize` splits sentences first). The harness downloads `punkt_tab` when it is first
imported; offline that download fails (or hangs until a network timeout) and the two checks then
raise `LookupError`. `ensure_sentence_tokenizer()` runs before the harness is imported:
  * `punkt_tab` installed (e.g. `python -m nltk.downloader punkt_tab`, which `scripts/setup.sh`
    runs when the network is reachable): used as is, exactly the harness's numbers;
  * not installed: an *untrained* Punkt model (the same algorithm with empty parameters: no
    abbreviation list, no collocations, no sentence starters) is put on NLTK's search path for this
    process only, and one warning names the two affected ids. It splits after every `.`/`?`/`!`
    that ends a token, so "Dr. Smith" counts as two sentences where the trained model counts one;
    every other instruction id is unaffected. `results.json` records which tokenizer scored.
  Either way no download is attempted at import.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
IFEVAL_FILE = ROOT / "eval" / "ifeval" / "input_data.jsonl"
HARNESS_TASK = "ifeval"  # the harness's task whose yaml (metrics, generation kwargs) we run
LOCAL_TASK = "ifeval_local"  # the same task reading IFEVAL_FILE
SET_NAME = "ifeval_harness"  # the prompt set's name in results.json
AFFECTED_BY_PUNKT = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")

_tokenizer_status: Optional[str] = None
_fallback_dir: Optional[str] = None
_harness: Optional[types.SimpleNamespace] = None


# --------------------------------------------------------------------------------------------
# NLTK punkt_tab: the real data when installed, else a documented fallback (never a download)
# --------------------------------------------------------------------------------------------


def _punkt_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def ensure_sentence_tokenizer(warn: bool = True) -> str:
    """Make NLTK's English Punkt model loadable without a download; return which one is used:
    `"punkt_tab"` (NLTK's trained data) or `"untrained-punkt"` (the fallback, see module doc)."""
    global _tokenizer_status, _fallback_dir
    if _tokenizer_status is not None:
        return _tokenizer_status
    import nltk

    if _punkt_installed():
        _tokenizer_status = "punkt_tab"
        return _tokenizer_status
    _fallback_dir = tempfile.mkdtemp(prefix="rlhf-pipeline-punkt-")
    atexit.register(shutil.rmtree, _fallback_dir, True)
    english = Path(_fallback_dir) / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in PUNKT_FILES:  # empty parameters: Punkt's rules without learned abbreviations
        (english / name).write_text("", encoding="utf-8")
    nltk.data.path.append(_fallback_dir)  # last: real data found later in the process would win
    _tokenizer_status = "untrained-punkt"
    if warn:
        from .utils import log

        log("IFEval: NLTK's `punkt_tab` data is not installed (and is not downloaded here). "
            f"{' and '.join(AFFECTED_BY_PUNKT)} are scored with an untrained Punkt sentence splitter "
            "(no abbreviation list: 'Dr. Smith' is two sentences), so those two checks can differ from the "
            "harness with the data; all other instruction ids are unaffected. For the exact numbers run "
            "`python -m nltk.downloader punkt_tab` once with a network.")
    return _tokenizer_status


def reset_sentence_tokenizer() -> None:
    """Forget the choice above and NLTK's cached Punkt models (tests; after installing the data)."""
    global _tokenizer_status, _fallback_dir
    import nltk
    import nltk.tokenize

    if _fallback_dir is not None:
        if _fallback_dir in nltk.data.path:
            nltk.data.path.remove(_fallback_dir)
        shutil.rmtree(_fallback_dir, ignore_errors=True)
    _tokenizer_status, _fallback_dir = None, None
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    nltk.data._resource_cache.clear()
    if _harness is not None:
        _harness.instructions_util._get_sentence_tokenizer.cache_clear()


# --------------------------------------------------------------------------------------------
# The harness's modules
# --------------------------------------------------------------------------------------------


def harness() -> types.SimpleNamespace:
    """lm-evaluation-harness's IFEval modules: `registry` (INSTRUCTION_DICT, the 25 ids), `instructions`,
    `instructions_util`, `utils` (test_instruction_following_strict/_loose, process_results), `version`.

    langdetect (the english_lowercase/english_capital/response_language checks) draws random numbers;
    its seed is fixed at 0 (langdetect's documented way to get reproducible results), so a verdict is the
    same in every run."""
    global _harness
    ensure_sentence_tokenizer()  # before the import: the harness downloads punkt_tab when it is missing
    if _harness is not None:
        return _harness
    try:
        import langdetect
        from importlib.metadata import version

        from lm_eval.tasks.ifeval import instructions, instructions_registry, instructions_util, utils
    except ImportError as e:  # pragma: no cover - an install problem, not a code path
        raise ImportError(f"IFEval needs lm-evaluation-harness with its ifeval extra ({e}); install with "
                          "`pip install 'lm_eval[ifeval]==0.4.13'` or `bash scripts/setup.sh`.") from e
    langdetect.DetectorFactory.seed = 0
    _harness = types.SimpleNamespace(registry=instructions_registry, instructions=instructions,
                                     instructions_util=instructions_util, utils=utils,
                                     version=version("lm_eval"))
    return _harness


# --------------------------------------------------------------------------------------------
# The public prompts, and the contamination guard
# --------------------------------------------------------------------------------------------


def load_ifeval(path: Path | str = IFEVAL_FILE) -> list[dict]:
    """The IFEval records (`key`, `prompt`, `instruction_id_list`, `kwargs`) from a JSONL file."""
    from .data import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: IFEval prompt file not found; it ships in the repository as "
                        "eval/ifeval/input_data.jsonl (see eval/ifeval/README.md).")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: not valid JSON ({e.msg}).") from None
    return rows


def normalise(text: str) -> str:
    """Lowercase, whitespace collapsed to single spaces, stripped."""
    return re.sub(r"\s+", " ", text).strip().lower()


def opening(text: str, n_words: int = 10) -> str:
    """The first `n_words` whitespace-separated words of `text`, normalised."""
    return " ".join(normalise(text).split(" ")[:n_words])


def _prompt_text(prompt: Any) -> str:
    """A record's prompt as text: a string, or the contents of a list of chat messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    return ""


def find_ifeval_prompts(prompts: Iterable[Any], ifeval_path: Path | str = IFEVAL_FILE,
                        n_words: int = 10) -> list[tuple[int, int]]:
    """(index into `prompts`, IFEval key) for every prompt that contains the opening `n_words` words of
    an IFEval prompt (both normalised: lowercase, whitespace collapsed)."""
    openings = {opening(r["prompt"], n_words): r["key"] for r in load_ifeval(ifeval_path)}
    hits = []
    for i, p in enumerate(prompts):
        text = normalise(_prompt_text(p))
        hits += [(i, key) for op, key in openings.items() if op and op in text]
    return hits


def assert_no_ifeval_prompts(files: Iterable[Path | str], ifeval_path: Path | str = IFEVAL_FILE) -> int:
    """Fail (DataError naming the file, row and IFEval key) when a training file's `prompt` carries an
    IFEval prompt; IFEval is for evaluation only. Returns the number of prompts checked."""
    from .data import DataError

    checked = 0
    for f in files:
        f = Path(f)
        if not f.exists():
            continue
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [r.get("prompt", "") if isinstance(r, dict) else "" for r in rows]
        checked += len(prompts)
        hits = find_ifeval_prompts(prompts, ifeval_path)
        if hits:
            row, key = hits[0]
            raise DataError(f"{f} row {row + 1}: the prompt contains the opening of IFEval prompt key {key} "
                            f"({len(hits)} such row(s) in this file). IFEval ({ifeval_path}) is for evaluation "
                            "only; remove those rows from the training data.")
    return checked


# --------------------------------------------------------------------------------------------
# The harness run
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def task_config(directory: Path, data_file: Path | str = IFEVAL_FILE) -> Path:
    """Write the local task: the harness's own `ifeval.yaml` (prompts, greedy generation, metrics,
    `process_results`) read from a local JSONL instead of the hub. Returns the yaml's path."""
    import yaml

    import lm_eval.tasks

    upstream = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"include": str(upstream), "task": LOCAL_TASK, "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"train": str(Path(data_file).resolve())}}}
    path = directory / f"{LOCAL_TASK}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_harness(model_path: str, *, limit: Optional[int] = None, max_gen_toks: Optional[int] = None,
                batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
                trust_remote_code: bool = False, data_file: Path | str = IFEVAL_FILE) -> dict:
    """`lm_eval.simple_evaluate(model="hf", pretrained=model_path, tasks=[ifeval on data_file],
    apply_chat_template=True)`, greedy; `max_gen_toks` None keeps the task's own (1280). Returns the
    harness's output dict (`results`, `samples`, `configs`, ...)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    harness()  # the sentence tokenizer first, then the harness's imports (no download)
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="rlhf-pipeline-ifeval-task-") as d:
        task_config(Path(d), data_file)
        tm = TaskManager(include_path=d, include_defaults=False)
        gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_path, "dtype": dtype, "trust_remote_code": trust_remote_code},
            tasks=[LOCAL_TASK], task_manager=tm, device=device, batch_size=batch_size, limit=limit,
            apply_chat_template=True, gen_kwargs=gen_kwargs, log_samples=True, bootstrap_iters=0,
        )
    if out is None:  # pragma: no cover - only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (not rank 0?)")
    return out


def harness_verdicts(out: dict) -> list[dict]:
    """Per prompt, in file order: key, prompt, response and the harness's own strict/loose verdicts
    (`inst_level_*_acc` lists from `process_results`)."""
    rows = []
    for s in sorted(out["samples"][LOCAL_TASK], key=lambda s: s["doc_id"]):
        doc = s["doc"]
        resp = s["filtered_resps"][0] if s.get("filtered_resps") else s["resps"][0][0]
        if isinstance(resp, list):
            resp = resp[0]
        ids = list(doc["instruction_id_list"])
        rows.append({"key": doc["key"], "prompt": doc["prompt"], "response": resp,
                     "instruction_id_list": ids,
                     "kwargs": [{k: v for k, v in kw.items() if v is not None} for kw in doc["kwargs"]],
                     "strict": [bool(x) for x in s["inst_level_strict_acc"]],
                     "loose": [bool(x) for x in s["inst_level_loose_acc"]]})
    return rows


def harness_metrics(out: dict) -> dict:
    """The harness's four aggregate accuracies (`prompt_level_strict_acc`, ...)."""
    res = out["results"][LOCAL_TASK]
    return {k.split(",")[0]: v for k, v in res.items()
            if k.endswith(",none") and "stderr" not in k and isinstance(v, (int, float))}


def ifeval_set(models: list[tuple[str, str]], *, limit: Optional[int], max_gen_toks: Optional[int],
               batch_size: int, device: str, dtype: str, trust_remote_code: bool = False,
               data_file: Path | str = IFEVAL_FILE) -> tuple[dict, list[dict]]:
    """Run the harness for each (name, model path) and return (a prompt set of `results.json`, sample
    rows for `samples.jsonl`). The set has the eval stage's keys (`pass_rate` = prompt-level strict,
    `pass_rate_loose`, `instruction_pass_rate`, `instruction_pass_rate_loose`, `per_id`), the harness's
    own numbers under `harness`, per-prompt verdicts under `per_prompt`, and `paired` prompt-level tests
    of each model against the one before it."""
    from .stages.eval import paired_pass_test, summarize_checks

    data_file = Path(data_file)
    status = ensure_sentence_tokenizer()
    h = harness()
    per_model, per_prompt, seconds, samples = {}, {}, {}, []
    upstream_gen: dict = {}
    for name, path in models:
        t0 = time.time()
        out = run_harness(path, limit=limit, max_gen_toks=max_gen_toks, batch_size=batch_size, device=device,
                          dtype=dtype, trust_remote_code=trust_remote_code, data_file=data_file)
        seconds[name] = round(time.time() - t0, 1)
        upstream_gen = dict(out.get("configs", {}).get(LOCAL_TASK, {}).get("generation_kwargs", {}))
        rows = harness_verdicts(out)
        checks = [[{"id": i, "kwargs": kw, "strict": s, "loose": lo}
                   for i, kw, s, lo in zip(r["instruction_id_list"], r["kwargs"], r["strict"], r["loose"])]
                  for r in rows]
        m = summarize_checks(checks) or {}
        m["n_prompts"] = len(rows)
        m["harness"] = harness_metrics(out)
        per_model[name] = m
        per_prompt[name] = [{"key": r["key"], "strict": r["strict"], "loose": r["loose"]} for r in rows]
        for i, (r, c) in enumerate(zip(rows, checks)):
            samples.append({"set": SET_NAME, "model": name, "index": i, "key": r["key"], "prompt": r["prompt"],
                            "response": r["response"],
                            "instructions": [{"id": x["id"], "kwargs": x["kwargs"], "passed": x["strict"],
                                              "passed_loose": x["loose"]} for x in c],
                            "passed": all(r["strict"]), "passed_loose": all(r["loose"])})
    n_total = len(load_ifeval(data_file))
    n = next(iter(per_model.values()))["n_prompts"] if per_model else 0
    names = [name for name, _ in models]
    paired = [{"model": b, "against": a,
               **paired_pass_test([all(p["strict"]) for p in per_prompt[b]],
                                  [all(p["strict"]) for p in per_prompt[a]])}
              for a, b in zip(names, names[1:]) if n]
    try:
        shown = str(data_file.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(data_file)
    result = {
        "file": shown, "sha256": _sha256(data_file), "n_prompts": n, "n_prompts_in_file": n_total,
        "comparable_to_published": n == n_total,
        "scorer": f"lm-evaluation-harness {h.version}, task `{HARNESS_TASK}` (simple_evaluate, model=hf)",
        "generation": {"decoding": "greedy", "chat_template": True, **upstream_gen,
                       "max_gen_toks": upstream_gen.get("max_gen_toks", max_gen_toks), "batch_size": batch_size,
                       "device": device, "dtype": dtype},
        "sentence_tokenizer": status,
        "seconds": seconds,
        "models": per_model,
        "per_prompt": per_prompt,
    }
    if paired:
        result["paired"] = paired
    return result, samples


def describe_set(s: dict) -> str:
    """One line for results notes and the report: what scored the IFEval set and how."""
    g = s.get("generation", {})
    parts = [f"{SET_NAME}: {s.get('scorer')}", f"{s.get('n_prompts')} of {s.get('n_prompts_in_file')} prompts"
             + ("" if s.get("comparable_to_published") else " (a subset: not comparable with published IFEval)"),
             f"greedy with the chat template, max_gen_toks {g.get('max_gen_toks')}",
             "sentence tokenizer " + ("NLTK punkt_tab" if s.get("sentence_tokenizer") == "punkt_tab" else
                                      "untrained Punkt fallback (punkt_tab missing: "
                                      + ", ".join(AFFECTED_BY_PUNKT) + " approximate)")]
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------
# The eval stage's hook (`eval.ifeval: true`, `pipeline eval --ifeval`)
# --------------------------------------------------------------------------------------------


def add_to_results(results: dict, flat: dict, recipe, models: list[tuple[str, str]], precision) -> list[dict]:
    """Run the harness for every (name, path), put the set `ifeval_harness` into `results["sets"]`, a note
    saying how it was scored into `results["notes"]`, its metrics into `flat`; return its sample rows."""
    from .models import resolve_model_path
    from .utils import log

    cfg = recipe.eval
    paths = [(name, str(resolve_model_path(path))) for name, path in models]
    log(f"eval: IFEval by lm-evaluation-harness on {', '.join(n for n, _ in paths)}"
        + (f" (first {cfg.ifeval_limit} prompts)" if cfg.ifeval_limit else ""))
    s, rows = ifeval_set(paths, limit=cfg.ifeval_limit, max_gen_toks=cfg.ifeval_max_gen_toks,
                         batch_size=cfg.batch_size, device=str(precision.device),
                         dtype=str(precision.dtype).replace("torch.", ""),
                         trust_remote_code=recipe.model.trust_remote_code)
    results.setdefault("sets", {})[SET_NAME] = s
    results.setdefault("notes", []).append(describe_set(s))
    for name, m in s["models"].items():
        for k in ("pass_rate", "pass_rate_loose", "instruction_pass_rate", "instruction_pass_rate_loose"):
            flat[f"eval/{SET_NAME}/{name}/{k}"] = m[k]
        for i, d in (m.get("per_id") or {}).items():
            flat[f"eval/{SET_NAME}/{name}/instruction_pass_rate/{i}"] = d["pass_rate"]
    return rows


def evaluate_only(recipe, out_dir: Path) -> dict:
    """The eval stage with `eval.ifeval` and no prompt files of its own: only the harness's IFEval;
    writes `results.json`, `samples.jsonl` and `metrics.jsonl` like `stages.eval.evaluate`."""
    from .models import resolve_precision
    from .stages.eval import _unique, model_name

    cfg = recipe.eval
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(recipe.model)
    refs = list(dict.fromkeys(cfg.models))
    models = list(zip(_unique([model_name(r) for r in refs]), [recipe.resolve_model_ref(r) for r in refs]))
    t0 = time.time()
    results: dict[str, Any] = {
        "generation": {"decoding": "greedy", "max_new_tokens": None, "seed": recipe.run.seed,
                       "device": str(precision.device), "dtype": str(precision.dtype).replace("torch.", "")},
        "models": dict(models), "reference": None, "baseline": None, "reward_model": None,
        "num_samples_in_report": cfg.num_samples_in_report, "notes": [], "sets": {},
    }
    flat: dict = {}
    samples = add_to_results(results, flat, recipe, models, precision)
    results["generation"]["max_new_tokens"] = results["sets"][SET_NAME]["generation"]["max_gen_toks"]
    results["seconds"] = results["sets"][SET_NAME]["seconds"]
    results["seconds_total"] = round(time.time() - t0, 1)
    from .stages.eval import write_outputs

    write_outputs(out_dir, results, samples, flat)
    return results
