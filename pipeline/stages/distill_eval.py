"""The distill stage's held-out check: teacher and student answer held-out prompts greedily through the eval
stage's generation and checkers (`eval.generate_with_progress`, `eval.pass_rates`), and the student's exact
KL to its teacher is measured at every state of its own samples, by response position (do errors compound
along the sequence?). Written to `distill/heldout.json` and the stage's summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..config import DistillConfig
from ..models import Precision
from ..onpolicy import (
    RolloutBatch, SamplingSettings, encode_prompts, pad_responses, sample_responses, unwrap_for_generation,
)
from .distill import DistillModels, label_states

DEFAULT_HELDOUT = "eval/constraints/heldout.jsonl"


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
    """Held-out figures of teacher and student. Greedy answers, pass rates, lengths, EOS share: the eval stage's
    code (`eval.generate_with_progress`, `eval.pass_rates`), plus distinct 4-grams. KL: the per-token reverse
    KL(student || teacher) is E_{y ~ student} of the exact KL at each visited state, so it is measured on the
    student's own *samples* (temperature 1, seeded), per token and by response position t = 1, 2, ... (mean
    over the prompts whose answer reaches t); the same at the states of the greedy answers as `*_greedy` (a
    greedy loop the teacher would also repeat scores a low KL there, so those flatter degenerate students)."""
    from .eval import generate_with_progress, pass_rates

    tok, V, T = models.tokenizer, models.vocab_size, cfg.max_new_tokens
    device = next(models.student.parameters()).device
    bs = cfg.heldout_batch_size or cfg.rollout_batch_size
    out: dict[str, Any] = {"prompts": len(examples), "max_new_tokens": T, "decoding": "greedy",
                           "kl_states": "student samples at temperature 1"}
    kl = {mode: PositionKL(T) for mode in ("sampled", "greedy")}
    answers = {}
    for name, model in (("teacher", models.teacher), ("student", models.student)):
        g = generate_with_progress(unwrap_for_generation(model), tok, [ex["prompt"] for ex in examples],
                                   batch_size=bs, desc=f"held-out {name}", tty=progress or None, max_new_tokens=T,
                                   autocast=precision.autocast_ctx())
        answers[name] = g.texts
        rates = pass_rates(examples, g.texts)
        out[name] = {"pass_rate": rates["pass_rate"] if rates else None,
                     "response_length": sum(map(len, g.response_ids)) / len(examples),
                     "eos_share": sum(g.ended) / len(examples), "distinct_4grams": distinct_ngrams(g.texts, 4)}
        if name == "student":
            for start in range(0, len(examples), bs):
                q, qm = encode_prompts(tok, examples[start:start + bs], device)
                r, rm, e = pad_responses(g.response_ids[start:start + bs], tok.eos_token_id, tok.pad_token_id, device)
                kl["greedy"].add(models, RolloutBatch(q, qm, r, rm, None, e), cfg, precision)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed * 100_003 + start)
                    r, rm, e = sample_responses(model, tok, q, qm, SamplingSettings(T, temperature=1.0),
                                                precision.autocast_ctx(), vocab_size=V)
                kl["sampled"].add(models, RolloutBatch(q, qm, r, rm, None, e), cfg, precision)
    for mode, suffix in (("sampled", ""), ("greedy", "_greedy")):
        out.update(kl[mode].summary(suffix))
    t_rate, s_rate = out["teacher"]["pass_rate"], out["student"]["pass_rate"]
    if t_rate and s_rate is not None:
        out["pass_rate_ratio"] = s_rate / t_rate
    out["samples"] = [{"prompt": ex["prompt"][-1]["content"], "teacher": t, "student": s}
                      for ex, t, s in list(zip(examples, answers["teacher"], answers["student"]))[:5]]
    return out


class PositionKL:
    """Sums of the exact reverse / forward KL to the teacher by response position, over batches."""

    def __init__(self, T: int):
        self.sums = {k: torch.zeros(T, dtype=torch.float64) for k in ("reverse_kl", "forward_kl")}
        self.counts = torch.zeros(T, dtype=torch.float64)

    def add(self, models: DistillModels, batch: RolloutBatch, cfg: DistillConfig, precision: Precision) -> None:
        labels = label_states(models, batch, 1.0, cfg.micro_batch_size, precision)
        rm = batch.response_mask
        for k, s in self.sums.items():
            per_pos = torch.where(rm, getattr(labels, k), 0.0).double().sum(0).cpu()
            s[:per_pos.shape[0]] += per_pos
        self.counts[:rm.shape[1]] += rm.double().sum(0).cpu()

    def summary(self, suffix: str) -> dict:
        n, reached = max(float(self.counts.sum()), 1.0), int((self.counts > 0).sum())
        rkl, fkl = self.sums["reverse_kl"], self.sums["forward_kl"]
        return {f"reverse_kl_per_token{suffix}": float(rkl.sum()) / n, f"forward_kl_per_token{suffix}": float(fkl.sum()) / n,
                f"reverse_kl_by_position{suffix}": (rkl[:reached] / self.counts[:reached]).tolist(),
                f"prompts_by_position{suffix}": [int(c) for c in self.counts[:reached].tolist()]}


def heldout_spec(cfg: DistillConfig) -> Optional[str]:
    if cfg.heldout_prompts:
        return cfg.heldout_prompts
    return DEFAULT_HELDOUT if Path(DEFAULT_HELDOUT).exists() else None
