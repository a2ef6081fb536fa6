"""Stage `distill`: on-policy distillation, i.e. DAgger for tokens, as an algorithm of the one on-policy loop
(`pipeline/loop.py`). The long description, with the departures from DAgger, is docs/distillation.md.

    pipeline run recipes/distill.yaml            (or --stages distill in any recipe)

What distillation supplies to the loop:
  warm-up (`warmup_iterations`, `warmup_data`): fixed demonstrations whose every state the teacher labels,
    trained on with the full estimator and `warmup_divergence`; no sampling (GKD's supervised part); or, with
    `warmup_divergence: cross_entropy`, plain SFT on the demonstrations' tokens (no teacher forward);
  collect: beta_i from the schedule; a rollout of the mixture pi_i = beta_i * teacher + (1 - beta_i) * student,
    mixed per sequence (a seeded coin per row; `from_teacher` says which); the teacher's logits at every
    visited state (what each token earns);
  loss: `estimator: full`, the exact divergence over the vocabulary at each visited state (reverse_kl, mode
    seeking; forward_kl, mode covering; jsd), plus `topk_forward_kl_coef` x the forward KL over the teacher's
    top-k tokens and a tail bucket (`rl.losses.topk_forward_kl`); or `estimator: sampled`, the sampled-token
    reverse-KL estimate as a per-token reward with discount 0 in PPO's clipped loss (GKD; Thinking Machines'
    "On-Policy Distillation").
Then the student is saved to `final/`; `distill_eval.heldout_eval` compares it with its teacher on held-out prompts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import DistillConfig, Recipe, RecipeError
from ..distributed import accelerate_precision, shard
from ..loop import OnPolicyAlgorithm, Process, ddp_prepare, summarise, train
from ..models import Precision, cut_neighbours, decoder_layer_parameters, save_final
from ..onpolicy import (
    Generation, PromptSampler, RolloutBatch, SamplingSettings, Throughput, Updater, adamw, chunk_seed,
    concat_batches, demonstration_batch, expand_prompts, pass_rate, policy_logprobs, response_hidden, response_logits,
    sample_rows, unwrap_for_generation,
)
from ..preflight import check_distill_config as check_config
from ..preflight import range_of
from ..rlmodels import DistillModels
from ..rlmodels import build_distill_models as build_models
from ..rl import (
    distill_loss, divergence_fn, eos_state_weights, masked_sum, mixture_beta, mixture_coins, sampled_rewards,
    student_state_figures, logprobs_from_logits, masked_mean, policy_loss
)
from ..rl.chunked import chunked_divergences
from ..rl.kl import STATE_FIGURES, reverse_kl_with_figures, student_state_figures_stacked
from ..rl.losses import topk_forward_kl
from ..utils import MetricsLogger, atomic_write_json, log

Tensor = torch.Tensor


def beta_at(cfg: DistillConfig, i: int) -> float:
    """beta_i for mixture iteration i = 0, 1, ...: the probability that a sequence is sampled by the teacher."""
    return mixture_beta(cfg.beta_schedule, cfg.beta, cfg.beta_end, cfg.beta_decay, i, cfg.iterations)


def make_loss_fn(models: DistillModels, cfg: DistillConfig, precision: Precision,
                 recorder: Optional["StateStats"] = None):
    """The update's loss. With a `recorder` (full estimator), the student's exact KLs and entropy at each
    row's states are taken from this training forward (detached, at a row's first visit), so the rollout
    needs no separate no-grad student pass. Stats without the `distill/` prefix (the loop adds it)."""
    V = models.vocab_size
    # The top-k forward KL (`topk_forward_kl_coef` > 0) is added to the divergence at every state: coef * its sum
    # over counted tokens / n_tokens; logged as `topk_forward_kl` (its per-token mean, before the coefficient).
    topk = functools.partial(topk_forward_kl, k=cfg.topk_forward_kl_k) if cfg.topk_forward_kl_coef > 0 else None
    # `eos_weight` != 1: each state's terms weigh 1 + (eos_weight - 1) * p_teacher(EOS) (`rl.eos_state_weights`).
    eos_id = models.tokenizer.eos_token_id

    def state_weights(mb: RolloutBatch) -> Optional[Tensor]:
        if cfg.eos_weight == 1.0:
            return None
        return eos_state_weights(mb.teacher_logits[..., :V], eos_id, cfg.eos_weight, cfg.temperature)

    def weighted_sum(x: Tensor, w: Optional[Tensor], mb: RolloutBatch) -> Tensor:
        return masked_sum(x if w is None else x * w.to(x.dtype), mb.response_mask.bool())

    def with_topk(per_token: Tensor, term: Optional[Tensor], mb: RolloutBatch, n_tokens: float):
        w = state_weights(mb)
        loss = weighted_sum(per_token, w, mb) / n_tokens
        stats = {"divergence": masked_mean(per_token.detach(), mb.response_mask)}
        if term is not None:
            loss = loss + cfg.topk_forward_kl_coef * weighted_sum(term, w, mb) / n_tokens
            stats["topk_forward_kl"] = masked_mean(term.detach(), mb.response_mask)
        if w is not None:
            stats["eos_state_weight"] = masked_mean(w, mb.response_mask)
        return loss, stats

    def full_loss(mb: RolloutBatch, n_tokens: float):
        if cfg.logits_chunk_size:
            return chunked_full_loss(mb, n_tokens)
        with precision.autocast_ctx():
            logits = response_logits(models.student, mb)[..., :V]
        t_logits = mb.teacher_logits[..., :V]
        _, per_token = distill_loss(logits, t_logits, mb.response_mask, cfg.divergence,
                                    n_tokens, cfg.temperature, cfg.jsd_beta)
        term = topk(logits, t_logits, temperature=cfg.temperature) if topk is not None else None
        if recorder is not None:
            recorder.record(mb.rows, logits.detach(), t_logits)
        return with_topk(per_token, term, mb, n_tokens)

    def chunked_full_loss(mb: RolloutBatch, n_tokens: float):
        """The same loss from the student's hidden states, its logits made `logits_chunk_size` positions at a time
        (one pass over the chunks for the divergence and the top-k term)."""
        # The recorder's figures come from the same chunks of logits (no gradient), not a second output layer pass;
        # for the reverse KL at temperature 1 (their own), from the divergence's own log-softmaxes.
        record = recorder is not None and recorder.wants(mb.rows)
        shared = record and cfg.divergence == "reverse_kl" and cfg.temperature == 1.0
        main = reverse_kl_with_figures if shared else divergence_fn(cfg.divergence, cfg.jsd_beta)
        fns = [main] + ([topk] if topk is not None else []) + ([_state_figures] if record and not shared else [])
        with precision.autocast_ctx():
            hidden, head = response_hidden(models.student, mb)
            out = chunked_divergences(hidden, head, mb.teacher_logits, fns, None, cfg.temperature,
                                      cfg.logits_chunk_size, V)
        per_token, figures = (out[0], out[1]) if shared else (out[0], out[-1] if record else None)
        term = [out[2 if shared else 1]] if topk is not None else []
        if record:
            recorder.record_figures(mb.rows, dict(zip(STATE_FIGURES, figures.unbind(-1))))
        return with_topk(per_token, term[0] if term else None, mb, n_tokens)

    def sampled_loss(mb: RolloutBatch, n_tokens: float):
        with precision.autocast_ctx():
            logprobs, _, _ = policy_logprobs(models.student, mb, cfg.temperature, vocab_size=V,
                                             chunk_size=cfg.logits_chunk_size)
        # Clipped ratio pi_s / pi_behaviour: on teacher rows the behaviour is the teacher (the mixture).
        return policy_loss(logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_coef, n_tokens)

    return full_loss if cfg.estimator == "full" else sampled_loss


def _state_figures(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """`student_state_figures` (stacked, (1, n, 3)) as a `chunked_divergences` fn: at temperature 1 whatever the
    loss's, and with no gradient (a record of the states, not part of the loss)."""
    with torch.no_grad():
        return student_state_figures_stacked(s_logits.detach(), t_logits)


