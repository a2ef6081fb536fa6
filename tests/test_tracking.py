"""Experiment trackers (`run.report_to`): preflight errors, and real local writes by W&B (offline mode) and
Trackio (local SQLite) from the on-policy logger (MetricsLogger) and from a Trainer stage (sft)."""

import glob
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline.config import RecipeError, parse_recipe
from pipeline.tracking import check_trackers, tracker_list
from pipeline.utils import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]


def test_report_to_is_checked_at_parse_and_preflight(monkeypatch):
    with pytest.raises(RecipeError, match=r"`run.report_to\[0\]` must be one of .*Did you mean 'wandb'"):
        parse_recipe({"run": {"report_to": ["wandbb"]}})
    assert parse_recipe({"run": {"report_to": "none"}}).run.report_to == "none"
    with pytest.raises(RecipeError, match="lists `none` together with"):
        check_trackers(["none", "tensorboard"])
    with pytest.raises(RecipeError, match="'comet' is not a tracker"):
        check_trackers(["comet"])
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("pipeline.tracking.importlib.util.find_spec",
                        lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(RecipeError, match=r"includes `mlflow`, but the package `mlflow` is not installed.*pip install mlflow"):
        check_trackers(["tensorboard", "mlflow"])
    assert check_trackers(["tensorboard"]) == ["tensorboard"] and check_trackers("none") == []
    assert tracker_list(["tensorboard", "none"]) == ["tensorboard"]


def test_metrics_logger_default_is_tensorboard_only(tmp_path):
    m = MetricsLogger(tmp_path / "ppo")
    m.log(0, {"ppo/loss": 0.5})
    m.close()
    assert glob.glob(str(tmp_path / "ppo" / "tensorboard" / "events.out.tfevents.*"))
    assert json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text())["ppo/loss"] == 0.5
    m = MetricsLogger(tmp_path / "sft", tensorboard=False)  # a Trainer stage: the Trainer reports itself
    m.log(0, {"sft/loss": 1.0})
    m.close()
    assert not (tmp_path / "sft" / "tensorboard").exists() and (tmp_path / "sft" / "metrics.jsonl").exists()


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads its environment once per process setup: start a fresh one
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "unset")  # recorded, so teardown removes what the code sets
    monkeypatch.delenv("WANDB_PROJECT")
    yield wandb
    wandb.teardown()


def _wandb_run_bytes(tmp_path) -> list[bytes]:
    """The offline runs' record files (protobuf records: the keys, names and JSON values appear as bytes),
    after wandb's service has flushed them (teardown)."""
    import wandb

    wandb.teardown()
    files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")))
    return [Path(f).read_bytes() for f in files]


def test_metrics_logger_writes_to_wandb_offline(tmp_path, wandb_offline):
    m = MetricsLogger(tmp_path / "ppo", report_to=["wandb", "tensorboard"], project="proj")
    for i in range(3):
        m.log(i, {"ppo/kl": 0.125 * (i + 1), "ppo/sample": "text is not a scalar"})
    m.close()
    (run,) = _wandb_run_bytes(tmp_path)
    assert b"proj-ppo" in run and b"ppo/kl" in run and b"0.375" in run and b"ppo/sample" not in run
    assert glob.glob(str(tmp_path / "ppo" / "tensorboard" / "events.out.tfevents.*"))
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 3  # always written


def test_metrics_logger_writes_to_trackio_locally(tmp_path):
    pytest.importorskip("trackio")
    # Trackio reads TRACKIO_DIR when imported: a fresh process.
    code = ("from pipeline.utils import MetricsLogger\n"
            f"m = MetricsLogger({str(tmp_path / 'distill')!r}, report_to=['trackio'], project='proj')\n"
            "for i in range(3): m.log(i, {'distill/loss': 2.0 - 0.5 * i})\n"
            "m.close()\n")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    rows = sqlite3.connect(tmp_path / "trackio" / "proj.db").execute(
        "select run_name, step, metrics from metrics order by step").fetchall()
    assert [(r[0], r[1], json.loads(r[2])["distill/loss"]) for r in rows] == [
        ("proj-distill", 0, 2.0), ("proj-distill", 1, 1.5), ("proj-distill", 2, 1.0)]
    assert not (tmp_path / "distill" / "tensorboard").exists()  # not asked for


def test_sft_stage_reports_to_wandb_offline(tmp_path, tiny_model_dir, wandb_offline):
    from pipeline.runner import run_recipe

    data = write_jsonl(tmp_path / "sft.jsonl",
                       [{"prompt": f"write about topic {i}", "completion": f"the answer {i}"} for i in range(16)])
    recipe = parse_recipe({
        "run": {"name": "trk", "output_dir": str(tmp_path / "out"), "report_to": ["wandb"]},
        "model": {"name_or_path": str(tiny_model_dir), "cpu_autocast": "off"},
        "stages": ["sft"],
        "sft": {"data": str(data), "batch_size": 8, "max_steps": 3, "logging_steps": 1, "lora": None,
                "eval_fraction": 0.0},
    })
    run_recipe(recipe)
    assert wandb_offline.run is None  # closed at the stage's end: the next stage gets a run of its own
    (run,) = _wandb_run_bytes(tmp_path)
    assert b"trk-sft" in run and b"train/loss" in run  # the Trainer's WandbCallback, run named per stage
    assert os.environ["WANDB_PROJECT"] == "trk"
    assert any("sft/loss" in r for r in (tmp_path / "out" / "sft" / "metrics.jsonl").read_text().splitlines())
    assert not glob.glob(str(tmp_path / "out" / "sft" / "tensorboard" / "events.*"))  # tensorboard not listed


@pytest.mark.parametrize("report_to", ["none", "tensorboard"])
def test_on_policy_logger_follows_the_run_and_is_closed_at_stage_end(tmp_path, monkeypatch, report_to):
    """A logger made inside a stage without being told its trackers (as the on-policy loop makes it) uses
    `run.report_to`, and the runner closes it when the stage ends."""
    from pipeline import utils
    from pipeline.runner import run_recipe

    made = []

    def run(recipe, stage_dir):
        m = MetricsLogger(stage_dir)
        m.log(1, {"ppo/loss": 0.5})
        made.append(m)
        return {}

    monkeypatch.setattr("pipeline.runner.stage_module", lambda s: type("M", (), {"run": staticmethod(run)}))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    recipe = parse_recipe({"run": {"name": "t", "output_dir": str(tmp_path / "out"), "report_to": report_to},
                           "model": {"name_or_path": "tiny"}, "stages": ["ppo"],
                           "ppo": {"prompts": str(prompts), "policy_from": "base", "rewards": [{"kind": "verifier"}]}})
    run_recipe(recipe)
    assert bool(glob.glob(str(tmp_path / "out" / "ppo" / "tensorboard" / "events.*"))) == (report_to == "tensorboard")
    assert made[0]._tb is None and made[0] not in utils._OPEN_LOGGERS
    other = MetricsLogger(tmp_path / "elsewhere")  # outside the run directory: the default, TensorBoard
    assert other._tb is not None
    other.close()
