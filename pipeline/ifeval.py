"""IFEval through lm-evaluation-harness: its verifiers, its scorer, offline.

IFEval (Zhou et al. 2023, arXiv:2311.07911) scores a response with deterministic checkers, one per
instruction id. The scorer papers and leaderboards use is lm-evaluation-harness's `ifeval` task
(`lm_eval/tasks/ifeval/`, a maintained copy of Google's instruction registry). This module is the
project's one door to it:

- `harness()`: the harness's `instructions_registry`, `instructions_util` and `utils` modules,
  imported without any network access (see the sentence tokenizer below). `pipeline.checkers` (the
  verifier reward and every pass rate) calls `utils.test_instruction_following_strict/_loose`.
- `run_harness(...)`: the real harness run, `lm_eval.simple_evaluate(...)` on the 541 public
  prompts in `eval/ifeval/input_data.jsonl` (a local task config pointing the harness's own
  `ifeval.yaml` at that file instead of the hub dataset `google/IFEval`), greedy decoding with the
  model's chat template. The harness builds the prompts, scores (`process_results`) and aggregates;
  the text comes from `PipelineLM` (default), a harness `LM` whose `generate_until` runs the
  project's batched greedy generation, or, with `backend="hf"`, from the harness's own `hf` model
  (much slower on a CPU; kept for cross-checking). `ifeval_set(...)` turns it into a prompt set of
  the eval stage's `results.json`: prompt- and instruction-level accuracy, strict and loose,
  per-prompt verdicts, and which generator produced the responses.
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


def prompt_text(prompt: Any) -> str:
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
        text = normalise(prompt_text(p))
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
# The generator: the harness's `LM` interface on the project's batched greedy generation
# --------------------------------------------------------------------------------------------

GENERATORS = ("pipeline", "hf")  # run_harness(backend=...): ours (default), or the harness's own HFLM
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default when a request names none (HFLM's `max_gen_toks`)
_GREEDY_ONLY = {"top_k", "top_p"}  # sampling knobs with no effect on greedy decoding: accepted, ignored
_LM_CLASS: Optional[type] = None


def describe_generator(backend: str) -> str:
    """One line for `results.json` (`sets.ifeval_harness.generation.generator`): what produced the text."""
    if backend == "hf":
        return ("lm-evaluation-harness `hf` model (HFLM): its own batched generate with stop-string stopping "
                "criteria")
    return ("pipeline.ifeval.PipelineLM: transformers `generate`, greedy, prompts sorted by token length in "
            "left-padded batches, KV cache, decoding stops at EOS or max_gen_toks, the text cut at the first "
            "`until` string")


class _PipelineLMMethods:
    """The body of `PipelineLM` (see `pipeline_lm`): an `lm_eval.api.model.LM` whose `generate_until`
    runs the project's batched greedy generation (the eval stage's recipe: prompts sorted by length,
    `batch_size` per left-padded batch, the KV cache, bf16 autocast where `Precision` says so), while the
    harness keeps everything else: the prompt (`doc_to_text`, the chat template through
    `apply_chat_template` below, exactly HFLM's call), the stop strings and `max_gen_toks` of each
    request, `process_results` and the aggregation.

    Decoding stops only at EOS (the tokenizer's, plus any in the model's generation config, as HFLM
    stops at those) or after `max_gen_toks` tokens; the request's `until` strings (and the EOS text,
    which the harness always adds) are applied afterwards, by cutting the decoded text at the first
    occurrence (the harness's own `postprocess_generated_text`). The text is the same as HFLM's,
    whose stopping criteria only end decoding early: greedy tokens before the stop string do not
    depend on what comes after it. Greedy only: a request with `do_sample: true` or a temperature
    above 0 is refused (use `backend="hf"`). Log-likelihood requests are not implemented (IFEval
    only generates)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 50, precision=None, name: str = "",
                 progress: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = max(1, int(batch_size))
        self.precision = precision  # a models.Precision: bf16 autocast around generate when it says so
        self.name = name or str(getattr(tokenizer, "name_or_path", "") or "model")
        self.progress = progress
        self._device = next(model.parameters()).device
        eos = [tokenizer.eos_token_id]
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += list(extra) if isinstance(extra, (list, tuple)) else [extra]
        self.eos_ids = [int(e) for e in dict.fromkeys(eos) if e is not None]
        # What the run did, for results.json: prompts, batches, generated tokens, responses cut by max_gen_toks.
        self.stats = {"prompts": 0, "batches": 0, "generated_tokens": 0, "hit_max_gen_toks": 0,
                      "truncated_prompts": 0, "seconds": 0.0}

    # ---- what the harness asks of a chat model (lm_eval/api/model.py, models/huggingface.py)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        if not chat_template:
            return None
        t = self.tokenizer.chat_template
        if isinstance(t, dict):
            return t.get(chat_template if isinstance(chat_template, str) else "default")
        return t

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """HFLM's call: the tokenizer's template as text, the assistant turn opened (for one user
        message this is `pipeline.data.render_prompt`, the eval stage's prompt)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_name": self.name, "generator": "pipeline.ifeval.PipelineLM", "batch_size": self.batch_size,
                "model_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "autocast": bool(self.precision is not None and self.precision.autocast)}

    def loglikelihood(self, requests):
        raise NotImplementedError("PipelineLM only generates (generate_until); use backend='hf' for "
                                  "log-likelihood tasks.")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("PipelineLM only generates (generate_until); use backend='hf' for "
                                  "log-likelihood tasks.")

    # ---- generation

    def tok_encode(self, text: str) -> list[int]:
        """HFLM's rule: no special tokens added when the text already starts with BOS (a chat template
        that writes it), else the tokenizer's default."""
        bos = self.tokenizer.bos_token
        starts = bool(bos) and text.startswith(bos)
        return self.tokenizer(text, add_special_tokens=not starts)["input_ids"]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One response per request (`args` = (context, gen_kwargs)), in request order. Requests with
        the same gen kwargs are generated together."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tokenizer.decode([self.tokenizer.eos_token_id], skip_special_tokens=False)
        out: list[Optional[str]] = [None] * len(requests)
        for idx in groups.values():
            kw = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen_toks = int(kw.pop("max_gen_toks"))
            if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError("PipelineLM decodes greedily; this task asks for sampling "
                                 f"({requests[idx[0]].args[1]}). Run it with backend='hf'.")
            unknown = sorted(set(kw) - _GREEDY_ONLY)
            if unknown:
                raise ValueError(f"PipelineLM: generation kwargs {unknown} are not supported (greedy decoding "
                                 "with max_gen_toks and until only); run with backend='hf'.")
            texts = self.generate_greedy([requests[i].args[0] for i in idx], max_gen_toks)
            for i, text in zip(idx, texts):
                s = postprocess_generated_text(text, until, None)
                out[i] = s
                self.cache_hook.add_partial("generate_until", requests[i].args, s)
        return out  # type: ignore[return-value]

    def generate_greedy(self, contexts: list[str], max_gen_toks: int) -> list[str]:
        """Greedy continuations of already templated prompts, uncut (decoded without special tokens, up to
        the first EOS or `max_gen_toks` tokens), in the order given."""
        import contextlib

        import torch

        from .decode import generate_ids
        from .generation import left_pad
        from .utils import log

        t0 = time.time()
        enc = [self.tok_encode(c) for c in contexts]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit:  # HFLM's rule: keep the last (limit - max_gen_toks) prompt tokens
            room = int(limit) - max_gen_toks
            if room <= 0:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's "
                                 f"{limit} positions.")
            cut = [i for i, e in enumerate(enc) if len(e) > room]
            for i in cut:
                enc[i] = enc[i][-room:]
            if cut:
                log(f"ifeval: {len(cut)} prompt(s) longer than {room} tokens kept their last {room} tokens.")
            self.stats["truncated_prompts"] += len(cut)
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        every = max(1, -(-len(batches) // 10))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        eos = set(self.eos_ids)
        texts: list[str] = [""] * len(enc)
        was_training = self.model.training
        self.model.eval()
        from .checkpoint import stop_if_interrupted

        for b, idx in enumerate(batches):
            stop_if_interrupted(f"IFEval generation (batch {b + 1}/{len(batches)})")
            input_ids, attn = left_pad([enc[i] for i in idx], pad, self._device)
            autocast = self.precision.autocast_ctx() if self.precision is not None else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                gen = generate_ids(self.model, input_ids, attn, max_gen_toks, self.eos_ids, pad)
            for row, i in enumerate(idx):
                toks = gen[row, input_ids.shape[1]:].tolist()
                end = next((k for k, t in enumerate(toks) if t in eos), None)
                if end is None:
                    self.stats["hit_max_gen_toks"] += 1
                    toks = [t for t in toks if t != pad]
                else:
                    toks = toks[:end]
                self.stats["generated_tokens"] += len(toks) + (end is not None)
                texts[i] = self.tokenizer.decode(toks, skip_special_tokens=True)
            if self.progress and ((b + 1) % every == 0 or b + 1 == len(batches)):
                log(f"ifeval: {self.name}: {sum(len(x) for x in batches[:b + 1])}/{len(enc)} prompts, batch "
                    f"{b + 1}/{len(batches)}, {time.time() - t0:.0f}s")
        if was_training:
            self.model.train()
        self.stats["prompts"] += len(enc)
        self.stats["batches"] += len(batches)
        self.stats["seconds"] = round(self.stats["seconds"] + time.time() - t0, 1)
        return texts


def pipeline_lm_class() -> type:
    """`PipelineLM`: `_PipelineLMMethods` on the harness's `lm_eval.api.model.LM` (made on first use, after
    `harness()` has settled the sentence tokenizer, so importing this module never imports the harness)."""
    global _LM_CLASS
    if _LM_CLASS is None:
        harness()
        from lm_eval.api.model import LM

        _LM_CLASS = type("PipelineLM", (_PipelineLMMethods, LM), {"__module__": __name__,
                                                                  "__doc__": _PipelineLMMethods.__doc__})
    return _LM_CLASS


def pipeline_lm(model, tokenizer, **kwargs):
    """A `PipelineLM` on a loaded (model, tokenizer); kwargs: batch_size, precision (a `models.Precision`,
    for its bf16 autocast), name, progress."""
    return pipeline_lm_class()(model, tokenizer, **kwargs)


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
                trust_remote_code: bool = False, data_file: Path | str = IFEVAL_FILE,
                backend: str = "pipeline", model_cfg=None, cpu_autocast: str = "auto",
                name: Optional[str] = None) -> dict:
    """`lm_eval.simple_evaluate(model=..., tasks=[ifeval on data_file], apply_chat_template=True)`, greedy;
    `max_gen_toks` None keeps the task's own (1280). Returns the harness's output dict (`results`,
    `samples`, `configs`, ...) plus `generator` (which model client generated, and its counters).

    `backend="pipeline"` (default): a `PipelineLM` on the model loaded the pipeline's way
    (`models.load_policy` with `model_cfg`, the recipe's model section, or one built from `device`,
    `dtype`, `trust_remote_code`, `cpu_autocast`; `models.resolve_precision` decides bf16 autocast).
    `backend="hf"`: the harness's own `hf` model (HFLM) on `model_path`, for cross-checking; slow on a CPU.
    `name`: the model's name in logs and in the harness's `model_name` (default: the path's last part)."""
    if backend not in GENERATORS:
        raise ValueError(f"run_harness: backend {backend!r} is not one of {', '.join(GENERATORS)}.")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    harness()  # the sentence tokenizer first, then the harness's imports (no download)
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = None
    if backend == "pipeline":
        import dataclasses

        from .config import ModelConfig
        from .models import load_policy, resolve_precision

        cfg = (dataclasses.replace(model_cfg, name_or_path=model_path, device=device, dtype=dtype)
               if model_cfg is not None else
               ModelConfig(name_or_path=model_path, device=device, dtype=dtype, cpu_autocast=cpu_autocast,
                           trust_remote_code=trust_remote_code))
        precision = resolve_precision(cfg)
        model, tok = load_policy(model_path, cfg, precision)
        lm = pipeline_lm(model, tok, batch_size=batch_size, precision=precision, name=name or Path(model_path).name)
    with tempfile.TemporaryDirectory(prefix="rlhf-pipeline-ifeval-task-") as d:
        task_config(Path(d), data_file)
        tm = TaskManager(include_path=d, include_defaults=False)
        gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None
        if lm is not None:
            model_kw: dict[str, Any] = {"model": lm}
        else:
            model_kw = {"model": "hf", "model_args": {"pretrained": model_path, "dtype": dtype,
                                                      "trust_remote_code": trust_remote_code}}
        out = lm_eval.simple_evaluate(
            **model_kw, tasks=[LOCAL_TASK], task_manager=tm, device=device, batch_size=batch_size, limit=limit,
            apply_chat_template=True, gen_kwargs=gen_kwargs, log_samples=True, bootstrap_iters=0,
        )
    if out is None:  # pragma: no cover - only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (not rank 0?)")
    out["generator"] = {"backend": backend, "generator": describe_generator(backend)}
    if lm is not None:
        out["generator"].update(autocast="bfloat16" if lm.precision.autocast else None, stats=dict(lm.stats))
        del lm, model
        import gc

        gc.collect()
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
               data_file: Path | str = IFEVAL_FILE, backend: str = "pipeline",
               model_cfg=None) -> tuple[dict, list[dict]]:
    """Run the harness for each (name, model path) and return (a prompt set of `results.json`, sample
    rows for `samples.jsonl`). The set has the eval stage's keys (`pass_rate` = prompt-level strict,
    `pass_rate_loose`, `instruction_pass_rate`, `instruction_pass_rate_loose`, `per_id`), the harness's
    own numbers under `harness`, per-prompt verdicts under `per_prompt`, and `paired` prompt-level tests
    of each model against the one before it. `backend`, `model_cfg`: see `run_harness`."""
    from .stages.eval import paired_pass_test, per_id_paired, summarize_checks

    data_file = Path(data_file)
    status = ensure_sentence_tokenizer()
    h = harness()
    per_model, per_prompt, seconds, samples = {}, {}, {}, []
    all_checks: dict[str, list] = {}
    upstream_gen: dict = {}
    generator: dict = {}
    gen_stats: dict = {}  # PipelineLM's counters per model (prompts, batches, tokens, hit_max_gen_toks, seconds)
    for name, path in models:
        t0 = time.time()
        out = run_harness(path, limit=limit, max_gen_toks=max_gen_toks, batch_size=batch_size, device=device,
                          dtype=dtype, trust_remote_code=trust_remote_code, data_file=data_file,
                          backend=backend, model_cfg=model_cfg, name=name)
        seconds[name] = round(time.time() - t0, 1)
        upstream_gen = dict(out.get("configs", {}).get(LOCAL_TASK, {}).get("generation_kwargs", {}))
        generator = {k: v for k, v in out["generator"].items() if k != "stats"}
        if "stats" in out["generator"]:
            gen_stats[name] = out["generator"]["stats"]
        rows = harness_verdicts(out)
        checks = [[{"id": i, "kwargs": kw, "strict": s, "loose": lo}
                   for i, kw, s, lo in zip(r["instruction_id_list"], r["kwargs"], r["strict"], r["loose"])]
                  for r in rows]
        all_checks[name] = checks
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
        "scorer": (f"lm-evaluation-harness {h.version}, task `{HARNESS_TASK}` (simple_evaluate, "
                   + ("model=hf" if backend == "hf" else "model=PipelineLM") + ")"),
        "generation": {"decoding": "greedy", "chat_template": True, **upstream_gen,
                       "max_gen_toks": upstream_gen.get("max_gen_toks", max_gen_toks), "batch_size": batch_size,
                       "device": device, "dtype": dtype, "backend": backend,
                       "generator": generator.get("generator", describe_generator(backend)),
                       **({"autocast": generator.get("autocast")} if backend == "pipeline" else {}),
                       **({"per_model": gen_stats} if gen_stats else {})},
        "sentence_tokenizer": status,
        "seconds": seconds,
        "models": per_model,
        "per_prompt": per_prompt,
    }
    if paired:
        result["paired"] = paired
        # Per instruction id, each model against the first (the base model in the shipped recipes), so the
        # report flags an id a stage made significantly worse (issue #22), as for the held-out set.
        first = names[0]
        result["per_id_paired"] = {"against": first, "models": {
            m: per_id_paired(all_checks[m], all_checks[first]) for m in names[1:]}}
    return result, samples


def describe_set(s: dict) -> str:
    """One line for results notes and the report: what scored the IFEval set and how."""
    g = s.get("generation", {})
    parts = [f"{SET_NAME}: {s.get('scorer')}", f"{s.get('n_prompts')} of {s.get('n_prompts_in_file')} prompts"
             + ("" if s.get("comparable_to_published") else " (a subset: not comparable with published IFEval)"),
             f"greedy with the chat template, max_gen_toks {g.get('max_gen_toks')}",
             ("generated by the harness's `hf` model" if g.get("backend") == "hf" else
              "generated by PipelineLM (the pipeline's batched greedy generation"
              + (", bf16 autocast" if g.get("autocast") else "") + ")"
              + "".join(f", {m}: {st['hit_max_gen_toks']} of {st['prompts']} responses reached max_gen_toks"
                        for m, st in (g.get("per_model") or {}).items())),
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
                         trust_remote_code=recipe.model.trust_remote_code, model_cfg=recipe.model)
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
