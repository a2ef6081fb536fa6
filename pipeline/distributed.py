"""Data-parallel helpers for the on-policy loop (DDP through accelerate; never a home-made layer).

Under `accelerate launch --num_processes N`, `rollout_batch_size` and `minibatch_size` are global: each
process holds a contiguous 1/N block of the batch, losses are normalised by the tokens of the whole minibatch
on all processes, statistics (whitening, means, early-stop decisions) are reduced over all processes, and
logged numbers are averaged. With one process (or no accelerator) every helper is the identity.
"""

from __future__ import annotations

import contextlib

import torch

Tensor = torch.Tensor


def shard(rows: list, rank: int, world: int) -> list:
    """This process's contiguous block of the global batch (len(rows) divisible by world)."""
    n = len(rows) // world
    return rows[rank * n:(rank + 1) * n]


def process_split(accelerator, section: str, **global_sizes: int) -> tuple[int, int]:
    """(world, rank), after checking that each global batch size splits evenly over the processes."""
    from .config import RecipeError

    kind = str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise RecipeError(
            f"`{section}` runs data-parallel (DDP) only, but this process was launched with {kind} (the "
            "accelerate config). Run the Trainer stages (sft, reward) with that config and this stage with "
            "recipes/accelerate/multi_gpu_ddp.yaml or single_gpu.yaml, e.g. `accelerate launch --config_file "
            f"recipes/accelerate/multi_gpu_ddp.yaml -m pipeline run RECIPE --stages {section}`.")
    if accelerator is None or accelerator.num_processes == 1:
        return 1, 0
    world = accelerator.num_processes
    for key, n in global_sizes.items():
        if n % world:
            raise RecipeError(f"`{section}.{key}` = {n} is a global batch size: it must be divisible by the "
                              f"number of processes ({world}).")
    return world, accelerator.process_index


def accelerate_precision(model_cfg):
    """The Accelerator (one process, or several under `accelerate launch`) and the precision on its
    device, for the recipe's `model` section."""
    from accelerate import Accelerator

    from .models import resolve_precision

    precision = resolve_precision(model_cfg)
    accelerator = Accelerator(cpu=precision.device.type == "cpu")
    precision.device = accelerator.device
    return precision, accelerator


def global_sum(x: float, accelerator) -> float:
    if accelerator is None or accelerator.num_processes == 1:
        return x
    t = torch.tensor([x], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum"))


@contextlib.contextmanager
def no_sync(accelerator, models: tuple, enabled: bool):
    if not enabled or accelerator is None or accelerator.num_processes == 1:
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(accelerator.no_sync(m))
        yield


def mean_across_processes(stats: dict, accelerator) -> dict:
    """Each logged number averaged over the processes that logged it (each holds an equal share of the
    batch; a key can be missing on some, e.g. a stat over teacher rows when a process sampled none)."""
    if accelerator is None or accelerator.num_processes == 1:
        return stats
    from accelerate.utils import gather_object

    per_rank = gather_object([{k: float(v) for k, v in stats.items()}])
    keys = sorted({k for d in per_rank for k in d})
    return {k: sum(d[k] for d in per_rank if k in d) / sum(k in d for d in per_rank) for k in keys}


def gather_mean(x: Tensor, mask: Tensor, accelerator=None) -> float:
    """Masked mean over all processes."""
    s = torch.where(mask.bool(), x.float(), 0.0).sum().reshape(1)
    n = mask.float().sum().reshape(1)
    if accelerator is not None and accelerator.num_processes > 1:
        s, n = accelerator.reduce(s, "sum"), accelerator.reduce(n, "sum")
    return float(s / n.clamp(min=1))


def whiten_global(x: Tensor, mask: Tensor, accelerator=None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening with statistics over the whole rollout batch on all processes."""
    if accelerator is None or accelerator.num_processes == 1:
        from .rl import masked_whiten

        return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    # Two passes (mean, then squared deviations) with Bessel's correction, as `rl.masked_whiten` on one process.
    m = mask.bool()
    sum_n = accelerator.reduce(torch.stack([torch.where(m, x, 0.0).sum(), m.to(x.dtype).sum()]).reshape(1, 2),
                               "sum")[0]
    mean, n = sum_n[0] / sum_n[1], sum_n[1]
    sq = accelerator.reduce(torch.where(m, (x - mean) ** 2, 0.0).sum().reshape(1), "sum")[0]
    var = sq / n * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)
