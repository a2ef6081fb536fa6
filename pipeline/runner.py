"""Runs a recipe's stages in order and writes the run directory.

Layout:
    <output_dir>/recipe.resolved.yaml    the recipe after overrides and defaults
    <output_dir>/run_info.json           package versions, seed, command line
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
from .data import load_rows, preference_examples, prompt_examples, sft_examples
from .utils import atomic_write_json, atomic_write_text, log, package_versions, set_seed

STAGE_MODULES = {s: f"pipeline.stages.{s}" for s in ("sft", "reward", "ppo", "distill", "eval")}


def stage_module(name: str):
    return importlib.import_module(STAGE_MODULES[name])


def validate_data(recipe: Recipe) -> list[str]:
    """Open and check every data file the recipe's stages read. Returns one line per file."""
    lines = []

    def check(stage: str, key: str, spec: str | None, fn) -> None:
        if not spec:
            if key in ("data", "prompts"):
                from .config import RecipeError

                raise RecipeError(f"{recipe.source}: `{stage}.{key}` is required (a data file or hub dataset).")
            return
        rows = load_rows(spec)
        n = fn(rows, spec)
        lines.append(f"{stage}.{key}: {spec}: {n} examples")

    for stage in recipe.stages:
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
        elif stage == "eval":
            for i, spec in enumerate(sec.prompts):
                check(stage, f"prompts[{i}]", spec, lambda r, s: len(prompt_examples(r, s)))
    return lines


def write_run_info(recipe: Recipe) -> None:
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
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


def run_recipe(recipe: Recipe, stages: list[str] | None = None) -> dict[str, dict]:
    stages = stages or recipe.stages
    main = is_main_process()
    if main:
        write_run_info(recipe)
    summaries = {}
    for stage in stages:
        section = getattr(recipe, stage)
        if section is None:
            from .config import SECTION_TYPES, parse_section

            setattr(recipe, stage, parse_section(SECTION_TYPES[stage], {}, stage, recipe.source or "<recipe>"))
        set_seed(recipe.run.seed)
        stage_dir = recipe.stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        log(f"=== stage {stage} -> {stage_dir}")
        t0 = time.time()
        summary = stage_module(stage).run(recipe, stage_dir)
        summary = {"stage": stage, "seconds": round(time.time() - t0, 1), **(summary or {})}
        summaries[stage] = summary
        if not main:
            continue
        atomic_write_json(stage_dir / "summary.json", summary)
        log(f"=== stage {stage} done in {summary['seconds']}s: " + json.dumps(
            {k: v for k, v in summary.items() if isinstance(v, (int, float)) and k != "seconds"}))
    return summaries
