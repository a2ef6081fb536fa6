"""Stage `sft`: supervised fine-tuning = behavior cloning on demonstrations.

    pipeline run recipes/sft.yaml            (or --stages sft in any recipe)

Maximises log pi(response | prompt) on the demonstrated response tokens only (prompt tokens are
masked, the closing EOS is trained), through TRL's SFTTrainer with LoRA (peft) or full fine-tuning.
Our departures from a plain SFTTrainer call:
- the chat template is applied once, by `pipeline.data` (the same path every stage uses), and the
  trainer gets pre-tokenized rows with a `completion_mask`;
- rows whose response is truncated away are counted and reported, not dropped silently;
- the evaluation loss is measured before and after training on a held-out split;
- optionally (`response_start_weight`), the first few response tokens weigh more in the training loss.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from ..config import Recipe, SFTConfig
from ..data import load_rows, sft_examples, tokenize_sft
from ..models import load_policy, peft_lora_config, resolve_precision, save_final
from ..tracking import finish_trainer_trackers, trainer_report_args
from ..utils import MetricsLogger, log
from .common import (
    InterruptCallback,
    MetricsCallback,
    NonFiniteCallback,
    last_trainer_checkpoint,
    raise_if_interrupted,
    tensorboard_dir,
    trainer_precision_args,
)


def response_start_weights(label_mask, n_tokens: int, weight: float):
    """Per-token loss weights: `weight` on the first `n_tokens` trained positions of each row, 1 on the
    other trained positions, 0 where `label_mask` is False. `label_mask` is (B, T) bool, aligned with the
    per-token log-probs (already shifted)."""
    import torch

    mask = label_mask.bool()
    rank = mask.long().cumsum(-1)  # 1 for the first trained position of each row, 2 for the second, ...
    w = torch.where(mask & (rank <= n_tokens), float(weight), 1.0)
    return w * mask


def weighted_token_loss(log_probs, weights, num_items) -> "object":
    """sum(w * -log p) / num_items, with num_items the plain count of trained tokens in the whole
    optimizer step (all micro-batches, all processes), as the Trainer counts them: a micro-batch split
    leaves the summed gradient unchanged, and with all weights 1 this is the usual token-mean NLL."""
    import torch

    return -(weights * log_probs).sum() / torch.as_tensor(num_items).clamp(min=1)


def _weighted_trainer_cls(base):
    """`base` (TRL's SFTTrainer) whose training loss weights the response start. Evaluation keeps the
    plain loss, so `eval_loss` stays comparable across settings."""

    class StartWeightedSFTTrainer(base):
        def __init__(self, *args, start_tokens: int, start_weight: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.start_tokens, self.start_weight = start_tokens, start_weight

        def token_logprobs(self, model, inputs, fused: bool = True):
            """-> (log-probs, mask, entropy or None, top-1 hits or None), (B, T-1), shifted to the labels.
            TRL's fused LM head when the installed TRL has one (no (B, T, V) logits); else from the logits."""
            if fused and getattr(self, "_fused_head", True):
                try:
                    out = model(**inputs, fused_lm_head=True)
                except TypeError:  # a forward that takes no `fused_lm_head`
                    out = None
                if getattr(out, "log_probs", None) is not None:
                    return out.log_probs, out.label_mask, out.entropy, out.is_top1
                self._fused_head = False  # an older TRL (or none patched this model): use the logits from now on
            from ..rl.logprobs import logprobs_from_logits

            labels = inputs["labels"][:, 1:]
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1]
            mask = labels != -100
            return logprobs_from_logits(logits, labels.clamp(min=0)) * mask, mask, None, None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training or return_outputs or self.aux_loss_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            log_probs, mask, entropy, is_top1 = self.token_logprobs(model, inputs)
            num = mask.sum() if num_items_in_batch is None else num_items_in_batch
            w = response_start_weights(mask, self.start_tokens, self.start_weight).to(log_probs.dtype)
            loss = weighted_token_loss(log_probs, w, num)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            # The metrics TRL logs on its own path (mean over trained tokens, across processes).
            metrics = getattr(self, "_metrics", None)
            gather = self.accelerator.gather_for_metrics
            n_valid = gather(mask.sum()).sum()
            if metrics is not None and entropy is not None and n_valid > 0:
                metrics["train"]["entropy"].append((gather(entropy.detach().sum()).sum() / n_valid).item())
                metrics["train"]["mean_token_accuracy"].append((gather(is_top1.sum()).sum() / n_valid).item())
            return loss

    return StartWeightedSFTTrainer


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(examples) < 4:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(examples) * fraction)))
    eval_idx = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in eval_idx], [examples[i] for i in sorted(eval_idx)]


