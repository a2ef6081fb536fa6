"""Stage `distill`: on-policy distillation, i.e. DAgger for tokens, on the shared RL core.

    pipeline run recipes/distill.yaml            (or --stages distill in any recipe)

A small student learns from a teacher by acting: the student samples responses and the teacher labels
every state (prefix) the student visits with its whole next-token distribution (BACKGROUND: DAgger).
Optionally first (`warmup_iterations`, `warmup_data`): batches of fixed demonstrations (prompt + completion
rows, e.g. the SFT data) whose every state the teacher labels, trained on with the full estimator and
`warmup_divergence` (default `divergence`); no sampling, so such a batch costs the label and update passes
only, a fraction of a sampled one (the supervised part of GKD, Agarwal et al. 2024). A freshly cut
student is far from its teacher; this heals it cheaply before it learns on its own samples.
Then per iteration i (numbered as in `train_distill`, after the warm-up):
  1. beta_i from the schedule: constant `beta`; linear from `beta` to `beta_end` over the iterations;
     exponential `beta * beta_decay**i`;
  2. roll out the mixture pi_i = beta_i * teacher + (1 - beta_i) * student, mixed PER SEQUENCE: each
     response is sampled wholly by the teacher with probability beta_i (a seeded coin per row), else
     wholly by the student. `RolloutBatch.from_teacher` says which; beta = 0 is fully on-policy,
     beta = 1 is off-policy distillation on teacher samples;
  3. label: one teacher forward gives its logits at every visited state; the behaviour log-probs are
     the SAMPLER's (the teacher's on teacher rows), so the sampled estimator's ratio
     pi_student / pi_behaviour corrects for the mixture. The full estimator needs no behaviour log-probs:
     it runs no no-grad student forward here, and the logged student KLs / entropy come from the update's
     own forward (`StateStats`);
  4. update through `onpolicy.optimise` (the same minibatch / micro-batch / token-normalised loop as PPO):
     - `estimator: full`: the exact per-token divergence over the whole vocabulary at each visited
       state, summed over counted tokens / the minibatch's `n_tokens`. `divergence`: reverse_kl
       KL(student || teacher) (mode seeking, default), forward_kl KL(teacher || student) (mode covering;
       on teacher samples this is behavior cloning with soft labels), or jsd (generalized JSD, `jsd_beta`);
     - `estimator: sampled`: reverse KL estimated at the sampled token only, used as a per-token reward
       r_t = -(log pi_s(a_t) - log pi_t(a_t)) with discount 0 (advantage = r_t, no baseline) in the PPO
       clipped policy-gradient loss (`rl.policy_loss`), as in on-policy distillation (Agarwal et al. 2024
       "GKD"; Thinking Machines, "On-Policy Distillation", 2025).
At the end: greedy teacher and student answers on held-out prompts -> checker pass rates and distinct
4-grams; and the exact reverse / forward KL of the student to the teacher at every state of the student's
own samples (temperature 1, seeded: the per-token reverse KL of its sequence distribution), per token and
at each response position 1..T (do errors compound along the sequence?), in `heldout.json` and the
summary (the same at the states of the greedy answers as `*_greedy`). The student is saved to `final/`
(plain transformers loads it).

Departures from DAgger as written in BACKGROUND.md, each deliberate:
  - the mixture is per sequence, not per state: every row has one behaviour policy, so its log-probs are
    one model's and teacher rows are plain (soft-label) behavior-cloning data;
  - no aggregation D <- D u D_i: each batch is trained on for `epochs` passes and dropped (on-policy
    distillation; the student's current states matter most);
  - the divergence uses the sampling `temperature` for both distributions (as TRL's GKDTrainer); the
    logged and held-out KLs are at temperature 1.
The teacher and student must share a tokenizer (vocabulary and special tokens; checked before any model
is loaded). Logits are sliced to `len(tokenizer)`, so embeddings padded to different sizes still match
(PITFALLS), and sampling never picks a padding row. The student is any causal LM, or the teacher with a
subset of its decoder layers (`student.from_teacher.keep_layers`).

Under `accelerate launch --num_processes N` (as PPO): `rollout_batch_size` and `minibatch_size` are global;
each process rolls out its contiguous block of the prompts (the mixture coins are drawn for the whole
batch, so the same rows are teacher rows however many processes there are), the student is DDP-wrapped,
the loss is normalised by the minibatch's tokens on all processes, logged numbers are averaged over the
processes, and only the main process writes metrics, samples, checkpoints, `final/` and the held-out
evaluation.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    Interrupted,
    interrupt_signal,
    latest_checkpoint,
    load_checkpoint,
    rank_rng_states,
    save_checkpoint,
    truncate_jsonl,
)
from ..config import DistillConfig, Recipe, RecipeError
from ..models import (
    ModelError,
    Precision,
    load_causal_lm,
    load_tokenizer,
    peft_lora_config,
    resolve_model_path,
    save_final,
)
from ..onpolicy import (
    Generation,
    PromptSampler,
    RolloutBatch,
    SamplingSettings,
    Throughput,
    UpdateSettings,
    accelerate_precision,
    check_generation_batch_size,
    chunk_seed,
    concat_batches,
    encode_prompts,
    mean_across_processes,
    optimise,
    policy_logprobs,
    process_split,
    response_logits,
    sample_responses,
    sample_rows,
    shard,
    unwrap_for_generation,
)
from ..rollout_vllm import pad_responses, rollout_engine
from ..rl import (
    entropy_from_logits,
    forward_kl_full,
    generalized_jsd_full,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    policy_loss,
    reverse_kl_full,
)
from ..utils import MetricsLogger, atomic_write_json, log, read_jsonl

Tensor = torch.Tensor
DEFAULT_HELDOUT = "eval/constraints/heldout.jsonl"
CALIBRATION_PROMPTS = 32  # prompts whose tokens score the teacher's layers for keep_layers: influence_K


class TokenizerMismatchError(ModelError):
    """Teacher and student tokenize differently: token-level distillation would compare unrelated ids."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class DistillModels:
    student: Any  # trainable (a PeftModel with LoRA)
    teacher: Any  # frozen, eval mode
    tokenizer: Any  # shared by both (checked)
    vocab_size: int  # len(tokenizer): both models' logits are sliced to it
    kept_layers: Optional[list[int]] = None  # the teacher layers a student built from the teacher keeps


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student"):
    """Raise TokenizerMismatchError unless the vocabularies and the special-token ids are identical."""
    problems = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t, only_s = sorted(set(tv) - set(sv))[:3], sorted(set(sv) - set(tv))[:3]
        moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])[:3]
        problems.append(f"vocabularies differ ({len(tv)} vs {len(sv)} tokens; only in teacher: {only_t}, "
                        f"only in student: {only_s}, different ids: {moved})")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(teacher_tok, name), getattr(student_tok, name)
        if a != b:
            problems.append(f"{name} {a} (teacher) != {b} (student)")
    if problems:
        raise TokenizerMismatchError(
            f"distill: the teacher ({teacher_name}) and the student ({student_name}) must share a tokenizer: "
            + "; ".join(problems) + ". Token-level distillation compares next-token distributions id by id; "
            "pick a student of the same model family, or build it from the teacher with "
            "`student: {from_teacher: {keep_layers: every_2nd}}`.")


