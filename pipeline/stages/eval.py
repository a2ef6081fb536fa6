"""Stage `eval`: held-out evaluation of any set of models, then the run report.

    pipeline run recipes/eval.yaml                       (or --stages eval in any recipe)
    pipeline eval --models A B --prompts FILE.jsonl [--output-dir DIR] [--reward-model RM]

Models are named as in recipes (`base`, a stage name such as `sft` or `ppo`, a path or a hub id) and
are loaded one at a time:
  1. each model answers every prompt set (greedy by default, seed fixed per model) and gets the
     teacher-forced log-probs of its own responses (not the reference: its KL is 0 by definition);
  2. the reference model (default `base`; the first model for `pipeline eval`) scores the same
     token sequences, giving the KL of each model to it;
  3. the reward model, when given, scores every response (mean, std, and the win rate against the
     baseline model: share of prompts where RM(model) > RM(baseline), ties count half; the
     baseline, default the reference, is evaluated too when it is not listed);
  4. checker pass rates (IFEval semantics, `pipeline.checkers`) with a 95% Wilson interval, lengths and
     EOS shares; each listed model against the one before it and against the reference, paired on the
     same prompts (gained, lost, McNemar exact p), and per instruction id against the reference (issue
     #22: `per_id_paired`, a significant drop is flagged as a regression); then `results.json`,
     `samples.jsonl`, `metrics.jsonl` (`eval/<set>/<model>/<metric>`) and a table on stdout. The
     runner writes `report.md` / `report.html` for the whole run directory after the last stage.

Generation shows its progress: a tqdm bar on a terminal, plain log lines otherwise (a log file).

KL: the per-token mean of log p_model - log p_ref over the response tokens, teacher-forced at
temperature 1: sum over all response tokens of the set / number of tokens (k1). The tokens come from
the model itself, but with greedy decoding they are not *samples* of p_model, so this is the k1
estimator evaluated on greedy outputs: it measures how far the model's own answers moved from the
reference, not an unbiased estimate of KL(p_model || p_ref) (it can even be negative).
(k1: joschu.net/blog/kl-approx.html)

Prompt sets are named by file stem; IFEval's generic stems get names that say which set they are
(`subset_supported` -> `ifeval_subset`, `input_data` -> `ifeval_full`), as its README asks.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import stop_if_interrupted
from ..config import EvalConfig, Recipe, RecipeError, RunConfig
from ..data import load_rows, prompt_token_ids, prompt_examples
from ..generation import Generations, generate, left_pad
from ..models import Precision, load_policy, resolve_model_path, resolve_precision
from ..utils import MetricsLogger, atomic_write_json, atomic_write_text, log, set_seed

_SET_ALIASES = {"subset_supported": "ifeval_subset", "input_data": "ifeval_full"}

# Scalar metrics of one (set, model) pair, in table order.
METRICS = (
    "pass_rate", "pass_rate_loose", "instruction_pass_rate", "instruction_pass_rate_loose",
    "rm_score_mean", "rm_score_std", "win_rate", "kl", "kl_per_response", "response_length", "eos_share",
)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def set_name(spec: str) -> str:
    """`eval/constraints/heldout.jsonl` -> `heldout`; IFEval's `subset_supported` -> `ifeval_subset`."""
    path = spec if Path(spec).exists() else spec.partition(":")[0]  # hub specs are `name:split`
    stem = Path(path).stem
    return _SET_ALIASES.get(stem, stem)


def model_name(ref: str) -> str:
    """A short name for metric keys: `sft` stays `sft`; `runs/x/ppo/final` -> `ppo`; `org/Model` -> `Model`."""
    if "/" not in ref and "\\" not in ref:
        return Path(ref).stem if ref.endswith(".gguf") else ref
    parts = [p for p in Path(ref).parts if p not in ("final", "/", "")]
    return parts[-1] if parts else ref


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


# --------------------------------------------------------------------------------------------
# Checker pass rates (pure: records + responses -> numbers)
# --------------------------------------------------------------------------------------------


