"""Where the time goes: `torch.profiler` over one PPO iteration of ours and one distillation step of ours.

    python bench/profile_steps.py                  # both, in the `best` setting, the comparison benches' sizes
    python bench/profile_steps.py --settings both  # or equal; one pair of tables per setting
    python bench/profile_steps.py --what ppo --rows 40  # only PPO, a longer table
    python bench/profile_steps.py --tiny           # tiny random models (a quick check of the script)
    python bench/profile_steps.py --what distill --shapes  # one row per (op, input shapes)

PPO: the run `bench/ppo_vs_trl.py` times for ours (`bench/ppo.py --no-lora`, the default model as policy and
reference, a sequence-classification model from the same directory as reward model and critic, batch 16,
64 new tokens, 2 minibatches of 8); two iterations, the second profiled (the first warms up kernels and
caches). Distillation: the run `bench/distill_vs_trl.py` times for ours (the `distill` stage's loop, the
default model as teacher, its every-2nd-layer student, batch 4, 32 new tokens, reverse KL over the full
vocabulary); two steps, the second profiled. Settings as in those benches: `equal` = fp32 with our defaults,
`best` = bf16 autocast on a CPU with native bf16 plus `logits_chunk_size` 256 and (PPO) `logprobs_from:
sampler` where the config has that field (`bench_common.best_onpolicy_kwargs`) and the shared value head
(`critic_from: shared`, as `ppo_vs_trl.py`'s `best`).

The profiler records CPU activities with memory (profile_memory on, record_shapes off). For each run it
prints the top `--rows` rows of `key_averages().table(sort_by="self_cpu_time_total")`, and writes the
Chrome trace, gzipped (open in https://ui.perfetto.dev or chrome://tracing), to `--out`
(`bench/results/profile_<what>_<setting>.json.gz`, git-ignored). Profiling slows the run down (more so with
memory on); the table's shares, not its seconds, are the figures to quote. See the PyTorch profiler recipe,
https://pytorch.org/tutorials/recipes/recipes/profiler_recipe.html.

(Not named `profile.py`: the scripts' folder comes first on sys.path, and a `bench/profile.py` would shadow
the standard library's `profile`, which `cProfile` imports, and so break every bench that imports peft.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import CPUThroughput, best_bf16, settings_list  # noqa: E402  (bench/, the script's own folder)

PROFILED_ITERATION = 2  # the first iteration warms up


class ProfiledThroughput(CPUThroughput):
    """The loop's per-iteration timer (made at the start of each iteration), which profiles iteration
    PROFILED_ITERATION: the profiler starts when that iteration's timer is made and stops when its `train` part
    (the last) ends. The finished profiler is left in `ProfiledThroughput.result`."""

    count = 0
    result = None
    record_shapes = False

    def __init__(self):
        super().__init__()
        ProfiledThroughput.count += 1
        self.prof = None
        if ProfiledThroughput.count == PROFILED_ITERATION:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=self.record_shapes,
                                profile_memory=True)
            self.prof.__enter__()

    @contextlib.contextmanager
    def time(self, name: str):
        with super().time(name):
            yield
        if name == "train" and self.prof is not None:
            self.prof.__exit__(None, None, None)
            ProfiledThroughput.result, self.prof = self.prof, None

    @classmethod
    def reset(cls):
        cls.count, cls.result = 0, None
        CPUThroughput.made = []


def metrics_only(stage_dir: Path):
    """The stage's metrics.jsonl without TensorBoard: no writer thread in the profile, none outliving the folder."""
    from pipeline.utils import MetricsLogger

    return MetricsLogger(stage_dir, tensorboard=False)


def ppo_run(args, setting: str, stage_dir: Path):
    import ppo as ppo_bench  # bench/ppo.py
    from ppo_vs_trl import ours_setting_flags

    from pipeline.stages.ppo import train_ppo

    argv = ["--no-lora", *ours_setting_flags(setting), "--iterations", str(PROFILED_ITERATION),
            "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
            "--minibatch-size", str(max(1, args.batch // 2)), "--prompts", args.prompts]
    if args.tiny:
        argv.append("--tiny")
    else:
        from pipeline.models import resolve_model_path

        argv += ["--reward", resolve_model_path("smollm2-135m-instruct")]
    pargs = ppo_bench.build_parser().parse_args(argv)
    models, reward, prompts, cfg, precision, _ = ppo_bench.prepare(pargs)
    settings = (f"batch {args.batch}, max_new_tokens {args.max_new_tokens}, bf16 autocast {precision.autocast}, "
                f"logits_chunk_size {cfg.logits_chunk_size}, logprobs_from {getattr(cfg, 'logprobs_from', '-')}")
    return settings, lambda: train_ppo(models, reward, prompts, cfg, precision, stage_dir, seed=0,
                                       metrics=metrics_only(stage_dir), progress=False)


def tiny_distill(cfg, precision):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer

    from pipeline.models import choose_layers, student_from_teacher
    from pipeline.rlmodels import DistillModels

    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=4).requires_grad_(False).eval()
    kept = choose_layers(teacher, cfg.student.from_teacher.keep_layers)
    student = student_from_teacher(teacher, kept).eval()
    prompts = [{"prompt": [{"role": "user", "content": f"hello world {i}"}]} for i in range(32)]
    models = DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok), kept_layers=kept)
    return models, prompts