def keep_layer_indices(spec, n_layers: int, influence: Optional[list[float]] = None) -> list[int]:
    """`every_2nd` / `every_3rd` / `every_Nth` -> layers 0, N, 2N, ...; `first_K` -> 0..K-1; `influence_K`
    -> the K layers with the highest Block Influence (`influence`, one score per layer); or a list."""
    if isinstance(spec, list):
        idx = list(spec)
    elif m := re.fullmatch(r"every_(\d+)(?:st|nd|rd|th)", str(spec)):
        idx = list(range(0, n_layers, int(m.group(1))))
    elif m := re.fullmatch(r"first_(\d+)", str(spec)):
        idx = list(range(int(m.group(1))))
    elif m := re.fullmatch(r"influence_(\d+)", str(spec)):
        if influence is None:
            raise ValueError("keep_layers influence_K needs the layers' Block Influence scores")
        k = int(m.group(1))
        idx = sorted(sorted(range(n_layers), key=lambda i: -influence[i])[:k]) if k <= n_layers else list(range(k))
    else:
        raise RecipeError(f"distill.student.from_teacher.keep_layers: {spec!r} is not every_2nd, every_3rd, "
                          "every_Nth, first_K, influence_K or a list of layer indices.")
    if not idx or len(set(idx)) != len(idx) or idx != sorted(idx) or idx[0] < 0 or idx[-1] >= n_layers:
        raise RecipeError(f"distill.student.from_teacher.keep_layers: {spec!r} gives layers {idx}; need distinct "
                          f"increasing indices in 0..{n_layers - 1} (the teacher has {n_layers} layers).")
    return idx