def instruction_results(examples: list[dict], responses: list[str]) -> list[Optional[list[dict]]]:
    """Per prompt: one {id, kwargs, strict, loose} per instruction, or None for a plain prompt."""
    from ..checkers import check_record

    out: list[Optional[list[dict]]] = []
    for ex, resp in zip(examples, responses):
        ids = ex.get("instruction_id_list")
        if not ids:
            out.append(None)
            continue
        strict = check_record(resp, ids, ex["kwargs"])
        loose = check_record(resp, ids, ex["kwargs"], loose=True)
        out.append([{"id": i, "kwargs": kw, "strict": s, "loose": lo}
                    for i, kw, s, lo in zip(ids, ex["kwargs"], strict, loose)])
    return out


def pass_rates(examples: list[dict], responses: list[str]) -> Optional[dict]:
    """IFEval accuracies over the prompts that carry instructions (None when none does).

    prompt-level: share of prompts whose instructions all pass; instruction-level: share of all
    instructions that pass (Zhou et al. 2023, sec. 3). `loose` also tries the response without its
    first/last line and without `*` (checkers.check_instruction). per_id: instruction-level per id.
    """
    return summarize_checks(instruction_results(examples, responses))


def summarize_checks(results: list[Optional[list[dict]]]) -> Optional[dict]:
    """`pass_rates` from the per-prompt output of `instruction_results`."""
    judged = [r for r in results if r is not None]
    if not judged:
        return None
    flat = [ins for r in judged for ins in r]
    per_id: dict[str, dict] = {}
    for ins in flat:
        d = per_id.setdefault(ins["id"], {"n": 0, "strict": 0, "loose": 0})
        d["n"] += 1
        d["strict"] += ins["strict"]
        d["loose"] += ins["loose"]
    return {
        "n_checked": len(judged),
        "n_instructions": len(flat),
        "pass_rate": sum(all(i["strict"] for i in r) for r in judged) / len(judged),
        "pass_rate_loose": sum(all(i["loose"] for i in r) for r in judged) / len(judged),
        "instruction_pass_rate": sum(i["strict"] for i in flat) / len(flat),
        "instruction_pass_rate_loose": sum(i["loose"] for i in flat) / len(flat),
        "per_id": {k: {"n": d["n"], "pass_rate": d["strict"] / d["n"], "pass_rate_loose": d["loose"] / d["n"]}
                   for k, d in sorted(per_id.items())},
    }


def paired_pass_test(passed: list[bool], before: list[bool]) -> dict:
    """Prompt-level pass of a model against another one on the same prompts: `gained` (passes now, failed
    before), `lost`, the `difference` in pass rate, and McNemar's exact two-sided `p_value` (a binomial test
    of gained vs lost among the discordant prompts at p = 1/2): how often a difference at least this large
    arises when neither model is better. 100 held-out prompts is a small sample; this says whether a lift
    is more than noise."""
    if len(passed) != len(before) or not passed:
        raise ValueError(f"paired_pass_test needs two equal, non-empty lists (got {len(passed)} and {len(before)})")
    gained = sum(bool(a) and not b for a, b in zip(passed, before))
    lost = sum(bool(b) and not a for a, b in zip(passed, before))
    n, k = gained + lost, min(gained, lost)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"n": len(passed), "gained": gained, "lost": lost, "difference": (gained - lost) / len(passed),
            "p_value": p}


