"""Preflight: everything a stage would check at its start, checked before the first stage runs.

`pipeline validate` runs it, and so does `pipeline run` before any stage (a typo in the PPO section fails
in seconds, not after SFT and the reward model have trained). It loads no weights: it reads recipes,
data files, run directories and, where a model's depth matters, a model's `config.json` (or a GGUF
file's header).

What it checks, in order:
- `stages` is not empty; `--stages` is a subset of it.
- `RANGES`: a range for every numeric field of every section (declared once per dataclass field; a field
  of `OnPolicyConfig` covers both `ppo` and `distill`). `tests/test_preflight.py` fails when a numeric
  field has no range, so a new field cannot skip it.
- Rules across fields (`check_rules`): RLOO needs several samples per prompt, batch sizes divide, the
  distillation settings fit together (`check_distill_config`), `eval.baseline` needs `eval.reward_from`,
  `rollout_engine: vllm` is usable here, known dtype/device/scheduler names.
- Model references (`check_references`): `base`, a stage that runs earlier in this recipe, a stage output
  that exists (in this run or in `run.inputs_from`), a local model directory, a .gguf file, the builtin
  model or a hub id `org/name` (not checked over the network). A mistyped name gets a suggestion.
- `distill.student.from_teacher.keep_layers` fits the teacher's depth, when the depth is known without
  weights (`model_depth`).
- The run directory (`check_output_dir`): not a file; not a non-empty folder that holds no run (unless
  --force); a run of a different recipe needs --force (`runner.prepare_output_dir`).
- Data files (`runner.validate_data`): each is opened and its rows checked by `pipeline/data.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .config import (
    STAGE_NAMES,
    DistillConfig,
    EvalConfig,
    KeepLayersConfig,
    LoraConfig,
    ModelConfig,
    OnPolicyConfig,
    PPOConfig,
    Recipe,
    RecipeError,
    RewardConfig,
    RewardSourceConfig,
    RunConfig,
    SFTConfig,
    StudentConfig,
)
from .models import BUILTIN_MODELS, ModelError

# --------------------------------------------------------------------------------------------
# Ranges of numeric fields
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: lo <= v <= hi (open ends with lo_open / hi_open; None: no
    bound). NaN and infinities are always refused. `means` says what the value is, for the message."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    means: str = ""

    def __contains__(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return "a finite number"


def _r(base: Range, means: str) -> Range:
    return dataclasses.replace(base, means=means)


POSITIVE = Range(0, lo_open=True)
NONNEG = Range(0)
COUNT = Range(1)
PROB = Range(0, 1)
FRACTION = Range(0, 1, hi_open=True)
FINITE = Range()

# One line per numeric field, keyed by the dataclass that declares it (looked up along the class's MRO,
# so `OnPolicyConfig` covers `ppo` and `distill`, `LoraConfig` every `lora:`). `None` (for Optional
# fields) is always allowed; the range applies to a number.
RANGES: dict[type, dict[str, Range]] = {
    RunConfig: {
        "seed": Range(0, 2**32 - 1, means="the random seed (numpy takes 0 .. 2**32 - 1)"),
    },
    LoraConfig: {
        "r": _r(COUNT, "the LoRA rank"),
        "alpha": _r(POSITIVE, "the LoRA scale numerator (scale = alpha / r)"),
        "dropout": _r(FRACTION, "a dropout probability"),
    },
    SFTConfig: {
        "eval_fraction": _r(FRACTION, "the share of `data` held out for the evaluation loss; 0: none"),
        "lr": _r(POSITIVE, "the learning rate; <= 0 would not train or would ascend the loss"),
        "epochs": _r(POSITIVE, "passes over the data"),
        "max_steps": Range(-1, means="optimizer steps; -1: train for `epochs`"),
        "batch_size": _r(COUNT, "sequences per device step"),
        "grad_accum": _r(COUNT, "gradient accumulation steps"),
        "max_seq_len": Range(2, means="tokens per sequence"),
        "response_start_weight": _r(NONNEG, "the loss weight of the first response tokens; 1.0: plain SFT"),
        "response_start_tokens": _r(NONNEG, "how many response tokens get that weight"),
        "warmup_ratio": _r(FRACTION, "the share of steps spent warming up the learning rate"),
        "weight_decay": _r(NONNEG, "AdamW weight decay"),
        "logging_steps": _r(COUNT, "optimizer steps between logged metrics"),
        "eval_steps": _r(NONNEG, "optimizer steps between evaluations; 0: once per epoch"),
        "checkpoint_every": _r(COUNT, "optimizer steps between checkpoints"),
        "max_rows": _r(COUNT, "rows read from `data`; null: all"),
    },
    RewardConfig: {
        "eval_fraction": _r(FRACTION, "the share of prompts held out for the evaluation; 0: none"),
        "lr": _r(POSITIVE, "the learning rate"),
        "epochs": _r(POSITIVE, "passes over the pairs"),
        "max_steps": Range(-1, means="optimizer steps; -1: train for `epochs`"),
        "batch_size": _r(COUNT, "pairs per device step"),
        "grad_accum": _r(COUNT, "gradient accumulation steps"),
        "max_seq_len": Range(2, means="tokens per sequence"),
        "center_coef": _r(NONNEG, "the weight of the score-centering term; 0: off"),
        "logging_steps": _r(COUNT, "optimizer steps between logged metrics"),
        "norm_samples": _r(COUNT, "policy samples for the normalisation statistics"),
        "format_probe_rows": _r(NONNEG, "held-out pairs for the unrequested-format probe; 0: off"),
        "max_new_tokens": _r(COUNT, "tokens per normalisation sample"),
        "checkpoint_every": _r(COUNT, "optimizer steps between checkpoints"),
        "max_rows": _r(COUNT, "rows read from `data`; null: all"),
    },
    RewardSourceConfig: {
        "weight": _r(FINITE, "this source's weight in the summed reward (negative: a penalty)"),
    },
    OnPolicyConfig: {
        "iterations": _r(COUNT, "rollout-and-update iterations"),
        "rollout_batch_size": _r(COUNT, "prompts per iteration"),
        "samples_per_prompt": _r(COUNT, "responses sampled per prompt"),
        "minibatch_size": _r(COUNT, "sequences per optimizer step"),
        "micro_batch_size": _r(COUNT, "sequences per forward pass"),
        "epochs": _r(COUNT, "passes over each iteration's rollouts"),
        "lr": _r(POSITIVE, "the learning rate; <= 0 would not train or would ascend the loss"),
        "max_grad_norm": _r(POSITIVE, "the gradient-norm clip"),
        "target_approx_kl": _r(POSITIVE, "the approx-KL that stops an iteration's epochs early; null: never"),
        "clip_coef": _r(POSITIVE, "the PPO clip range of the probability ratio"),
        "max_new_tokens": _r(COUNT, "tokens per sampled response"),
        "temperature": _r(POSITIVE, "the sampling temperature (0 is not a distribution)"),
        "top_k": _r(NONNEG, "top-k sampling; 0: off"),
        "top_p": Range(0, 1, lo_open=True, means="nucleus sampling mass; 1.0: off"),
        "generation_batch_size": _r(COUNT, "rows per generate call; null: the whole batch"),
        "log_samples_every": _r(NONNEG, "iterations between logged samples; 0: never"),
        "checkpoint_every": _r(NONNEG, "iterations between checkpoints; 0: only on interruption"),
        "max_nonfinite_steps": _r(COUNT, "NaN/inf updates in a row before the stage stops"),
        "logits_chunk_size": _r(NONNEG, "positions per chunk of output-layer logits; 0: off (all at once)"),
        "logprobs_gap_every": _r(NONNEG, "iterations between logged sampler / recompute log-prob gaps; 0: never"),
        "logprobs_gap_rows": _r(COUNT, "rows per process the log-prob gap is measured on"),
    },
    PPOConfig: {
        "critic_lr": _r(POSITIVE, "the critic's learning rate"),
        "critic_max_grad_norm": _r(POSITIVE, "the critic's gradient-norm clip; null: max_grad_norm"),
        "critic_warmup": _r(NONNEG, "iterations that train only the critic; 0: none"),
        "gamma": _r(PROB, "the discount factor"),
        "gae_lambda": _r(PROB, "GAE's lambda"),
        "clip_coef_v": _r(POSITIVE, "the value-function clip range"),
        "vf_coef": _r(NONNEG, "the value-loss weight"),
        "ent_coef": _r(NONNEG, "the entropy-bonus weight"),
        "kl_coef": _r(NONNEG, "the KL penalty coefficient; 0: no penalty"),
        "kl_target": _r(POSITIVE, "the adaptive KL controller's target"),
        "kl_horizon": _r(COUNT, "the adaptive KL controller's horizon"),
        "missing_eos_penalty": _r(NONNEG, "subtracted from the score of a response without EOS"),
    },
    DistillConfig: {
        "beta": _r(PROB, "the probability that a sequence is sampled by the teacher"),
        "beta_end": _r(PROB, "beta at the last iteration (linear schedule)"),
        "beta_decay": _r(PROB, "beta's factor per iteration (exponential schedule)"),
        "jsd_beta": _r(PROB, "the generalized JSD's mixture weight"),
        "warmup_iterations": _r(NONNEG, "warm-up batches on fixed demonstrations; 0: none"),
        "heldout_batch_size": _r(COUNT, "prompts per generate call in the held-out evaluation"),
        "topk_forward_kl_coef": _r(NONNEG, "the weight of the top-k forward-KL term; 0: off"),
        "topk_forward_kl_k": _r(COUNT, "the teacher's top tokens in the top-k forward-KL term"),
        "eos_weight": _r(NONNEG, "the loss weight at a state where the teacher surely stops; 1: off"),
        "student_temperature": _r(POSITIVE, "the sampling temperature of the student's own rollouts; null: `temperature`"),
    },
    KeepLayersConfig: {
        "neighbour_lr_scale": _r(POSITIVE, "the lr factor of the kept layers next to a removed block; 1.0: off"),
    },
    EvalConfig: {
        "max_new_tokens": _r(COUNT, "tokens per answer"),
        "batch_size": _r(COUNT, "prompts per generate call"),
        "temperature": _r(POSITIVE, "the sampling temperature (with do_sample)"),
        "max_prompts": _r(COUNT, "prompts read from each file; null: all"),
        "num_samples_in_report": _r(NONNEG, "prompts per set shown in report.md"),
        "ifeval_max_gen_toks": _r(COUNT, "tokens per IFEval answer; null: the harness task's own"),
        "ifeval_limit": _r(COUNT, "the first N IFEval prompts; null: all"),
    },
}

# Every dataclass a recipe is made of (the test checks that each numeric field of each has a range).
SECTION_CLASSES = (RunConfig, ModelConfig, LoraConfig, SFTConfig, RewardConfig, RewardSourceConfig, PPOConfig,
                   KeepLayersConfig, StudentConfig, DistillConfig, EvalConfig)


def _is_numeric(tp: Any) -> bool:
    """int / float / Optional[int | float] (bool is not a number here)."""
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


def numeric_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal") and _is_numeric(hints[f.name])]


def range_of(cls: type, name: str) -> Optional[Range]:
    for klass in cls.__mro__:
        if name in RANGES.get(klass, {}):
            return RANGES[klass][name]
    return None


def check_ranges(obj: Any, path: str, where: str) -> None:
    """Check every numeric field of the dataclass `obj` (and of the dataclasses inside it) against RANGES."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        value, key = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if _is_numeric(hints[f.name]):
            if value is None:
                continue
            rng = range_of(cls, f.name)
            if rng is None:  # a field added without a range: tests/test_preflight.py names it
                continue
            if value not in rng:
                means = f" ({rng.means})" if rng.means else ""
                raise RecipeError(f"{where}: `{key}` must be {rng.describe()}{means}, got {value!r}.")
        elif dataclasses.is_dataclass(value):
            check_ranges(value, key, where)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    check_ranges(v, f"{key}[{i}]", where)