def make_cross_entropy_loss_fn(models: DistillModels, cfg: DistillConfig, precision: Precision):
    """`warmup_divergence: cross_entropy`: SFT on the demonstrations, -log p_student(token) at temperature 1 summed
    over counted tokens / n_tokens (hard labels: no teacher). Stat `cross_entropy`: the mean per token."""

    def ce_loss(mb: RolloutBatch, n_tokens: float):
        with precision.autocast_ctx():
            logprobs, _, _ = policy_logprobs(models.student, mb, 1.0, vocab_size=models.vocab_size,
                                             chunk_size=cfg.logits_chunk_size)
        mask = mb.response_mask.bool()
        return -masked_sum(logprobs, mask) / n_tokens, {"cross_entropy": masked_mean(-logprobs.detach(), mask)}

    return ce_loss


def check_student_options(cfg: DistillConfig, where: str) -> None:
    """The ranges (`preflight.RANGES`) of the student options for a config built in code; a recipe's are checked
    when it is read. How the options fit the estimator: `preflight.check_distill_config`, called beside this."""
    for key in ("eos_weight", "student_temperature"):
        value, rng = getattr(cfg, key), range_of(DistillConfig, key)
        if value is not None and value not in rng:
            raise RecipeError(f"{where}: `distill.{key}` must be {rng.describe()}, got {value!r}.")


