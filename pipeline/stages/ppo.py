"""Stage `ppo`: clipped PPO with GAE and a per-token KL penalty to the SFT policy (InstructGPT step 3),
as an algorithm of the one on-policy loop (`pipeline/loop.py`).

    pipeline run recipes/ppo.yaml            (or --stages ppo in any recipe)

What PPO supplies to the loop:
  collect: roll out the policy (each prompt `samples_per_prompt` times); recompute behaviour (or keep the
    sampler's, `logprobs_from: sampler`), reference and value estimates with the training forward; every
    `logprobs_gap_every` iterations log the sampler-minus-recompute log-prob gap; score the responses
    (normalised RM score, the verifier, or a weighted sum); per-token rewards r_t = -kl_coef * kl_t plus the
    score at the EOS token; advantages from GAE with the critic, REINFORCE (reward-to-go minus the batch mean)
    or RLOO;
  loss: the clipped surrogate, plus vf_coef x the clipped value loss of the critic;
  updaters: the policy and the critic each have their own optimizer, learning rate and gradient clip (as
    verl and OpenRLHF), so a fresh critic's large gradients never shrink the policy's step;
  warm-up: `critic_warmup` iterations train only the critic on fresh rollouts before the policy moves
    (verl's critic_warmup);
  end of iteration: the KL controller (fixed or adaptive).
Departures from the papers, each a recipe option: the critic is a value head on its own backbone initialised
from the reward model (InstructGPT) or from the policy, or a head on the policy's own hidden states
(`critic_from: shared`: one forward gives log-probs and values, and the value loss also trains the policy's
backbone); the KL may go into the loss (`kl_in: loss`, k3 as in
GRPO) instead of the reward.

With LoRA the SFT adapter was merged into `sft/final`, so the policy is that merged model plus a fresh adapter
and the reference is the same model with the adapter disabled, i.e. the SFT policy itself (disabling an
un-merged SFT adapter would give the pre-SFT base: docs/implementation_details.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import PPOConfig, Recipe
from ..distributed import accelerate_precision, gather_mean, shard, whiten_global
from ..loop import OnPolicyAlgorithm, Process, ddp_prepare, summarise, train
from ..models import Precision, save_final
from ..onpolicy import (
    Generation, PromptSampler, RolloutBatch, SamplingSettings, Throughput, Updater, adamw, check_prompt_lengths,
    concat_batches, engine_returns_logprobs, expand_prompts, in_micro_batches, logprobs_gap, logprobs_gap_due,
    pass_rate, policy_logprobs, recompute_logprobs, response_hidden, sample_rows, unwrap_for_generation,
)
from ..rl import (
    AdaptiveKLController, FixedKLController, chunked_token_logprobs, entropy_bonus, entropy_from_logits,
    explained_variance, gae, kl_loss, kl_penalty, masked_mean, masked_var, policy_loss, reinforce_advantages,
    rloo_token_advantages, token_level_rewards, value_loss
)
from ..rlmodels import PPOModels, critic_values, recompute_values
from ..rlmodels import build_ppo_models as build_models
from ..utils import MetricsLogger


# --------------------------------------------------------------------------------------------
# Collect: roll out, score, advantages
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def make_rollout(models: PPOModels, reward, examples: list, cfg: PPOConfig, kl_coef: float, precision: Precision,
                 timer: Throughput, accelerator=None, generation: Optional[Generation] = None,
                 measure_gap: bool = False) -> tuple[RolloutBatch, dict]:
    """`examples`: this process's prompts; `generation`: engine, chunks and seeds (default: HF `generate`
    on all rows at once, from the global RNG stream). Behaviour log-probs: recomputed with the training forward,
    or with `cfg.logprobs_from: sampler` the sampler's own (no recompute forward). `measure_gap`: also log the
    sampler-minus-recompute gap on the first `cfg.logprobs_gap_rows` rows (`ppo/logprobs_gap/*`)."""
    tok, ac = models.tokenizer, precision.autocast_ctx
    gen = generation or Generation()
    rows, group = expand_prompts(examples, cfg.samples_per_prompt)
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    from_sampler = cfg.logprobs_from == "sampler"
    # With `recompute`, the sampler's log-probs are recorded only for the gap, when the engine can give them.
    record = from_sampler or (measure_gap and cfg.logprobs_gap_rows > 0 and engine_returns_logprobs(gen.engine))
    with timer.time("generate"):
        batch = concat_batches([sample_rows(models.policy, tok, rows[s:e], settings, precision.device, gen, seed, ac(),
                                            with_logprobs=record)
                                for s, e, seed in gen.chunks(len(rows))], tok.pad_token_id)
    batch.group = group.to(batch.response_ids.device)
    mb = cfg.micro_batch_size
    gap = {}
    with timer.time("score"):
        chunk = cfg.logits_chunk_size
        if from_sampler:
            batch.logprobs = batch.sampler_logprobs  # one training forward less
        elif models.shared_critic:  # one policy forward gives both
            batch.logprobs, batch.values = recompute_logprobs_values(models, batch, cfg, ac())
        else:
            batch.logprobs = recompute_logprobs(models.policy, batch, cfg.temperature, mb, ac(), chunk_size=chunk)
        if measure_gap and record and cfg.logprobs_gap_rows > 0:
            n = min(cfg.logprobs_gap_rows, len(batch))
            if from_sampler:  # the recompute forward on n rows, for the log only
                recomputed = recompute_logprobs(models.policy, batch.index(torch.arange(n)), cfg.temperature, mb,
                                                ac(), chunk_size=chunk)
            else:
                recomputed = batch.logprobs[:n]
            gap = logprobs_gap(batch.sampler_logprobs[:n], recomputed, batch.response_mask[:n])
        with models.reference_ctx():
            batch.ref_logprobs = recompute_logprobs(models.ref_model, batch, cfg.temperature, mb, ac(), chunk_size=chunk)
        if models.critic is not None and batch.values is None:
            batch.values = recompute_values(models.critic, batch, mb, ac(), policy=models.policy)
        texts = tok.batch_decode([ids[m].tolist() for ids, m in zip(batch.response_ids, batch.response_mask)],
                                 skip_special_tokens=True)
        raw = reward.score(rows, texts).float().to(batch.response_ids.device)
        components = getattr(reward, "last_components", None) or {}
        scores = reward.normalized(raw) if cfg.normalize_reward and hasattr(reward, "normalized") else raw
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(batch.ended, scores, scores - cfg.missing_eos_penalty)
    stats = assign_advantages(batch, scores, cfg, kl_coef, accelerator)
    stats.update({"ppo/score": float(raw.mean()), "ppo/score_std": float(raw.std()) if len(raw) > 1 else 0.0,
                  "ppo/score_norm": float(scores.mean())})
    stats.update({f"ppo/score/{k}": float(v.float().mean()) for k, v in components.items()})
    stats.update({f"ppo/logprobs_gap/{k}": v for k, v in gap.items()})
    rate = pass_rate(rows, texts)
    if rate is not None:
        stats["ppo/pass_rate"] = rate
    return batch, {"stats": stats, "texts": texts}


def policy_logprobs_values(models: PPOModels, mb: RolloutBatch, cfg: PPOConfig, with_entropy: bool = False):
    """With a shared value head: (logprobs, entropy or None, values) of a micro-batch from one policy forward; the
    output layer runs in chunks of `cfg.logits_chunk_size` (0: all positions at once)."""
    hidden, head = response_hidden(models.policy, mb)
    logprobs, entropy = chunked_token_logprobs(hidden, head, mb.response_ids, cfg.temperature,
                                               cfg.logits_chunk_size, None, with_entropy)
    return logprobs, entropy, models.critic(hidden)


@torch.no_grad()
def recompute_logprobs_values(models: PPOModels, batch: RolloutBatch, cfg: PPOConfig, autocast=None):
    """Behaviour log-probs and values (B, T) each, in micro-batches, from one forward of the policy."""
    both = in_micro_batches(models.policy, batch, cfg.micro_batch_size, autocast,
                            lambda mb: torch.stack(policy_logprobs_values(models, mb, cfg)[::2], dim=-1))
    return both[..., 0], both[..., 1]


def assign_advantages(batch: RolloutBatch, scores: torch.Tensor, cfg: PPOConfig, kl_coef: float,
                      accelerator=None) -> dict:
    """What each token earns: the score at EOS minus the per-token KL penalty; then advantages (and returns
    for the critic). Fills batch.scores / rewards / advantages / returns; -> the rollout's stats, including
    the critic's diagnostics before the update (explained variance, value error, return and advantage
    moments before whitening)."""
    mask = batch.response_mask
    kl = kl_penalty(batch.logprobs, batch.ref_logprobs, kind=cfg.kl_estimator)
    batch.scores = scores
    batch.rewards = token_level_rewards(scores, kl, mask, kl_coef if cfg.kl_in == "reward" else 0.0)
    stats = {}
    if cfg.advantage == "gae":
        adv, batch.returns = gae(batch.rewards, batch.values, mask, cfg.gamma, cfg.gae_lambda)
        stats.update(value_diagnostics(batch.values, batch.returns, mask))
    elif cfg.advantage == "reinforce":
        # Reward-to-go minus its mean over the whole rollout batch (all processes).
        adv = reinforce_advantages(batch.rewards, mask, cfg.gamma, baseline="batch_mean",
                                   mean=lambda x, m: gather_mean(x, m, accelerator))
    else:
        adv = rloo_token_advantages(batch.rewards, mask, cfg.samples_per_prompt, cfg.gamma)
    stats["ppo/advantage_mean"] = float(masked_mean(adv, mask))
    stats["ppo/advantage_std"] = float(masked_var(adv, mask).sqrt())
    batch.advantages = whiten_global(adv, mask, accelerator) if cfg.whiten_advantages else adv
    k1 = kl_penalty(batch.logprobs, batch.ref_logprobs, "k1")
    stats.update({
        "ppo/kl": float(torch.where(mask, k1, 0.0).sum(-1).mean()),  # nats per response (k1, sampled)
        "ppo/kl_per_token": gather_mean(k1, mask, accelerator),
        "ppo/reward": float(batch.rewards.sum(-1).mean()),
        "ppo/response_length": float(mask.sum(-1).float().mean()),
        "ppo/eos_share": float(batch.ended.float().mean()),
    })
    return stats


def value_diagnostics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict:
    """The critic before this iteration's update: explained variance of the returns (near 0: the critic is
    noise), mean squared value error, and the returns' moments."""
    return {"ppo/explained_variance": float(explained_variance(values, returns, mask)),
            "ppo/value_error": float(masked_mean((values - returns) ** 2, mask)),
            "ppo/return_mean": float(masked_mean(returns, mask)),
            "ppo/return_std": float(masked_var(returns, mask).sqrt())}


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def make_loss_fn(models: PPOModels, cfg: PPOConfig, kl_ctl, precision: Precision, train_policy: bool = True):
    """Clipped surrogate (+ entropy bonus, + k3 KL with `kl_in: loss`) + vf_coef x clipped value loss.
    `train_policy=False` (critic warm-up): the value loss alone; the policy runs no forward."""

    def loss_fn(mb: RolloutBatch, n_tokens: float):
        mask, stats = mb.response_mask, {}
        loss = torch.zeros((), device=mask.device)
        values = None
        if train_policy:
            with precision.autocast_ctx():  # chunked: the entropy comes with the log-probs (no logits to reuse)
                if models.shared_critic:  # log-probs and values from the one forward
                    (logprobs, entropy, values), logits = policy_logprobs_values(models, mb, cfg, True), None
                else:
                    logprobs, entropy, logits = policy_logprobs(models.policy, mb, cfg.temperature,
                                                                cfg.ent_coef > 0 or bool(cfg.logits_chunk_size),
                                                                chunk_size=cfg.logits_chunk_size)
            loss, stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, cfg.clip_coef, n_tokens)
            stats["pg_loss"] = loss.detach() * n_tokens / max(mb.n_tokens, 1)  # per-token mean, as value_loss
            if entropy is None:
                with torch.no_grad():
                    entropy = entropy_from_logits(logits.detach(), cfg.temperature)
            elif cfg.ent_coef > 0:
                loss = loss - cfg.ent_coef * entropy_bonus(entropy, mask, n_tokens)
            stats["entropy"] = masked_mean(entropy.detach(), mask)
            if cfg.kl_in == "loss":
                loss = loss + kl_ctl.value * kl_loss(logprobs, mb.ref_logprobs, mask, "k3", n_tokens)
        if models.critic is not None:
            if values is None:  # an own-backbone critic, or the shared head's warm-up (the head alone learns)
                with precision.autocast_ctx():
                    values = critic_values(models.critic, mb, models.policy, backbone_grad=False)
            vf, vstats = value_loss(values, mb.values, mb.returns, mask, cfg.clip_coef_v, n_tokens)
            loss = loss + cfg.vf_coef * vf
            stats["value_loss"] = vf.detach() * n_tokens / max(mb.n_tokens, 1)
            stats["vf_clipfrac"] = vstats["vf_clipfrac"]
        return loss, stats

    return loss_fn


