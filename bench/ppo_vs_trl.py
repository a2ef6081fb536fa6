"""One PPO iteration, ours vs TRL 0.19's `PPOTrainer`, on the same model, prompts, batch and lengths.

    python bench/ppo_vs_trl.py                   # creates bench/.venv-trl019 on first use (a minute or two)
    python bench/ppo_vs_trl.py --batch 8 --max-new-tokens 32
    python bench/ppo_vs_trl.py --only trl        # or --only ours; --setup-only builds the venv and stops
    python bench/ppo_vs_trl.py --settings best   # or equal; default both (one table each)

TRL 0.19 (the last release with the classic `PPOTrainer`) needs transformers 4.x, so it runs in its own
virtual environment, `bench/.venv-trl019`, made here with `python -m venv` and pinned installs
(`VENV_PACKAGES`); `bench/trl019_ppo_step.py` runs inside it as a subprocess. Ours runs as
`bench/ppo.py --json` in a subprocess of the system Python, so each side's peak RSS is its own.

Matched on both sides: the default model (SmolLM2-135M-Instruct, the cached safetensors directory) as
policy and reference, a sequence-classification model from the same directory (num_labels=1) as reward
model and as critic; full fine-tuning; fp32 weights (but ours' frozen ones in `best`, below); the
precision of each setting (below); the same 2 x batch prompts in the same order (our PromptSampler's
order, seed 0; TRL's shuffling loader is replaced by one in that order), chat template, left padding;
sampling at temperature 1.0 with no top-k / top-p, stopping at EOS, max_new_tokens = TRL's
response_length; the whole batch generated at once (TRL local_rollout_forward_batch_size = batch); 2 PPO
epochs x 2 minibatches of batch/2, one optimizer step per minibatch (TRL: per_device_train_batch_size =
batch, gradient_accumulation_steps 1, num_mini_batches 2); torch's fused AdamW kernel on both sides (ours:
`onpolicy.adamw`; TRL: `optim="adamw_torch_fused"`). Two iterations each; the second is reported
(the first warms up).
Settings (`--settings`, default both, one table each, both in this one run):
  equal: fp32 with no autocast on both sides (ours: --cpu-autocast off, --frozen-dtype float32), our defaults
    otherwise (logits_chunk_size 0, behaviour log-probs recomputed with a training forward);
  best: each side's fastest settings that keep the math. Ours: bf16 autocast on a CPU with native bf16
    (AMX-BF16 / AVX512-BF16, `pipeline.models.cpu_has_native_bf16`), else fp32, with the frozen models (the
    reference copy and the reward model) stored in bf16 there (`--frozen-dtype bfloat16`; fp32 elsewhere);
    `logits_chunk_size` 256;
    `logprobs_from: sampler` (behaviour log-probs from the sampler, no recomputing forward) where this
    version's PPOConfig has that field; the critic a value head on the policy's own hidden states
    (`--critic-from shared`; `--best-critic policy`: a second backbone, as TRL's). TRL's: on the same CPUs,
    `bf16=True` (with `use_cpu=True`) and its
    whole `train()` under torch.autocast(cpu, bf16) (`trl019_ppo_step.py --bf16`); TRL 0.19's PPOTrainer
    has no logits chunking or sampler log-probs to turn on. On a CPU without native bf16 both sides stay
    fp32 (bf16 there is emulated and slower).
  Not matched in `best`: which ops run in bf16 under autocast is torch's choice on both sides, but the
    chunked output layer, sampler log-probs and bf16 storage of the frozen models exist only on ours (TRL's
    reference and reward models keep fp32 weights, cast to bf16 by autocast at every forward).
Known differences in the work done, not equalised: ours recomputes the behaviour log-probs with a
training forward in `equal` (TRL reuses the generation logits; ours takes them from the sampler in
`best` where the config has `logprobs_from`), and ours scores decoded text re-tokenised for
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

from bench_common import (  # noqa: E402  (bench/, the script's own folder)
    add_settings_arg, best_bf16, best_onpolicy_kwargs, print_ratio_table, setting_model_kwargs, settings_list,
)


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


def ours_setting_flags(setting: str, critic: str = "shared") -> list[str]:
    """bench/ppo.py's flags for a setting: `equal` = fp32 (frozen models too), our defaults, the critic on a second
    backbone as TRL's; `best` = bf16 autocast where the CPU has native bf16, with the frozen models (reference
    copy, reward model) stored in bf16 there (`bench_common.setting_model_kwargs`), the config's speed options
    (`bench_common.best_onpolicy_kwargs`) and the critic `critic` (`shared`: a value head on the policy)."""
    model_flags = [f"--{k.replace('_', '-')}={v}" for k, v in setting_model_kwargs(setting).items()]
    if setting == "equal":
        return ["--cpu-autocast", "off", *model_flags]
    from pipeline.config import PPOConfig

    flags = ["--cpu-autocast", "on" if best_bf16() else "off", *model_flags, "--critic-from", critic]
    for key, value in best_onpolicy_kwargs(PPOConfig).items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def run_ours(args, model_dir: str, out: Path, setting: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "ppo.py"), "--no-lora", *ours_setting_flags(setting, args.best_critic),
           "--reward", model_dir, "--prompts", args.prompts, "--batch", str(args.batch),
           "--max-new-tokens", str(args.max_new_tokens), "--iterations", "2",
           "--minibatch-size", str(args.batch // 2), "--json", str(out)]
    print(f"ours ({setting}):", " ".join(cmd[1:]), flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=thread_env(args))
    if proc.returncode != 0:
        sys.exit(f"bench/ppo.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    fig = json.loads(out.read_text())
    print(f"ours done in {time.time() - t:.0f}s wall", flush=True)
    return {"seconds_per_iteration": fig["seconds_per_iteration"], "tokens": fig["response_tokens"],
            "tokens_per_s": fig["tokens_per_s"], "peak_rss_mb": fig["peak_rss_mb"],
            "generate_s": fig["generate_s"], "score_s": fig["score_s"], "train_s": fig["train_s"],
            "autocast_bf16": fig["autocast_bf16"], "logits_chunk_size": fig.get("logits_chunk_size"),
            "logprobs_from": fig.get("logprobs_from"), "frozen_dtype": fig.get("frozen_dtype"),
            "critic_from": fig.get("critic_from", "policy"),
            **{k: fig[k] for k in ("cpu_seconds_per_iteration", "cpu_generate_s", "cpu_score_s", "cpu_train_s")}}


def run_trl(args, model_dir: str, prompts: list, out: Path, setting: str) -> dict:
    py = ensure_venv()
    prompts_file = out.with_name("prompts.json")
    prompts_file.write_text(json.dumps([ex["prompt"] for ex in prompts]))
    cmd = [str(py), str(ROOT / "bench" / "trl019_ppo_step.py"), "--model-dir", model_dir,
           "--prompts-json", str(prompts_file), "--batch", str(args.batch),
           "--response-length", str(args.max_new_tokens), "--json", str(out)]
    if setting == "best" and best_bf16():
        cmd.append("--bf16")
    print(f"trl 0.19 ({setting}):", " ".join(cmd[1:]), flush=True)
    t = time.time()
    # The venv's python must not see this project's editable install or the system site-packages.
    env = {k: v for k, v in thread_env(args).items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"trl019_ppo_step.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print(f"trl done in {time.time() - t:.0f}s wall", flush=True)
    return json.loads(out.read_text())


def print_table(ours: dict | None, trl: dict | None, setting: str) -> None:
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
    print(f"\n== setting: {setting} ==")
    if ours:
        print(f"ours: bf16 autocast {ours.get('autocast_bf16')}, logits_chunk_size {ours.get('logits_chunk_size')}, "
              f"logprobs_from {ours.get('logprobs_from')}, frozen models in {ours.get('frozen_dtype')}, "
              f"critic_from {ours.get('critic_from')}")
    if trl:
        print(f"trl 0.19: bf16 {trl.get('bf16', False)}")
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
    ap.add_argument("--best-critic", default="shared", choices=["shared", "policy"],
                    help="ours' critic in `best`: shared (a value head on the policy's hidden states, the default) or "
                         "policy (a second backbone, as TRL's and as `equal`)")
    ap.add_argument("--threads", type=int, help="torch threads in both subprocesses (OMP_NUM_THREADS; default "
                    "torch's); 1 makes the CPU seconds a steadier measure of work on a busy machine")
    add_settings_arg(ap)
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
    settings = settings_list(args.settings)
    print(f"model {model_dir}\nbatch {args.batch}, max_new_tokens {args.max_new_tokens}, full fine-tuning, "
          f"settings {', '.join(settings)} (CPU native bf16: {best_bf16()}), "
          f"torch threads {args.threads or 'default'}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min) at the start", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl-") as tmp:
        for setting in settings:
            ours = trl = None
            if args.only in (None, "trl"):
                trl = run_trl(args, model_dir, benchmark_prompts(args.prompts, 2 * args.batch),
                              Path(tmp) / f"trl-{setting}.json", setting)
            if args.only in (None, "ours"):
                ours = run_ours(args, model_dir, Path(tmp) / f"ours-{setting}.json", setting)
            results[setting] = {"ours": ours, "trl019": trl}
    for setting, r in results.items():
        print_table(r["ours"], r["trl019"], setting)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
