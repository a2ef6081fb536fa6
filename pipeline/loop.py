"""The one on-policy loop. PPO and distillation are one algorithm on one token-level MDP (state = prompt +
tokens so far, action = the next token); they differ only in what each token earns and in the loss:

    for it in 1 .. warmup_iterations + iterations:
        batch, info = algo.collect(it, phase, generation, timer)    prompts -> rollout -> score or label
        update = optimise(batch, algo.loss_fn(phase), updaters)     epochs x minibatches x micro-batches
        log metrics and samples; non-finite streak; checkpoint; algo.end_iteration (e.g. the KL controller)

PPO (`stages/ppo.py`) collects policy samples and gives each token the score at EOS minus the per-token KL
penalty, turned into advantages; its loss is the clipped surrogate (+ the critic's value loss). Distillation
(`stages/distill.py`) collects samples of the teacher/student mixture and the teacher's distribution at every
visited state; its loss is the divergence to the teacher there. Both may start with a warm-up phase (PPO: the
critic learns the returns while the policy stays put; distillation: fixed demonstrations the teacher labels).

The loop owns what both share: prompts per process and seeded generation, resume from the newest checkpoint
(weights, optimizers, RNG streams, the algorithm's own state), checkpoints every `checkpoint_every` iterations
and on SIGINT/SIGTERM, the non-finite streak (`max_nonfinite_steps`), metrics averaged over processes into
`metrics.jsonl` (main process only), and sample logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import (
    Interrupted,
    interrupt_signal,
    latest_checkpoint,
    load_checkpoint,
    rank_rng_states,
    save_checkpoint,
    truncate_jsonl,
)
from .config import OnPolicyConfig, RecipeError
from .distributed import mean_across_processes, process_split
from .onpolicy import (
    Generation, OptimizerSet, RolloutBatch, Throughput, UpdateSettings, Updater, chunk_seed, engine_returns_logprobs,
    optimise,
)
from .rollout_vllm import rollout_engine
from .utils import MetricsLogger, log, read_jsonl, tune_malloc


@dataclass
class Process:
    """Where this process sits in the data-parallel group."""

    accelerator: Any
    world: int
    rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class OnPolicyAlgorithm:
    """What PPO and distillation supply to `train`. Subclasses set `name` (the metric prefix and progress label)
    and `cfg`, and implement `setup`, `collect` and `loss_fn`; the rest have defaults."""

    name: str = "onpolicy"
    cfg: OnPolicyConfig
    warmup_iterations: int = 0

    # -- set up ----------------------------------------------------------------------------------
    def setup(self, proc: Process, seed: int) -> list[Updater]:
        """Build the optimizers (and DDP-wrap the trainable models when proc.world > 1)."""
        raise NotImplementedError

    def trained_models(self) -> list:
        """The (possibly DDP-wrapped) models the loss trains: their gradient sync waits for the last micro-batch."""
        raise NotImplementedError

    def checkpoint_models(self) -> dict[str, Any]:
        """Models whose trainable weights a checkpoint holds (unwrapped from DDP)."""
        raise NotImplementedError

    def generators(self) -> dict[str, torch.Generator]:
        """Seeded streams of the algorithm's own (besides the loop's minibatch shuffle) that resume restores."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- one iteration ---------------------------------------------------------------------------
    def collect(self, it: int, warmup: bool, generation: Generation, timer: Throughput) -> tuple[RolloutBatch, dict]:
        """Prompts -> rollout -> score or label. -> (batch, {"stats": {...}, "texts": [...]}); stats keys are
        full names (`ppo/score`)."""
        raise NotImplementedError

    def loss_fn(self, warmup: bool, batch: RolloutBatch):
        """The update's loss, `(micro_batch, n_tokens) -> (loss, stats)`; stats keys without the prefix."""
        raise NotImplementedError

    def active_updaters(self, updaters: list[Updater], warmup: bool) -> list[Updater]:
        """The updaters that step in this phase (PPO's critic warm-up leaves the policy's out)."""
        return updaters

    def after_update(self, batch: RolloutBatch, info: dict, warmup: bool) -> dict:
        """Stats that only exist after the update (e.g. the student's KLs recorded by the loss's forward)."""
        return {}

    def end_iteration(self, stats: dict) -> None:
        """After the stats are averaged over processes, identically on every process (e.g. KL control)."""

    def postfix(self, stats: dict, warmup: bool) -> dict:
        return {}

    def sample_records(self, it: int, batch: RolloutBatch, info: dict, n: int) -> list[dict]:
        return []