@torch.no_grad()
def block_influence(model, input_ids: Tensor, attention_mask: Tensor) -> list[float]:
    """Block Influence of each decoder layer, 1 - cos(h_in, h_out) averaged over real tokens: how much the
    layer changes the residual stream (ShortGPT, Men et al. 2024, arXiv:2403.03853). Low = redundant."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   output_hidden_states=True, use_cache=False).hidden_states
    mask = attention_mask.bool()
    n = len(hidden) - 1
    # The last entry of hidden_states is after the final norm in most models, which raises the last layer's
    # score; ShortGPT uses the returned states as they are (and pruning schemes keep the last layer anyway).
    return [float((1 - torch.nn.functional.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1))[mask]
                  .mean()) for i in range(n)]


def _decoder_layers(model, n_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks (`model.layers` for Llama/Qwen, `transformer.h` for GPT-2)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            return name, mod
    raise ModelError(f"distill: cannot find the {n_layers} decoder layers of {type(model).__name__}; "
                     "give the student as `student.name_or_path` instead.")


def choose_layers(teacher, keep_layers, calibration: Optional[tuple[Tensor, Tensor]] = None) -> list[int]:
    """The teacher layers a `keep_layers` spec keeps (influence_K scores them on `calibration` first)."""
    influence = None
    if str(keep_layers).startswith("influence_"):
        if calibration is None:
            raise ValueError("keep_layers influence_K needs calibration inputs (input_ids, attention_mask)")
        influence = block_influence(teacher, *calibration)
    keep = keep_layer_indices(keep_layers, teacher.config.get_text_config().num_hidden_layers, influence)
    log(f"distill: the student keeps teacher layers {keep}" + (
        f" (Block Influence {[round(x, 3) for x in influence]})" if influence else ""))
    return keep


def student_from_teacher(teacher, keep_layers, calibration: Optional[tuple[Tensor, Tensor]] = None) -> Any:
    """A new model of the teacher's class with the teacher's embeddings, final norm, lm_head and the kept
    decoder layers. The config is rebuilt for the kept layers (num_hidden_layers and every per-layer
    list such as `layer_types`), so layer_idx / the KV cache are right and `save_pretrained` writes a
    config plain transformers loads. `influence_K` scores the layers on `calibration` (prompt tokens)."""
    from transformers import AutoModelForCausalLM

    n = teacher.config.get_text_config().num_hidden_layers
    keep = (keep_layer_indices(keep_layers, n) if isinstance(keep_layers, list)
            else choose_layers(teacher, keep_layers, calibration))
    config = copy.deepcopy(teacher.config)
    sub = config.get_text_config()
    for key, value in sub.to_dict().items():  # per-layer attributes, e.g. layer_types / no_rope_layers
        if isinstance(value, list) and len(value) == n and "layer" in key:
            setattr(sub, key, [value[i] for i in keep])
    sub.num_hidden_layers = len(keep)
    prefix, _ = _decoder_layers(teacher, n)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key, tensor in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{key[m.end():]}"] = tensor
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(state, strict=True)  # every kept weight lands in place, nothing is left random
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).device)


def build_models(recipe: Recipe, cfg: DistillConfig, precision: Precision) -> DistillModels:
    check_config(cfg, recipe.source or "<recipe>")
    teacher_path = resolve_model_path(recipe.resolve_model_ref(cfg.teacher_from))
    tok = load_tokenizer(teacher_path, recipe.model)
    student_path, kept_layers = None, None
    if cfg.student.name_or_path:
        student_path = resolve_model_path(recipe.resolve_model_ref(cfg.student.name_or_path))
        student_tok = load_tokenizer(student_path, recipe.model)
        check_same_tokenizer(tok, student_tok, teacher_path, student_path)  # before any model is loaded
        tok = student_tok
    teacher = load_causal_lm(teacher_path, recipe.model, precision, tok).requires_grad_(False)
    if student_path is not None:
        student = load_causal_lm(student_path, recipe.model, precision, tok)
    else:
        keep = cfg.student.from_teacher.keep_layers
        calibration = None
        if str(keep).startswith("influence_"):  # Block Influence measured on the first distillation prompts
            from ..data import load_rows, prompt_examples

            rows = prompt_examples(load_rows(cfg.prompts, max_rows=CALIBRATION_PROMPTS), cfg.prompts)
            calibration = encode_prompts(tok, rows, precision.device)
        kept_layers = choose_layers(teacher, keep, calibration)
        student = student_from_teacher(teacher, kept_layers)
    if cfg.lora is not None:
        from peft import get_peft_model

        student = get_peft_model(student, peft_lora_config(cfg.lora))
    # Dropout off in both models (PITFALLS); gradients still flow through the student.
    teacher.eval()
    student.eval()
    n_t = teacher.config.get_text_config().num_hidden_layers
    n_s = unwrap_for_generation(student).config.get_text_config().num_hidden_layers
    log(f"distill: teacher {teacher_path} ({n_t} layers) -> student "
        f"{student_path or f'from the teacher, keep_layers={cfg.student.from_teacher.keep_layers}'} ({n_s} layers)")
    return DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok),
                         kept_layers=kept_layers)


def check_config(cfg: DistillConfig, where: str) -> None:
    if cfg.estimator == "sampled" and cfg.divergence != "reverse_kl":
        raise RecipeError(f"{where}: `distill.estimator: sampled` estimates the reverse KL from the student's "
                          f"sampled tokens; it cannot train `divergence: {cfg.divergence}`. Use `estimator: full`.")
    if bool(cfg.student.name_or_path) == (cfg.student.from_teacher is not None):
        raise RecipeError(f"{where}: `distill.student` needs exactly one of `name_or_path` (a model with the "
                          "teacher's tokenizer) or `from_teacher: {keep_layers: ...}`.")
    for key in ("beta", "beta_end"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise RecipeError(f"{where}: `distill.{key}` is a probability in [0, 1], got {getattr(cfg, key)}.")
    check_generation_batch_size(cfg.generation_batch_size, "distill.generation_batch_size")
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


# --------------------------------------------------------------------------------------------
# The mixture and the losses
# --------------------------------------------------------------------------------------------


def beta_at(cfg: DistillConfig, i: int) -> float:
    """beta_i for iteration i = 0, 1, ...: the probability that a sequence is sampled by the teacher."""
    if cfg.beta_schedule == "linear":
        frac = i / max(cfg.iterations - 1, 1)
        return cfg.beta + (cfg.beta_end - cfg.beta) * frac
    if cfg.beta_schedule == "exponential":
        return cfg.beta * cfg.beta_decay ** i
    return cfg.beta


def divergence_fn(name: str, jsd_beta: float = 0.5):
    """(student_logits, teacher_logits, temperature) -> (B, T) per-token divergence over the vocabulary."""
    return {"reverse_kl": reverse_kl_full, "forward_kl": forward_kl_full,
            "jsd": functools.partial(generalized_jsd_full, beta=jsd_beta)}[name]


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, divergence: str, n_tokens: float,
                 temperature: float = 1.0, jsd_beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """Full-vocabulary estimator. (B, T, V) x2, mask (B, T) -> (sum of counted per-token divergences /
    n_tokens, the per-token divergence (B, T)). `n_tokens` counts the whole minibatch (optimise)."""
    per_token = divergence_fn(divergence, jsd_beta)(student_logits, teacher_logits.detach(), temperature=temperature)
    return masked_sum(per_token, mask.bool()) / n_tokens, per_token


def sampled_rewards(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """r_t = -(log pi_s(a_t) - log pi_t(a_t)): minus the k1 reverse-KL estimate at the sampled token (B, T).
    Zero on uncounted tokens."""
    r = -(student_logprobs - teacher_logprobs)
    return torch.where(mask.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))


def make_loss_fn(models: DistillModels, cfg: DistillConfig, precision: Precision,
                 recorder: Optional["StateStats"] = None):
    """The update's loss. With a `recorder` (full estimator), the student's exact KLs and entropy at each
    row's states are taken from this training forward (detached, at a row's first visit), so the rollout
    needs no separate no-grad student pass."""
    V = models.vocab_size

    def full_loss(mb: RolloutBatch, n_tokens: float):
        with precision.autocast_ctx():
            logits = response_logits(models.student, mb)[..., :V]
        loss, per_token = distill_loss(logits, mb.teacher_logits[..., :V], mb.response_mask, cfg.divergence,
                                       n_tokens, cfg.temperature, cfg.jsd_beta)
        if recorder is not None:
            recorder.record(mb.rows, logits.detach(), mb.teacher_logits[..., :V])
        return loss, {"distill/divergence": masked_mean(per_token.detach(), mb.response_mask)}

    def sampled_loss(mb: RolloutBatch, n_tokens: float):
        with precision.autocast_ctx():
            logprobs, _, _ = policy_logprobs(models.student, mb, cfg.temperature, vocab_size=V)
        # Clipped ratio pi_s / pi_behaviour: on teacher rows the behaviour is the teacher (the mixture).
        loss, stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_coef, n_tokens)
        return loss, {f"distill/{k}": v for k, v in stats.items()}

    return full_loss if cfg.estimator == "full" else sampled_loss


# --------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------


@dataclass
class StateLabels:
    teacher_logits: Tensor  # (B, T, V)
    teacher_logprobs: Tensor  # (B, T) at the sampling temperature
    # The student's side; None when `label_states` ran without the student (the full estimator's rollouts).
    student_logprobs: Optional[Tensor] = None  # (B, T) at the sampling temperature
    reverse_kl: Optional[Tensor] = None  # (B, T) exact KL(student || teacher) at temperature 1
    forward_kl: Optional[Tensor] = None  # (B, T) exact KL(teacher || student) at temperature 1
    entropy: Optional[Tensor] = None  # (B, T) the student's entropy at temperature 1 (near 0: collapsed)


def student_state_figures(s_logits: Tensor, t_logits: Tensor) -> dict[str, Tensor]:
    """Exact per-token reverse / forward KL to the teacher and the student's entropy, at temperature 1."""
    return {"reverse_kl": reverse_kl_full(s_logits, t_logits), "forward_kl": forward_kl_full(s_logits, t_logits),
            "entropy": entropy_from_logits(s_logits)}


