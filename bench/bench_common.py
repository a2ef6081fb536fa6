"""What the bench scripts share: the side-by-side table they print, and a stage timer that also keeps
CPU seconds. Imported as `bench_common` (the scripts' own folder is first on sys.path, and the repository
root is put there before this import, for `pipeline`)."""

from __future__ import annotations

import contextlib
import time
from typing import Optional

from pipeline.onpolicy import Throughput


class CPUThroughput(Throughput):
    """The stages' per-iteration timer, also keeping each part's process CPU seconds (all threads).
    Install with `stage_module.Throughput = CPUThroughput`; every timer made is kept in `made`."""

    made: list["CPUThroughput"] = []

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, float] = {}
        CPUThroughput.made.append(self)

    @contextlib.contextmanager
    def time(self, name: str):
        c = time.process_time()
        with super().time(name):
            yield
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c


def print_ratio_table(rows: list[tuple[str, str, str]], ours: Optional[dict], theirs: Optional[dict],
                      theirs_name: str, width: int) -> None:
    """`rows`: (label, key, format); a side that is missing or lacks a key prints `-`."""
    print(f"\n{'':<{width}}{'ours':>10}{theirs_name:>10}{'ours/' + theirs_name.split()[0]:>10}")
    for label, key, fmt in rows:
        a = ours.get(key) if ours else None
        b = theirs.get(key) if theirs else None
        a_s = fmt.format(a) if a is not None else "-"
        b_s = fmt.format(b) if b is not None else "-"
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"{label:<{width}}{a_s:>10}{b_s:>10}{ratio:>10}")


# --------------------------------------------------------------------------------------------
# The two settings every comparison runs (`--settings equal|best|both`)
# --------------------------------------------------------------------------------------------

SETTINGS_HELP = ("equal: fp32 on both sides (frozen models too), our defaults otherwise; best: each side's fastest "
                 "settings that keep the math (bf16 autocast where this CPU has native bf16, with ours' frozen models "
                 "stored in bf16 there, and ours' logits chunking and sampler log-probs where the code has them); "
                 "both (default): one table each")
BEST_LOGITS_CHUNK = 256  # positions per output-layer chunk in the `best` setting (`logits_chunk_size`)


def add_settings_arg(ap) -> None:
    ap.add_argument("--settings", default="both", choices=["equal", "best", "both"], help=SETTINGS_HELP)


def settings_list(choice: str) -> list[str]:
    return ["equal", "best"] if choice == "both" else [choice]


def best_bf16() -> bool:
    """bf16 autocast in the `best` setting: on a CPU with AMX-BF16 / AVX512-BF16 (`cpu_has_native_bf16`), where it
    is faster than fp32; elsewhere bf16 on CPU is emulated and slower, so `best` stays fp32 on both sides."""
    from pipeline.models import cpu_has_native_bf16

    return cpu_has_native_bf16()


def has_field(cls, name: str) -> bool:
    """Whether config dataclass `cls` has field `name` (so a bench runs on versions before and after it)."""
    import dataclasses

    return any(f.name == name for f in dataclasses.fields(cls))


def optional_field(cls, name: str, value, flag: str) -> dict:
    """`{name: value}` for a config class that has the field; else `{}` and a note that `flag` was ignored
    (the benches also run on older versions of the pipeline, for before/after figures)."""
    if value is None:
        return {}
    if has_field(cls, name):
        return {name: value}
    print(f"note: this version's {cls.__name__} has no {name}; {flag} {value} ignored", flush=True)
    return {}


def best_onpolicy_kwargs(cls, logits_chunk_size: int = BEST_LOGITS_CHUNK, sampler_logprobs: bool = True) -> dict:
    """Our on-policy config's speed options for the `best` setting, each only where `cls` has the field: the output
    layer in chunks (`logits_chunk_size`) and, with `sampler_logprobs` (PPO; distillation rejects it, its
    labelling forward gives those log-probs anyway), behaviour log-probs taken from the sampler
    (`logprobs_from: sampler`) instead of a recomputing forward."""
    kw = {}
    if has_field(cls, "logits_chunk_size"):
        kw["logits_chunk_size"] = logits_chunk_size
    if sampler_logprobs and has_field(cls, "logprobs_from"):
        kw["logprobs_from"] = "sampler"
    return kw


def frozen_dtype_setting(setting: str) -> str:
    """`model.frozen_dtype` for a setting: `equal` stores everything in fp32; `best` stores the frozen models
    (reference copy, reward model, teacher) in bf16 where it runs under bf16 autocast (`best_bf16`), else fp32."""
    return "bfloat16" if setting == "best" and best_bf16() else "float32"


def setting_model_kwargs(setting: str) -> dict:
    """Our ModelConfig's options for a setting beyond `cpu_autocast`: `frozen_dtype` (`frozen_dtype_setting`),
    only where this version's ModelConfig has the field."""
    from pipeline.config import ModelConfig

    return {"frozen_dtype": frozen_dtype_setting(setting)} if has_field(ModelConfig, "frozen_dtype") else {}
