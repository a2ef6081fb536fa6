"""The `pipeline` command.

    pipeline run RECIPE.yaml [section.key=value ...] [--stages sft eval] [--force] [--resume] [--rerun]
    pipeline validate RECIPE.yaml [section.key=value ...] [--stages sft eval] [--force]
    pipeline recipes
    pipeline eval --models A B C --prompts FILE.jsonl [--output-dir DIR]
    pipeline eval --models base --ifeval [--limit N] [--max-gen-toks 256]
    pipeline data RECIPE.yaml [--stage sft] [--key data] [--show N]
    pipeline report RUN_DIR
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

    # OSError: a user's path that cannot be read or written (a folder given for a file, no permission, ...).
    return (RecipeError, DataError, ModelError, OSError)


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}."
    return str(e)


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


def _parse_stages(recipe, given: list[str] | str | None) -> list[str]:
    """`--stages sft reward` or `--stages sft,reward` -> the recipe's stages among them, in recipe order."""
    import difflib

    from .config import STAGE_NAMES, RecipeError

    if not given:
        return list(recipe.stages)
    items = [given] if isinstance(given, str) else list(given)
    stages = [s.strip() for item in items for s in item.split(",") if s.strip()]
    for s in stages:
        if s not in STAGE_NAMES:
            hint = difflib.get_close_matches(s, STAGE_NAMES, n=1)
            extra = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(f"--stages: {s!r} is not a stage.{extra} Stages: {', '.join(STAGE_NAMES)}.")
    missing = [s for s in stages if s not in recipe.stages]
    if missing:
        raise RecipeError(f"--stages {' '.join(missing)}: not among the recipe's stages ({', '.join(recipe.stages)}); "
                          "add it to `stages` in the recipe, or pick from those.")
    return [s for s in recipe.stages if s in stages]


def cmd_validate(args) -> int:
    from .config import load_recipe
    from .preflight import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    stages = _parse_stages(recipe, args.stages)
    lines = preflight(recipe, stages, force=args.force)
    print(f"{args.recipe}: recipe OK (stages: {', '.join(stages)})")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_run(args) -> int:
    from .config import load_recipe
    from .preflight import preflight
    from .runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stages = _parse_stages(recipe, args.stages)
    preflight(recipe, stages, force=args.force, resume=args.resume)  # every check before the first stage
    run_recipe(recipe, stages, force=args.force, rerun=args.rerun)
    report = recipe.output_dir / "report.md"
    if report.exists():
        print(f"Report: {report}")
    print(f"Run directory: {recipe.output_dir}")
    return 0


def _data_tokenizer(recipe, stage: str):
    """The tokenizer of the model the stage starts from; the recipe's base model when that stage's
    output does not exist yet (the tokenizer is the same)."""
    from .config import RecipeError
    from .models import ModelError, load_tokenizer_only

    ref_key = {"sft": "init_from", "reward": "init_from", "ppo": "policy_from", "distill": "teacher_from"}.get(stage)
    ref = getattr(getattr(recipe, stage), ref_key) if ref_key else "base"
    try:
        path = recipe.resolve_model_ref(ref)
        return load_tokenizer_only(path, recipe.model)
    except (RecipeError, ModelError):
        if ref == "base":
            raise
        print(f"({stage}.{ref_key}: {ref} does not exist yet; using the base model's tokenizer)")
        return load_tokenizer_only(recipe.model.name_or_path, recipe.model)


def cmd_data(args) -> int:
    from .config import load_recipe
    from .data import data_key, inspect_data

    recipe = load_recipe(args.recipe, args.overrides)
    stage, _, _ = data_key(recipe, args.stage, args.key)
    tok = _data_tokenizer(recipe, stage)
    print(inspect_data(recipe, tok, stage, args.key, show=args.show, max_rows=args.max_rows,
                       color=sys.stdout.isatty()))
    return 0


def cmd_eval(args) -> int:
    from .config import RecipeError
    from .stages.eval import evaluate_cli

    if not args.prompts and not args.ifeval:
        raise RecipeError("pipeline eval: nothing to evaluate; pass --prompts FILE.jsonl and/or --ifeval.")
    if not args.ifeval and (args.limit is not None or args.max_gen_toks is not None):
        raise RecipeError("pipeline eval: --limit and --max-gen-toks apply to --ifeval only.")

    return evaluate_cli(args)


