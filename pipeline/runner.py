"""Runs a recipe's stages in order and writes the run directory.

Layout:
    <output_dir>/recipe.resolved.yaml    the recipe after overrides and defaults
    <output_dir>/run_info.json           package versions, seed, command line
    <output_dir>/inputs.json             sha256 of each stage's local data files (a changed file is caught
                                         like a changed recipe)
    <output_dir>/<stage>/final/          HF-format model (merged weights + tokenizer); LoRA adapter in final/adapter/
    <output_dir>/<stage>/metrics.jsonl   one JSON object per logged step
    <output_dir>/<stage>/summary.json    the stage's summary; written last, it marks the stage as done
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from .config import Recipe, dump_recipe
from .data import LOCAL_SUFFIXES, load_rows, preference_examples, prompt_examples, sft_examples
from .utils import atomic_write_json, atomic_write_text, log, package_versions, release_memory, set_seed

STAGE_MODULES = {s: f"pipeline.stages.{s}" for s in ("sft", "reward", "ppo", "distill", "eval")}


def stage_module(name: str):
    return importlib.import_module(STAGE_MODULES[name])


def check_data_path(spec: str, key: str, where: str) -> None:
    """A data key's value before it is read: a folder or a missing local file is an error naming the key
    (a name that is neither, e.g. `org/dataset:split`, is a hub dataset, read by `load_rows`)."""
    from .data import DataError, _is_saved_dataset
    from .preflight import _looks_local

    src = getattr(spec, "source", None)  # a DataSpec from a `{path: ..., split: ...}` mapping
    if src is not None and (src.data_files or not src.path):
        return  # a builder with data_files: read (and checked) by datasets
    target = src.path if src is not None else str(spec)
    path = Path(target).expanduser()
    if path.is_dir():
        # A folder is a dataset only when `datasets` can read it: saved with save_to_disk, or holding data files.
        if _is_saved_dataset(path) or any(p.suffix in LOCAL_SUFFIXES for p in path.rglob("*") if p.is_file()):
            return
        raise DataError(f"{where}: `{key}`: {target} is a folder with no data files in it; give a data file "
                        "(.jsonl, .json, .parquet or .csv), a folder saved by `datasets.save_to_disk`, or a hub "
                        "dataset `org/name[:split]`.")
    if path.exists():
        return
    if path.suffix in LOCAL_SUFFIXES or _looks_local(target):
        raise DataError(f"{where}: `{key}`: data file {target} not found (relative paths are read from {Path.cwd()}).")


def validate_data(recipe: Recipe, stages: list[str] | None = None) -> list[str]:
    """Open and check every data file the recipe's stages (or `stages`) read. Returns one line per file."""
    lines = []
    where = recipe.source or "<recipe>"

    def check(stage: str, key: str, spec: str | None, fn) -> None:
        if not spec:
            if key in ("data", "prompts"):
                from .config import RecipeError

                raise RecipeError(f"{where}: `{stage}.{key}` is required (a data file or hub dataset).")
            return
        check_data_path(spec, f"{stage}.{key}", where)
        rows = load_rows(spec)
        n = fn(rows, spec)
        lines.append(f"{stage}.{key}: {spec}: {n} examples")

    for stage in (recipe.stages if stages is None else stages):
        sec = getattr(recipe, stage)
        if stage == "sft":
            check(stage, "data", sec.data, lambda r, s: len(sft_examples(r, s)))
            check(stage, "eval_data", sec.eval_data, lambda r, s: len(sft_examples(r, s)))
        elif stage == "reward":
            check(stage, "data", sec.data, lambda r, s: len(preference_examples(r, s, sec.keep_ties)[0]))
            check(stage, "eval_data", sec.eval_data, lambda r, s: len(preference_examples(r, s, sec.keep_ties)[0]))
            check(stage, "norm_prompts", sec.norm_prompts, lambda r, s: len(prompt_examples(r, s)))
        elif stage in ("ppo", "distill"):
            check(stage, "prompts", sec.prompts, lambda r, s: len(prompt_examples(r, s)))
            if stage == "distill":
                check(stage, "heldout_prompts", sec.heldout_prompts, lambda r, s: len(prompt_examples(r, s)))
                check(stage, "warmup_data", sec.warmup_data, lambda r, s: len(sft_examples(r, s)))
                for i, spec in enumerate(sec.extra_prompts):
                    check(stage, f"extra_prompts[{i}]", spec, lambda r, s: len(prompt_examples(r, s)))
        elif stage == "eval":
            for i, spec in enumerate(sec.prompts):
                check(stage, f"prompts[{i}]", spec, lambda r, s: len(prompt_examples(r, s)))
    return lines


