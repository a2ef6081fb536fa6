"""Small shared helpers: atomic writes, logging, metrics files, seeding, versions."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, Optional


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it onto `final` only if the block succeeds.

    A reader never sees a half-written directory: it is either absent, the old one, or the new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite_or_str(v: Any) -> Any:
    # JSON has no NaN: write it as a string so it is never averaged away or shown as 0.0.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends one JSON object per step to `metrics.jsonl` (always) and mirrors the numbers to the run's
    experiment trackers (`run.report_to`, see pipeline/tracking.py): TensorBoard event files in
    `<stage>/tensorboard/`, and W&B / Trackio / MLflow through accelerate's tracker classes.

    `tensorboard=False`: metrics.jsonl only (the Trainer stages, whose Trainer logs to the trackers itself).
    `report_to`: the trackers; None takes the run's (`tracking.set_run_trackers`, default TensorBoard).
    `project` / `run_name`: the tracker project and this stage's run in it (default: the run's name and
    `<run name>-<stage directory name>`)."""

    def __init__(self, stage_dir: Path, tensorboard: bool = True, report_to=None, project: str | None = None,
                 run_name: str | None = None, config: dict | None = None):
        from .tracking import run_trackers, stage_run_name, start_trackers, tracker_list

        self.path = Path(stage_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._trackers: list = []
        if not tensorboard:
            return
        default_trackers, default_project = run_trackers(stage_dir)
        trackers = default_trackers if report_to is None else tracker_list(report_to)
        project = project or default_project
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(stage_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional at run time
                self._tb = None
        self._trackers = start_trackers(trackers, project, run_name or stage_run_name(project, Path(stage_dir).name),
                                        config)
        _OPEN_LOGGERS.add(self)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
                v = v.item()
            row[k] = _finite_or_str(v) if isinstance(v, float) else v
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        scalars = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if scalars:
            for tracker in self._trackers:
                tracker.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
        _OPEN_LOGGERS.discard(self)


_OPEN_LOGGERS: "weakref.WeakSet[MetricsLogger]" = weakref.WeakSet()


def close_metrics_loggers() -> None:
    """Close every MetricsLogger still open (the runner calls it when a stage ends), so a tracker run
    never outlives its stage: W&B would hand the next stage's `init` the same run."""
    for logger in list(_OPEN_LOGGERS):
        logger.close()


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def release_memory() -> bool:
    """Hand memory a finished stage freed back to the operating system: collect reference cycles (models,
    optimizers), empty the CUDA cache, and on glibc `malloc_trim(0)`, without which the freed heap stays
    resident and the next stage's peak sits on top of the last one's. True when malloc_trim ran."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)  # returns 1 when it released memory, 0 when none was free
    return True


def _glibc():
    """glibc through ctypes on Linux, else None (another OS, or musl / a libc without malloc_trim and mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (AttributeError where missing)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(threshold: Optional[int] = None) -> bool:
    """Opt-in speed for the RL loop, paid in memory. On glibc: serve blocks up to `threshold` from the heap and
    keep up to `threshold` of free heap top (`mallopt(M_MMAP_THRESHOLD)`, `mallopt(M_TRIM_THRESHOLD)`). glibc's
    defaults hand every block above a threshold that starts at 128 KiB (and adapts up to 32 MiB) to `mmap` and
    trim the heap top beyond 128 KiB, so each step's large tensors (a logits chunk, an activation, a packed
    weight) come back as fresh pages the kernel zero-fills on first touch. Measured at 256 MiB (docs/results.md,
    session 15): the distillation bench's step 10-15% faster, PPO 11-16% less CPU time at 100-270 MB more peak
    RSS, the quickstart's distillation stage 31% faster at 1.0 GB more peak RSS (freed blocks of changing sizes
    fragment the heap). Memory comes first by default: `threshold` None reads the environment's
    PIPELINE_MALLOC_THRESHOLD_MB (e.g. 256; unset or 0: off). No-op where the user set either glibc threshold
    through the environment (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_: glibc's own), off Linux, or on
    another libc. True when applied."""
    if threshold is None:
        mb = os.environ.get("PIPELINE_MALLOC_THRESHOLD_MB", "").strip()
        threshold = int(float(mb) * (1 << 20)) if mb else 0
    if threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("rlhf-pipeline", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