@torch.no_grad()
def label_states(models: DistillModels, batch: RolloutBatch, temperature: float, micro_batch_size: int,
                 precision: Precision, student: bool = True) -> StateLabels:
    """Teacher (and, with `student`, student) forwards over every visited state (the training forward:
    left padding, position ids from the mask), in micro-batches."""
    V, parts = models.vocab_size, []
    s_model = unwrap_for_generation(models.student)  # not the DDP wrapper: no collectives in no-grad forwards
    for start in range(0, len(batch), micro_batch_size):
        mb = batch.index(torch.arange(start, min(start + micro_batch_size, len(batch))))
        with precision.autocast_ctx():
            t_logits = response_logits(models.teacher, mb)[..., :V]
            s_logits = response_logits(s_model, mb)[..., :V] if student else None
        part = StateLabels(teacher_logits=t_logits,
                           teacher_logprobs=logprobs_from_logits(t_logits, mb.response_ids, temperature))
        if student:
            part.student_logprobs = logprobs_from_logits(s_logits, mb.response_ids, temperature)
            for k, v in student_state_figures(s_logits, t_logits).items():
                setattr(part, k, v)
        parts.append(part)
    return StateLabels(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                         for f in StateLabels.__dataclass_fields__))


class StateStats:
    """The student's per-token reverse / forward KL and entropy at every state of a rollout batch, recorded
    by the full estimator's loss from its own training forward (`make_loss_fn(recorder=...)`): each row at
    its first visit, i.e. before any update in a single-minibatch epoch, after the earlier minibatches' steps
    otherwise. Replaces the no-grad student forward of `label_states`, the same figures for one forward less."""

    def __init__(self, batch: RolloutBatch):
        B, T = batch.response_ids.shape
        dev = batch.response_ids.device
        self.reverse_kl, self.forward_kl, self.entropy = (torch.zeros(B, T, device=dev) for _ in range(3))
        self.seen = torch.zeros(B, dtype=torch.bool, device=dev)

    @torch.no_grad()
    def record(self, rows: Tensor, s_logits: Tensor, t_logits: Tensor) -> None:
        new = ~self.seen[rows]
        if not new.any():
            return
        idx = rows[new]
        if not new.all():  # a later epoch's mix of seen rows: keep the new ones (a copy of their logits)
            s_logits, t_logits = s_logits[new], t_logits[new]
        for k, v in student_state_figures(s_logits, t_logits).items():
            getattr(self, k)[idx] = v.float()
        self.seen[idx] = True