def cmd_report(args) -> int:
    from .report import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory; give the `run.output_dir` of a run "
                                "(e.g. runs/quickstart) or the --output-dir of `pipeline eval`.")
    report = build_report(run_dir, n_samples=args.samples)
    print(f"Report: {report} and {report.with_suffix('.html')}")
    return 0


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
    r.add_argument("--stages", nargs="+", metavar="STAGE",
                   help="a subset of the recipe's stages, e.g. `--stages sft reward` (or sft,reward)")
    r.add_argument("--resume", action="store_true",
                   help="insist on continuing the run in output_dir: an error when it holds none (without the flag a "
                        "run of the same recipe is continued too, and an absent one is started)")
    r.add_argument("--force", action="store_true",
                   help="go on although the recipe or data differ from the run in output_dir (changed stages rerun), "
                        "or output_dir is a non-empty folder holding no run")
    r.add_argument("--rerun", action="store_true", help="run the selected stages again even if they finished")
    r.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a recipe and its data files without training",
                       description="Parse the recipe strictly and open and check every data file it names.")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--stages", nargs="+", metavar="STAGE", help="check as for `run --stages`")
    v.add_argument("--force", action="store_true", help="check as for `run --force`")
    v.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("data", help="show how a stage reads its data (format, token lengths, loss mask)",
                       description="Load a stage's data as training would: the detected format, row count, token "
                       "length statistics, and examples rendered with the loss mask. Needs only the tokenizer.")
    d.add_argument("recipe")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--stage", help="sft, reward, ppo, distill or eval (default: the recipe's first stage)")
    d.add_argument("--key", help="which data key of the stage, e.g. eval_data or warmup_data (default: its main one)")
    d.add_argument("--show", type=int, default=1, help="examples to render with the loss mask (default 1)")
    d.add_argument("--max-rows", type=int, default=None, help="read only the first N rows (default: all)")
    d.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    d.set_defaults(func=cmd_data)

    ls = sub.add_parser("recipes", help="list the shipped recipes", description="List the shipped recipes.")
    ls.set_defaults(func=cmd_recipes)

    e = sub.add_parser("eval", help="evaluate models on held-out prompts outside a recipe",
                       description="Generate with each model on the prompts and score the responses.")
    e.add_argument("--models", nargs="+", required=True, help="model paths, hub ids or `smollm2-135m-instruct`")
    e.add_argument("--prompts", nargs="+", default=[],
                   help="prompt files (JSONL; IFEval-style records are checked); optional with --ifeval")
    e.add_argument("--output-dir", default="runs/eval-cli", help="where results.json is written")
    e.add_argument("--reward-model", default=None, help="reward model directory to score responses")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-prompts", type=int, default=None)
    e.add_argument("--ifeval", action="store_true",
                   help="also score IFEval with lm-evaluation-harness (eval/ifeval/input_data.jsonl, greedy, chat template)")
    e.add_argument("--limit", type=int, default=None, help="--ifeval: the first N prompts only (not comparable)")
    e.add_argument("--max-gen-toks", type=int, default=None, help="--ifeval: max generated tokens (default: the task's 1280)")
    e.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    e.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="rebuild a run's report.md / report.html from what it wrote",
                        description="Rebuild report.md, report.html and plots/ of a run directory from the stages "
                                    "that finished (an eval stage is not needed).")
    rp.add_argument("run_dir", help="a run's output_dir, e.g. runs/quickstart")
    rp.add_argument("--samples", type=int, default=None,
                    help="prompts gained and lost shown per step (default: eval.num_samples_in_report)")
    rp.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    rp.set_defaults(func=cmd_report)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but dotted overrides may also come after options (`--stages sft sft.lr=1e-4`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "stages", None):
        # `--stages sft reward sft.lr=1e-4`: nargs="+" also took the override
        extra = [x for x in args.stages if "=" in x] + extra
        args.stages = [x for x in args.stages if "=" not in x]
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
    except BrokenPipeError:  # `pipeline validate X | head`: the reader left; not an error of ours (checked
        import os  # before the user errors: a BrokenPipeError is an OSError)

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second traceback at exit
        return 0
    except _user_errors() as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
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
