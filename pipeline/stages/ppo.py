"""Stage `ppo`: clipped PPO with GAE and a per-token KL penalty to the SFT policy (InstructGPT step 3).

    pipeline run recipes/ppo.yaml            (or --stages ppo in any recipe)

Per iteration (numbered as in `iteration` below):
  1. sample prompts; 2. roll out the policy (KV cache, left padding, stop at EOS);
  3. recompute behaviour, reference and value estimates with the training forward;
  4. score responses with the reward (normalised RM score, or the verifier, or a weighted sum);
  5. per-token rewards r_t = -kl_coef * kl_t, plus the score at the EOS token (k1 by default);
  6. advantages: GAE with the critic, REINFORCE (reward-to-go minus batch mean) or RLOO;
  7. several epochs of clipped-surrogate updates on shuffled minibatches; 8. update the KL coefficient.
Departures from the papers, each a recipe option: the critic is a value head on its own backbone
initialised from the reward model (InstructGPT) or from the policy; the KL may go into the loss
(`kl_in: loss`, k3 as in GRPO) instead of the reward.

With LoRA the SFT adapter was merged into `sft/final`, so the policy is that merged model plus a fresh
adapter and the reference is the same model with the adapter disabled, i.e. the SFT policy itself
(PITFALLS: disabling an un-merged SFT adapter would give the pre-SFT base).
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..config import PPOConfig, Recipe
from ..models import Precision, load_policy, peft_lora_config, resolve_model_path, save_final
from ..onpolicy import (
    Generation,
    accelerate_precision,
    PromptSampler,
    RolloutBatch,
    ValueModel,
    SamplingSettings,
    Throughput,
    UpdateSettings,
    check_generation_batch_size,
    check_prompt_lengths,
    chunk_seed,
    concat_batches,
    critic_values,
    gather_mean,
    mean_across_processes,
    optimise,
    policy_logprobs,
    process_split,
    recompute_logprobs,
    recompute_values,
    sample_rows,
    shard,
    unwrap_for_generation,
    whiten_global,
)
from ..rl import (
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
    reinforce_advantages,
    rloo_token_advantages,
    token_level_rewards,
    value_loss,
)
from ..checkpoint import (
    Interrupted,
    interrupt_signal,
    latest_checkpoint,
    load_checkpoint,
    rank_rng_states,
    save_checkpoint,
    truncate_jsonl,
)
from ..rollout_vllm import rollout_engine
from ..utils import MetricsLogger, log, read_jsonl


@dataclass
class PPOModels:
    policy: Any  # trainable (a PeftModel with LoRA)
    tokenizer: Any
    reference: Optional[Any]  # None with LoRA: the policy with its adapter disabled
    critic: Optional[Any]  # ValueModel over a sequence-classification model; None without GAE

    def reference_ctx(self):
        """Context in which `self.ref_model` computes reference log-probs."""
        if self.reference is None:
            return unwrap_for_generation(self.policy).disable_adapter()
        return contextlib.nullcontext()

    @property
    def ref_model(self):
        return self.policy if self.reference is None else self.reference


# --------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------


def load_critic(path: str, recipe: Recipe, precision: Precision, tokenizer, lora) -> Any:
    """A scalar head on its own backbone: from the reward model (its head already scores responses)
    or from the policy (a fresh head initialised to zero)."""
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(path), num_labels=1, dtype=precision.dtype,
        trust_remote_code=recipe.model.trust_remote_code)
    critic.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(critic, "score", None)
    if head is not None and not (Path(resolve_model_path(path)) / "reward_norm.json").exists() \
            and critic.config.architectures and "ForCausalLM" in critic.config.architectures[0]:
        torch.nn.init.zeros_(head.weight)
    if lora is not None:
        from peft import get_peft_model

        pcfg = peft_lora_config(lora, task_type="SEQ_CLS")
        critic = get_peft_model(critic, pcfg)
    return ValueModel(critic.to(precision.device))


def build_models(recipe: Recipe, cfg: PPOConfig, precision: Precision) -> PPOModels:
    policy, tok = load_policy(recipe.resolve_model_ref(cfg.policy_from), recipe.model, precision)
    reference = None
    if cfg.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_lora_config(cfg.lora))
    else:
        reference = copy.deepcopy(policy).requires_grad_(False)
    critic = None
    if cfg.advantage == "gae":
        src = cfg.reward_from if cfg.critic_from == "reward" and not cfg.rewards else cfg.policy_from
        if cfg.critic_from == "reward" and cfg.rewards:
            rm = [r for r in cfg.rewards if r.kind == "rm"]
            src = rm[0].source if rm else cfg.policy_from
            if not rm:
                log(f"ppo: critic_from: reward, but no reward model among `ppo.rewards`; the critic starts from the "
                    f"policy ({cfg.policy_from}) with a zero value head")
        critic = load_critic(recipe.resolve_model_ref(src), recipe, precision, tok, cfg.lora)
    # Dropout off everywhere during RL (PITFALLS): the models stay in eval mode, gradients still flow.
    for m in (policy, reference, critic):
        if m is not None:
            m.eval()
    return PPOModels(policy=policy, tokenizer=tok, reference=reference, critic=critic)


# --------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------


def expand_prompts(examples: list, k: int) -> tuple[list, torch.Tensor]:
    """Each prompt k times, contiguous (RLOO's leave-one-out groups)."""
    rows = [ex for ex in examples for _ in range(k)]
    group = torch.arange(len(examples)).repeat_interleave(k)
    return rows, group


@torch.no_grad()
def make_rollout(models: PPOModels, reward, examples: list, cfg: PPOConfig, kl_coef: float, precision: Precision,
                 timer: Throughput, accelerator=None,
                 generation: Optional[Generation] = None) -> tuple[RolloutBatch, dict]:
    """`examples`: this process's prompts; `generation`: engine, chunks and seeds (default: HF `generate`
    on all rows at once, from the global RNG stream)."""
    tok, ac = models.tokenizer, precision.autocast_ctx
    gen = generation or Generation()
    rows, group = expand_prompts(examples, cfg.samples_per_prompt)
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    with timer.time("generate"):
        batch = concat_batches([sample_rows(models.policy, tok, rows[s:e], settings, precision.device, gen, seed, ac())
                                for s, e, seed in gen.chunks(len(rows))], tok.pad_token_id)
    batch.group = group.to(batch.response_ids.device)
    r, rm, ended = batch.response_ids, batch.response_mask, batch.ended
    mb = cfg.micro_batch_size
    with timer.time("score"):
        batch.logprobs = recompute_logprobs(models.policy, batch, cfg.temperature, mb, ac())
        with models.reference_ctx():
            batch.ref_logprobs = recompute_logprobs(models.ref_model, batch, cfg.temperature, mb, ac())
        if models.critic is not None:
            batch.values = recompute_values(models.critic, batch, mb, ac())
        texts = tok.batch_decode([ids[m].tolist() for ids, m in zip(r, rm)], skip_special_tokens=True)
        raw = reward.score(rows, texts).float().to(r.device)
        scores = reward.normalized(raw) if cfg.normalize_reward and hasattr(reward, "normalized") else raw
        scores = scores.to(r.device)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
    mask = batch.response_mask
    kl = kl_penalty(batch.logprobs, batch.ref_logprobs, kind=cfg.kl_estimator)
    coef = kl_coef if cfg.kl_in == "reward" else 0.0
    batch.scores = scores
    batch.rewards = token_level_rewards(scores, kl, mask, coef)
    if cfg.advantage == "gae":
        adv, ret = gae(batch.rewards, batch.values, mask, cfg.gamma, cfg.gae_lambda)
        batch.returns = ret
    elif cfg.advantage == "reinforce":
        # Reward-to-go minus its mean over the whole rollout batch (all processes).
        adv = reinforce_advantages(batch.rewards, mask, cfg.gamma, baseline="batch_mean",
                                   mean=lambda x, m: gather_mean(x, m, accelerator))
    else:
        adv = rloo_token_advantages(batch.rewards, mask, cfg.samples_per_prompt, cfg.gamma)
    batch.advantages = whiten_global(adv, mask, accelerator) if cfg.whiten_advantages else adv
    seq_kl = torch.where(mask, kl_penalty(batch.logprobs, batch.ref_logprobs, "k1"), 0.0).sum(-1)
    stats = {
        "ppo/score": float(raw.mean()),
        "ppo/score_std": float(raw.std()) if len(raw) > 1 else 0.0,
        "ppo/score_norm": float(scores.mean()),
        "ppo/kl": float(seq_kl.mean()),  # nats per response (k1, sampled)
        "ppo/kl_per_token": gather_mean(kl_penalty(batch.logprobs, batch.ref_logprobs, "k1"), mask, accelerator),
        "ppo/reward": float(batch.rewards.sum(-1).mean()),
        "ppo/response_length": float(mask.sum(-1).float().mean()),
        "ppo/eos_share": float(ended.float().mean()),
    }
    pass_rate = checker_pass_rate(rows, texts)
    if pass_rate is not None:
        stats["ppo/pass_rate"] = pass_rate
    return batch, {"stats": stats, "texts": texts}


def checker_pass_rate(rows: list, texts: list[str]) -> Optional[float]:
    """Share of sampled responses that satisfy all their instructions (prompts with checkers only)."""
    from ..checkers import check_record

    judged = [all(check_record(t, ex["instruction_id_list"], ex["kwargs"]))
              for ex, t in zip(rows, texts) if isinstance(ex, dict) and ex.get("instruction_id_list")]
    return sum(judged) / len(judged) if judged else None


def make_loss_fn(models: PPOModels, cfg: PPOConfig, kl_ctl, precision: Precision):
    def loss_fn(mb: RolloutBatch, n_tokens: float):
        with precision.autocast_ctx():
            logprobs, entropy, logits = policy_logprobs(models.policy, mb, cfg.temperature,
                                                        with_entropy=cfg.ent_coef > 0)
            values = critic_values(models.critic, mb) if models.critic is not None else None
        mask = mb.response_mask
        loss, stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, cfg.clip_coef, n_tokens)
        stats = {f"ppo/{k}": v for k, v in stats.items()}
        stats["ppo/pg_loss"] = loss.detach() * n_tokens / max(mb.n_tokens, 1)  # per-token mean, as value_loss
        if values is not None:
            vf, vstats = value_loss(values, mb.values, mb.returns, mask, cfg.clip_coef_v, n_tokens)
            loss = loss + cfg.vf_coef * vf
            stats["ppo/value_loss"] = vf.detach() * n_tokens / max(mb.n_tokens, 1)
            stats["ppo/vf_clipfrac"] = vstats["vf_clipfrac"]
        if entropy is None:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach(), cfg.temperature)
        else:
            loss = loss - cfg.ent_coef * entropy_bonus(entropy, mask, n_tokens)
        stats["ppo/entropy"] = masked_mean(entropy.detach(), mask)
        if cfg.kl_in == "loss":
            loss = loss + kl_ctl.value * kl_loss(logprobs, mb.ref_logprobs, mask, "k3", n_tokens)
        return loss, stats

    return loss_fn


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_ppo(models: PPOModels, reward, prompts: list, cfg: PPOConfig, precision: Precision, stage_dir: Path,
              seed: int = 0, accelerator=None, metrics: Optional[MetricsLogger] = None,
              progress: bool = True, resume: bool = True) -> list[dict]:
    """Run `cfg.iterations` PPO iterations. Returns the per-iteration metrics (also in metrics.jsonl).

    Every `checkpoint_every` iterations (and on SIGINT/SIGTERM) the trainable weights, optimizer, RNG,
    KL controller and prompt position are saved to `stage_dir/checkpoints/`; with `resume` the loop
    continues from the newest complete checkpoint there.
    """
    check_generation_batch_size(cfg.generation_batch_size, "ppo.generation_batch_size")
    engine = rollout_engine(cfg.rollout_engine, precision.device, "ppo.rollout_engine")
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    sampler = PromptSampler(prompts, seed)
    params = [p for p in models.policy.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.lr}]
    if models.critic is not None:
        groups.append({"params": [p for p in models.critic.parameters() if p.requires_grad], "lr": cfg.critic_lr})
    optimizer = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)
    all_params = [p for g in groups for p in g["params"]]
    # rollout_batch_size and minibatch_size are global: each process holds 1/world of both.
    world, rank = process_split(accelerator, "ppo", rollout_batch_size=cfg.rollout_batch_size,
                                minibatch_size=cfg.minibatch_size)
    if world > 1:
        # DDP over the trainable models; each process rolls out its block of the global prompt batch.
        if models.critic is not None:
            models.policy, models.critic, optimizer = accelerator.prepare(models.policy, models.critic, optimizer)
        else:
            models.policy, optimizer = accelerator.prepare(models.policy, optimizer)
        torch.manual_seed(seed + rank)  # different samples on each process (without generation_batch_size)
    is_main = rank == 0
    generator = torch.Generator().manual_seed(seed)
    update = UpdateSettings(cfg.ppo_epochs, cfg.minibatch_size // world, cfg.micro_batch_size, cfg.max_grad_norm,
                            cfg.target_approx_kl)
    local_rows = cfg.rollout_batch_size // world * cfg.samples_per_prompt
    loss_fn = make_loss_fn(models, cfg, kl_ctl, precision)
    ckpt_root = stage_dir / "checkpoints"
    ckpt_models = {"policy": unwrap_for_generation(models.policy),
                   "critic": unwrap_for_generation(models.critic) if models.critic is not None else None}
    generators = {"shuffle": generator}
    start, nonfinite, history = 1, 0, []
    latest = latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        state = load_checkpoint(latest, ckpt_models, optimizer, generators, rank=rank)
        kl_ctl.load_state_dict(state["kl_ctl"])
        sampler.load_state_dict(state["sampler"])
        start, nonfinite = state["iteration"] + 1, state["nonfinite"]
        if is_main:
            truncate_jsonl(stage_dir / "metrics.jsonl", state["iteration"])
            truncate_jsonl(stage_dir / "samples.jsonl", state["iteration"], key="iteration")
            history = [r for r in read_jsonl(stage_dir / "metrics.jsonl") if "ppo/score" in r]
        log(f"ppo: resuming from {latest} (iteration {start} of {cfg.iterations})")
    elif is_main:
        # A fresh start: rows from an earlier attempt that left no checkpoint are not this run's.
        for name in ("metrics.jsonl", "samples.jsonl"):
            (stage_dir / name).unlink(missing_ok=True)
    metrics = metrics or (MetricsLogger(stage_dir) if is_main else None)
    bar = tqdm(range(start, cfg.iterations + 1), desc="ppo", disable=not (progress and is_main),
               initial=start - 1, total=cfg.iterations)
    for it in bar:
        timer = Throughput()
        examples = shard(sampler.next(cfg.rollout_batch_size), rank, world)
        gen = Generation(engine, cfg.generation_batch_size,
                         chunk_seed(seed, it) if cfg.generation_batch_size else None, rank * local_rows)
        batch, info = make_rollout(models, reward, examples, cfg, kl_ctl.value, precision, timer, accelerator, gen)
        with timer.time("train"):
            upd = optimise(batch, loss_fn, optimizer, all_params, update, generator, accelerator,
                           models=tuple(m for m in (models.policy, models.critic) if m is not None))
        stats = dict(info["stats"])
        stats.update({k: v for k, v in upd.items() if k.startswith("ppo/")})
        stats["ppo/loss"] = upd.get("loss", float("nan"))
        stats["ppo/grad_norm"] = upd.get("grad_norm", float("nan"))
        stats["ppo/skipped_steps"] = upd["skipped_steps"]
        stats["ppo/early_stop"] = upd["early_stop"]
        if batch.values is not None and batch.returns is not None:
            stats["ppo/explained_variance"] = float(explained_variance(batch.values, batch.returns,
                                                                       batch.response_mask))
        stats["ppo/kl_coef"] = kl_ctl.value
        total = sum(timer.parts.values())
        stats["ppo/tokens_per_s"] = batch.n_tokens / max(total, 1e-9)
        for k, v in timer.parts.items():
            stats[f"ppo/time_{k}_s"] = v
        if upd["optimizer_steps"] == 0 and upd["skipped_steps"] > 0:
            nonfinite += 1
            log(f"ppo: iteration {it}: every update had a non-finite gradient; skipped ({nonfinite} in a row)")
            if nonfinite >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"ppo: {nonfinite} iterations in a row with non-finite gradients; stopping. Lower ppo.lr or "
                    "check the reward scale.")
        else:
            nonfinite = 0
        stats = mean_across_processes(stats, accelerator)
        kl_ctl.update(stats["ppo/kl"], cfg.rollout_batch_size * cfg.samples_per_prompt)  # the same on every process
        if is_main:
            metrics.log(it, stats)
        history.append(stats)
        bar.set_postfix(score=f"{stats['ppo/score']:.3f}", kl=f"{stats['ppo/kl']:.3f}",
                        **({"pass": f"{stats['ppo/pass_rate']:.2f}"} if "ppo/pass_rate" in stats else {}))
        if is_main and cfg.log_samples_every and (it == 1 or it % cfg.log_samples_every == 0):
            log_samples(stage_dir, it, batch, info["texts"], n=3)
        signum = interrupt_signal()
        if (cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.iterations) or signum:
            path = ckpt_root / f"iter-{it:06d}"
            rngs = rank_rng_states(accelerator)  # every process's sampling RNG, gathered on all
            if is_main:
                path = save_checkpoint(ckpt_root, it, ckpt_models, optimizer, {
                    "kl_ctl": kl_ctl.state_dict(), "sampler": sampler.state_dict(), "nonfinite": nonfinite},
                    generators, rank_rngs=rngs)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if signum:
                raise Interrupted(signum, str(path))
    return history


def log_samples(stage_dir: Path, it: int, batch: RolloutBatch, texts: list[str], n: int = 3) -> None:
    with open(stage_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for i in range(min(n, len(texts))):
            ex = batch.prompts[i]
            prompt = ex["prompt"][-1]["content"] if isinstance(ex, dict) else str(ex)
            f.write(json.dumps({"iteration": it, "prompt": prompt, "response": texts[i],
                                "score": float(batch.scores[i]), "ended": bool(batch.ended[i])}) + "\n")


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
    last = history[-1]
    first = history[0]
    keys = ("ppo/score", "ppo/kl", "ppo/pass_rate", "ppo/response_length", "ppo/eos_share", "ppo/tokens_per_s")
    summary = {"iterations": len(history), "policy_from": recipe.resolve_model_ref(cfg.policy_from)}
    for k in keys:
        if k in last:
            summary[f"{k}_first"] = first[k]
            summary[f"{k}_last"] = last[k]
    # The last few iterations smooth the sampling noise of a single rollout batch.
    tail = history[-5:]
    for k in ("ppo/score", "ppo/kl", "ppo/pass_rate"):
        if k in last:
            summary[f"{k}_last5_mean"] = sum(h[k] for h in tail) / len(tail)
    return summary