def student_param_groups(models: DistillModels, cfg: DistillConfig) -> list[dict]:
    """The student's trainable parameters as AdamW param groups: all at `lr`, or, with
    `student.from_teacher.neighbour_lr_scale` != 1, the layers next to a removed block
    (`pipeline.models.cut_neighbours`) at lr * scale in a group of their own (`name: cut_neighbours`; the others
    `name: rest`)."""
    params = [p for p in models.student.parameters() if p.requires_grad]
    ft = cfg.student.from_teacher
    scale = ft.neighbour_lr_scale if ft is not None else 1.0
    if scale == 1.0:
        return [{"params": params, "lr": cfg.lr}]
    if models.kept_layers is None:
        raise ValueError("distill: student.from_teacher.neighbour_lr_scale needs the teacher layers the student "
                         "kept (DistillModels.kept_layers)")
    n_teacher = models.teacher.config.get_text_config().num_hidden_layers
    seams = cut_neighbours(models.kept_layers, n_teacher)
    near_ids = {id(p) for p in decoder_layer_parameters(models.student, seams)}
    near = [p for p in params if id(p) in near_ids]
    rest = [p for p in params if id(p) not in near_ids]
    log(f"distill: student layers {seams} (teacher layers {[models.kept_layers[i] for i in seams]}) sit next to a "
        f"removed block: lr {cfg.lr} x {scale}")
    groups = [{"params": rest, "lr": cfg.lr, "name": "rest"},
              {"params": near, "lr": cfg.lr * scale, "name": "cut_neighbours"}]
    return [g for g in groups if g["params"]]


# -- Collect: the mixture's rollouts and the teacher's labels --------------------------------------


@dataclass
class StateLabels:
    teacher_logits: Tensor  # (B, T, V)
    teacher_logprobs: Tensor  # (B, T) at the sampling temperature
    # The student's side; None when `label_states` ran without the student (the full estimator's rollouts).
    student_logprobs: Optional[Tensor] = None  # (B, T) at the sampling temperature
    reverse_kl: Optional[Tensor] = None  # (B, T) exact KL(student || teacher) at temperature 1
    forward_kl: Optional[Tensor] = None  # (B, T) exact KL(teacher || student) at temperature 1
    entropy: Optional[Tensor] = None  # (B, T) the student's entropy at temperature 1 (near 0: collapsed)


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

    def wants(self, rows: Tensor) -> bool:
        """Whether any of `rows` has no record yet."""
        return bool((~self.seen[rows]).any())

    @torch.no_grad()
    def record(self, rows: Tensor, s_logits: Tensor, t_logits: Tensor) -> None:
        new = ~self.seen[rows]
        if not new.any():
            return
        if not new.all():  # a later epoch's mix of seen rows: keep the new ones (a copy of their logits)
            s_logits, t_logits = s_logits[new], t_logits[new]
        self._store(rows[new], student_state_figures(s_logits, t_logits))

    @torch.no_grad()
    def record_figures(self, rows: Tensor, figures: dict[str, Tensor]) -> None:
        """`student_state_figures` already computed for every one of `rows` ((len(rows), T) each); the rows
        with no record yet keep theirs."""
        new = ~self.seen[rows]
        if new.any():
            self._store(rows[new], {k: v[new] for k, v in figures.items()})

    def _store(self, idx: Tensor, figures: dict[str, Tensor]) -> None:
        for k, v in figures.items():
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