# --------------------------------------------------------------------------------------------
# Rules across fields
# --------------------------------------------------------------------------------------------


def check_onpolicy_batches(cfg: OnPolicyConfig, section: str, where: str) -> None:
    rows = cfg.rollout_batch_size * cfg.samples_per_prompt
    if rows % cfg.minibatch_size:
        raise RecipeError(
            f"{where}: `{section}.minibatch_size` ({cfg.minibatch_size}) must divide the sequences of an iteration, "
            f"`rollout_batch_size` x `samples_per_prompt` = {cfg.rollout_batch_size} x {cfg.samples_per_prompt} = "
            f"{rows}: otherwise every epoch ends on a short minibatch whose optimizer step averages fewer sequences "
            f"(a noisier, larger step). E.g. minibatch_size: {_divisor_near(rows, cfg.minibatch_size)}.")
    if cfg.micro_batch_size > cfg.minibatch_size:
        raise RecipeError(
            f"{where}: `{section}.micro_batch_size` ({cfg.micro_batch_size}) is the sequences per forward pass within "
            f"a minibatch of `minibatch_size` ({cfg.minibatch_size}) sequences, so it must be <= minibatch_size. "
            "It need not divide it: the loss is normalised by the whole minibatch's tokens, so a shorter last "
            "micro-batch gives the same gradient.")


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def check_keep_layers(spec: Any, n_layers: Optional[int], where: str, teacher: str = "the teacher") -> None:
    """`every_Nth` / `first_K` / `influence_K` / a list of layer indices, against the teacher's depth when
    known (the logic of `stages/distill.py::keep_layer_indices`, without the influence scores)."""
    key = "distill.student.from_teacher.keep_layers"
    formats = "every_2nd, every_3rd, every_Nth, first_K, influence_K or a list of layer indices"
    depth = f" ({teacher} has {n_layers} layers)" if n_layers is not None else ""
    if isinstance(spec, list):
        idx = list(spec)
        if not idx or len(set(idx)) != len(idx) or idx != sorted(idx) or idx[0] < 0:
            raise RecipeError(f"{where}: `{key}`: {spec!r} must be distinct increasing layer indices >= 0{depth}.")
        if n_layers is not None and idx[-1] >= n_layers:
            raise RecipeError(f"{where}: `{key}`: {spec!r} names layer {idx[-1]}, but {teacher} has {n_layers} layers "
                              f"(indices 0..{n_layers - 1}).")
        return
    s = str(spec)
    m = re.fullmatch(r"every_(\d+)(?:st|nd|rd|th)", s) or re.fullmatch(r"(first|influence)_(\d+)", s)
    if not m:
        hint = difflib.get_close_matches(s, ["every_2nd", "every_3rd", "every_4th"], n=1)
        extra = f" Did you mean `{hint[0]}`?" if hint else ""
        raise RecipeError(f"{where}: `{key}`: {spec!r} is not one of {formats}.{extra}")
    k = int(m.group(m.lastindex))
    if k < 1:
        raise RecipeError(f"{where}: `{key}`: {spec!r} keeps no layer; the number must be >= 1.")
    if n_layers is not None and not s.startswith("every_") and k > n_layers:
        raise RecipeError(f"{where}: `{key}: {spec}` keeps {k} layers, but {teacher} has {n_layers}; use at most "
                          f"`{s.split('_')[0]}_{n_layers}`.")