def build_datasets(cfg: SFTConfig, tokenizer, seed: int):
    import datasets

    examples = sft_examples(load_rows(cfg.data, cfg.max_rows), cfg.data)
    if cfg.eval_data:
        train_ex, eval_ex = examples, sft_examples(load_rows(cfg.eval_data), cfg.eval_data)
    else:
        train_ex, eval_ex = split_eval(examples, cfg.eval_fraction, seed)
    train_rows, train_stats = tokenize_sft(tokenizer, train_ex, cfg.max_seq_len, cfg.completion_only_loss)
    eval_rows, eval_stats = tokenize_sft(tokenizer, eval_ex, cfg.max_seq_len, cfg.completion_only_loss)
    log(f"sft data: train {train_stats.summary()}")
    if eval_ex:
        log(f"sft data: eval  {eval_stats.summary()}")
    if not train_rows:
        from ..data import DataError

        raise DataError(
            f"{cfg.data}: no row has a response token left after truncation to sft.max_seq_len={cfg.max_seq_len}; "
            "raise sft.max_seq_len or shorten the prompts."
        )
    to_ds = lambda rows: datasets.Dataset.from_list(rows) if rows else None  # noqa: E731
    return to_ds(train_rows), to_ds(eval_rows), train_stats, eval_stats


def run(recipe: Recipe, stage_dir: Path) -> dict:
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    cfg: SFTConfig = recipe.sft
    precision = resolve_precision(recipe.model)
    init = recipe.resolve_model_ref(cfg.init_from)
    model, tok = load_policy(init, recipe.model, precision)
    train_ds, eval_ds, train_stats, eval_stats = build_datasets(cfg, tok, recipe.run.seed)

    args = TRLSFTConfig(
        output_dir=str(stage_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        eval_strategy=("steps" if cfg.eval_steps else "epoch") if eval_ds is not None else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,
        **trainer_report_args(recipe, "sft"),  # run.report_to (pipeline/tracking.py)
        seed=recipe.run.seed,
        data_seed=recipe.run.seed,
        completion_only_loss=cfg.completion_only_loss,
        max_length=cfg.max_seq_len,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        dataset_num_proc=None,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        activation_checkpointing=False,  # small models: recomputing activations costs more than it saves
        **trainer_precision_args(precision, lora=cfg.lora is not None),
    )
    metrics = MetricsLogger(stage_dir, tensorboard=False)  # the Trainer writes TensorBoard itself
    nonfinite = NonFiniteCallback("sft")
    tensorboard_dir(stage_dir)
    weighted = cfg.response_start_weight != 1.0 and cfg.response_start_tokens > 0
    trainer_cls = _weighted_trainer_cls(SFTTrainer) if weighted else SFTTrainer
    extra = {"start_tokens": cfg.response_start_tokens, "start_weight": cfg.response_start_weight} if weighted else {}
    if weighted:
        log(f"sft: the first {cfg.response_start_tokens} response tokens weigh {cfg.response_start_weight:g} in the training loss")
    trainer = trainer_cls(
        **extra,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        peft_config=peft_lora_config(cfg.lora) if cfg.lora is not None else None,
        callbacks=[MetricsCallback(metrics, prefix="sft"), InterruptCallback(), nonfinite],
    )
    summary: dict = {
        "init_from": init,
        "train_rows": train_stats.kept,
        "train_rows_truncated": train_stats.truncated,
        "train_rows_dropped_no_response_tokens": train_stats.no_trainable_tokens,
        "eval_rows": eval_stats.kept,
        "lora": cfg.lora is not None,
    }
    if weighted:
        summary["response_start"] = f"first {cfg.response_start_tokens} tokens x{cfg.response_start_weight:g}"
    if eval_ds is not None:
        before = trainer.evaluate()["eval_loss"]
        summary["eval_loss_before"] = before
    resume_from = last_trainer_checkpoint(args.output_dir)
    if resume_from:
        log(f"sft: resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    raise_if_interrupted(args.output_dir)
    nonfinite.raise_if_stopped(args.output_dir)
    summary["train_loss"] = result.training_loss
    summary["steps"] = result.global_step
    if eval_ds is not None:
        after = trainer.evaluate()["eval_loss"]
        summary["eval_loss"] = after
        summary["eval_ppl"] = math.exp(min(after, 50))
    metrics.close()
    finish_trainer_trackers()  # the next stage's metrics go to a run of their own
    if trainer.accelerator.is_main_process:
        save_final(trainer.model, tok, stage_dir / "final")
    trainer.accelerator.wait_for_everyone()
    log(f"sft: saved {stage_dir / 'final'}")
    return summary