@torch.no_grad()
def make_rollout(models: DistillModels, examples: list, cfg: DistillConfig, beta: float, precision: Precision,
                 timer: Throughput, generator: torch.Generator, generation: Optional[Generation] = None,
                 from_teacher: Optional[Tensor] = None, student_pass: bool = True) -> tuple[RolloutBatch, dict]:
    """Sample from the per-sequence mixture and label the visited states. -> (batch, {"stats", "texts",
    "row_reverse_kl"}). `from_teacher`: this process's coins (else drawn from `generator`). `student_pass=False`
    (full estimator only): no no-grad student forward, so no behaviour log-probs (the full loss needs none) and
    the student's KLs / entropy come from the update's forward (`StateStats`)."""
    if not student_pass and cfg.estimator != "full":
        raise ValueError("the sampled estimator needs the student's behaviour log-probs (student_pass=True)")
    tok, device, gen, parts = models.tokenizer, next(models.student.parameters()).device, generation or Generation(), []
    coins = (mixture_coins(len(examples), beta, generator) if from_teacher is None else from_teacher).tolist()
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    # The student's own rows at `student_temperature` when set (the loss keeps `temperature`).
    student_settings = (settings if cfg.student_temperature is None
                        else replace(settings, temperature=cfg.student_temperature))
    with timer.time("generate"):
        for start, end, seed in gen.chunks(len(examples)):
            for flag, model in ((True, models.teacher), (False, models.student)):
                rows = [ex for ex, f in zip(examples[start:end], coins[start:end]) if f == flag]
                if not rows:
                    continue
                seed_here = None if seed is None else chunk_seed(seed, flag)
                part = sample_rows(model, tok, rows, settings if flag else student_settings, device, gen,
                                   seed_here, precision.autocast_ctx(), models.vocab_size)
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
    stats = {"distill/beta": beta, "distill/teacher_share": float(batch.from_teacher.float().mean()),
             "distill/response_length": float(mask.sum(-1).float().mean()),
             "distill/eos_share": float(batch.ended.float().mean())}
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


@torch.no_grad()
def make_warmup_batch(models: DistillModels, rows: list, cfg: DistillConfig, precision: Precision,
                      timer: Throughput) -> tuple[RolloutBatch, dict]:
    """A warm-up batch: the teacher labels the states of fixed demonstrations (no sampling).
    -> (batch, {"stats", "texts"}) like `make_rollout` with the full estimator and no student pass."""
    tok, device = models.tokenizer, next(models.student.parameters()).device
    batch = demonstration_batch(tok, rows, cfg.max_new_tokens, device)
    if cfg.warmup_divergence != "cross_entropy":  # cross_entropy: the demonstrations' own tokens, no teacher forward
        with timer.time("label"):
            labels = label_states(models, batch, cfg.temperature, cfg.micro_batch_size, precision, student=False)
        batch.teacher_logprobs, batch.teacher_logits = labels.teacher_logprobs, labels.teacher_logits
    mask = batch.response_mask
    texts = tok.batch_decode([ids[m].tolist() for ids, m in zip(batch.response_ids, mask)], skip_special_tokens=True)
    stats = {"distill/warmup": 1.0, "distill/response_length": float(mask.sum(-1).float().mean()),
             "distill/eos_share": float(batch.ended.float().mean())}
    return batch, {"stats": stats, "texts": texts}


# -- Distillation as an algorithm of the one loop --------------------------------------------------