def check_distill_config(cfg: DistillConfig, where: str) -> None:
    """The distillation settings that must fit together (was `stages/distill.py::check_config`)."""
    if cfg.estimator == "sampled" and cfg.divergence != "reverse_kl":
        raise RecipeError(f"{where}: `distill.estimator: sampled` estimates the reverse KL from the student's "
                          f"sampled tokens; it cannot train `divergence: {cfg.divergence}`. Use `estimator: full`.")
    if bool(cfg.student.name_or_path) == (cfg.student.from_teacher is not None):
        raise RecipeError(f"{where}: `distill.student` needs exactly one of `name_or_path` (a model with the "
                          "teacher's tokenizer) or `from_teacher: {keep_layers: ...}`.")
    for key in ("beta", "beta_end"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise RecipeError(f"{where}: `distill.{key}` is a probability in [0, 1], got {getattr(cfg, key)}.")
    if cfg.generation_batch_size is not None and cfg.generation_batch_size < 1:
        raise RecipeError(f"{where}: `distill.generation_batch_size` is a number of rows per generate call (>= 1) "
                          f"or null, got {cfg.generation_batch_size}.")
    if cfg.heldout_batch_size is not None and cfg.heldout_batch_size < 1:
        raise RecipeError(f"{where}: `distill.heldout_batch_size` must be >= 1, got {cfg.heldout_batch_size}.")
    if cfg.warmup_iterations < 0:
        raise RecipeError(f"{where}: `distill.warmup_iterations` must be >= 0, got {cfg.warmup_iterations}.")
    if cfg.warmup_iterations and not cfg.warmup_data:
        raise RecipeError(f"{where}: `distill.warmup_iterations: {cfg.warmup_iterations}` needs `distill.warmup_data`"
                          " (prompt + completion rows, e.g. data/constraints/sft.jsonl).")
    if cfg.warmup_data and not cfg.warmup_iterations:
        raise RecipeError(f"{where}: `distill.warmup_data` is set but `distill.warmup_iterations` is 0; give the "
                          "number of warm-up batches (or drop `warmup_data`).")
    if cfg.warmup_iterations and cfg.estimator != "full":
        raise RecipeError(f"{where}: the warm-up on fixed demonstrations needs `distill.estimator: full` (the "
                          "sampled estimator weights tokens by the student's own sampling probabilities).")
    if cfg.topk_forward_kl_coef > 0 and cfg.estimator != "full":
        raise RecipeError(f"{where}: `distill.topk_forward_kl_coef: {cfg.topk_forward_kl_coef}` needs the teacher's "
                          "logits at every state, which only `distill.estimator: full` keeps; use the full estimator "
                          "or set the coefficient to 0.")
    for key, off in (("eos_weight", 1.0), ("student_temperature", None)):
        if getattr(cfg, key) != off and cfg.estimator != "full":
            raise RecipeError(f"{where}: `distill.{key}: {getattr(cfg, key)}` needs the teacher's logits at every "
                              "state, which only `distill.estimator: full` keeps; use the full estimator or drop it.")
    if cfg.student.from_teacher is not None:
        check_keep_layers(cfg.student.from_teacher.keep_layers, None, where)


_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def _device_of(model: ModelConfig, where: str):
    import torch

    if model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(model.device)
    except (RuntimeError, ValueError):
        raise RecipeError(f"{where}: `model.device` is {model.device!r}, not a device; use auto, cpu, cuda, cuda:N "
                          "or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{where}: `model.device: {model.device}` but this machine has no CUDA GPU that torch can "
                          "use; set `model.device: auto` (GPU when present, else CPU) or `cpu`.")
    return device


_FROZEN_DTYPES = ("auto", "float32", "bfloat16")


def check_frozen_dtype(model: ModelConfig, device, where: str) -> None:
    """`model.frozen_dtype` (the storage dtype of frozen models): one of _FROZEN_DTYPES (the recipe parser already
    refuses others; this also covers a ModelConfig built in code), and bfloat16 only where the device has it."""
    value = getattr(model, "frozen_dtype", "auto")
    if value not in _FROZEN_DTYPES:
        hint = difflib.get_close_matches(str(value), _FROZEN_DTYPES, n=1)
        extra = f" Did you mean `{hint[0]}`?" if hint else ""
        raise RecipeError(f"{where}: `model.frozen_dtype` is {value!r}, not allowed.{extra} Use auto (bfloat16 under "
                          "bf16 autocast or bf16 parameters, else the parameter dtype), float32 or bfloat16.")
    if value == "bfloat16" and device.type == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise RecipeError(f"{where}: `model.frozen_dtype: bfloat16` but this GPU has no bf16 support; use "
                              "`model.frozen_dtype: auto` (the parameter dtype there) or float32.")


def check_rules(recipe: Recipe, stages: list[str], where: str) -> None:
    if recipe.model.dtype not in _DTYPES:
        hint = difflib.get_close_matches(recipe.model.dtype, _DTYPES, n=1)
        extra = f" Did you mean `{hint[0]}`?" if hint else ""
        raise RecipeError(f"{where}: `model.dtype` is {recipe.model.dtype!r}, not a dtype.{extra} Use auto, float32, "
                          "bfloat16 or float16.")
    device = _device_of(recipe.model, where)
    check_frozen_dtype(recipe.model, device, where)
    if "sft" in stages:
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if recipe.sft.lr_scheduler not in names:
            hint = difflib.get_close_matches(recipe.sft.lr_scheduler, names, n=1)
            extra = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(f"{where}: `sft.lr_scheduler` is {recipe.sft.lr_scheduler!r}, not a transformers "
                              f"scheduler.{extra} Choices: {', '.join(names)}.")
    for section in ("ppo", "distill"):
        if section not in stages:
            continue
        cfg = getattr(recipe, section)
        check_onpolicy_batches(cfg, section, where)
        from .rollout_vllm import resolve_engine_name

        resolve_engine_name(cfg.rollout_engine, device, f"{section}.rollout_engine")
    if "ppo" in stages:
        cfg = recipe.ppo
        if cfg.advantage == "rloo" and cfg.samples_per_prompt < 2:
            raise RecipeError(
                f"{where}: `ppo.advantage: rloo` baselines each sample by the other samples of its prompt, so it needs "
                f"`ppo.samples_per_prompt` >= 2 (got {cfg.samples_per_prompt}); e.g. samples_per_prompt: 4, or "
                "`advantage: reinforce` (batch-mean baseline) for one sample per prompt.")
        if cfg.critic_warmup and cfg.advantage != "gae":
            raise RecipeError(
                f"{where}: `ppo.critic_warmup: {cfg.critic_warmup}` trains the critic before the policy moves, but "
                f"`ppo.advantage: {cfg.advantage}` has no critic; use `advantage: gae` or drop `critic_warmup`.")
    if "distill" in stages:
        check_distill_config(recipe.distill, where)
    if "eval" in stages:
        cfg = recipe.eval
        if not cfg.models:
            raise RecipeError(f"{where}: `eval.models` is empty; list the models to evaluate, e.g. [base, sft].")
        if not cfg.prompts and not cfg.ifeval:
            raise RecipeError(f"{where}: `eval.prompts` is empty; give held-out prompt files, e.g. "
                              "[eval/constraints/heldout.jsonl], or set `eval.ifeval: true`.")
        if cfg.baseline and not cfg.reward_from:
            raise RecipeError(f"{where}: `eval.baseline: {cfg.baseline}` sets the model win rates are measured "
                              "against, and win rates need reward-model scores: set `eval.reward_from` (e.g. `reward`) "
                              "or drop `eval.baseline`.")


# --------------------------------------------------------------------------------------------
# Model references
# --------------------------------------------------------------------------------------------

# Keys that name a model, per stage: (key, kind). kind `policy`: a causal LM (base, a policy stage, a
# path); `reward`: a reward model (the reward stage or a path).
MODEL_KEYS = {
    "sft": [("init_from", "policy")],
    "reward": [("init_from", "policy"), ("norm_policy", "policy")],
    "ppo": [("policy_from", "policy"), ("reward_from", "reward"), ("rewards", "reward")],
    "distill": [("teacher_from", "policy"), ("student.name_or_path", "policy")],
    "eval": [("models", "policy"), ("reference", "policy"), ("baseline", "policy"), ("reward_from", "reward")],
}
POLICY_STAGES = ("sft", "ppo", "distill")


def _model_refs(recipe: Recipe, stage: str) -> list[tuple[str, str, str]]:
    """(key path, value, kind) for each model a stage's section names."""
    section, out = getattr(recipe, stage), []
    for key, kind in MODEL_KEYS[stage]:
        if key == "rewards":
            for i, src in enumerate(section.rewards or []):
                if src.kind == "rm":
                    out.append((f"ppo.rewards[{i}].source", src.source, kind))
            continue
        if key == "reward_from" and stage == "ppo" and section.rewards:
            continue  # `rewards` replaces it
        value = section
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, list):
            out += [(f"{stage}.{key}[{i}]", v, kind) for i, v in enumerate(value)]
        elif value:
            out.append((f"{stage}.{key}", value, kind))
    return out


