"""Three pieces of evidence (issue #20), each one command and a figure. Claims, commands and the measured
numbers: docs/evidence.md.

    python scripts/evidence.py compounding --teacher runs/quickstart/ppo/final    # -> runs/evidence/compounding.*
    python scripts/evidence.py modes --teacher runs/quickstart/ppo/final          # -> runs/evidence/modes.*
    python scripts/evidence.py overopt --reward runs/quickstart/reward/final      # -> runs/evidence/overopt.*
    python scripts/evidence.py all --teacher runs/quickstart/ppo/final --reward runs/quickstart/reward/final
    python scripts/evidence.py all --tiny --out /tmp/evidence                     # tiny random models: a smoke test

1. compounding: two half-depth students distilled from one teacher with the same iterations, batch and
   tokens; off-policy (beta 1 throughout: the teacher samples every sequence) and on-policy (beta 1 -> 0
   linearly, or 0 throughout with `--on-policy-beta zero`). Each run's held-out check (`distill/heldout.json`,
   pipeline/stages/distill_eval.py) measures the student's exact reverse KL to the teacher at every state of
   its own samples, by response position. Behaviour cloning's error bound grows as O(eps T^2) against
   DAgger's O(eps T) (Ross & Bagnell 2010; Ross, Gordon & Bagnell 2011): the off-policy student's per-position
   KL should exceed the on-policy one's by a gap that grows with the position. Fitted: the least-squares
   slope of KL against position (positions that at least `--min-prompts` answers reach), of the cumulative
   KL, and of the gap (off - on).
2. modes: reverse-KL and forward-KL students, the same settings (the reverse-KL one is the on-policy run of
   `compounding`, reused when it exists). Each student (and the teacher, for reference) samples
   `--samples-per-prompt` answers per held-out prompt at temperature 1; per model: the entropy per token at
   its own states, distinct 4-grams across the samples of a prompt, the pass rate (the eval stage's
   `pass_rates`) and the teacher's log-prob per token of the samples. Reverse KL is mode seeking, forward KL
   mode covering (Minka 2005; Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD)): the
   reverse-KL student should have the lower entropy, fewer distinct 4-grams and samples the teacher finds
   more likely.
3. overopt: PPO against the reward model alone (a weight-0 verifier only logs its verdicts), a small KL
   coefficient and a high learning rate. Per iteration the RM score (`ppo/score/rm`), the verifier pass rate
   (`ppo/pass_rate`) and the KL per token to the reference (`ppo/kl_per_token`); marked: the iteration where
   the smoothed pass rate peaks, and whether the RM score still rises after it (Gao, Schulman & Hilton 2022,
   "Scaling Laws for Reward Model Overoptimization").

Every training run is an ordinary run directory under `<out>/runs/` (running the same command again
resumes or reuses them; changed settings are refused with a diff unless `--force`). `--tiny` builds a tiny
random teacher, reward model and prompt set under `<out>/tiny/` and shrinks every size, to check the whole
path in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "smollm2-135m-instruct"

# Sizes: (default with a real model, default with --tiny). With SmolLM2-135M on 2 CPU cores each distill
# run is sized for a few minutes (the quickstart's distill stage, 24 batches of 16 at 96 tokens plus a
# 100-prompt held-out check, took 321 s: docs/results.md).
SIZES = {
    "keep_layers": ("influence_15", "influence_2"),
    "iterations": (24, 2),
    "rollout_batch_size": (8, 4),
    "max_new_tokens": (64, 12),
    "lr": (2.0e-4, 3.0e-3),
    "temperature": (1.0, 1.0),
    "warmup_iterations": (8, 1),
    "max_heldout": (48, 4),
    "min_prompts": (10, 2),
    "samples_per_prompt": (8, 4),
    "sample_batch_size": (64, 32),
    "ppo_iterations": (40, 4),
    "ppo_rollout_batch_size": (4, 2),
    "ppo_samples_per_prompt": (4, 2),
    "ppo_max_new_tokens": (64, 12),
    "ppo_lr": (3.0e-4, 3.0e-3),
    "kl_coef": (0.01, 0.01),
    "smooth": (5, 3),
}


class EvidenceError(ValueError):
    """Bad arguments to this script: printed as one paragraph, no traceback."""


# ------------------------------------------------------------------------------------------------
# The numbers: fits, smoothing, peaks, diversity
# ------------------------------------------------------------------------------------------------


def ols(x: Sequence[float], y: Sequence[float]) -> dict:
    """Least-squares line y = a + b x -> {slope, intercept, slope_se, n}; slope_se is the usual standard
    error sqrt(s^2 / Sxx) with s^2 = RSS / (n - 2) (None with fewer than 3 points)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"ols: {n} x values but {len(y)} y values")
    if n < 2:
        return {"slope": None, "intercept": None, "slope_se": None, "n": n}
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        return {"slope": None, "intercept": None, "slope_se": None, "n": n}
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    intercept = my - slope * mx
    se = None
    if n > 2:
        rss = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
        se = math.sqrt(rss / (n - 2) / sxx)
    return {"slope": slope, "intercept": intercept, "slope_se": se, "n": n}


def verdict(slope: Optional[float], se: Optional[float], predicted_sign: int = 1) -> str:
    """`agrees` when the slope has the predicted sign by more than two standard errors, `disagrees` when it
    has the other sign by as much, else `inconclusive`."""
    if slope is None or se is None:
        return "inconclusive"
    s = slope * predicted_sign
    if s - 2 * se > 0:
        return "agrees"
    if s + 2 * se < 0:
        return "disagrees"
    return "inconclusive"


