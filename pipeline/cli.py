"""The `pipeline` command.

    pipeline run RECIPE.yaml [section.key=value ...] [--stages sft,eval]
    pipeline validate RECIPE.yaml [section.key=value ...]
    pipeline recipes
    pipeline eval --models A B C --prompts FILE.jsonl [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import RecipeError
    from .data import DataError
    from .models import ModelError

    return (RecipeError, DataError, ModelError, FileNotFoundError)


def recipes_dir() -> Path:
    # Shipped recipes live beside the package in a source checkout.
    return Path(__file__).resolve().parent.parent / "recipes"


def _first_comment_line(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#") and not line.lstrip("# ").lower().startswith("run:"):
            return line.lstrip("# ").strip()
    return ""


def cmd_recipes(args) -> int:
    d = recipes_dir()
    paths = sorted(d.glob("*.yaml"))
    if not paths:
        print(f"no recipes found in {d}")
        return 1
    width = max(len(str(p.relative_to(d.parent))) for p in paths)
    for p in paths:
        print(f"{str(p.relative_to(d.parent)):<{width}}  {_first_comment_line(p)}")
    return 0


def _parse_stages(recipe, text: str | None) -> list[str]:
    from .config import STAGE_NAMES, RecipeError

    if not text:
        return list(recipe.stages)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    for s in stages:
        if s not in STAGE_NAMES:
            raise RecipeError(f"--stages: {s!r} is not a stage; stages: {', '.join(STAGE_NAMES)}.")
    return stages


def cmd_validate(args) -> int:
    from .config import load_recipe
    from .runner import validate_data

    recipe = load_recipe(args.recipe, args.overrides)
    lines = validate_data(recipe)
    print(f"{args.recipe}: recipe OK (stages: {', '.join(recipe.stages)})")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_run(args) -> int:
    from .config import load_recipe
    from .runner import run_recipe, validate_data

    recipe = load_recipe(args.recipe, args.overrides)
    stages = _parse_stages(recipe, args.stages)
    validate_data(recipe)
    run_recipe(recipe, stages, force=args.force, rerun=args.rerun)
    report = recipe.output_dir / "report.md"
    if report.exists():
        print(f"Report: {report}")
    print(f"Run directory: {recipe.output_dir}")
    return 0


def cmd_eval(args) -> int:
    from .stages.eval import evaluate_cli

    return evaluate_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="Post-train language models: SFT, reward model, "
                                "PPO and on-policy distillation, from recipe YAMLs.")
    p.add_argument("--version", action="version", version=f"rlhf-pipeline {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe's stages in order",
                       description="Run every stage of a recipe (or those given by --stages).")
    r.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.lr=1e-4 run.output_dir=runs/x")
    r.add_argument("--stages", help="comma-separated subset of the recipe's stages, e.g. sft,eval")
    r.add_argument("--resume", action="store_true",
                   help="continue a partial run in output_dir (also automatic when it holds one of the same recipe)")
    r.add_argument("--force", action="store_true",
                   help="go on although the recipe differs from the run in output_dir (changed stages rerun)")
    r.add_argument("--rerun", action="store_true", help="run the selected stages again even if they finished")
    r.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a recipe and its data files without training",
                       description="Parse the recipe strictly and open and check every data file it names.")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    v.set_defaults(func=cmd_validate)

    ls = sub.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    ls.set_defaults(func=cmd_recipes)

    e = sub.add_parser("eval", help="evaluate models on held-out prompts outside a recipe",
                       description="Generate with each model on the prompts and score the responses.")
    e.add_argument("--models", nargs="+", required=True, help="model paths, hub ids or `smollm2-135m-instruct`")
    e.add_argument("--prompts", nargs="+", required=True, help="prompt files (JSONL; IFEval-style records are checked)")
    e.add_argument("--output-dir", default="runs/eval-cli", help="where results.json is written")
    e.add_argument("--reward-model", default=None, help="reward model directory to score responses")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-prompts", type=int, default=None)
    e.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    e.set_defaults(func=cmd_eval)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but dotted overrides may also come after options (`--stages sft sft.lr=1e-4`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pipeline validate X | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second traceback at exit
        return 0
    except Exception as e:  # noqa: BLE001 - interruption and numerical stops are reported, not traced
        from .checkpoint import Interrupted

        if isinstance(e, Interrupted):
            print(f"stopped: {e}", file=sys.stderr)
            return 128 + e.signum
        if isinstance(e, FloatingPointError) and not getattr(args, "debug", False):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