def _looks_local(ref: str) -> bool:
    """A name that can only mean a local path (models.resolve_model_path's rule, plus: its folder exists
    here, e.g. `runs/x/sft/final` or `data/model`)."""
    if ref.startswith((".", "/", "~", "runs")) or ref.count("/") > 1:
        return True
    parent = Path(ref).parent
    return str(parent) not in ("", ".") and parent.is_dir()


def check_model_path(ref: str, key: str, where: str) -> None:
    """A model that is not `base` or a stage name: the builtin, a local directory or .gguf file, or a hub id."""
    if ref in BUILTIN_MODELS:
        return
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{where}: `{key}`: GGUF file {ref} not found.")
        return
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"{where}: `{key}`: {ref} is not a model directory (no config.json). Give a directory "
                             "written by `save_pretrained`, a .gguf file, a hub id (org/name), "
                             f"{', '.join(f'`{b}`' for b in BUILTIN_MODELS)}, `base` or a stage name.")
        return
    if _looks_local(ref):
        raise ModelError(f"{where}: `{key}`: {ref} does not exist (relative paths are read from {Path.cwd()}). If it "
                         "is a stage's output, name the stage instead (e.g. `sft`) or run that stage first.")
    if "/" not in ref:
        known = list(BUILTIN_MODELS) + ["base"] + [s for s in STAGE_NAMES if s != "eval"]
        hint = difflib.get_close_matches(ref, known, n=1, cutoff=0.75)
        if hint:
            raise ModelError(f"{where}: `{key}`: {ref!r} is not a model, a stage or a local path. Did you mean "
                             f"`{hint[0]}`? Give `base`, a stage name, a local model directory, a .gguf file, a hub "
                             f"id (org/name) or {', '.join(f'`{b}`' for b in BUILTIN_MODELS)}.")
    # Otherwise a hub id: not checked here (no network).