def state_stats(batch: RolloutBatch, reverse_kl: Tensor, forward_kl: Tensor, entropy: Tensor
                ) -> tuple[dict[str, float], list[float]]:
    """-> (the logged per-token KLs / entropy, on the student's own rows and on the teacher's rows;
    each row's mean reverse KL per token)."""
    mask, teacher_rows = batch.response_mask, batch.from_teacher[:, None]
    stats = {}
    for suffix, rows in (("", ~teacher_rows), ("_teacher_rows", teacher_rows)):
        rows_mask = mask & rows
        if rows_mask.any():
            stats[f"distill/reverse_kl{suffix}"] = float(masked_mean(reverse_kl, rows_mask))
            stats[f"distill/forward_kl{suffix}"] = float(masked_mean(forward_kl, rows_mask))
            stats[f"distill/entropy{suffix}"] = float(masked_mean(entropy, rows_mask))
    row_kl = (torch.where(mask, reverse_kl, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    return stats, row_kl


def mixture_coins(n: int, beta: float, generator: torch.Generator) -> Tensor:
    """One seeded coin per sequence of the global batch: True = sampled wholly by the teacher."""
    return torch.rand(n, generator=generator) < beta


@torch.no_grad()
def make_rollout(models: DistillModels, examples: list, cfg: DistillConfig, beta: float, precision: Precision,
                 timer: Throughput, generator: torch.Generator, generation: Optional[Generation] = None,
                 from_teacher: Optional[Tensor] = None, student_pass: bool = True) -> tuple[RolloutBatch, dict]:
    """Sample from the per-sequence mixture and label the visited states. -> (batch, {"stats", "texts",
    "row_reverse_kl"}). `from_teacher`: this process's coins (drawn from `generator` for `examples` when
    omitted); `generation`: engine, chunks and seeds (default: HF `generate`, all rows at once, global RNG
    stream). `student_pass=False` (full estimator only): no no-grad student forward; the batch then has no
    behaviour log-probs (the full loss needs none) and the student's KLs / entropy are left to the update's
    forward (`StateStats`), so the stats lack them and "row_reverse_kl" is missing."""
    if not student_pass and cfg.estimator != "full":
        raise ValueError("the sampled estimator needs the student's behaviour log-probs (student_pass=True)")
    tok, device = models.tokenizer, next(models.student.parameters()).device
    gen = generation or Generation()
    coins = (mixture_coins(len(examples), beta, generator) if from_teacher is None else from_teacher).tolist()
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature)
    parts = []
    with timer.time("generate"):
        for start, end, seed in gen.chunks(len(examples)):
            for flag, model in ((True, models.teacher), (False, models.student)):
                rows = [ex for ex, f in zip(examples[start:end], coins[start:end]) if f == flag]
                if not rows:
                    continue
                part = sample_rows(model, tok, rows, settings, device, gen, None if seed is None else
                                   chunk_seed(seed, flag), precision.autocast_ctx(), models.vocab_size)
                part.from_teacher = torch.full((len(rows),), flag, dtype=torch.bool, device=device)
                parts.append(part)
    batch = concat_batches(parts, tok.pad_token_id)
    batch.rows = torch.arange(len(batch), device=device)
    with timer.time("label"):
        labels = label_states(models, batch, cfg.temperature, cfg.micro_batch_size, precision, student_pass)
    mask, teacher_rows = batch.response_mask, batch.from_teacher[:, None]
    # Behaviour log-probs are the sampler's: the teacher's on teacher rows, the student's on the others.
    if student_pass:
        batch.logprobs = torch.where(teacher_rows, labels.teacher_logprobs, labels.student_logprobs)
    batch.teacher_logprobs = labels.teacher_logprobs
    if cfg.estimator == "full":
        batch.teacher_logits = labels.teacher_logits
    else:
        # Discount 0: each token's advantage is its own reward (no reward-to-go, no baseline).
        batch.rewards = sampled_rewards(labels.student_logprobs, labels.teacher_logprobs, mask)
        batch.advantages = batch.rewards
    texts = tok.batch_decode([ids[m].tolist() for ids, m in zip(batch.response_ids, mask)], skip_special_tokens=True)
    stats = {
        "distill/beta": beta,
        "distill/teacher_share": float(batch.from_teacher.float().mean()),
        "distill/response_length": float(mask.sum(-1).float().mean()),
        "distill/eos_share": float(batch.ended.float().mean()),
    }
    info: dict[str, Any] = {"texts": texts}
    if student_pass:
        # Exact per-token KLs to the teacher (temperature 1), on the student's own samples and on the teacher's.
        kl_stats, info["row_reverse_kl"] = state_stats(batch, labels.reverse_kl, labels.forward_kl, labels.entropy)
        stats.update(kl_stats)
    if cfg.estimator == "sampled":
        stats["distill/reward"] = float(masked_mean(batch.rewards, mask))
    student_rows = [i for i, f in enumerate(batch.from_teacher.tolist()) if not f]
    rate = pass_rate([batch.prompts[i] for i in student_rows], [texts[i] for i in student_rows])
    if rate is not None:
        stats["distill/pass_rate"] = rate
    info["stats"] = stats
    return batch, info


def demonstration_batch(tokenizer, rows: list, max_new_tokens: int, device) -> RolloutBatch:
    """Fixed demonstrations ({"prompt", "completion"}) as the states of a batch: the prompt left-padded as
    for sampling, the completion's tokens (through the chat template's end-of-turn EOS, cut at
    `max_new_tokens`) as the response. `from_teacher` is True on every row (not the student's samples)."""
    from ..data import completion_token_ids

    q, qm = encode_prompts(tokenizer, rows, device)
    seqs = [completion_token_ids(tokenizer, ex["prompt"], ex["completion"])[:max_new_tokens] for ex in rows]
    r, rm, ended = pad_responses(seqs, tokenizer.eos_token_id, tokenizer.pad_token_id, device)
    batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm, logprobs=None, ended=ended,
                         prompts=list(rows))
    batch.from_teacher = torch.ones(len(rows), dtype=torch.bool, device=device)
    batch.rows = torch.arange(len(rows), device=device)
    return batch


@torch.no_grad()
def make_warmup_batch(models: DistillModels, rows: list, cfg: DistillConfig, precision: Precision,
                      timer: Throughput) -> tuple[RolloutBatch, dict]:
    """A warm-up batch: the teacher labels the states of fixed demonstrations (no sampling).
    -> (batch, {"stats", "texts"}) like `make_rollout` with the full estimator and no student pass."""
    tok, device = models.tokenizer, next(models.student.parameters()).device
    batch = demonstration_batch(tok, rows, cfg.max_new_tokens, device)
    with timer.time("label"):
        labels = label_states(models, batch, cfg.temperature, cfg.micro_batch_size, precision, student=False)
    batch.teacher_logprobs, batch.teacher_logits = labels.teacher_logprobs, labels.teacher_logits
    mask = batch.response_mask
    texts = tok.batch_decode([ids[m].tolist() for ids, m in zip(batch.response_ids, mask)], skip_special_tokens=True)
    stats = {"distill/warmup": 1.0, "distill/response_length": float(mask.sum(-1).float().mean()),
             "distill/eos_share": float(batch.ended.float().mean())}
    return batch, {"stats": stats, "texts": texts}