def per_id_paired(checks: list[Optional[list[dict]]], before: list[Optional[list[dict]]]) -> dict[str, dict]:
    """Instruction-level pass per instruction id, a model against another on the same prompts (issue #22).

    For each id, the prompts carrying it (an id listed twice in a prompt counts twice): both pass rates
    (`pass_rate`, `pass_rate_against`) and `paired_pass_test` of this instruction's strict pass, i.e.
    gained, lost and McNemar's exact p over those prompts. `regression`: significantly worse
    (`report.is_regression`: p < 0.05 and more lost than gained)."""
    from ..report import is_regression

    pairs: dict[str, tuple[list[bool], list[bool]]] = {}
    for now, was in zip(checks, before):
        if now is None or was is None:
            continue
        for a, b in zip(now, was):  # the same record: the same instructions in the same order
            pairs.setdefault(a["id"], ([], []))
            pairs[a["id"]][0].append(bool(a["strict"]))
            pairs[a["id"]][1].append(bool(b["strict"]))
    out = {}
    for i, (a, b) in sorted(pairs.items()):
        t = {"pass_rate": sum(a) / len(a), "pass_rate_against": sum(b) / len(b), **paired_pass_test(a, b)}
        t["regression"] = is_regression(t)
        out[i] = t
    return out


def prompt_passes(checks: list[Optional[list[dict]]]) -> list[bool]:
    """Strict prompt-level pass of each prompt that carries instructions."""
    return [all(i["strict"] for i in r) for r in checks if r is not None]


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Share of prompts where score > baseline score; ties count half."""
    wins = [1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline_scores)]
    return sum(wins) / len(wins)


# --------------------------------------------------------------------------------------------
# Teacher-forced log-probs (the same forward PPO uses, so the two KLs are measured alike)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                      vocab_size: int, batch_size: int = 8, autocast=None) -> list[float]:
    """Sum over response tokens of log p(token | prefix) at temperature 1, one float per response.

    Rows are sorted by length so batches pad little. Query left-padded, response right-padded;
    position ids follow the attention mask (onpolicy.model_inputs). Logits are sliced to the
    tokenizer's vocabulary (padded vocabularies differ within a family: docs/implementation_details.md).
    """
    from ..onpolicy import RolloutBatch, recompute_logprobs
    from ..rl import masked_sum

    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    sums = [0.0] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        q, qm = left_pad([prompt_ids[i] for i in idx], pad_id, device)
        T = max(1, max(len(response_ids[i]) for i in idx))
        r = torch.full((len(idx), T), pad_id, dtype=torch.long)
        m = torch.zeros((len(idx), T), dtype=torch.bool)
        for row, i in enumerate(idx):
            r[row, :len(response_ids[i])] = torch.tensor(response_ids[i], dtype=torch.long)
            m[row, :len(response_ids[i])] = True
        batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r.to(device), response_mask=m.to(device),
                             logprobs=None, ended=m.any(1).to(device))
        lp = recompute_logprobs(model, batch, 1.0, batch_size, autocast, vocab_size=vocab_size)
        for row, s in zip(idx, masked_sum(lp, batch.response_mask, dim=1).tolist()):
            sums[row] = s
    return sums


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class PromptSet:
    name: str
    spec: str
    examples: list[dict]


@dataclass
class Answers:
    """One model's responses on one prompt set, and what was measured on them."""

    texts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    logprob_sums: Optional[list[float]] = None  # sum of log p_model over each response
    kl_sums: Optional[list[float]] = None  # sum of log p_model - log p_ref over each response
    rm_scores: Optional[list[float]] = None


@dataclass
class ModelRun:
    name: str
    path: str
    vocab: int = 0  # hash of the tokenizer's vocabulary: KL needs the same tokens for both models
    seconds: float = 0.0
    answers: dict[str, Answers] = field(default_factory=dict)


def load_prompt_sets(specs: list[str], max_prompts: Optional[int]) -> list[PromptSet]:
    if not specs:
        raise RecipeError("eval: no prompt files; set `eval.prompts` (or pass --prompts).")
    names = _unique([set_name(s) for s in specs])
    return [PromptSet(n, s, prompt_examples(load_rows(s, max_prompts), s)) for n, s in zip(names, specs)]


def _vocab_hash(tok) -> int:
    return hash(tuple(sorted(tok.get_vocab().items())))


# Without a terminal (a log file, a job scheduler) progress is a plain line every few batches, about
# this many per (model, prompt set), instead of a bar redrawn with carriage returns.
PROGRESS_LINES = 10