def _stage_final(recipe: Recipe, ref: str) -> Path:
    if recipe.run.inputs_from and ref not in recipe.stages:
        return Path(recipe.run.inputs_from) / ref / "final"
    return recipe.stage_dir(ref) / "final"


def check_stage_ref(recipe: Recipe, stages: list[str], owner: str, key: str, ref: str, kind: str,
                    where: str) -> None:
    """A stage name used by `owner`'s `key`: a model of the right kind, made earlier in this recipe or
    existing already (this run's directory or `run.inputs_from`)."""
    if ref == "eval":
        raise RecipeError(f"{where}: `{key}: eval` names the eval stage, which makes no model; name `base`, "
                          f"{', '.join(POLICY_STAGES)}, `reward` or a path.")
    if kind == "reward" and ref != "reward":
        raise RecipeError(f"{where}: `{key}: {ref}` names a stage that makes a language model, not a reward "
                          "model; use `reward` (the reward stage) or the path of a reward model.")
    if kind == "policy" and ref == "reward":
        raise RecipeError(f"{where}: `{key}: reward` names the reward model, which scores text and cannot "
                          f"generate; use `base`, {', '.join(POLICY_STAGES)} or a model path.")
    if ref == owner:
        raise RecipeError(f"{where}: `{key}` names the stage itself ({ref}); name an earlier stage, `base` or a "
                          "model path.")
    order = recipe.stages
    final = _stage_final(recipe, ref)
    if ref in order:
        if owner in order and order.index(ref) > order.index(owner):
            raise RecipeError(f"{where}: `{key}: {ref}` names a stage that runs later; put `{ref}` before "
                              f"`{owner}` in `stages`.")
        if ref in stages:
            return  # made earlier in this invocation
        if not (final / "config.json").is_file():
            raise RecipeError(f"{where}: `{key}: {ref}` reads {final}, but this run skips `{ref}` (--stages "
                              f"{' '.join(stages)}) and {final} does not hold a model yet. Run `{ref}` first (add it "
                              "to --stages).")
        return
    if (final / "config.json").is_file():
        return
    if recipe.run.inputs_from:
        raise RecipeError(f"{where}: `{key}: {ref}`: `{ref}` is not a stage of this recipe, so it is read from "
                          f"`run.inputs_from` ({recipe.run.inputs_from}), but {final} does not hold a model. Run the "
                          f"recipe that makes it first, or point `run.inputs_from` at a run directory that has "
                          f"`{ref}/final`.")
    raise RecipeError(f"{where}: `{key}: {ref}`: `{ref}` is not a stage of this recipe and {final} does not exist. "
                      f"Add `{ref}` to `stages` before `{owner}`, set `run.inputs_from` to an earlier run directory "
                      f"that has `{ref}/final`, or give a model path.")