def pass_rate(rows: list, texts: list[str]) -> Optional[float]:
    """Share of responses that follow all their instructions (rows with checkers only; None if none)."""
    from ..checkers import check_record

    judged = [all(check_record(t, ex["instruction_id_list"], ex["kwargs"]))
              for ex, t in zip(rows, texts) if isinstance(ex, dict) and ex.get("instruction_id_list")]
    return sum(judged) / len(judged) if judged else None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_distill(models: DistillModels, prompts: list, cfg: DistillConfig, precision: Precision, stage_dir: Path,
                  seed: int = 0, metrics: Optional[MetricsLogger] = None, progress: bool = True,
                  resume: bool = True, accelerator=None, demonstrations: Optional[list] = None) -> list[dict]:
    """Run `cfg.warmup_iterations` warm-up iterations on `demonstrations` ({"prompt", "completion"} rows),
    then `cfg.iterations` distillation iterations on the mixture. Returns the per-iteration metrics (also in
    metrics.jsonl, averaged over the processes; warm-up rows have `distill/warmup: 1`). Checkpoints (student weights, optimizer, RNGs, prompt
    position) every `checkpoint_every` iterations and on SIGINT/SIGTERM; with `resume` continues from the
    newest. With an `accelerator` of several processes the student is DDP-wrapped (module docstring)."""
    check_config(cfg, "distill")
    W, total = cfg.warmup_iterations, cfg.warmup_iterations + cfg.iterations
    if W and not demonstrations:
        raise ValueError("distill: warmup_iterations > 0 needs demonstrations to warm up on")
    engine = rollout_engine(cfg.rollout_engine, precision.device, "distill.rollout_engine")
    stage_dir = Path(stage_dir)
    sampler = PromptSampler(prompts, seed)
    demo_sampler = PromptSampler(demonstrations, seed + 2) if W else None
    warmup_cfg = replace(cfg, divergence=cfg.warmup_divergence or cfg.divergence)
    params = [p for p in models.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-5, weight_decay=0.0)
    world, rank = process_split(accelerator, "distill", rollout_batch_size=cfg.rollout_batch_size,
                                minibatch_size=cfg.minibatch_size)
    if world > 1:
        models.student, optimizer = accelerator.prepare(models.student, optimizer)
        torch.manual_seed(seed + rank)  # different samples on each process (without generation_batch_size)
    is_main = rank == 0
    shuffle = torch.Generator().manual_seed(seed)
    mixture = torch.Generator().manual_seed(seed + 1)  # the per-sequence teacher/student coins
    update = UpdateSettings(cfg.epochs, cfg.minibatch_size // world, cfg.micro_batch_size, cfg.max_grad_norm)
    local_rows = cfg.rollout_batch_size // world
    # Full estimator: the student's KLs / entropy come from the update's own forward (StateStats), not from
    # a separate no-grad student pass over the rollout (one student forward per iteration less).
    student_pass = cfg.estimator != "full"
    ckpt_root = stage_dir / "checkpoints"
    ckpt_models = {"student": unwrap_for_generation(models.student)}
    generators = {"shuffle": shuffle, "mixture": mixture}
    start, nonfinite, history = 1, 0, []
    latest = latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        state = load_checkpoint(latest, ckpt_models, optimizer, generators, rank=rank)
        sampler.load_state_dict(state["sampler"])
        if demo_sampler is not None and state.get("warmup_sampler"):
            demo_sampler.load_state_dict(state["warmup_sampler"])
        start, nonfinite = state["iteration"] + 1, state["nonfinite"]
        if is_main:
            truncate_jsonl(stage_dir / "metrics.jsonl", state["iteration"])
            truncate_jsonl(stage_dir / "samples.jsonl", state["iteration"], key="iteration")
            history = [r for r in read_jsonl(stage_dir / "metrics.jsonl") if "distill/loss" in r]
        log(f"distill: resuming from {latest} (iteration {start} of {total})")
    elif is_main:
        for name in ("metrics.jsonl", "samples.jsonl"):  # rows of an earlier attempt without a checkpoint
            (stage_dir / name).unlink(missing_ok=True)
    metrics = metrics or (MetricsLogger(stage_dir) if is_main else None)
    bar = tqdm(range(start, total + 1), desc="distill", disable=not (progress and is_main),
               initial=start - 1, total=total)
    for it in bar:
        timer = Throughput()
        warmup = it <= W
        if warmup:
            # 0. warm-up: the teacher labels the states of fixed demonstrations (no sampling).
            beta = None
            batch, info = make_warmup_batch(models, shard(demo_sampler.next(cfg.rollout_batch_size), rank, world),
                                            cfg, precision, timer)
        else:
            # 1-2. beta_i, then roll out the mixture; 3. the teacher labels every visited state.
            beta = beta_at(cfg, it - W - 1)
            coins = mixture_coins(cfg.rollout_batch_size, beta, mixture)  # the whole batch's, on every process
            gen = Generation(engine, cfg.generation_batch_size,
                             chunk_seed(seed, it) if cfg.generation_batch_size else None, rank * local_rows)
            batch, info = make_rollout(models, shard(sampler.next(cfg.rollout_batch_size), rank, world), cfg, beta,
                                       precision, timer, mixture, gen, shard(coins, rank, world), student_pass)
        # 4. update the student on this batch through the shared loop.
        recorder = None if (student_pass and not warmup) else StateStats(batch)
        loss_fn = make_loss_fn(models, warmup_cfg if warmup else cfg, precision, recorder)
        with timer.time("train"):
            upd = optimise(batch, loss_fn, optimizer, params, update, shuffle, accelerator, models=(models.student,))
        if recorder is not None:
            kl_stats, info["row_reverse_kl"] = state_stats(batch, recorder.reverse_kl, recorder.forward_kl,
                                                           recorder.entropy)
            if warmup:  # every row is a demonstration: its figures are not the student's own samples'
                kl_stats = {k.replace("_teacher_rows", "_demonstrations"): v for k, v in kl_stats.items()}
            info["stats"].update(kl_stats)
        stats = dict(info["stats"])
        stats.update({k: v for k, v in upd.items() if k.startswith("distill/")})
        stats["distill/loss"] = upd.get("loss", float("nan"))
        stats["distill/grad_norm"] = upd.get("grad_norm", float("nan"))
        stats["distill/skipped_steps"] = upd["skipped_steps"]
        stats["distill/tokens_per_s"] = batch.n_tokens / max(sum(timer.parts.values()), 1e-9)
        for k, v in timer.parts.items():
            stats[f"distill/time_{k}_s"] = v
        if upd["optimizer_steps"] == 0 and upd["skipped_steps"] > 0:
            nonfinite += 1
            log(f"distill: iteration {it}: every update had a non-finite gradient; skipped ({nonfinite} in a row)")
            if nonfinite >= cfg.max_nonfinite_steps:
                raise FloatingPointError(f"distill: {nonfinite} iterations in a row with non-finite gradients; "
                                         "stopping. Lower distill.lr.")
        else:
            nonfinite = 0
        stats = mean_across_processes(stats, accelerator)
        if is_main:
            metrics.log(it, stats)
        history.append(stats)
        post = {"rkl": f"{stats['distill/reverse_kl']:.3f}"} if "distill/reverse_kl" in stats else {}
        bar.set_postfix(loss=f"{stats['distill/loss']:.3f}", beta="warm-up" if warmup else f"{beta:.2f}", **post)
        if is_main and cfg.log_samples_every and (it == 1 or it % cfg.log_samples_every == 0):
            log_samples(stage_dir, it, batch, info, n=3)
        signum = interrupt_signal()
        if (cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < total) or signum:
            path = ckpt_root / f"iter-{it:06d}"
            rngs = rank_rng_states(accelerator)  # every process's sampling RNG, gathered on all
            if is_main:
                path = save_checkpoint(ckpt_root, it, ckpt_models, optimizer,
                                       {"sampler": sampler.state_dict(), "nonfinite": nonfinite,
                                        "warmup_sampler": demo_sampler.state_dict() if demo_sampler else None},
                                       generators,
                                       rank_rngs=rngs)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if signum:
                raise Interrupted(signum, str(path))
    return history


def log_samples(stage_dir: Path, it: int, batch: RolloutBatch, info: dict, n: int = 3) -> None:
    with open(stage_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for i in range(min(n, len(batch))):
            ex = batch.prompts[i]
            prompt = ex["prompt"][-1]["content"] if isinstance(ex, dict) else str(ex)
            source = ("demonstration" if info["stats"].get("distill/warmup")
                      else "teacher" if bool(batch.from_teacher[i]) else "student")
            f.write(json.dumps({"iteration": it, "prompt": prompt, "response": info["texts"][i],
                                "from_teacher": bool(batch.from_teacher[i]), "source": source,
                                "reverse_kl_per_token": info["row_reverse_kl"][i]}) + "\n")


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------


def distinct_ngrams(texts: list[str], n: int = 4) -> Optional[float]:
    """Mean over texts of (distinct word n-grams / n-grams): 1.0 for text that never repeats itself,
    near 0 for degenerate loops ("a. a. a. ..."). Texts shorter than n words are skipped."""
    ratios = []
    for t in texts:
        words = t.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return sum(ratios) / len(ratios) if ratios else None


@torch.no_grad()
def heldout_eval(models: DistillModels, examples: list, cfg: DistillConfig, precision: Precision,
                 progress: bool = False, seed: int = 0) -> dict:
    """Held-out figures of teacher and student.

    Pass rates, lengths, EOS share and distinct 4-grams: greedy answers (as the eval stage decodes).
    KL: the per-token reverse KL(student || teacher) is E_{y ~ student} of the exact KL at each visited
    state, so it is measured on the student's own *samples* (temperature 1, seeded; `reverse_kl_per_token`,
    `forward_kl_per_token`, and by position t = 1, 2, ... as the mean over the prompts whose answer reaches
    t). The same exact KLs at the states of the greedy answers are reported too (`*_greedy`): a greedy
    loop that the teacher would also repeat scores a low KL there, so they flatter degenerate students."""
    tok, V = models.tokenizer, models.vocab_size
    device = next(models.student.parameters()).device
    bs = cfg.heldout_batch_size or cfg.rollout_batch_size
    out: dict[str, Any] = {"prompts": len(examples), "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
                           "kl_states": "student samples at temperature 1"}
    T = cfg.max_new_tokens
    acc = {mode: ({k: torch.zeros(T, dtype=torch.float64) for k in ("reverse_kl", "forward_kl")},
                  torch.zeros(T, dtype=torch.float64)) for mode in ("sampled", "greedy")}

    def add_kl(mode: str, q: Tensor, qm: Tensor, r: Tensor, rm: Tensor, e: Tensor) -> None:
        batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm, logprobs=None, ended=e)
        labels = label_states(models, batch, 1.0, cfg.micro_batch_size, precision)
        sums, counts = acc[mode]
        for k in sums:
            per_pos = torch.where(rm, getattr(labels, k), 0.0).double().sum(0)
            sums[k][:per_pos.shape[0]] += per_pos
        counts[:rm.shape[1]] += rm.double().sum(0)

    samples = []
    for name, model in (("teacher", models.teacher), ("student", models.student)):
        texts, lengths, ended = [], [], []
        for start in tqdm(range(0, len(examples), bs), desc=f"held-out {name}", disable=not progress):
            rows = examples[start:start + bs]
            q, qm = encode_prompts(tok, rows, device)
            r, rm, e = sample_responses(model, tok, q, qm, SamplingSettings(T), precision.autocast_ctx(),
                                        greedy=True, vocab_size=V)
            texts += tok.batch_decode([ids[m].tolist() for ids, m in zip(r, rm)], skip_special_tokens=True)
            lengths += rm.sum(-1).tolist()
            ended += e.tolist()
            if name == "student":
                add_kl("greedy", q, qm, r, rm, e)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed * 100_003 + start)
                    rs, rms, es = sample_responses(model, tok, q, qm, SamplingSettings(T, temperature=1.0),
                                                   precision.autocast_ctx(), greedy=False, vocab_size=V)
                add_kl("sampled", q, qm, rs, rms, es)
        out[name] = {"pass_rate": pass_rate(examples, texts), "response_length": sum(lengths) / len(lengths),
                     "eos_share": sum(ended) / len(ended), "distinct_4grams": distinct_ngrams(texts, 4)}
        for i, t in enumerate(texts[:5]):
            if name == "teacher":
                samples.append({"prompt": examples[i]["prompt"][-1]["content"], "teacher": t})
            else:
                samples[i]["student"] = t
    for mode, suffix in (("sampled", ""), ("greedy", "_greedy")):
        sums, counts = acc[mode]
        n = max(float(counts.sum()), 1.0)
        out[f"reverse_kl_per_token{suffix}"] = float(sums["reverse_kl"].sum()) / n
        out[f"forward_kl_per_token{suffix}"] = float(sums["forward_kl"].sum()) / n
        reached = int((counts > 0).sum())
        out[f"reverse_kl_by_position{suffix}"] = (sums["reverse_kl"][:reached] / counts[:reached]).tolist()
        out[f"prompts_by_position{suffix}"] = [int(c) for c in counts[:reached].tolist()]
    t_rate, s_rate = out["teacher"]["pass_rate"], out["student"]["pass_rate"]
    if t_rate is not None and s_rate is not None and t_rate > 0:
        out["pass_rate_ratio"] = s_rate / t_rate
    out["samples"] = samples
    return out