def generate_with_progress(model, tok, prompts: list, *, batch_size: int, desc: str, tty: Optional[bool] = None,
                           **gen_kwargs) -> Generations:
    """`generation.generate` one batch at a time, showing progress: a tqdm bar when stderr is a terminal,
    else a `log` line every ceil(batches / PROGRESS_LINES) batches and after the last one.

    The batches are the ones `generate` forms itself (prompts sorted by token length, stable, cut every
    `batch_size`), and it keeps the order of an already sorted batch, so the answers are the same as
    from one `generate` call over all prompts."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty() if tty is None else tty
    lengths = [len(prompt_token_ids(tok, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    every = max(1, math.ceil(len(batches) / PROGRESS_LINES))
    texts: list = [None] * len(prompts)
    ids: list = [None] * len(prompts)
    ended: list = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, file=sys.stderr, disable=not tty)
    t0, done = time.time(), 0
    for b, idx in enumerate(batches):
        stop_if_interrupted(f"the eval stage ({desc}, batch {b + 1}/{len(batches)})")
        g = generate(model, tok, [prompts[i] for i in idx], batch_size=batch_size, progress=False, **gen_kwargs)
        for j, i in enumerate(idx):
            texts[i], ids[i], ended[i] = g.texts[j], g.response_ids[j], g.ended[j]
        done += len(idx)
        bar.update(len(idx))
        if not tty and ((b + 1) % every == 0 or b + 1 == len(batches)):
            log(f"eval: {desc}: {done}/{len(prompts)} prompts, batch {b + 1}/{len(batches)}, "
                f"{time.time() - t0:.0f}s")
    bar.close()
    return Generations(texts=texts, response_ids=ids, ended=ended)


def answer_all(run: ModelRun, sets: list[PromptSet], recipe: Recipe, precision: Precision, logprobs: bool) -> None:
    """Step 1: load the model, answer every set, keep the log-probs of its own responses (unless it
    is the reference), unload."""
    cfg: EvalConfig = recipe.eval
    t0 = time.time()
    model, tok = load_policy(run.path, recipe.model, precision)
    run.vocab = _vocab_hash(tok)
    for ps in sets:
        set_seed(recipe.run.seed)  # each model's sampling is reproducible whatever the order
        prompts = [ex["prompt"] for ex in ps.examples]
        gens = generate_with_progress(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                                      temperature=cfg.temperature, autocast=precision.autocast_ctx(),
                                      desc=f"{run.name} on {ps.name}")
        p_ids = [prompt_token_ids(tok, p) for p in prompts]
        a = run.answers[ps.name] = Answers(gens.texts, p_ids, gens.response_ids, gens.ended)
        if logprobs:
            a.logprob_sums = sequence_logprobs(model, p_ids, gens.response_ids, tok.pad_token_id, len(tok),
                                               autocast=precision.autocast_ctx())
    run.seconds = round(time.time() - t0, 1)
    log(f"eval: {run.name} answered {sum(len(s.examples) for s in sets)} prompts in {run.seconds}s")
    del model
    gc.collect()


def score_reference(runs: list[ModelRun], ref_path: str, recipe: Recipe, precision: Precision,
                    notes: list[str]) -> None:
    """Step 2: log-probs of every model's responses under the reference model."""
    todo = [r for r in runs if r.path != ref_path]
    for r in runs:
        if r.path == ref_path:  # the reference itself: KL is 0 by definition, no forward at all
            for a in r.answers.values():
                a.kl_sums = [0.0] * len(a.texts)
    if not todo:
        return
    model, tok = load_policy(ref_path, recipe.model, precision)
    for r in todo:
        if r.vocab != _vocab_hash(tok):
            notes.append(f"KL of {r.name} skipped: its tokenizer differs from the reference's.")
            continue
        for a in r.answers.values():
            ref = sequence_logprobs(model, a.prompt_ids, a.response_ids, tok.pad_token_id, len(tok),
                                    autocast=precision.autocast_ctx())
            a.kl_sums = [lp - lr for lp, lr in zip(a.logprob_sums, ref)]
    del model
    gc.collect()


