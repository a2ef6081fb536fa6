"""A tiny PPO run killed mid-stage (a real subprocess, kill -9 or SIGTERM), then resumed, ends with
the same metrics as an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_tiny_model, build_tiny_tokenizer, save_tiny, write_jsonl

ITERATIONS = 24


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("resume")
    policy = save_tiny(root / "policy")
    tok = build_tiny_tokenizer()
    cfg = build_tiny_model(tok, seed=1).config
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"hello world {i}"} for i in range(16)])
    recipe = root / "ppo.yaml"
    recipe.write_text(
        "# Run: pipeline run ppo.yaml\n"
        f"run: {{name: t, seed: 0, output_dir: {root / 'out'}}}\n"
        f"model: {{name_or_path: {policy}, cpu_autocast: 'off'}}\n"
        "stages: [ppo]\n"
        f"ppo: {{policy_from: {policy}, reward_from: {root / 'rm'}, critic_from: policy, prompts: {prompts},\n"
        f"       lora: null, iterations: {ITERATIONS}, checkpoint_every: 4, rollout_batch_size: 8,\n"
        "       minibatch_size: 4, micro_batch_size: 4, max_new_tokens: 16, lr: 1.0e-3, normalize_reward: false,\n"
        "       log_samples_every: 0}\n")
    return root, recipe


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(recipe), f"run.output_dir={out}"]


def _env():
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _rows(out: Path) -> list[dict]:
    p = out / "ppo" / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _run_and_interrupt(recipe: Path, out: Path, sig: int, after_rows: int) -> int:
    proc = subprocess.Popen(_cmd(recipe, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_rows(out)) < after_rows:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc.returncode


def _final(out: Path) -> dict:
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1)), "each iteration logged exactly once"
    return rows[-1]


@pytest.fixture(scope="module")
def reference_run(ppo_setup):
    root, recipe = ppo_setup
    out = root / "uninterrupted"
    subprocess.run(_cmd(recipe, out), env=_env(), check=True, capture_output=True)
    return _final(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_ppo_resumes_to_the_same_metrics(ppo_setup, reference_run, sig):
    root, recipe = ppo_setup
    out = root / f"interrupted-{sig.name}"
    code = _run_and_interrupt(recipe, out, sig, after_rows=10)
    ckpts = sorted((out / "ppo" / "checkpoints").glob("iter-*"))
    assert ckpts, "a checkpoint exists after the interruption"
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM, "SIGTERM saves and exits non-zero"
    else:
        assert code == -signal.SIGKILL
    assert not (out / "ppo" / "summary.json").exists()
    done = subprocess.run(_cmd(recipe, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    final = _final(out)
    for key in ("ppo/score", "ppo/kl", "ppo/loss", "ppo/kl_coef", "ppo/response_length"):
        assert final[key] == pytest.approx(reference_run[key], rel=1e-4, abs=1e-5), key
    assert (out / "ppo" / "final" / "config.json").exists()


def test_changed_recipe_is_refused_with_a_diff(ppo_setup, reference_run):
    root, recipe = ppo_setup
    out = root / "uninterrupted"
    r = subprocess.run(_cmd(recipe, out) + ["ppo.lr=5e-4"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "holds a run of a different recipe" in r.stderr and "-  lr: 0.001" in r.stderr and "+  lr: 0.0005" in r.stderr
    assert "Traceback" not in r.stderr