def heldout_spec(cfg: DistillConfig) -> Optional[str]:
    if cfg.heldout_prompts:
        return cfg.heldout_prompts
    return DEFAULT_HELDOUT if Path(DEFAULT_HELDOUT).exists() else None


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run(recipe: Recipe, stage_dir: Path) -> dict:
    from ..data import load_rows, prompt_examples, sft_examples

    cfg: DistillConfig = recipe.distill
    stage_dir = Path(stage_dir)
    check_config(cfg, recipe.source or "<recipe>")
    precision, accelerator = accelerate_precision(recipe.model)
    prompts = prompt_examples(load_rows(cfg.prompts), cfg.prompts)
    spec = heldout_spec(cfg)
    heldout = prompt_examples(load_rows(spec), spec) if spec else None
    demos = sft_examples(load_rows(cfg.warmup_data), cfg.warmup_data) if cfg.warmup_iterations else None
    models = build_models(recipe, cfg, precision)
    history = train_distill(models, prompts, cfg, precision, stage_dir, seed=recipe.run.seed,
                            accelerator=accelerator, demonstrations=demos)
    if accelerator.is_main_process:
        save_final(unwrap_for_generation(models.student), models.tokenizer, stage_dir / "final")
    warm = [h for h in history if h.get("distill/warmup")]
    history = [h for h in history if not h.get("distill/warmup")]
    first, last, tail = history[0], history[-1], history[-5:]
    summary: dict[str, Any] = {
        "iterations": len(history), "teacher_from": recipe.resolve_model_ref(cfg.teacher_from),
        "student_layers": unwrap_for_generation(models.student).config.get_text_config().num_hidden_layers,
        "teacher_layers": models.teacher.config.get_text_config().num_hidden_layers,
        "student_kept_layers": models.kept_layers,
        "rollout_tokens": int(sum(h["distill/response_length"] * cfg.rollout_batch_size for h in history)),
    }
    for k in ("distill/loss", "distill/reverse_kl", "distill/forward_kl", "distill/pass_rate", "distill/tokens_per_s"):
        if k in first and k in last:
            summary[f"{k}_first"], summary[f"{k}_last"] = first[k], last[k]
            vals = [h[k] for h in tail if k in h]
            summary[f"{k}_last5_mean"] = sum(vals) / len(vals)
    if warm:
        summary["warmup_iterations"] = len(warm)
        summary["warmup_tokens"] = int(sum(h["distill/response_length"] * cfg.rollout_batch_size for h in warm))
        summary["distill/warmup_loss_first"], summary["distill/warmup_loss_last"] = (warm[0]["distill/loss"],
                                                                                   warm[-1]["distill/loss"])
    if heldout and accelerator.is_main_process:  # the other processes' summaries are not written
        log(f"distill: held-out evaluation on {len(heldout)} prompts from {spec}")
        result = heldout_eval(models, heldout, cfg, precision, progress=True, seed=recipe.run.seed)
        result["prompts_file"] = spec
        atomic_write_json(stage_dir / "heldout.json", result)
        summary.update({
            "heldout_teacher_pass_rate": result["teacher"]["pass_rate"],
            "heldout_student_pass_rate": result["student"]["pass_rate"],
            "heldout_pass_rate_ratio": result.get("pass_rate_ratio"),
            "heldout_reverse_kl": result["reverse_kl_per_token"],
            "heldout_reverse_kl_greedy": result["reverse_kl_per_token_greedy"],
            "heldout_forward_kl": result["forward_kl_per_token"],
            "heldout_reverse_kl_by_position": result["reverse_kl_by_position"],
        })
    elif not heldout:
        log("distill: no held-out prompts (distill.heldout_prompts, or eval/constraints/heldout.jsonl); skipping "
            "the held-out evaluation")
    accelerator.wait_for_everyone()  # the next stage starts when final/ and heldout.json are written
    return summary