def score_reward(runs: list[ModelRun], sets: list[PromptSet], rm_path: str, recipe: Recipe,
                 precision: Precision, notes: list[str]) -> bool:
    """Step 3: reward-model scores of every response. False (with a note) when no scorer exists yet."""
    try:
        from ..rewards import RewardModelScorer
    except ImportError as e:
        notes.append(f"reward-model metrics skipped: pipeline.rewards.RewardModelScorer is unavailable ({e}).")
        return False
    scorer = RewardModelScorer(rm_path, recipe.model, precision)
    bs = recipe.eval.batch_size
    for r in runs:
        for ps in sets:
            a = r.answers[ps.name]
            prompts = [ex["prompt"] for ex in ps.examples]
            a.rm_scores = [float(s) for i in range(0, len(prompts), bs)
                           for s in scorer.score(prompts[i:i + bs], a.texts[i:i + bs]).float().tolist()]
    del scorer
    gc.collect()
    return True


def set_metrics(a: Answers, checks: list[Optional[list[dict]]], baseline: Optional[Answers]) -> dict:
    lengths = [len(r) for r in a.response_ids]
    m: dict[str, Any] = {k: None for k in METRICS}
    m["n_prompts"] = len(a.texts)
    m.update(summarize_checks(checks) or {})
    if m.get("n_checked"):
        from ..report import wilson_interval

        m["pass_rate_ci95"] = list(wilson_interval(round(m["pass_rate"] * m["n_checked"]), m["n_checked"]))
    m["response_length"] = sum(lengths) / len(lengths)
    m["eos_share"] = sum(a.ended) / len(a.ended)
    if a.kl_sums is not None:
        m["kl"] = sum(a.kl_sums) / max(1, sum(lengths))
        m["kl_per_response"] = sum(a.kl_sums) / len(a.kl_sums)
    if a.rm_scores is not None:
        s = torch.tensor(a.rm_scores, dtype=torch.float64)
        m["rm_score_mean"] = float(s.mean())
        m["rm_score_std"] = float(s.std()) if len(s) > 1 else 0.0
        if baseline is not None and baseline.rm_scores is not None:
            m["win_rate"] = win_rate(a.rm_scores, baseline.rm_scores)
    return m


def sample_rows(ps: PromptSet, run: ModelRun, checks: list[Optional[list[dict]]]) -> list[dict]:
    a = run.answers[ps.name]
    rows = []
    for i, ex in enumerate(ps.examples):
        row = {"set": ps.name, "model": run.name, "index": i, "prompt": ex["prompt"][-1]["content"],
               "response": a.texts[i], "length": len(a.response_ids[i]), "ended": a.ended[i]}
        for k in ("key", "id"):
            if k in ex:
                row[k] = ex[k]
        if checks[i] is not None:
            row["instructions"] = [{"id": c["id"], "kwargs": c["kwargs"], "passed": c["strict"],
                                    "passed_loose": c["loose"]} for c in checks[i]]
            row["passed"] = all(c["strict"] for c in checks[i])
        if a.kl_sums is not None:
            row["kl"] = a.kl_sums[i]
        if a.rm_scores is not None:
            row["rm_score"] = a.rm_scores[i]
        rows.append(row)
    return rows


def write_outputs(out_dir: Path, results: dict, samples: list[dict], flat: dict) -> None:
    """results.json, samples.jsonl and metrics.jsonl of an evaluation (each written whole, atomically)."""
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    # One measurement, like results.json: a rerun replaces the row instead of appending a second one.
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    metrics = MetricsLogger(out_dir, tensorboard=False)
    metrics.log(0, flat)
    metrics.close()