def check_loop_config(cfg: OnPolicyConfig, section: str) -> None:
    """The few settings the loop itself cannot run without (preflight checks every range)."""
    if cfg.generation_batch_size is not None and cfg.generation_batch_size < 1:
        raise RecipeError(f"`{section}.generation_batch_size` is a number of rows per generate call (>= 1) or null, "
                          f"got {cfg.generation_batch_size}.")
    if cfg.iterations < 0 or cfg.epochs < 1 or cfg.minibatch_size < 1 or cfg.micro_batch_size < 1:
        raise RecipeError(f"`{section}`: iterations must be >= 0 and epochs, minibatch_size and micro_batch_size >= 1.")
    problem = cfg.logprobs_from_problem(section)  # also refused when the recipe is read (config.OnPolicyConfig)
    if problem:
        raise RecipeError(problem)


def train(algo: OnPolicyAlgorithm, stage_dir: Path, seed: int = 0, accelerator=None,
          metrics: Optional[MetricsLogger] = None, progress: bool = True, resume: bool = True) -> list[dict]:
    """Run `algo.warmup_iterations + cfg.iterations` iterations. Returns the per-iteration metrics (also in
    `stage_dir/metrics.jsonl`, averaged over processes)."""
    cfg, name = algo.cfg, algo.name
    check_loop_config(cfg, name)
    tune_malloc()  # opt-in (PIPELINE_MALLOC_THRESHOLD_MB): large per-step tensors from the heap (utils.tune_malloc)
    stage_dir = Path(stage_dir)
    engine = rollout_engine(cfg.rollout_engine, _device(algo), f"{name}.rollout_engine")
    if cfg.logprobs_from == "sampler" and not engine_returns_logprobs(engine):  # e.g. `auto` resolved to vLLM
        raise RecipeError(f"`{name}.logprobs_from: sampler` keeps the rollout engine's log-probs, but "
                          f"`{name}.rollout_engine: {cfg.rollout_engine}` resolved to an engine that returns none "
                          f"(vLLM's are not wired yet); set `{name}.rollout_engine: hf` or "
                          f"`{name}.logprobs_from: recompute`.")
    world, rank = process_split(accelerator, name, rollout_batch_size=cfg.rollout_batch_size,
                                minibatch_size=cfg.minibatch_size)
    proc = Process(accelerator, world, rank)
    updaters = algo.setup(proc, seed)
    if world > 1:
        torch.manual_seed(seed + rank)  # different samples on each process (without generation_batch_size)
    optimizers = OptimizerSet(updaters)
    shuffle = torch.Generator().manual_seed(seed)
    generators = {"shuffle": shuffle, **algo.generators()}
    update = UpdateSettings(cfg.epochs, cfg.minibatch_size // world, cfg.micro_batch_size, cfg.max_grad_norm,
                            cfg.target_approx_kl)
    local_rows = cfg.rollout_batch_size * cfg.samples_per_prompt // world
    trained = tuple(m for m in algo.trained_models() if m is not None)
    W, total = algo.warmup_iterations, algo.warmup_iterations + cfg.iterations
    ckpt_root = stage_dir / "checkpoints"
    start, nonfinite, history = resume_state(algo, stage_dir, optimizers, generators, proc, resume, total)
    metrics = metrics or (MetricsLogger(stage_dir) if proc.is_main else None)
    bar = tqdm(range(start, total + 1), desc=name, disable=not (progress and proc.is_main), initial=start - 1,
               total=total)
    for it in bar:
        warmup = it <= W
        timer = Throughput()
        gen = Generation(engine, cfg.generation_batch_size,
                         chunk_seed(seed, it) if cfg.generation_batch_size else None, rank * local_rows)
        batch, info = algo.collect(it, warmup, gen, timer)
        with timer.time("train"):
            upd = optimise(batch, algo.loss_fn(warmup, batch), algo.active_updaters(updaters, warmup), None, update,
                           shuffle, accelerator, models=trained)
        stats = dict(info["stats"])
        stats.update(algo.after_update(batch, info, warmup))
        stats.update(update_stats(name, upd))
        stats[f"{name}/tokens_per_s"] = batch.n_tokens / max(sum(timer.parts.values()), 1e-9)
        stats.update({f"{name}/time_{k}_s": v for k, v in timer.parts.items()})
        if warmup:
            stats[f"{name}/warmup"] = 1.0
        nonfinite = nonfinite + 1 if upd["optimizer_steps"] == 0 and upd["skipped_steps"] > 0 else 0
        if nonfinite:
            log(f"{name}: iteration {it}: every update had a non-finite gradient; skipped ({nonfinite} in a row)")
            if nonfinite >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{name}: {nonfinite} iterations in a row with non-finite gradients; stopping (the last "
                    f"checkpoint is intact). Lower {name}.lr" + (" or check the reward scale." if name == "ppo" else "."))
        stats = mean_across_processes(stats, accelerator)
        algo.end_iteration(stats)
        if proc.is_main:
            metrics.log(it, stats)
        history.append(stats)
        bar.set_postfix(loss=f"{stats[f'{name}/loss']:.3f}", **algo.postfix(stats, warmup))
        if proc.is_main and cfg.log_samples_every and (it == 1 or it % cfg.log_samples_every == 0):
            _append_jsonl(stage_dir / "samples.jsonl", algo.sample_records(it, batch, info, 3))
        signum = interrupt_signal()
        if (cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < total) or signum:
            path = ckpt_root / f"iter-{it:06d}"
            rngs = rank_rng_states(accelerator)  # every process's sampling RNG, gathered on all
            if proc.is_main:
                path = save_checkpoint(ckpt_root, it, algo.checkpoint_models(), optimizers,
                                       {"algorithm": algo.state_dict(), "nonfinite": nonfinite}, generators,
                                       rank_rngs=rngs)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if signum:
                raise Interrupted(signum, str(path))
    return history