# --------------------------------------------------------------------------------------------
# PPO as an algorithm of the one loop
# --------------------------------------------------------------------------------------------


class PPO(OnPolicyAlgorithm):
    name = "ppo"

    def __init__(self, models: PPOModels, reward, prompts: list, cfg: PPOConfig, precision: Precision, seed: int = 0):
        self.models, self.reward, self.cfg, self.precision = models, reward, cfg, precision
        self.sampler = PromptSampler(prompts, seed)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.warmup_iterations = cfg.critic_warmup if models.critic is not None else 0
        self.proc = Process(None, 1, 0)

    def setup(self, proc: Process, seed: int) -> list[Updater]:
        self.proc, cfg, m = proc, self.cfg, self.models
        policy_params = [p for p in m.policy.parameters() if p.requires_grad]
        opt = adamw(policy_params, cfg.lr)
        if m.critic is None:
            ((m.policy, opt),) = ddp_prepare(proc, (m.policy, opt))
            return [Updater("policy", opt, policy_params, cfg.max_grad_norm)]
        critic_params = [p for p in m.critic.parameters() if p.requires_grad]
        if cfg.critic_optimizer == "shared":  # one optimizer and one clip over both (the ablation's baseline)
            opt = adamw([{"params": policy_params, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.critic_lr}],
                        cfg.lr)
            (m.policy, opt), (m.critic, _) = ddp_prepare(proc, (m.policy, opt), (m.critic, None))
            return [Updater("policy", opt, policy_params + critic_params, cfg.max_grad_norm)]
        critic_opt = adamw(critic_params, cfg.critic_lr)
        (m.policy, opt), (m.critic, critic_opt) = ddp_prepare(proc, (m.policy, opt), (m.critic, critic_opt))
        return [Updater("policy", opt, policy_params, cfg.max_grad_norm),
                Updater("critic", critic_opt, critic_params, cfg.critic_max_grad_norm or cfg.max_grad_norm,
                        metric="critic_grad_norm")]

    def trained_models(self) -> list:
        return [self.models.policy, self.models.critic]

    def checkpoint_models(self) -> dict:
        critic = self.models.critic
        return {"policy": unwrap_for_generation(self.models.policy),
                "critic": unwrap_for_generation(critic) if critic is not None else None}

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler.load_state_dict(state["sampler"])

    def collect(self, it, warmup, generation, timer):
        examples = shard(self.sampler.next(self.cfg.rollout_batch_size), self.proc.rank, self.proc.world)
        return make_rollout(self.models, self.reward, examples, self.cfg, self.kl_ctl.value, self.precision, timer,
                            self.proc.accelerator, generation, logprobs_gap_due(it, self.cfg.logprobs_gap_every))

    def loss_fn(self, warmup, batch):
        return make_loss_fn(self.models, self.cfg, self.kl_ctl, self.precision, train_policy=not warmup)

    def active_updaters(self, updaters, warmup):
        return [u for u in updaters if u.name == "critic"] if warmup else updaters

    def end_iteration(self, stats):
        stats["ppo/kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(stats["ppo/kl"], self.cfg.rollout_batch_size * self.cfg.samples_per_prompt)

    def postfix(self, stats, warmup):
        out = {"score": f"{stats['ppo/score']:.3f}", "kl": f"{stats['ppo/kl']:.3f}"}
        if "ppo/pass_rate" in stats:
            out["pass"] = f"{stats['ppo/pass_rate']:.2f}"
        if "ppo/explained_variance" in stats:
            out["ev"] = f"{stats['ppo/explained_variance']:.2f}"
        return out

    def sample_records(self, it, batch, info, n):
        return [{"iteration": it, "prompt": prompt_text(batch.prompts[i]), "response": info["texts"][i],
                 "score": float(batch.scores[i]), "ended": bool(batch.ended[i])} for i in range(min(n, len(batch)))]


def prompt_text(ex) -> str:
    return ex["prompt"][-1]["content"] if isinstance(ex, dict) else str(ex)


def train_ppo(models: PPOModels, reward, prompts: list, cfg: PPOConfig, precision: Precision, stage_dir: Path,
              seed: int = 0, accelerator=None, metrics: Optional[MetricsLogger] = None,
              progress: bool = True, resume: bool = True) -> list[dict]:
    """`cfg.critic_warmup` (with a critic) + `cfg.iterations` PPO iterations through the one loop. Returns the
    per-iteration metrics (also in metrics.jsonl); checkpoints and resume as `loop.train`."""
    return train(PPO(models, reward, prompts, cfg, precision, seed), stage_dir, seed, accelerator, metrics,
                 progress, resume)


def run(recipe: Recipe, stage_dir: Path) -> dict:
    from ..data import load_rows, prompt_examples
    from ..rewards import build_reward

    cfg: PPOConfig = recipe.ppo
    precision, accelerator = accelerate_precision(recipe.model)
    prompts = prompt_examples(load_rows(cfg.prompts), cfg.prompts)
    models = build_models(recipe, cfg, precision)
    check_prompt_lengths(models.tokenizer, prompts, cfg.prompts,
                         getattr(unwrap_for_generation(models.policy).config, "max_position_embeddings", None),
                         cfg.max_new_tokens)
    reward = build_reward(cfg.rewards, cfg.reward_from, recipe)
    history = train_ppo(models, reward, prompts, cfg, precision, stage_dir, seed=recipe.run.seed,
                        accelerator=accelerator)
    if accelerator.is_main_process:
        save_final(unwrap_for_generation(models.policy), models.tokenizer, stage_dir / "final")
    accelerator.wait_for_everyone()
    keys = ("ppo/score", "ppo/kl", "ppo/pass_rate", "ppo/response_length", "ppo/eos_share", "ppo/tokens_per_s",
            "ppo/explained_variance")
    return {"policy_from": recipe.resolve_model_ref(cfg.policy_from),
            **summarise(history, "ppo", keys, ("ppo/score", "ppo/kl", "ppo/pass_rate", "ppo/explained_variance"))}