def check_references(recipe: Recipe, stages: list[str], where: str) -> list[str]:
    """Check `model.name_or_path` and every model the running stages name. Returns one line per model."""
    check_model_path(recipe.model.name_or_path, "model.name_or_path", where)
    lines = []
    for stage in stages:
        for key, ref, kind in _model_refs(recipe, stage):
            if ref == "base":
                if kind == "reward":
                    raise RecipeError(f"{where}: `{key}: base` names the base language model, not a reward model; "
                                      "use `reward` (the reward stage) or the path of a reward model.")
                continue
            if ref in STAGE_NAMES:
                check_stage_ref(recipe, stages, stage, key, ref, kind, where)
                lines.append(f"{key}: {ref} -> {recipe.resolve_model_ref(ref)}")
            else:
                check_model_path(ref, key, where)
    return lines


# --------------------------------------------------------------------------------------------
# Model depth without weights (for keep_layers)
# --------------------------------------------------------------------------------------------


def _config_depth(config: dict) -> Optional[int]:
    for cfg in (config, config.get("text_config") or {}):
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(k), int):
                return cfg[k]
    return None


def _gguf_depth(path: Path) -> Optional[int]:
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        arch_f = reader.fields["general.architecture"]
        arch = bytes(arch_f.parts[arch_f.data[0]]).decode()
        f = reader.fields[f"{arch}.block_count"]
        return int(f.parts[f.data[0]][0])
    except Exception:  # noqa: BLE001 - an unreadable header only means the depth is unknown here
        return None