class Distill(OnPolicyAlgorithm):
    name = "distill"

    def __init__(self, models: DistillModels, prompts: list, cfg: DistillConfig, precision: Precision, seed: int = 0,
                 demonstrations: Optional[list] = None):
        check_config(cfg, "distill")
        check_student_options(cfg, "distill")
        if cfg.warmup_iterations and not demonstrations:
            raise ValueError("distill: warmup_iterations > 0 needs demonstrations to warm up on")
        self.models, self.cfg, self.precision = models, cfg, precision
        self.warmup_iterations = cfg.warmup_iterations
        self.warmup_ce = cfg.warmup_divergence == "cross_entropy"
        self.warmup_cfg = replace(cfg, divergence=cfg.divergence if self.warmup_ce else
                                  cfg.warmup_divergence or cfg.divergence)
        self.sampler = PromptSampler(prompts, seed)
        self.demo_sampler = PromptSampler(demonstrations, seed + 2) if cfg.warmup_iterations else None
        self.mixture = torch.Generator().manual_seed(seed + 1)  # the per-sequence teacher/student coins
        # Full estimator: the student's KLs / entropy come from the update's own forward (StateStats), not from
        # a separate no-grad student pass over the rollout (one student forward per iteration less).
        self.student_pass = cfg.estimator != "full"
        self.proc, self.beta, self.recorder = Process(None, 1, 0), None, None

    def setup(self, proc: Process, seed: int) -> list[Updater]:
        self.proc = proc
        groups = student_param_groups(self.models, self.cfg)
        params = [p for g in groups for p in g["params"]]
        opt = adamw(groups, self.cfg.lr)
        ((self.models.student, opt),) = ddp_prepare(proc, (self.models.student, opt))
        return [Updater("student", opt, params, self.cfg.max_grad_norm)]

    def trained_models(self) -> list:
        return [self.models.student]

    def checkpoint_models(self) -> dict:
        return {"student": unwrap_for_generation(self.models.student)}

    def generators(self) -> dict:
        return {"mixture": self.mixture}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(),
                "warmup_sampler": self.demo_sampler.state_dict() if self.demo_sampler else None}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.demo_sampler is not None and state.get("warmup_sampler"):
            self.demo_sampler.load_state_dict(state["warmup_sampler"])

    def collect(self, it, warmup, generation, timer):
        cfg, (rank, world) = self.cfg, (self.proc.rank, self.proc.world)
        if warmup:  # 0. the teacher labels the states of fixed demonstrations (no sampling)
            self.beta = None
            rows = shard(self.demo_sampler.next(cfg.rollout_batch_size), rank, world)
            return make_warmup_batch(self.models, rows, cfg, self.precision, timer)
        # 1-2. beta_i, then roll out the mixture; 3. the teacher labels every visited state.
        self.beta = beta_at(cfg, it - self.warmup_iterations - 1)
        k = cfg.samples_per_prompt
        coins = mixture_coins(cfg.rollout_batch_size * k, self.beta, self.mixture)  # the whole batch's, every process
        rows, _ = expand_prompts(shard(self.sampler.next(cfg.rollout_batch_size), rank, world), k)
        return make_rollout(self.models, rows, cfg, self.beta, self.precision, timer, self.mixture, generation,
                            shard(coins, rank, world), self.student_pass)

    def loss_fn(self, warmup, batch):
        if warmup and self.warmup_ce:  # hard labels: no teacher logits, so no KL figures to record
            self.recorder = None
            return make_cross_entropy_loss_fn(self.models, self.cfg, self.precision)
        self.recorder = None if (self.student_pass and not warmup) else StateStats(batch)
        return make_loss_fn(self.models, self.warmup_cfg if warmup else self.cfg, self.precision, self.recorder)

    def after_update(self, batch, info, warmup):
        if self.recorder is None:
            return {}
        r = self.recorder
        stats, info["row_reverse_kl"] = state_stats(batch, r.reverse_kl, r.forward_kl, r.entropy)
        if warmup:  # every row is a demonstration: its figures are not the student's own samples'
            stats = {k.replace("_teacher_rows", "_demonstrations"): v for k, v in stats.items()}
        return stats

    def postfix(self, stats, warmup):
        out = {"beta": "warm-up" if warmup else f"{self.beta:.2f}"}
        if "distill/reverse_kl" in stats:
            out["rkl"] = f"{stats['distill/reverse_kl']:.3f}"
        return out

    def sample_records(self, it, batch, info, n):
        out = []
        for i in range(min(n, len(batch))):
            ex, teacher = batch.prompts[i], bool(batch.from_teacher[i])
            source = "demonstration" if info["stats"].get("distill/warmup") else "teacher" if teacher else "student"
            out.append({"iteration": it, "prompt": ex["prompt"][-1]["content"] if isinstance(ex, dict) else str(ex),
                        "response": info["texts"][i], "from_teacher": teacher, "source": source,
                        "reverse_kl_per_token": info["row_reverse_kl"][i] if "row_reverse_kl" in info else None})
        return out