def resume_state(algo: OnPolicyAlgorithm, stage_dir: Path, optimizers: OptimizerSet, generators: dict,
                 proc: Process, resume: bool, total: int) -> tuple[int, int, list[dict]]:
    """Restore the newest complete checkpoint (weights, optimizers, RNG streams, the algorithm's state) and drop
    the metric and sample rows logged after it. -> (first iteration to run, non-finite streak, history)."""
    name = algo.name
    latest = latest_checkpoint(stage_dir / "checkpoints") if resume else None
    if latest is None:
        if proc.is_main:  # a fresh start: rows from an earlier attempt that left no checkpoint are not this run's
            for file in ("metrics.jsonl", "samples.jsonl"):
                (stage_dir / file).unlink(missing_ok=True)
        return 1, 0, []
    state = load_checkpoint(latest, algo.checkpoint_models(), optimizers, generators, rank=proc.rank)
    algo.load_state_dict(state["algorithm"])
    history = []
    if proc.is_main:
        truncate_jsonl(stage_dir / "metrics.jsonl", state["iteration"])
        truncate_jsonl(stage_dir / "samples.jsonl", state["iteration"], key="iteration")
        history = [r for r in read_jsonl(stage_dir / "metrics.jsonl") if f"{name}/loss" in r]
    log(f"{name}: resuming from {latest} (iteration {state['iteration'] + 1} of {total})")
    return state["iteration"] + 1, state["nonfinite"], history


def update_stats(name: str, upd: dict) -> dict:
    """The update's figures under the stage's prefix: the loss's own stats, the loss and grad norms (NaN when
    every minibatch was skipped), skipped steps and whether the epochs stopped early on approx KL."""
    out = {f"{name}/{k}": v for k, v in upd.items() if k not in ("optimizer_steps", "skipped_steps", "early_stop")}
    out.setdefault(f"{name}/loss", float("nan"))
    out.setdefault(f"{name}/grad_norm", float("nan"))
    out[f"{name}/skipped_steps"] = upd["skipped_steps"]
    out[f"{name}/early_stop"] = upd["early_stop"]
    out[f"{name}/optimizer_steps"] = upd["optimizer_steps"]
    return out


def ddp_prepare(proc: Process, *pairs):
    """DDP-wrap (model, optimizer) pairs under several processes; the same objects with one."""
    if proc.world == 1:
        return pairs
    flat = [x for pair in pairs for x in pair]
    out = proc.accelerator.prepare(*flat)
    return tuple((out[i], out[i + 1]) for i in range(0, len(out), 2))


def _device(algo) -> torch.device:
    models = algo.checkpoint_models()
    return next(next(m.parameters()).device for m in models.values() if m is not None)


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def summarise(history: list[dict], name: str, keys: tuple, smoothed: tuple) -> dict:
    """A stage's summary from its per-iteration metrics: the number of (warm-up) iterations, and for the main
    phase the first and last value of each of `keys`, and the mean of the last five of each of `smoothed` (they
    smooth one rollout batch's sampling noise)."""
    warm = [h for h in history if h.get(f"{name}/warmup")]
    main = [h for h in history if not h.get(f"{name}/warmup")]
    out: dict[str, Any] = {"iterations": len(main), "warmup_iterations": len(warm)}
    if main:
        first, last = main[0], main[-1]
        out.update({f"{k}_{w}": h[k] for k in keys for w, h in (("first", first), ("last", last))
                    if k in first and k in last})
        for k in smoothed:
            vals = [h[k] for h in main[-5:] if k in h]
            if vals:
                out[f"{k}_last5_mean"] = sum(vals) / len(vals)
    if warm:
        out[f"{name}/warmup_loss_first"], out[f"{name}/warmup_loss_last"] = warm[0][f"{name}/loss"], warm[-1][f"{name}/loss"]
    return out