def evaluate(recipe: Recipe, out_dir: Path) -> dict:
    """Run steps 1-4 for `recipe.eval` and write results.json, samples.jsonl and metrics.jsonl."""
    cfg: EvalConfig = recipe.eval
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(recipe.model)
    if cfg.ifeval and not cfg.prompts:  # only IFEval by lm-evaluation-harness (pipeline/ifeval.py)
        from ..ifeval import evaluate_only

        return evaluate_only(recipe, out_dir)
    sets = load_prompt_sets(cfg.prompts, cfg.max_prompts)  # fail on bad data before loading any model
    ref_ref = cfg.reference or "base"
    base_ref = (cfg.baseline or ref_ref) if cfg.reward_from else None
    refs = list(dict.fromkeys(cfg.models + ([base_ref] if base_ref else [])))  # the baseline needs answers
    runs = [ModelRun(n, recipe.resolve_model_ref(r)) for n, r in zip(_unique([model_name(r) for r in refs]), refs)]
    ref_path = recipe.resolve_model_ref(ref_ref)
    for path in dict.fromkeys([r.path for r in runs] + [ref_path]):
        resolve_model_path(path)  # a missing stage output fails now, not after the other models ran
    notes: list[str] = []

    t0 = time.time()
    for run in runs:
        answer_all(run, sets, recipe, precision, logprobs=run.path != ref_path)
    score_reference(runs, ref_path, recipe, precision, notes)
    have_rm = bool(cfg.reward_from) and score_reward(runs, sets, recipe.resolve_model_ref(cfg.reward_from),
                                                     recipe, precision, notes)
    baseline = next((r for r in runs if r.path == recipe.resolve_model_ref(base_ref)), None) if have_rm else None

    results: dict[str, Any] = {
        "generation": {
            "decoding": "sampling" if cfg.do_sample else "greedy", "do_sample": cfg.do_sample,
            "temperature": cfg.temperature if cfg.do_sample else None, "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size, "seed": recipe.run.seed, "device": str(precision.device),
            "dtype": str(precision.dtype).replace("torch.", ""), "bf16_autocast": precision.autocast,
        },
        "models": {r.name: r.path for r in runs},
        "reference": {"name": next((r.name for r in runs if r.path == ref_path), model_name(ref_ref)),
                      "path": ref_path},
        "baseline": baseline.name if baseline else None,
        "reward_model": recipe.resolve_model_ref(cfg.reward_from) if have_rm else None,
        "kl_estimator": "k1 per token: sum of (log p_model - log p_ref) over response tokens / tokens, "
                        "teacher-forced at temperature 1 on the model's own "
                        + ("samples" if cfg.do_sample else "greedy outputs (not an unbiased KL estimate)"),
        "num_samples_in_report": cfg.num_samples_in_report,
        "seconds": {r.name: r.seconds for r in runs},
        "seconds_total": round(time.time() - t0, 1),
        "notes": notes,
        "sets": {},
    }
    samples, flat = [], {}
    listed = runs[:len(dict.fromkeys(cfg.models))]  # the recipe's models in its order (base, sft, ppo, ...)
    # Per instruction id, every listed model is tested against the KL reference (issue #22); when the
    # reference was not evaluated, against the first listed model.
    against = next((r for r in runs if r.path == ref_path), listed[0])
    if against.path != ref_path and len(listed) > 1:
        notes.append(f"per-instruction tests are against {against.name}: the reference {ref_ref} was not evaluated.")
    for ps in sets:
        per_model, passes, all_checks = {}, {}, {}
        for run in runs:
            checks = all_checks[run.name] = instruction_results(ps.examples, run.answers[ps.name].texts)
            passes[run.name] = prompt_passes(checks)
            b = baseline.answers[ps.name] if baseline else None
            m = per_model[run.name] = set_metrics(run.answers[ps.name], checks, b)
            samples += sample_rows(ps, run, checks)
            for k in METRICS:
                if m.get(k) is not None:
                    flat[f"eval/{ps.name}/{run.name}/{k}"] = m[k]
            for i, d in (m.get("per_id") or {}).items():
                flat[f"eval/{ps.name}/{run.name}/instruction_pass_rate/{i}"] = d["pass_rate"]
        results["sets"][ps.name] = {"file": ps.spec, "n_prompts": len(ps.examples), "models": per_model}
        # Each listed model against the one listed before it (the stage it was trained from, in a recipe).
        paired = [{"model": b.name, "against": a.name, **paired_pass_test(passes[b.name], passes[a.name])}
                  for a, b in zip(listed, listed[1:]) if passes[a.name]]
        if paired:
            results["sets"][ps.name]["paired"] = paired
        others = [r for r in listed if r is not against]
        if passes[against.name] and others:
            # Prompt-level, each listed model against the reference (the headline's "overall" line) ...
            results["sets"][ps.name]["paired_reference"] = [
                {"model": r.name, "against": against.name, **paired_pass_test(passes[r.name], passes[against.name])}
                for r in others]
            # ... and instruction-level per instruction id.
            results["sets"][ps.name]["per_id_paired"] = {
                "against": against.name,
                "models": {r.name: per_id_paired(all_checks[r.name], all_checks[against.name]) for r in others}}

    if cfg.ifeval:  # IFEval by lm-evaluation-harness on every listed model (pipeline/ifeval.py)
        from ..ifeval import add_to_results

        samples += add_to_results(results, flat, recipe, [(r.name, r.path) for r in listed], precision)
    write_outputs(out_dir, results, samples, flat)
    for n in notes:
        log(f"eval: note: {n}")
    return results


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def results_table(results: dict) -> str:
    """The compact stdout table: one line per (model, set)."""
    from ..report import fmt, regression_lines, text_table

    cols = [("pass_rate", "pass"), ("instruction_pass_rate", "instr"), ("response_length", "len"),
            ("eos_share", "eos"), ("kl", "kl/tok")]
    if results.get("reward_model"):
        cols += [("rm_score_mean", "rm"), ("win_rate", "win")]
    rows = [[model, name] + [fmt(m.get(k)) for k, _ in cols]
            for name, s in results["sets"].items() for model, m in s["models"].items()]
    out = text_table(["model", "set"] + [h for _, h in cols], rows)
    paired = [[f"{p['model']} vs {p['against']}", name, str(p["gained"]), str(p["lost"]), f"{p['difference']:+.3f}",
               f"{p['p_value']:.3g}"] for name, s in results["sets"].items() for p in s.get("paired", [])]
    if paired:
        out += "\n\nPrompt-level pass, paired on the same prompts (McNemar exact p):\n" + text_table(
            ["models", "set", "gained", "lost", "diff", "p"], paired)
    flags = regression_lines(results)
    if flags:
        out += "\n\n" + "\n".join(flags)
    return out