def verdict_phrase(v: str) -> str:
    """`the measurement ...` completed for a verdict."""
    return {"agrees": "agrees with the claim", "partly agrees": "partly agrees with the claim",
            "disagrees": "disagrees with the claim", "inconclusive": "is inconclusive",
            "not observed": "does not show it"}.get(v, v)


def cumulative(y: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for v in y:
        total += v
        out.append(total)
    return out


def smooth(y: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (odd; an even one is made odd), shrunk at the ends."""
    half = max(int(window), 1) // 2
    return [sum(y[max(0, i - half):i + half + 1]) / len(y[max(0, i - half):i + half + 1]) for i in range(len(y))]


def find_peak(y: Sequence[float], window: int) -> dict:
    """The index where the smoothed curve is highest (the first, on ties) and the smoothed curve."""
    if not y:
        raise ValueError("find_peak: an empty curve")
    s = smooth(y, window)
    i = max(range(len(s)), key=lambda k: (s[k], -k))
    return {"index": i, "value": s[i], "smoothed": s}


def distinct_ngrams_across(texts: Sequence[str], n: int = 4) -> Optional[float]:
    """Distinct word n-grams / all n-grams, pooled over `texts` (the samples of one prompt): 1.0 when no
    n-gram repeats within or across them, 1/k when k samples are the same text. None: no n-grams."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


# ------------------------------------------------------------------------------------------------
# Runs through the pipeline
# ------------------------------------------------------------------------------------------------


def run_recipe_dict(data: dict, where: str, force: bool) -> dict:
    """Parse, preflight and run a recipe (as `pipeline run` does); a finished run is reused. -> summaries."""
    from pipeline.config import parse_recipe
    from pipeline.preflight import preflight
    from pipeline.runner import run_recipe
    from pipeline.utils import log

    recipe = parse_recipe(data, where=where)
    preflight(recipe, force=force)
    log(f"evidence: {where} -> {recipe.output_dir}")
    out = run_recipe(recipe, force=force)
    gc.collect()
    return out


def write_heldout(args) -> str:
    """The first `--max-heldout` held-out prompts, as a JSONL file under `<out>/data/` (rewritten only when
    its content changes, so a rerun's inputs are the same files)."""
    from pipeline.data import load_rows
    from pipeline.utils import atomic_write_text

    rows = load_rows(args.heldout, max_rows=args.max_heldout)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = Path(args.out) / "data" / "heldout.jsonl"
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return str(path.resolve())


def distill_recipe(args, name: str, beta: float, schedule: str, divergence: str, heldout: str) -> dict:
    keep = json.loads(args.keep_layers) if str(args.keep_layers).startswith("[") else args.keep_layers
    warmup = {}
    if args.warmup_iterations:
        warmup = {"warmup_data": args.warmup_data, "warmup_iterations": args.warmup_iterations,
                  "warmup_divergence": "forward_kl"}
    return {
        "run": {"name": f"evidence-{name}", "seed": args.seed, "output_dir": str(Path(args.out) / "runs" / name),
                "keep_checkpoints": False},
        "model": {"name_or_path": args.teacher},
        "stages": ["distill"],
        "distill": {
            "teacher_from": "base", "student": {"from_teacher": {"keep_layers": keep}},
            "prompts": args.prompts, "heldout_prompts": heldout, "heldout_batch_size": args.max_heldout,
            "beta": beta, "beta_schedule": schedule, "beta_end": 0.0, "divergence": divergence, "estimator": "full",
            **warmup,
            "iterations": args.iterations, "rollout_batch_size": args.rollout_batch_size,
            "minibatch_size": args.rollout_batch_size, "micro_batch_size": args.rollout_batch_size,
            "epochs": 1, "lr": args.lr, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "checkpoint_every": 10,
        },
    }


def on_policy_beta(args) -> tuple[float, str]:
    return (1.0, "linear") if args.on_policy_beta == "linear" else (0.0, "constant")


def read_heldout(run_dir: Path) -> dict:
    path = run_dir / "distill" / "heldout.json"
    if not path.exists():
        raise EvidenceError(f"{path} not found: the distill run in {run_dir} finished without its held-out check "
                            "(no `heldout_prompts`?). Run again with --force to redo it.")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# 1. Compounding error
# ------------------------------------------------------------------------------------------------

COMPOUNDING_CLAIM = ("Trained at equal compute, the off-policy student's per-position KL to the teacher on its own "
                     "samples exceeds the on-policy student's by a gap that grows with the position "
                     "(O(eps T^2) against O(eps T)).")


def position_curve(heldout: dict, min_prompts: int) -> tuple[list[int], list[float]]:
    """(positions 1.., reverse KL) over the positions that at least `min_prompts` sampled answers reach."""
    kl, counts = heldout.get("reverse_kl_by_position"), heldout.get("prompts_by_position")
    if kl is None or counts is None:
        raise EvidenceError("heldout.json has no `reverse_kl_by_position` / `prompts_by_position` (written by an "
                            "older version of the distill stage?); rerun the distill runs with --force.")
    pos = [t + 1 for t, c in enumerate(counts) if c >= min_prompts]
    return pos, [kl[t - 1] for t in pos]


def arm_figures(heldout: dict, min_prompts: int) -> dict:
    pos, kl = position_curve(heldout, min_prompts)
    fit, cum_fit = ols(pos, kl), ols(pos, cumulative(kl))
    return {"positions": pos, "kl_by_position": kl, "cumulative_kl": cumulative(kl),
            "prompts_by_position": heldout["prompts_by_position"][:len(pos)],
            "slope": fit["slope"], "slope_se": fit["slope_se"], "intercept": fit["intercept"],
            "cumulative_slope": cum_fit["slope"],
            "reverse_kl_per_token": heldout.get("reverse_kl_per_token"),
            "forward_kl_per_token": heldout.get("forward_kl_per_token"),
            "pass_rate": (heldout.get("student") or {}).get("pass_rate"),
            "teacher_pass_rate": (heldout.get("teacher") or {}).get("pass_rate")}


def compounding_result(off: dict, on: dict, min_prompts: int) -> dict:
    """The figures of both arms and the fit of the gap (off - on) over the positions both reach."""
    a, b = arm_figures(off, min_prompts), arm_figures(on, min_prompts)
    common = sorted(set(a["positions"]) & set(b["positions"]))
    ka, kb = dict(zip(a["positions"], a["kl_by_position"])), dict(zip(b["positions"], b["kl_by_position"]))
    gap = [ka[t] - kb[t] for t in common]
    fit = ols(common, gap)
    v = verdict(fit["slope"], fit["slope_se"])
    if fit["slope"] is None:
        sentence = f"Too few positions reached by {min_prompts} answers in both students to fit a slope: inconclusive."
    else:
        se = f" +- {fit['slope_se']:.2g}" if fit["slope_se"] is not None else ""
        sentence = (f"Off-policy minus on-policy KL per token changes by {fit['slope']:+.3g}{se} nats per position "
                    f"over positions 1-{common[-1]} (gap {gap[0]:+.3f} at position {common[0]}, {gap[-1]:+.3f} at "
                    f"{common[-1]}): the measurement {verdict_phrase(v)}"
                    + (" (the slope is within two standard errors of 0)." if v == "inconclusive" else "."))
    return {"claim": COMPOUNDING_CLAIM, "min_prompts": min_prompts, "off_policy": a, "on_policy": b,
            "gap": {"positions": common, "kl_gap": gap, "slope": fit["slope"], "slope_se": fit["slope_se"],
                    "intercept": fit["intercept"]},
            "verdict": v, "sentence": sentence}


def plot_compounding(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, colour in (("off_policy", "off-policy (beta 1)", "tab:red"),
                               ("on_policy", "on-policy (beta -> 0)", "tab:blue")):
        arm = res[key]
        pos = arm["positions"]
        axes[0].plot(pos, arm["kl_by_position"], ".", color=colour, alpha=0.6,
                     label=f"{label}: slope {fmt(arm['slope'], '+.2g')}")
        if arm["slope"] is not None:
            axes[0].plot(pos, [arm["intercept"] + arm["slope"] * t for t in pos], "-", color=colour)
        axes[1].plot(pos, arm["cumulative_kl"], "-", color=colour,
                     label=f"{label}: slope {fmt(arm['cumulative_slope'], '.3g')}")
    axes[0].set(xlabel="response position t", ylabel="KL(student || teacher) at t, nats",
                title="Per-position KL on the student's own samples")
    axes[1].set(xlabel="response position t", ylabel="sum of KL over positions 1..t, nats", title="Cumulative KL")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Compounding error: gap slope {fmt(res['gap']['slope'], '+.2g')} nats/position ({res['verdict']})",
                 fontsize=10)
    save_figure(fig, path)


def cmd_compounding(args) -> dict:
    heldout = write_heldout(args)
    beta_on, schedule_on = on_policy_beta(args)
    off_dir, on_dir = Path(args.out) / "runs" / "off_policy", Path(args.out) / "runs" / "on_policy"
    summaries = {
        "off_policy": run_recipe_dict(distill_recipe(args, "off_policy", 1.0, "constant", "reverse_kl", heldout),
                                      "evidence compounding (off-policy)", args.force)["distill"],
        "on_policy": run_recipe_dict(distill_recipe(args, "on_policy", beta_on, schedule_on, "reverse_kl", heldout),
                                     "evidence compounding (on-policy)", args.force)["distill"]}
    res = compounding_result(read_heldout(off_dir), read_heldout(on_dir), args.min_prompts)
    for arm, summary in summaries.items():  # equal compute: the same iterations x batch x max_new_tokens
        res[arm].update({k: summary.get(k) for k in ("iterations", "warmup_iterations", "rollout_tokens",
                                                     "warmup_tokens", "student_layers", "teacher_layers")})
    res.update(command=command_line(), runs={"off_policy": str(off_dir), "on_policy": str(on_dir)},
               settings=shared_distill_settings(args, heldout))
    out = Path(args.out)
    plot_compounding(res, out / "compounding.png")
    write_json(out / "compounding.json", res)
    print("\n== compounding ==")
    for key in ("off_policy", "on_policy"):
        a = res[key]
        print(f"{key:<11} slope {fmt(a['slope'], '+.4f')} nats/position (se {fmt(a['slope_se'], '.4f')}), cumulative "
              f"slope {fmt(a['cumulative_slope'], '.4f')}, KL/token {fmt(a['reverse_kl_per_token'], '.3f')}, "
              f"pass rate {fmt(a['pass_rate'], '.3f')}, positions fitted {len(a['positions'])}")
    print(res["sentence"])
    print(f"-> {out / 'compounding.json'}, {out / 'compounding.png'}")
    return res


def shared_distill_settings(args, heldout: str) -> dict:
    return {"teacher": args.teacher, "keep_layers": args.keep_layers, "iterations": args.iterations,
            "rollout_batch_size": args.rollout_batch_size, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
            "temperature": args.temperature, "warmup_iterations": args.warmup_iterations,
            "on_policy_beta": args.on_policy_beta, "heldout": heldout, "heldout_prompts": args.max_heldout,
            "seed": args.seed}


# ------------------------------------------------------------------------------------------------
# 2. Mode seeking against mode covering
# ------------------------------------------------------------------------------------------------

MODES_CLAIM = ("The reverse-KL student is mode seeking and the forward-KL student mode covering: the reverse-KL "
               "student has the lower entropy per token, fewer distinct 4-grams across its samples of a prompt, "
               "and samples to which the teacher gives a higher log-prob per token.")


def sample_figures(model, teacher, tok, examples: list, k: int, max_new_tokens: int, batch_size: int,
                   micro_batch_size: int, precision, seed: int) -> dict:
    """`k` samples per prompt at temperature 1 from `model`; -> entropy per token (the model's own, at its
    states), the model's and the teacher's log-prob per token of the samples, distinct 4-grams across each
    prompt's samples (mean over prompts), the pass rate over all samples, the mean length; and the same
    per prompt (`per_prompt`, token-weighted over the prompt's samples) for paired comparisons."""
    import torch

    from pipeline.onpolicy import (
        RolloutBatch, SamplingSettings, encode_prompts, expand_prompts, policy_logprobs, recompute_logprobs,
        sample_responses,
    )
    from pipeline.stages.eval import pass_rates

    V = min(len(tok), model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    rows, _ = expand_prompts(examples, k)
    per_row = {"entropy": [], "own_logprob": [], "teacher_logprob": [], "tokens": [], "ended": []}
    texts: list[str] = []
    model.eval()
    teacher.eval()
    for start in range(0, len(rows), batch_size):
        q, qm = encode_prompts(tok, rows[start:start + batch_size], device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 100_003 + start)
            r, rm, ended = sample_responses(model, tok, q, qm, SamplingSettings(max_new_tokens, temperature=1.0),
                                            precision.autocast_ctx(), vocab_size=V)
        batch = RolloutBatch(q, qm, r, rm, None, ended)
        with torch.no_grad():
            for s in range(0, len(batch), micro_batch_size):
                mb = batch.index(torch.arange(s, min(s + micro_batch_size, len(batch))))
                with precision.autocast_ctx():
                    lp, ent, _ = policy_logprobs(model, mb, 1.0, with_entropy=True, vocab_size=V)
                m = mb.response_mask
                per_row["entropy"] += torch.where(m, ent.float(), 0.0).sum(-1).tolist()
                per_row["own_logprob"] += torch.where(m, lp.float(), 0.0).sum(-1).tolist()
        t_lp = recompute_logprobs(teacher, batch, 1.0, micro_batch_size, precision.autocast_ctx(), vocab_size=V)
        per_row["teacher_logprob"] += torch.where(rm, t_lp.float(), 0.0).sum(-1).tolist()
        per_row["tokens"] += rm.sum(-1).float().tolist()
        per_row["ended"] += ended.float().tolist()
        texts += tok.batch_decode([ids[m].tolist() for ids, m in zip(r, rm)], skip_special_tokens=True)

    def per_token(key: str, rows_slice: slice) -> float:
        return sum(per_row[key][rows_slice]) / max(sum(per_row["tokens"][rows_slice]), 1.0)

    groups = [slice(i, i + k) for i in range(0, len(texts), k)]
    per_prompt = {"entropy_per_token": [per_token("entropy", g) for g in groups],
                  "teacher_logprob_per_token": [per_token("teacher_logprob", g) for g in groups],
                  "distinct_4grams": [distinct_ngrams_across(texts[g], 4) for g in groups]}
    distinct = [d for d in per_prompt["distinct_4grams"] if d is not None]
    rates = pass_rates(rows, texts)
    every = slice(0, len(texts))
    return {"samples": len(texts), "samples_per_prompt": k,
            "entropy_per_token": per_token("entropy", every),
            "own_logprob_per_token": per_token("own_logprob", every),
            "teacher_logprob_per_token": per_token("teacher_logprob", every),
            "distinct_4grams": sum(distinct) / len(distinct) if distinct else None,
            "pass_rate": rates["pass_rate"] if rates else None,
            "response_length": sum(per_row["tokens"]) / len(texts), "eos_share": sum(per_row["ended"]) / len(texts),
            "per_prompt": per_prompt, "example": texts[0] if texts else ""}


def paired_difference(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> dict:
    """Mean and standard error of a_i - b_i over the prompts where both are known."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"mean": None, "se": None, "n": 0}
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
    return {"mean": mean, "se": se, "n": len(d)}


# (prediction, metric, predicted sign of reverse-KL minus forward-KL student)
MODES_PREDICTIONS = (("lower_entropy", "entropy_per_token", -1),
                     ("fewer_distinct_4grams", "distinct_4grams", -1),
                     ("higher_teacher_logprob", "teacher_logprob_per_token", +1))


def modes_result(rows: dict[str, dict]) -> dict:
    """The three predictions, reverse-KL student against forward-KL student, each judged on the per-prompt
    paired difference (`verdict`: beyond two standard errors either way, or not), and an overall verdict."""
    rev, fwd = rows["reverse_kl"], rows["forward_kl"]
    checks = {}
    for name, metric, sign in MODES_PREDICTIONS:
        diff = paired_difference(rev["per_prompt"][metric], fwd["per_prompt"][metric])
        v = verdict(diff["mean"], diff["se"], sign)
        checks[name] = {"metric": metric, "reverse_minus_forward": diff["mean"], "se": diff["se"],
                        "prompts": diff["n"], "verdict": v}
    holds = sum(c["verdict"] == "agrees" for c in checks.values())
    fails = sum(c["verdict"] == "disagrees" for c in checks.values())
    v = ("agrees" if holds == len(checks) else "partly agrees" if holds else "disagrees" if fails
         else "inconclusive")
    sentence = (f"Reverse KL against forward KL: entropy/token {fmt(rev['entropy_per_token'], '.3f')} vs "
                f"{fmt(fwd['entropy_per_token'], '.3f')}, distinct 4-grams {fmt(rev['distinct_4grams'], '.3f')} vs "
                f"{fmt(fwd['distinct_4grams'], '.3f')}, teacher log-prob/token "
                f"{fmt(rev['teacher_logprob_per_token'], '.3f')} vs {fmt(fwd['teacher_logprob_per_token'], '.3f')}, "
                f"pass rate {fmt(rev['pass_rate'], '.3f')} vs {fmt(fwd['pass_rate'], '.3f')}; of the 3 predictions "
                f"{holds} hold and {fails} fail by more than two standard errors of the per-prompt difference: the "
                f"measurement {verdict_phrase(v)}.")
    return {"claim": MODES_CLAIM, "models": rows, "predictions": checks, "verdict": v, "sentence": sentence}


MODES_METRICS = (("entropy_per_token", "entropy / token (nats)"), ("distinct_4grams", "distinct 4-grams"),
                 ("pass_rate", "pass rate"), ("teacher_logprob_per_token", "teacher log-prob / token"))


def plot_modes(res: dict, path: Path) -> None:
    plt = pyplot()
    names = list(res["models"])
    colours = {"teacher": "tab:gray", "reverse_kl": "tab:blue", "forward_kl": "tab:orange"}
    fig, axes = plt.subplots(1, len(MODES_METRICS), figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, MODES_METRICS):
        vals = [res["models"][n][key] for n in names]
        ax.bar(range(len(names)), [0.0 if v is None else v for v in vals],
               color=[colours.get(n, "tab:green") for n in names])
        for i, v in enumerate(vals):
            ax.annotate(fmt(v, ".3f"), (i, 0.0 if v is None else v), ha="center",
                        va="bottom" if (v or 0) >= 0 else "top", fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Mode seeking (reverse KL) against mode covering (forward KL): {res['verdict']}", fontsize=10)
    save_figure(fig, path)


def cmd_modes(args) -> dict:
    from pipeline.config import ModelConfig
    from pipeline.data import load_rows, prompt_examples
    from pipeline.models import load_causal_lm, load_tokenizer, resolve_model_path, resolve_precision

    heldout = write_heldout(args)
    beta_on, schedule_on = on_policy_beta(args)
    runs = {"reverse_kl": Path(args.out) / "runs" / "on_policy", "forward_kl": Path(args.out) / "runs" / "forward_kl"}
    run_recipe_dict(distill_recipe(args, "on_policy", beta_on, schedule_on, "reverse_kl", heldout),
                    "evidence modes (reverse KL; compounding's on-policy run)", args.force)
    run_recipe_dict(distill_recipe(args, "forward_kl", beta_on, schedule_on, "forward_kl", heldout),
                    "evidence modes (forward KL)", args.force)

    cfg = ModelConfig()
    precision = resolve_precision(cfg)
    teacher_path = resolve_model_path(args.teacher)
    tok = load_tokenizer(teacher_path, cfg)
    teacher = load_causal_lm(teacher_path, cfg, precision, tok).requires_grad_(False)
    examples = prompt_examples(load_rows(heldout), heldout)
    rows = {}
    for name, path in (("teacher", None), *runs.items()):
        model = teacher if path is None else load_causal_lm(str(path / "distill" / "final"), cfg, precision, tok)
        print(f"modes: sampling {args.samples_per_prompt} answers per prompt from the {name} "
              f"({len(examples)} prompts)", file=sys.stderr)
        rows[name] = sample_figures(model.requires_grad_(False), teacher, tok, examples, args.samples_per_prompt,
                                    args.max_new_tokens, args.sample_batch_size, args.rollout_batch_size, precision,
                                    args.seed)
        if path is not None:
            del model
            gc.collect()
    res = modes_result(rows)
    res.update(command=command_line(), runs={k: str(v) for k, v in runs.items()},
               settings=shared_distill_settings(args, heldout) | {"samples_per_prompt": args.samples_per_prompt,
                                                                  "sampling_temperature": 1.0})
    out = Path(args.out)
    plot_modes(res, out / "modes.png")
    write_json(out / "modes.json", res)
    print("\n== modes ==")
    cols = ("entropy_per_token", "distinct_4grams", "pass_rate", "teacher_logprob_per_token", "own_logprob_per_token",
            "response_length", "eos_share")
    heads = ("entropy/tok", "distinct 4g", "pass rate", "teacher lp/tok", "own lp/tok", "length", "EOS share")
    print(f"{'model':<11}" + "".join(f"{h:>15}" for h in heads))
    for name, r in rows.items():
        print(f"{name:<11}" + "".join(f"{fmt(r[c], '.3f'):>15}" for c in cols))
    print(res["sentence"])
    print(f"-> {out / 'modes.json'}, {out / 'modes.png'}")
    return res


# ------------------------------------------------------------------------------------------------
# 3. Over-optimisation of the reward model
# ------------------------------------------------------------------------------------------------

OVEROPT_CLAIM = ("Optimised against the reward model alone, the policy's verifier pass rate peaks and then falls "
                 "while the RM score still climbs and the KL to the reference grows (Gao et al. 2022).")


def overopt_recipe(args) -> dict:
    return {
        "run": {"name": "evidence-overopt", "seed": args.seed, "output_dir": str(Path(args.out) / "runs" / "overopt"),
                "keep_checkpoints": False},
        "model": {"name_or_path": args.policy},
        "stages": ["ppo"],
        "ppo": {
            "policy_from": "base",
            # The verifier at weight 0 adds nothing to the reward; its verdicts are logged (`ppo/score/verifier`).
            "rewards": [{"kind": "rm", "source": args.reward, "weight": 1.0}, {"kind": "verifier", "weight": 0.0}],
            "prompts": args.prompts, "advantage": "rloo", "samples_per_prompt": args.ppo_samples_per_prompt,
            "iterations": args.ppo_iterations, "rollout_batch_size": args.ppo_rollout_batch_size,
            "minibatch_size": args.ppo_rollout_batch_size * args.ppo_samples_per_prompt,
            "micro_batch_size": args.ppo_rollout_batch_size * args.ppo_samples_per_prompt,
            "epochs": 2, "lr": args.ppo_lr, "max_new_tokens": args.ppo_max_new_tokens, "temperature": 1.0,
            "kl_coef": args.kl_coef, "checkpoint_every": 10, "log_samples_every": 5,
        },
    }


def overopt_result(history: list[dict], window: int) -> dict:
    """Per iteration RM score, pass rate and KL/token from the PPO stage's metrics rows; the smoothed pass
    rate's peak; the RM score's slope from the peak on; a verdict."""
    rows = [r for r in history if "ppo/pass_rate" in r and "ppo/kl_per_token" in r]
    if not rows:
        raise EvidenceError("the PPO run's metrics.jsonl has no iteration with `ppo/pass_rate` and `ppo/kl_per_token`"
                            " (prompts without `instruction_id_list`?).")
    rm_key = "ppo/score/rm" if "ppo/score/rm" in rows[0] else "ppo/score"
    it = [int(r["step"]) for r in rows]
    rm = [float(r[rm_key]) for r in rows]
    pr = [float(r["ppo/pass_rate"]) for r in rows]
    kl = [float(r["ppo/kl_per_token"]) for r in rows]
    peak = find_peak(pr, window)
    p = peak["index"]
    rm_s = smooth(rm, window)
    after = ols(it[p:], rm[p:])
    rises = after["slope"] is not None and after["slope"] > 0
    drop = peak["value"] - peak["smoothed"][-1]
    at_end = p >= len(pr) - 1 - window // 2
    at_start = p <= window // 2
    if at_end:
        v = "not observed"
        why = "the smoothed pass rate is still at its peak at the end of the run (train longer or raise the lr)"
    elif drop <= 0:
        v = "disagrees"
        why = "the pass rate does not fall after its peak"
    elif not rises:
        v = "partly agrees"
        why = "the pass rate falls after its peak, but the RM score does not rise after it"
    elif at_start:
        v = "partly agrees"
        why = "the RM score rises while the pass rate falls, but the pass rate never rose above its start"
    else:
        v = "agrees"
        why = "the pass rate rises, peaks and falls while the RM score still rises"
    sentence = (f"The smoothed verifier pass rate peaks at iteration {it[p]} ({peak['value']:.3f}) and ends at "
                f"{peak['smoothed'][-1]:.3f}; the RM score goes {rm_s[p]:+.3f} -> {rm_s[-1]:+.3f} after the peak "
                f"(slope {fmt(after['slope'], '+.3g')} per iteration), KL/token {kl[p]:.3f} -> {kl[-1]:.3f}: "
                f"{why}; the measurement {verdict_phrase(v)}.")
    return {"claim": OVEROPT_CLAIM, "rm_key": rm_key, "iterations": it, "rm_score": rm, "pass_rate": pr,
            "kl_per_token": kl, "smooth_window": window, "pass_rate_smoothed": peak["smoothed"],
            "rm_score_smoothed": rm_s,
            "peak": {"iteration": it[p], "index": p, "pass_rate_smoothed": peak["value"], "rm_score_smoothed": rm_s[p],
                     "kl_per_token": kl[p]},
            "end": {"iteration": it[-1], "pass_rate_smoothed": peak["smoothed"][-1], "rm_score_smoothed": rm_s[-1],
                    "kl_per_token": kl[-1]},
            "peak_at_start": at_start, "peak_at_end": at_end, "pass_rate_drop_after_peak": drop,
            "rm_slope_after_peak": after["slope"],
            "rm_slope_after_peak_se": after["slope_se"], "rm_rises_after_peak": rises,
            "verdict": v, "sentence": sentence}


def plot_overopt(res: dict, path: Path) -> None:
    plt = pyplot()
    it = res["iterations"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    panels = ((axes[0], res["rm_score"], res["rm_score_smoothed"], "RM score (raw)", "tab:purple"),
              (axes[1], res["pass_rate"], res["pass_rate_smoothed"], "verifier pass rate", "tab:green"),
              (axes[2], res["kl_per_token"], None, "KL / token to the reference", "tab:red"))
    for ax, y, ys, label, colour in panels:
        ax.plot(it, y, "o", ms=3, color=colour, alpha=0.5 if ys else 1.0)
        ax.plot(it, ys if ys else y, "-", color=colour)
        ax.axvline(res["peak"]["iteration"], ls="--", color="black", lw=1)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].annotate(f"pass rate peak (smoothed, window {res['smooth_window']}): iteration {res['peak']['iteration']}",
                     (res["peak"]["iteration"], res["peak"]["pass_rate_smoothed"]), fontsize=8,
                     xytext=(5, 5), textcoords="offset points")
    axes[2].set_xlabel("PPO iteration")
    fig.suptitle(f"Over-optimisation of the reward model: {res['verdict']} (RM slope after the peak "
                 f"{fmt(res['rm_slope_after_peak'], '+.3g')})", fontsize=10)
    save_figure(fig, path)


def cmd_overopt(args) -> dict:
    from pipeline.utils import read_jsonl

    recipe = overopt_recipe(args)
    run_recipe_dict(recipe, "evidence overopt (PPO against the RM alone)", args.force)
    run_dir = Path(recipe["run"]["output_dir"])
    res = overopt_result(read_jsonl(run_dir / "ppo" / "metrics.jsonl"), args.smooth)
    res.update(command=command_line(), run=str(run_dir),
               settings={"policy": args.policy, "reward": args.reward, "iterations": args.ppo_iterations,
                         "rollout_batch_size": args.ppo_rollout_batch_size,
                         "samples_per_prompt": args.ppo_samples_per_prompt, "max_new_tokens": args.ppo_max_new_tokens,
                         "lr": args.ppo_lr, "kl_coef": args.kl_coef, "seed": args.seed})
    out = Path(args.out)
    plot_overopt(res, out / "overopt.png")
    write_json(out / "overopt.json", res)
    print("\n== overopt ==")
    print(f"{'iteration':>9} {'RM score':>9} {'pass rate':>9} {'KL/token':>9}")
    for i, (t, a, b, c) in enumerate(zip(res["iterations"], res["rm_score"], res["pass_rate"], res["kl_per_token"])):
        mark = "  <- pass rate peak (smoothed)" if i == res["peak"]["index"] else ""
        print(f"{t:>9} {a:>9.3f} {b:>9.3f} {c:>9.3f}{mark}")
    print(res["sentence"])
    print(f"-> {out / 'overopt.json'}, {out / 'overopt.png'}")
    return res


# ------------------------------------------------------------------------------------------------
# --tiny: a tiny random teacher, reward model and prompt set
# ------------------------------------------------------------------------------------------------

TINY_WORDS = ("write a short poem about the sea in lowercase letters describe a cat do not use any commas wrap "
              "the whole answer in double quotes the quick brown fox jumps over lazy dog and sleeps").split()
TINY_TASKS = (("write a short poem about the sea {i} in lowercase letters", "change_case:english_lowercase",
               "the sea is blue and calm {i}"),
              ("describe a cat {i} and do not use any commas", "punctuation:no_comma",
               "the cat sleeps over the lazy dog {i}"),
              ("wrap the whole answer about the fox {i} in double quotes", "startend:quotation",
               '"the quick brown fox {i}"'))
TINY_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny(out: Path) -> dict:
    """<out>/tiny/{teacher,reward}/ and the prompt, warm-up and held-out files (kept when they exist)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from pipeline.utils import atomic_dir, atomic_write_text

    d = out / "tiny"
    paths = {"teacher": d / "teacher", "reward": d / "reward", "prompts": d / "prompts.jsonl",
             "warmup": d / "warmup.jsonl", "heldout": d / "heldout.jsonl"}
    if not all(p.exists() for p in paths.values()):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        corpus = [" ".join(TINY_WORDS), "system user assistant 0 1 2 3 4 5 6 7 8 9 \" ."] * 20
        tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", unk_token="<|endoftext|>")
        tok.chat_template = TINY_TEMPLATE
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(cfg)
        with torch.no_grad():  # peaked next-token distributions (a random init gives near-uniform ones)
            teacher.model.norm.weight.mul_(6.0)
        teacher.generation_config.eos_token_id = tok.eos_token_id
        teacher.generation_config.pad_token_id = tok.pad_token_id
        reward_cfg = copy.deepcopy(cfg)
        reward_cfg.num_labels = 1
        reward = LlamaForSequenceClassification(reward_cfg)
        for name, model in (("teacher", teacher), ("reward", reward)):
            with atomic_dir(paths[name]) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)

        def rows(n: int, offset: int, completion: bool) -> str:
            out_rows = []
            for i in range(offset, offset + n):
                prompt, iid, answer = TINY_TASKS[i % len(TINY_TASKS)]
                row = {"prompt": prompt.format(i=i), "instruction_id_list": [iid], "kwargs": [{}]}
                if completion:
                    row = {"prompt": row["prompt"], "completion": answer.format(i=i)}
                out_rows.append(json.dumps(row) + "\n")
            return "".join(out_rows)

        atomic_write_text(paths["prompts"], rows(24, 0, False))
        atomic_write_text(paths["warmup"], rows(24, 0, True))
        atomic_write_text(paths["heldout"], rows(12, 100, False))
    return {k: str(p.resolve()) for k, p in paths.items()}


# ------------------------------------------------------------------------------------------------
# Helpers and the command line
# ------------------------------------------------------------------------------------------------


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write the figure atomically (a temporary sibling renamed onto `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    pyplot().close(fig)


def write_json(path: Path, obj: Any) -> None:
    from pipeline.utils import atomic_write_json

    atomic_write_json(path, obj)


def command_line() -> str:
    return " ".join(["python", "scripts/evidence.py", *sys.argv[1:]]) if sys.argv[0].endswith("evidence.py") else \
        "python scripts/evidence.py (called in-process)"


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/evidence.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("compounding", "modes", "overopt", "all"))
    p.add_argument("--teacher", help="the teacher: a merged HF model directory (e.g. runs/quickstart/ppo/final), a "
                   "hub id or smollm2-135m-instruct (compounding, modes)")
    p.add_argument("--reward", help="a reward model directory, e.g. runs/quickstart/reward/final (overopt)")
    p.add_argument("--policy", default=None, help=f"the PPO start and reference for overopt (default {DEFAULT_MODEL})")
    p.add_argument("--out", default="runs/evidence", help="output folder (default runs/evidence)")
    p.add_argument("--tiny", action="store_true", help="tiny random models and data built on the fly (a smoke test)")
    p.add_argument("--force", action="store_true", help="rerun runs whose settings changed (as `pipeline run --force`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="training prompts (default data/constraints/prompts.jsonl)")
    p.add_argument("--heldout", default=None, help="held-out prompts (default eval/constraints/heldout.jsonl)")
    p.add_argument("--warmup-data", default=None, help="demonstrations for the students' shared forward-KL warm-up "
                   "(default data/constraints/sft.jsonl)")
    p.add_argument("--on-policy-beta", choices=("linear", "zero"), default="linear",
                   help="the on-policy arm's mixture: beta 1 -> 0 linearly (default) or 0 throughout")
    helps = {
        "keep_layers": "the student's teacher layers (distill.student.from_teacher.keep_layers)",
        "iterations": "distill iterations per student (both arms alike)",
        "rollout_batch_size": "prompts per distill iteration", "max_new_tokens": "tokens per distill sample",
        "lr": "the students' learning rate", "temperature": "the distill rollouts' temperature",
        "warmup_iterations": "forward-KL warm-up batches on --warmup-data before the mixture (0: none)",
        "max_heldout": "held-out prompts used (the first N)",
        "min_prompts": "fit positions that at least this many sampled answers reach",
        "samples_per_prompt": "modes: samples per held-out prompt", "sample_batch_size": "modes: rows per generate call",
        "ppo_iterations": "overopt: PPO iterations", "ppo_rollout_batch_size": "overopt: prompts per iteration",
        "ppo_samples_per_prompt": "overopt: RLOO samples per prompt", "ppo_max_new_tokens": "overopt: tokens per sample",
        "ppo_lr": "overopt: LoRA learning rate", "kl_coef": "overopt: the KL coefficient",
        "smooth": "overopt: moving-average window for the pass-rate peak",
    }
    for key, (real, tiny) in SIZES.items():
        kind = str if isinstance(real, str) else type(real)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"{helps[key]} (default {real}; --tiny {tiny})")
    args = p.parse_args(argv)
    for key, (real, tiny) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else real)
    return args


def check_args(args) -> None:
    """Fill the data and model defaults (--tiny: build them) and refuse missing or bad values before any run."""
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise EvidenceError(f"--out {args.out} is a file; give a folder (default runs/evidence).")
    args.out = str(out)
    if args.tiny:
        tiny = build_tiny(out)
        args.teacher = args.teacher or tiny["teacher"]
        args.reward = args.reward or tiny["reward"]
        args.policy = args.policy or tiny["teacher"]
        args.prompts = args.prompts or tiny["prompts"]
        args.heldout = args.heldout or tiny["heldout"]
        args.warmup_data = args.warmup_data or tiny["warmup"]
    args.policy = args.policy or DEFAULT_MODEL
    args.prompts = args.prompts or str(ROOT / "data/constraints/prompts.jsonl")
    args.heldout = args.heldout or str(ROOT / "eval/constraints/heldout.jsonl")
    args.warmup_data = args.warmup_data or str(ROOT / "data/constraints/sft.jsonl")
    needs_teacher = args.experiment in ("compounding", "modes", "all")
    if needs_teacher and not args.teacher:
        raise EvidenceError(f"`{args.experiment}` needs --teacher: the model the students learn from, a merged model "
                            "directory such as runs/quickstart/ppo/final (or smollm2-135m-instruct), or --tiny.")
    if args.experiment in ("overopt", "all") and not args.reward:
        raise EvidenceError(f"`{args.experiment}` needs --reward: a reward model directory such as "
                            "runs/quickstart/reward/final (the `reward` stage's output), or --tiny.")
    for key in ("iterations", "rollout_batch_size", "max_new_tokens", "max_heldout", "min_prompts",
                "samples_per_prompt", "sample_batch_size", "ppo_iterations", "ppo_rollout_batch_size",
                "ppo_max_new_tokens", "smooth"):
        if getattr(args, key) < 1:
            raise EvidenceError(f"--{key.replace('_', '-')} is {getattr(args, key)}; it must be at least 1.")
    if args.ppo_samples_per_prompt < 2:
        raise EvidenceError(f"--ppo-samples-per-prompt is {args.ppo_samples_per_prompt}; RLOO baselines each sample "
                            "by the others of its prompt, so it must be at least 2.")
    if args.warmup_iterations < 0:
        raise EvidenceError(f"--warmup-iterations is {args.warmup_iterations}; it must be >= 0 (0: no warm-up).")


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    from pipeline.config import RecipeError
    from pipeline.data import DataError
    from pipeline.models import ModelError

    try:
        check_args(args)
        if args.experiment in ("compounding", "all"):
            cmd_compounding(args)
        if args.experiment in ("modes", "all"):
            cmd_modes(args)
        if args.experiment in ("overopt", "all"):
            cmd_overopt(args)
    except (EvidenceError, RecipeError, DataError, ModelError, OSError) as e:
        text = f"{e.filename}: {e.strerror}." if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"error: {text}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
