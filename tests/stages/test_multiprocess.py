"""PPO and distillation under `accelerate launch` with 2 CPU processes follow the same per-iteration
trajectory as 1 process with the same GLOBAL batch (8 rows: 8 on one process, 4 + 4 on two).

Why the numbers can be equal, not merely alike in distribution (tests/stages/mp_driver.py runs both):
- batch sizes are global: `rollout_batch_size` and `minibatch_size` are split over the processes, each
  holding a contiguous block of the prompts; the distillation mixture coins are drawn for the whole
  batch on every process and sliced the same way;
- sampling: `generation_batch_size: 4` makes every `generate` call cover 4 rows under a seed from (run
  seed, iteration, the call's first row in the global batch). One process makes two calls (rows 0-3,
  4-7), two processes one each (rank 0: rows 0-3, rank 1: rows 4-7): the same calls with the same seeds
  and the same padding, hence the same tokens. (Per-rank RNG streams, the default, would give other
  samples on 2 processes; greedy decoding would hide sampling bugs.)
- update: one minibatch is the whole batch (2 epochs = 2 optimizer steps per iteration), the loss is
  sum over tokens / tokens of the minibatch on all processes, and DDP averages the gradients: the same
  gradient as on one process, up to the order of float sums (micro-batches of 2, the all-reduce).
Tolerance: rtol 1e-3 on every compared number (measured differences are ~1e-6 relative).
Negative control: the 2-process run with each process normalising by its own token count (gradients
~2x, the "sum instead of mean over processes" bug) must miss that tolerance on the loss and grad norm.
About a minute on 2 CPU cores (three launches of the driver), hence `slow`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("mp_driver.py")
RTOL = 1e-3
PPO_KEYS = ("ppo/loss", "ppo/pg_loss", "ppo/value_loss", "ppo/grad_norm", "ppo/score", "ppo/kl",
            "ppo/response_length")
DISTILL_KEYS = ("distill/loss", "distill/divergence", "distill/grad_norm", "distill/response_length",
                "distill/teacher_share")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, processes: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [sys.executable, str(DRIVER), str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes/accelerate/cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
               str(DRIVER), str(out), *extra]
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _trajectory(path: Path, keys: tuple) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {k: [r.get(k) for r in rows] for k in keys}  # None where a row has no such figure


def _mismatches(a: dict, b: dict) -> list[str]:
    def differ(x, y) -> bool:
        if x is None or y is None:
            return x is not y
        return abs(x - y) > RTOL * max(abs(x), abs(y), 1e-6)

    return [f"{k}: {a[k]} vs {b[k]}" for k in a if len(a[k]) != len(b[k]) or any(map(differ, a[k], b[k]))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    out = {"one": root / "one", "two": root / "two", "fault": root / "fault"}
    _run(out["one"], 1)
    _run(out["two"], 2)
    _run(out["fault"], 2, "--fault", "local_token_count")
    return out


def _ppo(d: Path) -> dict:
    return _trajectory(d / "ppo" / "metrics.jsonl", PPO_KEYS)


def _distill(d: Path) -> dict:
    return _trajectory(d / "run" / "distill" / "metrics.jsonl", DISTILL_KEYS)


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    one, two = _ppo(runs["one"]), _ppo(runs["two"])
    print("ppo 1 process:", json.dumps(one), "\nppo 2 processes:", json.dumps(two))
    assert len(one["ppo/loss"]) == 3 and not _mismatches(one, two), _mismatches(one, two)
    one, two = _distill(runs["one"]), _distill(runs["two"])
    print("distill 1 process:", json.dumps(one), "\ndistill 2 processes:", json.dumps(two))
    # 2 warm-up iterations on demonstrations (sharded across the processes), then 3 on the mixture.
    assert len(one["distill/loss"]) == 5 and not _mismatches(one, two), _mismatches(one, two)
    assert one["distill/teacher_share"][:2] == [None, None]
    assert 0 < one["distill/teacher_share"][2] < 1  # the mixture really has rows of both kinds


@pytest.mark.slow
def test_wrong_gradient_scaling_is_detected(runs):
    """Per-process token normalisation (~2x gradient) misses the tolerance: the comparison can fail."""
    one, fault = _ppo(runs["one"]), _ppo(runs["fault"])
    bad = _mismatches({k: one[k] for k in ("ppo/loss", "ppo/grad_norm")},
                      {k: fault[k] for k in ("ppo/loss", "ppo/grad_norm")})
    assert len(bad) == 2, (one, fault)
    assert fault["ppo/grad_norm"][0] > 1.5 * one["ppo/grad_norm"][0]
    one, fault = _distill(runs["one"]), _distill(runs["fault"])
    assert fault["distill/grad_norm"][0] > 1.5 * one["distill/grad_norm"][0]


@pytest.mark.slow
def test_two_process_distill_stage_outputs(runs):
    """Only the main process writes; the checkpoint holds both processes' RNG states."""
    from safetensors.torch import load_file

    stage = runs["two"] / "run" / "distill"
    for name in ("final/config.json", "heldout.json", "summary.json", "samples.jsonl"):
        assert (stage / name).exists(), name
    rows = (stage / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5]  # one row per iteration, not one per process
    rng = load_file(str(stage / "checkpoints" / "iter-000002" / "rng.safetensors"))
    assert {"torch_rng_rank0", "torch_rng_rank1"} <= set(rng)
