"""What happens to a stage's outputs once it has trained: model cards, Hub upload, checkpoint clean-up.

The runner calls, for each stage (main process only):
- `finalize_stage` after the stage returns and before `summary.json` is written (a stage counts as
  finished only with its cards): the adapter's portable base and the model cards (pipeline/modelcard.py);
- `after_stage` once `summary.json` is written, and again for a stage skipped as already finished:
  uploads `final/` to the Hub when the stage sets `push_to_hub` and the upload has not happened yet
  (a failed upload is retried by running the same command again), deletes `<stage>/checkpoints/` when
  `run.keep_checkpoints` is false, and after the eval stage refreshes the evaluated models' cards.
`check_outputs` is the preflight part: trackers (`run.report_to`) and push settings, checked before any
stage trains.

Uploads go through huggingface_hub's `HfApi.create_repo` + `HfApi.upload_folder` (huggingface_hub docs,
"Upload files to the Hub"): one commit with the merged weights, tokenizer, card and `adapter/`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from .config import Recipe, RecipeError
from .utils import atomic_write_json, log

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?")


class HubError(RecipeError):
    """An upload that cannot happen or failed, with what to do about it."""


def _push_stages(recipe: Recipe, stages: Optional[list[str]] = None) -> list[str]:
    return [s for s in (stages or recipe.stages)
            if getattr(getattr(recipe, s, None), "push_to_hub", False)]


def hub_token() -> Optional[str]:
    from huggingface_hub import get_token

    return get_token()


def hub_api():
    from huggingface_hub import HfApi

    return HfApi()


def _hub_offline() -> bool:
    import os

    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def check_push(recipe: Recipe, stages: Optional[list[str]] = None) -> None:
    """Each stage with `push_to_hub` names a valid repo and a write token is available (not checked over
    the network)."""
    where = recipe.source or "<recipe>"
    for s in _push_stages(recipe, stages):
        repo = getattr(recipe, s).hub_model_id
        if not repo:
            raise RecipeError(f"{where}: `{s}.push_to_hub` is true but `{s}.hub_model_id` is not set; name the Hub "
                              f"repo to upload `{s}/final/` to, e.g. `{s}.hub_model_id: your-name/{recipe.run.name}-{s}`.")
        if not _REPO_ID.fullmatch(repo) or "--" in repo or ".." in repo:
            raise RecipeError(f"{where}: `{s}.hub_model_id`: {repo!r} is not a Hub repo id; write `name` or "
                              "`user-or-org/name` (letters, digits, `-`, `_`, `.`).")
        if _hub_offline():
            raise HubError(f"{where}: `{s}.push_to_hub` is true but HF_HUB_OFFLINE is set, so nothing can be "
                           f"uploaded. Unset HF_HUB_OFFLINE, or set `{s}.push_to_hub: false`.")
        if not hub_token():
            raise HubError(f"{where}: `{s}.push_to_hub` is true but no Hugging Face token was found. Log in with "
                           "`hf auth login` or set HF_TOKEN to a token with write access, or set "
                           f"`{s}.push_to_hub: false`.")


def check_outputs(recipe: Recipe, stages: Optional[list[str]] = None) -> list[str]:
    """Preflight for the output settings: `run.report_to` (known trackers, packages installed) and the
    stages' `push_to_hub` (repo id, token). Raises RecipeError; returns one line per setting checked."""
    from .tracking import check_trackers

    where = recipe.source or "<recipe>"
    trackers = check_trackers(recipe.run.report_to, where)
    check_push(recipe, stages)
    lines = [f"run.report_to: {', '.join(trackers) or 'none'} (and metrics.jsonl)"]
    lines += [f"{s}.push_to_hub: {getattr(recipe, s).hub_model_id}" for s in _push_stages(recipe, stages)]
    return lines


# Settings that change where a run's results go, not the results: changing them on an existing run
# directory needs no --force and reruns nothing.
OUTPUT_KEYS = {"run": ("report_to", "keep_checkpoints"),
               "*": ("push_to_hub", "hub_model_id", "hub_private")}


def _strip_output_keys(d: dict) -> dict:
    out = {}
    for section, value in (d or {}).items():
        if isinstance(value, dict):
            drop = OUTPUT_KEYS.get(section, ()) + OUTPUT_KEYS["*"]
            value = {k: v for k, v in value.items() if k not in drop}
        out[section] = value
    return out


def only_outputs_changed(old_text: str, recipe: Recipe) -> bool:
    """True when the saved recipe (`recipe.resolved.yaml` text) differs from `recipe` in OUTPUT_KEYS only."""
    import yaml

    from .config import dump_recipe

    try:
        old = yaml.safe_load(old_text) or {}
    except yaml.YAMLError:
        return False
    return _strip_output_keys(old) == _strip_output_keys(yaml.safe_load(dump_recipe(recipe)))