def _summary(results: dict) -> dict:
    out = {}
    for name, s in results["sets"].items():
        for model, m in s["models"].items():
            for k in ("pass_rate", "instruction_pass_rate", "kl", "rm_score_mean", "win_rate"):
                if m.get(k) is not None:
                    out[f"{name}/{model}/{k}"] = m[k]
    return out


def run(recipe: Recipe, stage_dir: Path) -> dict:
    results = evaluate(recipe, stage_dir)
    print(results_table(results), flush=True)
    return _summary(results)  # the runner writes the run's report after its last stage


def evaluate_cli(args) -> int:
    """`pipeline eval --models A B --prompts F.jsonl`: KL and win rate against the first model listed."""
    from ..report import build_report

    recipe = Recipe(run=RunConfig(name="eval", output_dir=args.output_dir), stages=["eval"], eval=EvalConfig(
        models=list(args.models), prompts=list(args.prompts or []), reward_from=args.reward_model,
        reference=args.models[0], baseline=args.models[0], max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, max_prompts=args.max_prompts, ifeval=getattr(args, "ifeval", False),
        ifeval_limit=getattr(args, "limit", None), ifeval_max_gen_toks=getattr(args, "max_gen_toks", None),
    ), source="pipeline eval")
    results = evaluate(recipe, Path(args.output_dir))
    print(results_table(results))
    build_report(args.output_dir, results_path=Path(args.output_dir) / "results.json")
    print(f"Results: {Path(args.output_dir) / 'results.json'}")
    return 0
