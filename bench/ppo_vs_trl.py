"""One PPO iteration, ours vs TRL 0.19's `PPOTrainer`, on the same model, prompts, batch and lengths.

    python bench/ppo_vs_trl.py                   # creates bench/.venv-trl019 on first use (a minute or two)
    python bench/ppo_vs_trl.py --batch 8 --max-new-tokens 32
    python bench/ppo_vs_trl.py --only trl        # or --only ours; --setup-only builds the venv and stops

TRL 0.19 (the last release with the classic `PPOTrainer`) needs transformers 4.x, so it runs in its own
virtual environment, `bench/.venv-trl019`, made here with `python -m venv` and pinned installs
(`VENV_PACKAGES`); `bench/trl019_ppo_step.py` runs inside it as a subprocess. Ours runs as
`bench/ppo.py --json` in a subprocess of the system Python, so each side's peak RSS is its own.

Matched on both sides: the default model (SmolLM2-135M-Instruct, the cached safetensors directory) as
policy and reference, a sequence-classification model from the same directory (num_labels=1) as
reward model and as critic; full fine-tuning; fp32 with no autocast (ours: --cpu-autocast off); the
same 2 x batch prompts in the same order (our PromptSampler's order, seed 0; TRL's shuffling loader
is replaced by one in that order), chat template, left padding; sampling at temperature 1.0 with no
top-k / top-p, stopping at EOS, max_new_tokens = TRL's response_length; the whole batch generated
at once (TRL local_rollout_forward_batch_size = batch); 2 PPO epochs x 2 minibatches of batch/2, one
optimizer step per minibatch (TRL: per_device_train_batch_size = batch, gradient_accumulation_steps 1,
num_mini_batches 2). Two iterations each; the second is reported (the first warms up).
Known differences in the work done, not equalised: ours recomputes the behaviour log-probs with a
training forward (TRL reuses the generation logits), and ours scores decoded text re-tokenised for
the reward model (TRL scores the token ids).

Tokens = response tokens through the first EOS. Split: generate / score (log-probs, reference,
values, reward, advantages) / train (the PPO epochs), in wall seconds and in process CPU seconds (all
threads, `time.process_time`): on a machine shared with other jobs the CPU seconds still measure the
work each side does, the wall seconds mostly measure the other jobs. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-trl019"
# Releases of mid-2025, contemporary with trl 0.19.1 (which asks for transformers>=4.51, accelerate>=1.4,
# datasets>=3.0); torch is the local CPU wheel (an unpinned torch would pull a CUDA build).
VENV_PACKAGES = ["torch==2.13.0", "trl==0.19.1", "transformers==4.53.3", "accelerate==1.9.0",
                 "datasets==4.0.0"]

sys.path.insert(0, str(ROOT))

from bench_common import print_ratio_table  # noqa: E402  (bench/, the script's own folder)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """Create bench/.venv-trl019 and install VENV_PACKAGES, unless a previous run already did."""
    marker = VENV / "installed.json"
    if marker.exists() and json.loads(marker.read_text()) == VENV_PACKAGES and venv_python().exists():
        return venv_python()
    t = time.time()
    print(f"creating {VENV.relative_to(ROOT)} with {' '.join(VENV_PACKAGES)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # torch first, on its own: the pinned CPU wheel (a local wheel where PIP_FIND_LINKS has one). Installing
    # it together with trl would let pip resolve torch from the index, which on Linux is a multi-GB CUDA build.
    torch_pin = [p for p in VENV_PACKAGES if p.startswith("torch==")]
    for step in (torch_pin, [p for p in VENV_PACKAGES if p not in torch_pin]):
        proc = subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", *step],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"pip install {' '.join(step)} into {VENV} failed:\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-3000:]}")
    marker.write_text(json.dumps(VENV_PACKAGES))
    print(f"venv ready in {time.time() - t:.0f}s", flush=True)
    return venv_python()


def thread_env(args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return env


def benchmark_prompts(path: str, n: int) -> list:
    """The first n prompts our PromptSampler (seed 0, as in bench/ppo.py) hands out, in its order."""
    from pipeline.data import load_rows, prompt_examples
    from pipeline.onpolicy import PromptSampler

    return PromptSampler(prompt_examples(load_rows(path), path), seed=0).next(n)


def run_ours(args, model_dir: str, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "ppo.py"), "--no-lora", "--cpu-autocast", "off",
           "--reward", model_dir, "--prompts", args.prompts, "--batch", str(args.batch),
           "--max-new-tokens", str(args.max_new_tokens), "--iterations", "2",
           "--minibatch-size", str(args.batch // 2), "--json", str(out)]
    print("ours:", " ".join(cmd[1:]), flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=thread_env(args))
    if proc.returncode != 0:
        sys.exit(f"bench/ppo.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    fig = json.loads(out.read_text())
    print(f"ours done in {time.time() - t:.0f}s wall", flush=True)
    return {"seconds_per_iteration": fig["seconds_per_iteration"], "tokens": fig["response_tokens"],
            "tokens_per_s": fig["tokens_per_s"], "peak_rss_mb": fig["peak_rss_mb"],
            "generate_s": fig["generate_s"], "score_s": fig["score_s"], "train_s": fig["train_s"],
            **{k: fig[k] for k in ("cpu_seconds_per_iteration", "cpu_generate_s", "cpu_score_s", "cpu_train_s")}}


def run_trl(args, model_dir: str, prompts: list, out: Path) -> dict:
    py = ensure_venv()
    prompts_file = out.with_name("prompts.json")
    prompts_file.write_text(json.dumps([ex["prompt"] for ex in prompts]))
    cmd = [str(py), str(ROOT / "bench" / "trl019_ppo_step.py"), "--model-dir", model_dir,
           "--prompts-json", str(prompts_file), "--batch", str(args.batch),
           "--response-length", str(args.max_new_tokens), "--json", str(out)]
    print("trl 0.19:", " ".join(cmd[1:]), flush=True)
    t = time.time()
    # The venv's python must not see this project's editable install or the system site-packages.
    env = {k: v for k, v in thread_env(args).items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"trl019_ppo_step.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print(f"trl done in {time.time() - t:.0f}s wall", flush=True)
    return json.loads(out.read_text())


def print_table(ours: dict | None, trl: dict | None) -> None:
    rows = [("seconds / iteration", "seconds_per_iteration", "{:.1f}"),
            ("  generate s", "generate_s", "{:.1f}"), ("  score s", "score_s", "{:.1f}"),
            ("  train s", "train_s", "{:.1f}"), ("CPU s / iteration", "cpu_seconds_per_iteration", "{:.1f}"),
            ("  generate CPU s", "cpu_generate_s", "{:.1f}"), ("  score CPU s", "cpu_score_s", "{:.1f}"),
            ("  train CPU s", "cpu_train_s", "{:.1f}"), ("response tokens", "tokens", "{:.0f}"),
            ("tokens / s", "tokens_per_s", "{:.2f}"), ("tokens / CPU s", "tokens_per_cpu_s", "{:.2f}"),
            ("peak RSS MB", "peak_rss_mb", "{:.0f}")]
    for f in (ours, trl):
        if f and f.get("cpu_seconds_per_iteration"):
            f["tokens_per_cpu_s"] = f["tokens"] / f["cpu_seconds_per_iteration"]
    print_ratio_table(rows, ours, trl, "trl 0.19", 22)
    for name, f in (("ours", ours), ("trl 0.19", trl)):
        if f:
            total = f["seconds_per_iteration"]
            print(f"split {name}: generate {f['generate_s'] / total:.0%}, score {f['score_s'] / total:.0%}, "
                  f"train {f['train_s'] / total:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--only", choices=["ours", "trl"])
    ap.add_argument("--threads", type=int, help="torch threads in both subprocesses (OMP_NUM_THREADS; default "
                    "torch's); 1 makes the CPU seconds a steadier measure of work on a busy machine")
    ap.add_argument("--setup-only", action="store_true", help="create the TRL venv and stop")
    ap.add_argument("--json", help="also write both sides' figures to this file")
    args = ap.parse_args()
    if args.batch % 2:
        ap.error("--batch must be even (2 minibatches)")
    if args.setup_only:
        ensure_venv()
        return

    from pipeline.models import resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    print(f"model {model_dir}\nbatch {args.batch}, max_new_tokens {args.max_new_tokens}, fp32, full fine-tuning, "
          f"torch threads {args.threads or 'default'}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min) at the start", flush=True)
    ours = trl = None
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl-") as tmp:
        if args.only in (None, "trl"):
            trl = run_trl(args, model_dir, benchmark_prompts(args.prompts, 2 * args.batch), Path(tmp) / "trl.json")
        if args.only in (None, "ours"):
            ours = run_ours(args, model_dir, Path(tmp) / "ours.json")
    print_table(ours, trl)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ours": ours, "trl019": trl}, indent=2))


if __name__ == "__main__":
    main()