def distill_run(args, setting: str, stage_dir: Path):
    import distill_vs_trl  # bench/distill_vs_trl.py

    from pipeline.stages.distill import train_distill

    dargs = argparse.Namespace(steps=PROFILED_ITERATION, batch=args.distill_batch,
                               max_new_tokens=args.distill_max_new_tokens, lr=5e-5, keep_layers="every_2nd",
                               prompts=args.prompts, seed=0)
    if args.tiny:
        from pipeline.config import DistillConfig, KeepLayersConfig, StudentConfig
        from pipeline.models import resolve_precision

        precision = resolve_precision(distill_vs_trl.model_config(setting))
        extra = distill_vs_trl.best_onpolicy_kwargs(DistillConfig, sampler_logprobs=False) if setting == "best" else {}
        cfg = DistillConfig(
            teacher_from="base", student=StudentConfig(from_teacher=KeepLayersConfig("every_2nd")), prompts="",
            beta=0.0, divergence="reverse_kl", estimator="full", lora=None, iterations=PROFILED_ITERATION,
            rollout_batch_size=dargs.batch, minibatch_size=dargs.batch, micro_batch_size=dargs.batch, epochs=1,
            lr=dargs.lr, max_new_tokens=dargs.max_new_tokens, log_samples_every=0, checkpoint_every=0, **extra)
        models, prompts = tiny_distill(cfg, precision)
    else:
        models, prompts, cfg, precision = distill_vs_trl.ours_setup(dargs, setting)
    settings = (f"batch {dargs.batch}, max_new_tokens {dargs.max_new_tokens}, bf16 autocast {precision.autocast}, "
                f"logits_chunk_size {cfg.logits_chunk_size}, logprobs_from {getattr(cfg, 'logprobs_from', '-')}")
    return settings, lambda: train_distill(models, prompts, cfg, precision, stage_dir, seed=0,
                                           metrics=metrics_only(stage_dir), progress=False, resume=False)


def profile_one(what: str, setting: str, args) -> None:
    import pipeline.loop as loop
    from pipeline.utils import close_metrics_loggers

    ProfiledThroughput.reset()
    ProfiledThroughput.record_shapes = args.shapes
    loop.Throughput = ProfiledThroughput  # the one loop makes one per iteration
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix=f"profile-{what}-") as tmp:
        settings, train = (ppo_run if what == "ppo" else distill_run)(args, setting, Path(tmp))
        t = time.time()
        try:
            train()
        finally:
            close_metrics_loggers()  # the TensorBoard writer, before its folder goes
        wall = time.time() - t
    prof = ProfiledThroughput.result
    if prof is None:
        sys.exit(f"{what}: the profiled iteration ({PROFILED_ITERATION}) did not run")
    parts = CPUThroughput.made[PROFILED_ITERATION - 1].parts
    name = "one PPO iteration" if what == "ppo" else "one distillation step"
    print(f"\n== {name}, setting {setting}: {settings} ==")
    print(f"profiled iteration {PROFILED_ITERATION} (of {PROFILED_ITERATION}, {wall:.0f}s wall in all, profiler on): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in parts.items()))
    if args.shapes:
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50, max_shapes_column_width=70))
    else:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"profile_{what}_{setting}{'_tiny' if args.tiny else ''}.json.gz"
    partial = trace.with_name(".partial-" + trace.name)  # written whole, then renamed: no half-written trace
    prof.export_chrome_trace(str(partial))  # gzipped (the name ends in .gz)
    os.replace(partial, trace)
    print(f"Chrome trace: {trace} ({trace.stat().st_size / 2**20:.1f} MB)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", nargs="+", default=["ppo", "distill"], choices=["ppo", "distill"])
    ap.add_argument("--settings", default="best", choices=["equal", "best", "both"],
                    help="equal: fp32, our defaults; best (default): bf16 autocast where this CPU has native bf16, "
                    "logits chunking and sampler log-probs where the config has them; both: one table each")
    ap.add_argument("--batch", type=int, default=16, help="PPO rollout batch (ppo_vs_trl.py's default)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="PPO (ppo_vs_trl.py's default)")
    ap.add_argument("--distill-batch", type=int, default=4, help="distillation batch (distill_vs_trl.py's default)")
    ap.add_argument("--distill-max-new-tokens", type=int, default=32, help="distillation (distill_vs_trl.py's)")
    ap.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    ap.add_argument("--rows", type=int, default=20, help="rows of each table")
    ap.add_argument("--threads", type=int, help="torch threads (default torch's)")
    ap.add_argument("--shapes", action="store_true", help="record input shapes; one table row per (op, shapes)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the Chrome traces")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and small sizes: a check of the script")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.batch, args.max_new_tokens, args.distill_batch, args.distill_max_new_tokens = 4, 8, 2, 8
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU native bf16 {best_bf16()}", flush=True)
    for setting in settings_list(args.settings):
        for what in args.what:
            profile_one(what, setting, args)


if __name__ == "__main__":
    main()
