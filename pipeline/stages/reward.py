"""Stage `reward`: a scalar reward model learnt from preference comparisons (InstructGPT step 2).

    pipeline run recipes/reward.yaml         (or --stages reward in any recipe)

A sequence-classification head with one output on the chosen backbone (default: the SFT output),
LoRA or full, trained with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected) - margin)
plus an optional centering term, through TRL's RewardTrainer on rows tokenized by our one chat-template
path (`chosen_ids` / `rejected_ids` = prompt + response through EOS). The score is read at the last
real token, the EOS itself: the pad token is distinct from EOS and the model pools the last non-pad.
Ranked lists expand into pairs; **ties are skipped by default** (`keep_ties: true` keeps them).
The held-out split is made by prompt, so no prompt is in both splits.

After training, the mean and std of the scores of policy samples (the policy PPO starts from, else
the init model, sampling the RL prompts) are saved as `final/reward_norm.json`; PPO normalises scores
with them.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..config import Recipe, RewardConfig
from ..data import completion_token_ids, load_rows, preference_examples, prompt_examples, prompt_token_ids
from ..format_probe import format_bias
from ..models import load_tokenizer, peft_lora_config, resolve_model_path, resolve_precision, save_final
from ..rewards import NORM_FILE, RewardModelScorer
from ..tracking import finish_trainer_trackers, trainer_report_args
from ..utils import MetricsLogger, atomic_write_json, log
from .common import (
    InterruptCallback,
    MetricsCallback,
    NonFiniteCallback,
    last_trainer_checkpoint,
    raise_if_interrupted,
    tensorboard_dir,
    trainer_precision_args,
)


def split_by_prompt(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    keys = sorted({str(p["prompt"]) for p in pairs})
    random.Random(seed).shuffle(keys)
    held = set(keys[:max(1, int(round(len(keys) * fraction)))]) if fraction > 0 and len(keys) > 4 else set()
    return [p for p in pairs if str(p["prompt"]) not in held], [p for p in pairs if str(p["prompt"]) in held]


def tokenize_pairs(tok, pairs: list[dict], max_len: int, use_margin: bool) -> tuple[list[dict], int]:
    rows, dropped = [], 0
    for p in pairs:
        prompt_ids = prompt_token_ids(tok, p["prompt"])
        c = prompt_ids + completion_token_ids(tok, p["prompt"], p["chosen"])
        r = prompt_ids + completion_token_ids(tok, p["prompt"], p["rejected"])
        if len(c) > max_len or len(r) > max_len:
            # Truncating would cut the EOS the score is read at: drop, count and report instead.
            dropped += 1
            continue
        row = {"chosen_ids": c, "rejected_ids": r}
        if use_margin:
            row["margin"] = float(p.get("margin") or 0.0)
        rows.append(row)
    return rows, dropped


def with_lengths(rows: list[dict]) -> list[dict]:
    """A `length` column (the longer side of each pair) for length-grouped batches."""
    return [{**r, "length": max(len(r["chosen_ids"]), len(r["rejected_ids"]))} for r in rows]


@torch.no_grad()
def pairwise_metrics(scorer: RewardModelScorer, pairs: list[dict], bins: int = 10) -> dict:
    prompts = [p["prompt"] for p in pairs]
    rc = scorer.score(prompts, [p["chosen"] for p in pairs])
    rr = scorer.score(prompts, [p["rejected"] for p in pairs])
    lo, hi = float(torch.min(torch.cat([rc, rr]))), float(torch.max(torch.cat([rc, rr])))
    hi = hi if hi > lo else lo + 1e-6
    return {
        "rm/accuracy": float((rc > rr).float().mean()),
        "rm/margin": float((rc - rr).mean()),
        "rm/score_chosen": float(rc.mean()),
        "rm/score_rejected": float(rr.mean()),
        "histogram": {"edges": torch.linspace(lo, hi, bins + 1).tolist(),
                      "chosen": torch.histc(rc, bins, lo, hi).int().tolist(),
                      "rejected": torch.histc(rr, bins, lo, hi).int().tolist()},
    }


def norm_policy_ref(recipe: Recipe, cfg: RewardConfig, init: str) -> str:
    """The policy whose samples calibrate the scores: the one PPO will start from, when known."""
    if cfg.norm_policy:
        return recipe.resolve_model_ref(cfg.norm_policy)
    if recipe.ppo is not None and "ppo" in recipe.stages:
        ref = recipe.resolve_model_ref(recipe.ppo.policy_from)
        if ref == recipe.model.name_or_path or Path(ref).exists():
            return ref
        log(f"reward: normalisation samples from {init} ({ref} does not exist yet)")
    return init


def normalisation_stats(recipe: Recipe, cfg: RewardConfig, scorer: RewardModelScorer, init: str, precision) -> dict:
    """Mean/std of the RM's scores on samples of `init` (see norm_policy_ref)."""
    from ..generation import generate
    from ..models import load_policy

    spec = cfg.norm_prompts or (recipe.ppo.prompts if recipe.ppo is not None and recipe.ppo.prompts else cfg.data)
    examples = prompt_examples(load_rows(spec), spec)
    rng = random.Random(recipe.run.seed)
    examples = rng.sample(examples, min(cfg.norm_samples, len(examples)))
    policy, tok = load_policy(init, recipe.model, precision)
    torch.manual_seed(recipe.run.seed)
    gens = generate(policy, tok, [e["prompt"] for e in examples], max_new_tokens=cfg.max_new_tokens, batch_size=32,
                    do_sample=True, temperature=1.0, autocast=precision.autocast_ctx(), progress=True,
                    desc="reward norm samples")
    del policy
    scores = scorer.score(examples, gens.texts)
    return {"mean": float(scores.mean()), "std": float(scores.std().clamp(min=1e-6)), "n": len(examples),
            "source": f"{init} sampling {spec}"}


