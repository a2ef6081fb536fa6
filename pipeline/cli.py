"""The `pipeline` command.

    pipeline run RECIPE.yaml [section.key=value ...] [--stages sft eval] [--force] [--resume] [--rerun]
    pipeline validate RECIPE.yaml [section.key=value ...] [--stages sft eval] [--force]
    pipeline recipes
    pipeline cp NAME DEST [--force]
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
    """The shipped recipes: `recipes/` beside the package in a source checkout, else the data-only package
    `pipeline_recipes` that a wheel or an editable install holds (pyproject.toml maps `recipes/` to it).
    Found through the import system's search locations rather than `importlib.resources.files`, which
    fails on a package without `__init__.py` under setuptools' editable finder (Python 3.11)."""
    import importlib.util

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes").is_dir():
        return checkout / "recipes"
    try:
        spec = importlib.util.find_spec("pipeline_recipes")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if any(Path(location).glob("*.yaml")):
            return Path(location)
    return checkout / "recipes"  # absent: `pipeline recipes` says none were found there


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every shipped recipe: `quickstart`, ..., and the accelerate configs as `accelerate/fsdp`."""
    d = recipes_dir()
    names = {p.relative_to(d).with_suffix("").as_posix(): p for p in d.rglob("*.yaml")}
    return {n: names[n] for n in sorted(names, key=lambda n: ("/" in n, n))}


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
    width = max(len(p.name) for p in paths)
    for p in paths:
        print(f"{p.name:<{width}}  {_first_comment_line(p)}")
    configs = sorted(n for n in shipped_recipes() if "/" in n)
    if configs:
        print(f"accelerate configs: {', '.join(configs)}")
    print(f"(in {d}; `pipeline cp NAME DEST` copies one out, e.g. `pipeline cp quickstart my_recipes/`)")
    return 0


def _recipe_data_paths(text: str) -> list[str]:
    """`stage.key: path` for each local data path a recipe names (hub ids and mappings left out)."""
    import yaml

    from .data import DATA_KEYS

    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return []
    out = []
    for stage, keys in DATA_KEYS.items():
        section = raw.get(stage) if isinstance(raw, dict) else None
        for key in keys if isinstance(section, dict) else ():
            values = section.get(key)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and value and Path(value).suffix:
                    out.append(f"{stage}.{key}: {value}")
    return out


def cmd_cp(args) -> int:
    """Copy a shipped recipe out of the package: DEST is a folder (DEST/NAME.yaml) or a `.yaml` file."""
    from .config import RecipeError
    from .utils import atomic_write_text

    recipes = shipped_recipes()
    name = args.name[:-5] if args.name.endswith(".yaml") else args.name
    name = name[len("recipes/"):] if name.startswith("recipes/") else name
    if name not in recipes:
        import difflib

        hint = difflib.get_close_matches(name, list(recipes), n=1)
        extra = f" Did you mean `{hint[0]}`?" if hint else ""
        raise RecipeError(f"pipeline cp: no shipped recipe named {args.name!r}.{extra} "
                          f"Shipped: {', '.join(recipes) or f'none (none found in {recipes_dir()})'}.")
    dest = Path(args.dest)
    if dest.suffix.lower() not in (".yaml", ".yml"):
        if dest.exists() and not dest.is_dir():
            raise RecipeError(f"pipeline cp: {dest} is a file, not a folder; give a folder (the recipe is written "
                              f"as {dest}/{Path(name).name}.yaml) or a file name ending in .yaml.")
        dest = dest / f"{Path(name).name}.yaml"
    if dest.is_dir():
        raise RecipeError(f"pipeline cp: {dest} is a folder; give a file name ending in .yaml or a folder "
                          "without the suffix.")
    if dest.exists() and not args.force:
        raise RecipeError(f"pipeline cp: {dest} exists; pass --force to overwrite it, or give another DEST.")
    text = recipes[name].read_text(encoding="utf-8")
    atomic_write_text(dest, text)
    print(f"wrote {dest} (from {recipes[name]})")
    paths = _recipe_data_paths(text)
    if paths:
        print("Its data paths are read relative to the folder you run it from (the shipped data/ and eval/ are "
              "in the source repository); point them at your own files:")
        for line in paths:
            print(f"  {line}")
        print(f"`pipeline data {dest} --stage STAGE --show 2` shows what a stage will read.")
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

    cp = sub.add_parser("cp", help="copy a shipped recipe to a file or folder",
                        description="Copy a shipped recipe (see `pipeline recipes`) out of the installed package, "
                        "e.g. `pipeline cp quickstart my_recipes/` writes my_recipes/quickstart.yaml. The accelerate "
                        "configs are `accelerate/NAME`.")
    cp.add_argument("name", help="a recipe name, e.g. quickstart (or accelerate/multi_gpu_ddp)")
    cp.add_argument("dest", help="a folder (NAME.yaml is written into it) or a file name ending in .yaml")
    cp.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    cp.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    cp.set_defaults(func=cmd_cp)

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