def train_distill(models: DistillModels, prompts: list, cfg: DistillConfig, precision: Precision, stage_dir: Path,
                  seed: int = 0, metrics: Optional[MetricsLogger] = None, progress: bool = True,
                  resume: bool = True, accelerator=None, demonstrations: Optional[list] = None) -> list[dict]:
    """`cfg.warmup_iterations` warm-up iterations on `demonstrations` ({"prompt", "completion"} rows), then
    `cfg.iterations` iterations on the mixture, through the one loop. Returns the per-iteration metrics (also in
    metrics.jsonl; warm-up rows have `distill/warmup: 1`)."""
    return train(Distill(models, prompts, cfg, precision, seed, demonstrations), stage_dir, seed, accelerator,
                 metrics, progress, resume)


# -- The stage -------------------------------------------------------------------------------------


def run(recipe: Recipe, stage_dir: Path) -> dict:
    from ..data import load_rows, prompt_examples, sft_examples
    from .distill_eval import heldout_eval, heldout_spec

    cfg: DistillConfig = recipe.distill
    stage_dir = Path(stage_dir)
    check_config(cfg, recipe.source or "<recipe>")
    check_student_options(cfg, recipe.source or "<recipe>")
    precision, accelerator = accelerate_precision(recipe.model)
    prompts = prompt_pool(cfg, recipe.source or "<recipe>")
    spec = heldout_spec(cfg) if cfg.heldout_eval else None
    heldout = prompt_examples(load_rows(spec), spec) if spec else None
    demos = sft_examples(load_rows(cfg.warmup_data), cfg.warmup_data) if cfg.warmup_iterations else None
    models = build_models(recipe, cfg, precision)
    history = train_distill(models, prompts, cfg, precision, stage_dir, seed=recipe.run.seed,
                            accelerator=accelerator, demonstrations=demos)
    if accelerator.is_main_process:
        save_final(unwrap_for_generation(models.student), models.tokenizer, stage_dir / "final")
    summary = summary_of(history, cfg, models, recipe)
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
    elif not cfg.heldout_eval:
        log("distill: distill.heldout_eval is false; no held-out comparison in this stage")
    elif not heldout:
        log("distill: no held-out prompts (distill.heldout_prompts, or eval/constraints/heldout.jsonl); skipping "
            "the held-out evaluation")
    accelerator.wait_for_everyone()  # the next stage starts when final/ and heldout.json are written
    return summary


def prompt_pool(cfg: DistillConfig, where: str) -> list:
    """The rollout prompts: `prompts` and then every file of `extra_prompts`, one pool (each row as likely as any
    other). Rows may carry no instructions (no or an empty `instruction_id_list`): `pass_rate` skips them."""
    from ..data import DataSpec, _spec_for, load_rows, prompt_examples

    pool = prompt_examples(load_rows(cfg.prompts), cfg.prompts)
    columns = {k: v for k, v in vars(cfg.columns).items() if v is not None} if cfg.columns is not None else {}
    for i, ref in enumerate(cfg.extra_prompts):
        # A recipe's data keys are DataSpecs (pipeline/data.py: DATA_KEYS); a plain path or DataSource is made one
        # here, with the stage's column mapping, so its errors name `distill.extra_prompts[i]`.
        spec = ref if isinstance(ref, DataSpec) else _spec_for(ref, "distill", f"extra_prompts[{i}]", columns, where)
        pool += prompt_examples(load_rows(spec), spec)
    return pool


def summary_of(history: list[dict], cfg: DistillConfig, models: DistillModels, recipe: Recipe) -> dict:
    rows = cfg.rollout_batch_size * cfg.samples_per_prompt
    student = unwrap_for_generation(models.student)
    keys = ("distill/loss", "distill/reverse_kl", "distill/forward_kl", "distill/topk_forward_kl", "distill/pass_rate",
            "distill/tokens_per_s")
    return {"teacher_from": recipe.resolve_model_ref(cfg.teacher_from),
            "student_layers": student.config.get_text_config().num_hidden_layers,
            "teacher_layers": models.teacher.config.get_text_config().num_hidden_layers,
            "student_kept_layers": models.kept_layers, "student_parameters": sum(p.numel() for p in student.parameters()),
            "rollout_tokens": int(sum(h["distill/response_length"] * rows for h in history if not h.get("distill/warmup"))),
            "warmup_tokens": int(sum(h["distill/response_length"] * rows for h in history if h.get("distill/warmup"))),
            **summarise(history, "distill", keys, keys)}
