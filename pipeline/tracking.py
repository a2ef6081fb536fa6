"""Experiment trackers (`run.report_to`): TensorBoard, Weights & Biases, Trackio, MLflow, or none.

Every stage writes `<stage>/metrics.jsonl` whatever is chosen. On top of it:
- the Trainer stages (sft, reward) pass the list to `TrainingArguments(report_to=...)`, whose callbacks
  do the logging (transformers docs, "Callbacks": TensorBoardCallback, WandbCallback, TrackioCallback,
  MLflowCallback);
- the on-policy stages (ppo, distill) and anything else that logs through `utils.MetricsLogger` write
  TensorBoard event files themselves and reach the other trackers through accelerate's tracker classes
  (`accelerate.tracking`: WandBTracker, TrackioTracker, MLflowTracker; accelerate docs, "Experiment
  trackers").

Names: the tracker project (W&B project, Trackio project, MLflow experiment) is `run.name`; each stage is
one run in it, named `<run.name>-<stage>`. Everything else comes from the tracker's own environment
variables, which the pipeline never overrides: `WANDB_MODE=offline` / `WANDB_DIR` / `WANDB_PROJECT`,
`TRACKIO_DIR` (Trackio logs locally unless given a Space), `MLFLOW_TRACKING_URI` / `MLFLOW_EXPERIMENT_NAME`.
TensorBoard files stay in `<stage>/tensorboard/`.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
# The import name each tracker needs, and what to install.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow")}


def tracker_list(report_to: Union[str, Iterable[str], None]) -> list[str]:
    """`run.report_to` as a list without `none` (a string is one tracker; `none` or [] means no tracker)."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    return list(dict.fromkeys(t for t in items if t != "none"))


def check_trackers(report_to, where: str = "<recipe>") -> list[str]:
    """Preflight for `run.report_to`: every name is a known tracker, `none` stands alone, and each
    tracker's package is importable here. Raises RecipeError naming the key and the fix; returns the
    trackers (without `none`)."""
    from .config import RecipeError

    items = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for t in items:
        if t != "none" and t not in TRACKERS:
            hint = difflib.get_close_matches(str(t), TRACKERS, n=1)
            extra = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(f"{where}: `run.report_to`: {t!r} is not a tracker.{extra} Choose from "
                              f"{', '.join(TRACKERS)}, or `none` for metrics.jsonl only.")
    if "none" in items and len(items) > 1:
        raise RecipeError(f"{where}: `run.report_to` lists `none` together with {[t for t in items if t != 'none']}; "
                          "give either `none` (metrics.jsonl only) or the trackers.")
    trackers = tracker_list(items)
    for t in trackers:
        module, pip = _PACKAGES[t]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"{where}: `run.report_to` includes `{t}`, but the package `{module}` is not installed "
                              f"in this Python ({sys.executable}). Run `pip install {pip}`, or drop `{t}` from "
                              "`run.report_to`.")
    return trackers


def stage_run_name(project: str, stage: str) -> str:
    return f"{project}-{stage}"


def trainer_report_args(recipe, stage: str) -> dict:
    """TrainingArguments fields for the run's trackers (sft, reward). Sets the W&B project and MLflow
    experiment through their environment variables when the user has not set them (WandbCallback and
    MLflowCallback read only those); Trackio takes `project` from the arguments."""
    trackers = tracker_list(recipe.run.report_to)
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_PROJECT", recipe.run.name)
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", recipe.run.name)
    from transformers import TrainingArguments

    args = {"report_to": trackers or "none", "run_name": stage_run_name(recipe.run.name, stage)}
    if "project" in TrainingArguments.__dataclass_fields__:  # transformers releases with Trackio support
        args["project"] = recipe.run.name
    return args


def finish_trainer_trackers() -> None:
    """Close a W&B run the Trainer left open (its callback reuses an open run), so the next stage's
    metrics start a run of their own instead of landing in this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def start_trackers(trackers: list[str], project: str, run_name: str, config: Optional[dict] = None) -> list:
    """Started accelerate trackers for `trackers` other than TensorBoard (MetricsLogger writes TensorBoard
    files itself, in `<stage>/tensorboard/`)."""
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TrackioTracker, WandBTracker

    out = []
    if any(t != "tensorboard" for t in trackers):
        PartialState()  # accelerate's trackers log through its logger, which needs the (single-process) state
    for t in trackers:
        if t == "tensorboard":
            continue
        if t == "wandb":
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", project), name=run_name)
        elif t == "trackio":
            tracker = TrackioTracker(project, name=run_name)
        elif t == "mlflow":
            tracker = MLflowTracker(experiment_name=project, run_name=run_name)
        else:
            raise ValueError(f"unknown tracker {t!r}; choose from {', '.join(TRACKERS)}")
        tracker.start()
        if config:
            tracker.store_init_configuration(config)
        out.append(tracker)
    return out


# The run's trackers, for MetricsLogger instances that are not told theirs: set by the runner for the run
# directory it writes; a logger elsewhere (a test, `pipeline eval`) gets the default, TensorBoard.
_DEFAULT = (["tensorboard"], "run")
_RUN: dict = {"report_to": None, "project": None, "output_dir": None}


def set_run_trackers(report_to, project: str, output_dir) -> None:
    _RUN.update(report_to=tracker_list(report_to), project=project, output_dir=Path(output_dir).resolve())


def run_trackers(stage_dir=None) -> tuple[list[str], str]:
    """(trackers, project) for a logger writing into `stage_dir`."""
    out = _RUN["output_dir"]
    if out is not None and stage_dir is not None and Path(stage_dir).resolve().is_relative_to(out):
        return list(_RUN["report_to"]), _RUN["project"]
    return list(_DEFAULT[0]), _DEFAULT[1]