# --------------------------------------------------------------------------------------------
# Around a stage
# --------------------------------------------------------------------------------------------


def finalize_stage(recipe: Recipe, stage: str, summary: dict) -> None:
    """Before summary.json: close the stage's tracker runs, then the adapter's portable base and the model
    cards of `<stage>/final/`."""
    from .modelcard import write_stage_cards
    from .tracking import finish_trainer_trackers
    from .utils import close_metrics_loggers

    close_metrics_loggers()
    finish_trainer_trackers()
    write_stage_cards(recipe, stage, summary)


def push_stage(recipe: Recipe, stage: str) -> dict:
    """Upload `<stage>/final/` to `<stage>.hub_model_id`; returns {"repo_id", "commit_url"}."""
    cfg = getattr(recipe, stage)
    final = recipe.stage_dir(stage) / "final"
    check_push(recipe, [stage])
    repo = cfg.hub_model_id
    retry = ("The stage itself is finished and saved; fix the cause and run the same command again: finished "
             "stages are skipped and the upload is retried.")
    if not final.is_dir():
        raise HubError(f"{stage}.push_to_hub: {final} does not exist, so there is nothing to upload.")
    api = hub_api()
    log(f"{stage}: uploading {final} to https://huggingface.co/{repo} ({'private' if cfg.hub_private else 'public'}) ...")
    try:
        api.create_repo(repo_id=repo, repo_type="model", private=cfg.hub_private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(final),
                                 commit_message=f"{recipe.run.name}: {stage} stage (rlhf-pipeline)")
    except Exception as e:  # network, permissions, quota: the library's message says which
        raise HubError(f"{stage}.push_to_hub: uploading {final} to the Hub repo {repo} failed: "
                       f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. {retry}") from None
    url = getattr(info, "commit_url", None) or str(info)
    log(f"{stage}: uploaded to https://huggingface.co/{repo} ({url})")
    return {"repo_id": repo, "commit_url": url}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def drop_checkpoints(recipe: Recipe, stage: str) -> Optional[Path]:
    """Delete `<stage>/checkpoints/` of a finished stage (summary.json written, and final/ for a stage
    that makes a model). Returns the deleted path, None when nothing was deleted."""
    d = recipe.stage_dir(stage)
    ck = d / "checkpoints"
    if not ck.exists() or not (d / "summary.json").exists():
        return None
    if stage != "eval" and not (d / "final" / "config.json").exists():
        log(f"{stage}: keeping {ck}: the stage has no final/ model")
        return None
    size = _size(ck)
    shutil.rmtree(ck)
    log(f"{stage}: deleted {ck} ({size / 2**20:.0f} MiB; run.keep_checkpoints is false)")
    return ck


def after_stage(recipe: Recipe, stage: str, summary: dict) -> dict:
    """After summary.json (also for a stage skipped as finished): push, drop checkpoints, refresh the cards
    after eval. Returns the summary, with `hub` added after an upload (and written to summary.json)."""
    cfg = getattr(recipe, stage, None)
    if cfg is not None and getattr(cfg, "push_to_hub", False):
        done = summary.get("hub") or {}
        if done.get("repo_id") != cfg.hub_model_id:
            summary = {**summary, "hub": push_stage(recipe, stage)}
            atomic_write_json(recipe.stage_dir(stage) / "summary.json", summary)
    if not recipe.run.keep_checkpoints:
        drop_checkpoints(recipe, stage)
    if stage == "eval":
        from .modelcard import refresh_eval_cards

        push_updated_cards(recipe, refresh_eval_cards(recipe))
    return summary


def push_updated_cards(recipe: Recipe, cards: list[Path]) -> None:
    """Upload rewritten cards (README.md files only) of stages already pushed to their Hub repos. A failure
    is a warning: the model is on the Hub and the card on disk is current."""
    by_stage: dict[str, list[Path]] = {}
    for path in cards:
        by_stage.setdefault(Path(path).relative_to(recipe.output_dir).parts[0], []).append(Path(path))
    for stage, paths in by_stage.items():
        cfg = getattr(recipe, stage, None)
        if cfg is None or not getattr(cfg, "push_to_hub", False):
            continue
        try:
            summary = json.loads((recipe.stage_dir(stage) / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if (summary.get("hub") or {}).get("repo_id") != cfg.hub_model_id:
            continue
        final = recipe.stage_dir(stage) / "final"
        try:
            api = hub_api()
            for path in paths:
                api.upload_file(path_or_fileobj=str(path), path_in_repo=path.relative_to(final).as_posix(),
                                repo_id=cfg.hub_model_id, repo_type="model",
                                commit_message=f"{recipe.run.name}: {stage} model card with the evaluation")
        except Exception as e:
            log(f"eval: warning: could not upload the updated card of {stage} to {cfg.hub_model_id}: "
                f"{type(e).__name__}: {e}")
