"""Resumable checkpoints for the on-policy stages, and graceful interruption.

A checkpoint is a directory `checkpoints/iter-000010/` written under a temporary name and renamed
into place (`utils.atomic_dir`), so resume never picks a half-written one. It holds the trainable
weights (safetensors), the optimizer state (`torch.load(weights_only=True)` on the way back), the RNG
states, and a JSON file with everything else (iteration, KL controller, prompt position, ...).

SIGINT / SIGTERM set a flag; loops check it at their next safe point, save, and raise `Interrupted`.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import torch

from .utils import atomic_dir, log

CKPT_PREFIX = "iter-"


class Interrupted(RuntimeError):
    """Raised after a resumable checkpoint was saved in response to SIGINT/SIGTERM."""

    def __init__(self, signum: int, where: str, saved: bool = True):
        self.signum = signum
        name = signal.Signals(signum).name
        if saved:
            super().__init__(f"{name} received: saved a resumable checkpoint at {where}; run the same command "
                             f"again to resume.")
        else:  # a stage with nothing worth saving mid-way (evaluation): the finished stages are kept
            super().__init__(f"{name} received: stopped {where}; the finished stages are kept, and the same "
                             f"command runs this one again from its start.")


class InterruptFlag:
    """Installs SIGINT/SIGTERM handlers that only record the signal (the loop saves at a safe point).
    A second SIGINT restores the default behaviour so a user can still force-quit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "InterruptFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum
        log(f"{signal.Signals(signum).name} received: will save a checkpoint at the next safe point "
            "(Ctrl-C again to quit without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None


_ACTIVE: Optional[InterruptFlag] = None


def set_active_flag(flag: Optional[InterruptFlag]) -> None:
    global _ACTIVE
    _ACTIVE = flag


def interrupt_signal() -> Optional[int]:
    """The signal received since the stage started, if any (checked by loops at safe points)."""
    return _ACTIVE.signum if _ACTIVE is not None else None


def stop_if_interrupted(where: str) -> None:
    """For stages that save nothing mid-way (evaluation): stop at this point once SIGINT/SIGTERM arrived."""
    signum = interrupt_signal()
    if signum is not None:
        raise Interrupted(signum, where, saved=False)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks: {missing[:3]} ...")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    return {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _to_json(x):
    if isinstance(x, tuple):
        return [_to_json(v) for v in x]
    return x


def _to_tuple(x):
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(_to_tuple(state["python"]))
    s = state["numpy"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def rank_rng_states(accelerator=None) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states (CPU, and CUDA when in use), keyed by rank: the sampling streams
    differ per process, so resume restores each one. A collective under several processes: call on all."""
    local = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        local["cuda_rng"] = torch.cuda.get_rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        per_rank = [local]
    else:
        from accelerate.utils import gather_object

        per_rank = gather_object([local])
    return {f"{k}_rank{r}": v.cpu() for r, states in enumerate(per_rank) for k, v in states.items()}


def save_checkpoint(ckpt_root: Path, iteration: int, models: dict[str, Any], optimizer, meta: dict,
                    generators: dict[str, torch.Generator], keep: int = 2,
                    rank_rngs: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """`rank_rngs`: `rank_rng_states()` of all processes (this process's RNG alone when omitted)."""
    from safetensors.torch import save_file

    _check_disk(ckpt_root, models)
    final = ckpt_root / f"{CKPT_PREFIX}{iteration:06d}"
    with atomic_dir(final) as tmp:
        for name, model in models.items():
            if model is not None:
                save_file(trainable_state(model), str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        tensors = {"torch_rng": torch.get_rng_state(), **(rank_rngs or {}),
                   **{f"gen_{k}": g.get_state() for k, g in generators.items()}}
        save_file(tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "rng": rng_state(), **meta}, indent=1))
    # Keep the newest `keep` checkpoints.
    for old in sorted(ckpt_root.glob(f"{CKPT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The newest complete checkpoint (temporary directories start with '.' and are ignored)."""
    if not ckpt_root.exists():
        return None
    done = [p for p in sorted(ckpt_root.glob(f"{CKPT_PREFIX}*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def load_checkpoint(path: Path, models: dict[str, Any], optimizer, generators: dict[str, torch.Generator],
                    rank: int = 0) -> dict:
    """Restore weights, optimizer and RNGs; `rank` picks this process's saved RNG states when present."""
    from safetensors.torch import load_file

    for name, model in models.items():
        if model is not None:
            load_trainable_state(model, load_file(str(path / f"{name}.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    tensors = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(tensors.get(f"torch_rng_rank{rank}", tensors["torch_rng"]))
    if f"cuda_rng_rank{rank}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"cuda_rng_rank{rank}"])
    for k, g in generators.items():
        g.set_state(tensors[f"gen_{k}"])
    state = json.loads((path / "state.json").read_text())
    set_rng_state(state["rng"])
    return state


def _check_disk(root: Path, models: dict[str, Any]) -> None:
    need = 0
    for m in models.values():
        if m is not None:
            need += 3 * sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need + 50 * 2**20:
        raise OSError(f"not enough free disk space for a checkpoint in {root}: {free / 2**20:.0f} MiB free, "
                      f"about {need / 2**20:.0f} MiB needed. Free some space and resume.")


def truncate_jsonl(path: Path, last_step: int, key: str = "step") -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        if row.get(key, 0) <= last_step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