def run(recipe: Recipe, stage_dir: Path) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    cfg: RewardConfig = recipe.reward
    precision = resolve_precision(recipe.model)
    init = recipe.resolve_model_ref(cfg.init_from)
    path = resolve_model_path(init)
    tok = load_tokenizer(path, recipe.model)

    pairs, ties = preference_examples(load_rows(cfg.data, cfg.max_rows), cfg.data, cfg.keep_ties)
    probe_rows: list[dict] = []
    if cfg.eval_data:
        eval_rows = load_rows(cfg.eval_data)
        train_pairs, eval_pairs = pairs, preference_examples(eval_rows, cfg.eval_data, cfg.keep_ties)[0]
        probe_rows = [{"prompt": r["prompt"], "response": r["chosen"], "instruction_id_list": r["instruction_id_list"]}
                      for r in eval_rows if isinstance(r.get("instruction_id_list"), list)
                      and isinstance(r.get("chosen"), str) and r.get("prompt") is not None]
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_fraction, recipe.run.seed)
    use_margin = cfg.use_margin and any(p.get("margin") is not None for p in pairs)
    train_rows, dropped = tokenize_pairs(tok, train_pairs, cfg.max_seq_len, use_margin)
    log(f"reward data: {len(train_rows)} train pairs, {len(eval_pairs)} held-out pairs; {ties} ties skipped; "
        f"{dropped} pairs longer than reward.max_seq_len={cfg.max_seq_len} dropped")
    if not train_rows:
        from ..data import DataError

        raise DataError(f"{cfg.data}: no preference pair fits in reward.max_seq_len={cfg.max_seq_len}.")

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=precision.dtype, trust_remote_code=recipe.model.trust_remote_code)
    model.config.pad_token_id = tok.pad_token_id
    model.to(precision.device)

    summary: dict = {"init_from": init, "train_pairs": len(train_rows), "eval_pairs": len(eval_pairs),
                     "ties_skipped": ties, "pairs_dropped_too_long": dropped, "lora": cfg.lora is not None}
    metrics = MetricsLogger(stage_dir, tensorboard=False)
    if eval_pairs:
        untrained = RewardModelScorer(model, recipe.model, precision, tokenizer=tok)
        before = pairwise_metrics(untrained, eval_pairs)
        summary["rm/accuracy_before"] = before["rm/accuracy"]
        if probe_rows and cfg.format_probe_rows:
            before.update(format_bias(untrained, probe_rows, cfg.format_probe_rows))
            summary["rm/format_bias_before"] = before.get("rm/format_bias")
        metrics.log(0, {k: v for k, v in before.items() if k != "histogram"})
        model.train()

    tensorboard_dir(stage_dir)
    args = TRLRewardConfig(
        output_dir=str(stage_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        **trainer_report_args(recipe, "reward"),  # run.report_to (pipeline/tracking.py)
        seed=recipe.run.seed,
        max_length=None,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        center_rewards_coefficient=cfg.center_coef or None,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        activation_checkpointing=False,
        disable_dropout=True,
        **trainer_precision_args(precision, lora=cfg.lora is not None),
    )
    nonfinite = NonFiniteCallback("reward")
    train_ds = datasets.Dataset.from_list(with_lengths(train_rows))
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_ds, processing_class=tok,
        peft_config=peft_lora_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora is not None else None,
        callbacks=[MetricsCallback(metrics, prefix="rm"), InterruptCallback(), nonfinite],
    )
    resume_from = last_trainer_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume_from)
    raise_if_interrupted(args.output_dir)
    nonfinite.raise_if_stopped(args.output_dir)
    summary["train_loss"] = result.training_loss
    summary["steps"] = result.global_step

    trained = trainer.model
    trained.eval()
    scorer = RewardModelScorer(trained, recipe.model, precision, tokenizer=tok)
    if eval_pairs:
        after = pairwise_metrics(scorer, eval_pairs)
        if probe_rows and cfg.format_probe_rows:
            after.update(format_bias(scorer, probe_rows, cfg.format_probe_rows))
            if "rm/format_bias" in after and summary.get("rm/format_bias_before") is not None:
                log("reward: prefers an unrequested format added to a held-out chosen answer in "
                    f"{after['rm/format_bias']:.2f} of cases (before training {summary['rm/format_bias_before']:.2f}; "
                    "0.5 = indifferent): " + ", ".join(f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in after.items()
                                                       if k.startswith("rm/format_bias/")))
        metrics.log(result.global_step, {k: v for k, v in after.items() if k != "histogram"})
        summary.update({k: v for k, v in after.items()})
        log(f"reward: held-out accuracy {summary['rm/accuracy_before']:.3f} -> {after['rm/accuracy']:.3f}, "
            f"margin {after['rm/margin']:.3f}")
    metrics.close()
    finish_trainer_trackers()  # the next stage's metrics go to a run of their own
    stats = normalisation_stats(recipe, cfg, scorer, norm_policy_ref(recipe, cfg, init), precision)
    summary["norm"] = stats
    if trainer.accelerator.is_main_process:
        out = save_final(trained, tok, stage_dir / "final")
        atomic_write_json(out / NORM_FILE, stats)
    trainer.accelerator.wait_for_everyone()
    return summary