def _builtin_gguf_path(name: str) -> Optional[Path]:
    import importlib.util

    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec["package"])  # no install here: preflight changes nothing
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / spec["gguf"]


def model_path_depth(ref: str) -> Optional[int]:
    """Decoder layers of a model given as the builtin name, a local directory or a .gguf file; None for a
    hub id or anything unreadable."""
    if ref in BUILTIN_MODELS:
        gguf_path = _builtin_gguf_path(ref)
        if gguf_path is None or not gguf_path.is_file():
            return None
        from .models import _gguf_cache_dir

        converted = _gguf_cache_dir(gguf_path) / "config.json"
        if converted.is_file():
            return model_path_depth(str(converted.parent))
        return _gguf_depth(gguf_path)
    p = Path(ref).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return _gguf_depth(p)
    if (p / "config.json").is_file():
        try:
            return _config_depth(json.loads((p / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None
    return None


# A stage that keeps its input's architecture: its output has the depth of the model it starts from.
_STAGE_INPUT = {"sft": lambda r: r.sft.init_from, "ppo": lambda r: r.ppo.policy_from}


def model_depth(recipe: Recipe, ref: str, seen: tuple = ()) -> tuple[Optional[int], str]:
    """(depth, where it was read) of a model reference: an existing stage output's config.json, else (for a
    stage of this recipe that has not run) the depth of the model the stage starts from (SFT and PPO keep
    the architecture)."""
    if ref == "base":
        return model_depth(recipe, recipe.model.name_or_path, seen + (ref,))
    if ref in STAGE_NAMES:
        final = _stage_final(recipe, ref)
        if (final / "config.json").is_file():
            return model_path_depth(str(final)), str(final)
        if ref in recipe.stages and ref in _STAGE_INPUT and ref not in seen and getattr(recipe, ref) is not None:
            depth, src = model_depth(recipe, _STAGE_INPUT[ref](recipe), seen + (ref,))
            return depth, f"{ref} (from {src})"
        return None, ref
    return model_path_depth(ref), ref


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


def check_output_dir(recipe: Recipe, force: bool, resume: bool, where: str) -> None:
    from .runner import is_run_dir

    out = recipe.output_dir
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{where}: `run.output_dir` {out} is a file, not a folder; set `run.output_dir` to a new "
                          "folder (e.g. runs/mine).")
    if out.is_dir() and not is_run_dir(out):
        others = sorted(p.name for p in out.iterdir())
        if others and not force:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise RecipeError(
                f"{where}: `run.output_dir` {out} is a folder with other files ({shown}) and no run in it (no "
                "recipe.resolved.yaml or run_info.json), so the run's files would be mixed into it. Set "
                "`run.output_dir` to a new or empty folder, or pass --force to write into this one anyway.")
    if resume and not is_run_dir(out):
        raise RecipeError(f"{where}: --resume: {out} holds no run to resume (no recipe.resolved.yaml). Drop --resume "
                          "to start a new run there, or set `run.output_dir` to the run you meant.")


# --------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------


def preflight(recipe: Recipe, stages: Optional[list[str]] = None, force: bool = False,
              resume: bool = False) -> list[str]:
    """Run every check; raise RecipeError / DataError / ModelError on the first problem. Returns lines
    describing what was checked (data files and their example counts, resolved models)."""
    from .hub import check_outputs
    from .runner import prepare_output_dir, validate_data

    where = recipe.source or "<recipe>"
    if not recipe.stages:
        raise RecipeError(f"{where}: `stages` is empty, so there is nothing to run; list the stages in order, e.g. "
                          "`stages: [sft, reward, ppo, eval]` (choices: " + ", ".join(STAGE_NAMES) + ").")
    stages = list(recipe.stages) if stages is None else list(stages)
    missing = [s for s in stages if s not in recipe.stages]
    if missing:
        raise RecipeError(f"{where}: --stages {' '.join(missing)}: not among the recipe's stages "
                          f"({', '.join(recipe.stages)}); add it to `stages` or pick from those.")
    check_ranges(recipe, "", where)
    check_rules(recipe, stages, where)
    lines = check_references(recipe, stages, where)
    if "distill" in stages and recipe.distill.student.from_teacher is not None:
        depth, src = model_depth(recipe, recipe.distill.teacher_from)
        check_keep_layers(recipe.distill.student.from_teacher.keep_layers, depth, where,
                          teacher=f"the teacher ({src})")
        if depth is not None:
            lines.append(f"distill.teacher_from: {recipe.distill.teacher_from}: {depth} layers ({src})")
    lines += check_outputs(recipe, stages)  # trackers installed, push_to_hub's repo id and token
    check_output_dir(recipe, force, resume, where)
    if not force:
        prepare_output_dir(recipe, force=False)  # a run of a different recipe or other data: refused, with a diff
    return validate_data(recipe, stages) + lines