def peak_rss_gb() -> "float | None":
    """This process's peak resident memory so far in GB (`getrusage` ru_maxrss: KiB on Linux, bytes on macOS);
    None where `resource` does not exist (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)


def reset_gpu_peak() -> None:
    """Start a stage's GPU memory peak from zero (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_gb() -> "float | None":
    """The GPU memory this process's tensors held at most since `reset_gpu_peak` (this device, GB); None
    without CUDA. The caching allocator reserves somewhat more (`torch.cuda.max_memory_reserved`)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 2)


def stage_input_files(recipe: Recipe) -> dict[str, dict[str, str]]:
    """{stage: {path: sha256}} for the local data files each stage section names (hub datasets and
    run references such as `sft` are not files and are left out)."""
    import hashlib

    from .data import LOCAL_SUFFIXES

    def paths(value) -> list[str]:
        if isinstance(value, str):
            return [value] if Path(value).suffix in LOCAL_SUFFIXES and Path(value).is_file() else []
        if isinstance(value, dict):
            return [p for v in value.values() for p in paths(v)]
        if isinstance(value, list):
            return [p for v in value for p in paths(v)]
        return []

    out: dict[str, dict[str, str]] = {}
    as_dict = recipe.to_dict()
    for stage in recipe.stages:
        files = {}
        for f in sorted(set(paths(as_dict.get(stage)))):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            files[f] = h.hexdigest()
        out[stage] = files
    return out


def write_run_info(recipe: Recipe) -> None:
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
    atomic_write_json(out / "inputs.json", stage_input_files(recipe))
    atomic_write_json(out / "run_info.json", {
        "seed": recipe.run.seed,
        "recipe": recipe.source,
        "argv": sys.argv,
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


def stage_done(recipe: Recipe, stage: str) -> bool:
    return (recipe.stage_dir(stage) / "summary.json").exists()


def is_main_process() -> bool:
    """True in a plain run and in process 0 under `accelerate launch`."""
    import os

    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def recipe_diff(old: str, new: str, where: str) -> str:
    import difflib

    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), fromfile=f"{where} (existing run)",
                                 tofile="this recipe", lineterm="", n=1)
    return "\n".join(lines)


def stages_to_rerun(old_text: str, recipe: Recipe) -> list[str]:
    """Stages whose inputs changed: from the first stage whose section changed onwards (later stages
    read earlier outputs); every stage when `model` or the seed changed."""
    import yaml

    old, new = yaml.safe_load(old_text) or {}, recipe.to_dict()
    if old.get("model") != new.get("model") or (old.get("run") or {}).get("seed") != new["run"].get("seed"):
        return list(recipe.stages)
    for i, s in enumerate(recipe.stages):
        if old.get(s) != new.get(s):
            return list(recipe.stages[i:])
    return []


def changed_inputs(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(stages whose local data files changed since the run directory was written, lines naming the
    files). Empty for a run directory written before inputs.json existed."""
    saved = recipe.output_dir / "inputs.json"
    if not saved.exists():
        return [], []
    try:
        old = json.loads(saved.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return [], []
    new = stage_input_files(recipe)
    stages, lines = [], []
    for stage in recipe.stages:
        before, now = old.get(stage, {}), new.get(stage, {})
        if stage not in old or before == now:
            continue
        stages.append(stage)
        for f in sorted(set(before) | set(now)):
            if before.get(f) != now.get(f):
                what = "is new" if f not in before else "is gone" if f not in now else "changed"
                lines.append(f"  {stage}: {f} {what} since the run started")
    return stages, lines


RUN_MARKERS = ("recipe.resolved.yaml", "run_info.json")


def is_run_dir(path: Path) -> bool:
    """A folder this pipeline wrote a run into (it holds recipe.resolved.yaml or run_info.json)."""
    return any((Path(path) / m).is_file() for m in RUN_MARKERS)


def stages_wrote_anything(out: Path) -> bool:
    """Whether any stage of the run in `out` has written a file (an empty stage folder does not count)."""
    from .config import STAGE_NAMES

    return any(p.is_file() for s in STAGE_NAMES if (Path(out) / s).is_dir() for p in (Path(out) / s).rglob("*"))


def prepare_output_dir(recipe: Recipe, force: bool = False) -> list[str]:
    """Check an existing run directory. Returns the stages whose outputs or checkpoints are stale and
    must rerun (with --force); refuses a changed recipe or changed data files without it, showing what
    changed. A run that stopped before any stage wrote a file holds nothing to protect: it is started
    again under the new recipe, without --force."""
    from .config import RecipeError

    resolved = recipe.output_dir / "recipe.resolved.yaml"
    if not resolved.exists():
        return []
    if not stages_wrote_anything(recipe.output_dir):
        return []
    old, new = resolved.read_text(encoding="utf-8"), dump_recipe(recipe)
    from .hub import only_outputs_changed

    if old != new and (only_outputs_changed(old, recipe)  # trackers, uploads, checkpoint keeping: no rerun
                       or only_new_defaults(old, new)):  # a newer version's keys, at their defaults
        old = new
    data_stages, lines = changed_inputs(recipe)
    if old == new and not data_stages:
        return []
    what = "\n".join(([recipe_diff(old, new, str(resolved))] if old != new else []) + lines)
    if not force:
        head = "of a different recipe. What changed" if old != new else "made from other data"
        raise RecipeError(
            f"{recipe.output_dir} holds a run {head}:\n{what}\n"
            "Its checkpoints and finished stages were made from the old recipe or files. Run with --force to go "
            "on with the new ones (the stages from the first changed one rerun), or set run.output_dir to a new "
            "directory."
        )
    changed = (stages_to_rerun(old, recipe) if old != new else []) + data_stages
    rerun = list(recipe.stages[min(map(recipe.stages.index, changed)):]) if changed else []
    log(f"--force: {'recipe' if old != new else 'data'} changed; rerunning {', '.join(rerun) or 'no stage'}:\n{what}")
    return rerun


def only_new_defaults(old: str, new: str) -> bool:
    """Whether the resolved recipe `old` (written by an earlier version) differs from `new` only by keys that
    version did not have, at their default values: read with today's parser, it resolves to `new`."""
    import yaml

    from .config import RecipeError, parse_recipe

    try:
        return dump_recipe(parse_recipe(yaml.safe_load(old))) == new
    except (RecipeError, ValueError, yaml.YAMLError):  # e.g. a key renamed since: a real change
        return False


def invalidate_stage(recipe: Recipe, stage: str) -> None:
    """Mark a stage as not finished and drop its checkpoints (they belong to other settings).
    Its final/ and metrics stay until the rerun replaces them."""
    import shutil

    d = recipe.stage_dir(stage)
    if (d / "summary.json").exists():
        (d / "summary.json").rename(d / "summary.stale.json")
    for ck in ("checkpoints",):
        if (d / ck).exists():
            shutil.rmtree(d / ck)


def write_report(out: Path) -> None:
    """The run's report.md / report.html from whatever stages finished. A failure here is logged, never
    raised: it must not hide the run's own outcome."""
    try:
        from .report import build_report

        log(f"report: {build_report(out)}")
    except Exception as e:  # noqa: BLE001
        log(f"report: not written ({type(e).__name__}: {e}); rebuild it with `pipeline report {out}`")


def run_recipe(recipe: Recipe, stages: list[str] | None = None, force: bool = False,
               rerun: bool = False) -> dict[str, dict]:
    """`_run_stages`, then the run's report (main process only), also when a stage failed: the report
    shows what finished. Not after an interruption (Ctrl-C, SIGTERM), which should stop promptly, nor
    when the run directory was refused."""
    from .checkpoint import Interrupted
    from .config import RecipeError

    try:
        summaries = _run_stages(recipe, stages, force, rerun)
    except Exception as e:
        # RecipeError: the run directory was refused before any stage ran; nothing new to report.
        if not isinstance(e, (Interrupted, RecipeError)) and is_main_process() and recipe.output_dir.is_dir():
            write_report(recipe.output_dir)
        raise
    if is_main_process():
        write_report(recipe.output_dir)
    return summaries


def _run_stages(recipe: Recipe, stages: list[str] | None = None, force: bool = False,
                rerun: bool = False) -> dict[str, dict]:
    """Run the stages in order. Finished stages (summary.json present) are skipped; an interrupted
    stage continues from its last checkpoint. `rerun` runs the given stages again even if finished."""
    from .checkpoint import InterruptFlag, set_active_flag

    from .hub import after_stage, check_outputs, finalize_stage
    from .tracking import set_run_trackers

    stages = stages or recipe.stages
    main = is_main_process()
    check_outputs(recipe, stages)  # trackers installed, Hub uploads possible: before any training
    set_run_trackers(recipe.run.report_to, recipe.run.name, recipe.output_dir)
    stale = prepare_output_dir(recipe, force) if main else []
    if main:
        for s in set(stale) | (set(stages) if rerun else set()):
            invalidate_stage(recipe, s)
        write_run_info(recipe)
    summaries = {}
    for stage in stages:
        if stage_done(recipe, stage):
            log(f"=== stage {stage}: already finished ({recipe.stage_dir(stage) / 'summary.json'}); skipping "
                "(use --rerun to run it again)")
            summaries[stage] = json.loads((recipe.stage_dir(stage) / "summary.json").read_text())
            if main:  # an upload that failed last time, checkpoints to drop
                summaries[stage] = after_stage(recipe, stage, summaries[stage])
            continue
        section = getattr(recipe, stage)
        if section is None:
            from .config import SECTION_TYPES, parse_section

            setattr(recipe, stage, parse_section(SECTION_TYPES[stage], {}, stage, recipe.source or "<recipe>"))
        set_seed(recipe.run.seed)
        from .decode import set_cpu_decoder

        set_cpu_decoder(recipe.model.cpu_decoder)
        stage_dir = recipe.stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        log(f"=== stage {stage} -> {stage_dir}")
        t0 = time.time()
        reset_gpu_peak()
        with InterruptFlag() as flag:
            set_active_flag(flag)
            try:
                summary = stage_module(stage).run(recipe, stage_dir)
            finally:
                set_active_flag(None)
                release_memory()  # the next stage starts from what it needs, not on top of this one's heap
        summary = {"stage": stage, "seconds": round(time.time() - t0, 1), **(summary or {})}
        summary["peak_rss_gb"] = peak_rss_gb()  # the process's peak so far: the stage that raises it needed it
        if (gpu := peak_gpu_gb()) is not None:
            summary["peak_gpu_gb"] = gpu  # this stage's own peak (reset above)
        summaries[stage] = summary
        if not main:
            continue
        finalize_stage(recipe, stage, summary)  # model cards, the adapter's portable base
        atomic_write_json(stage_dir / "summary.json", summary)
        log(f"=== stage {stage} done in {summary['seconds']}s: " + json.dumps(
            {k: v for k, v in summary.items() if isinstance(v, (int, float)) and k != "seconds"}))
        summaries[stage] = after_stage(recipe, stage, summary)  # Hub upload, checkpoint clean-up
    return summaries
