"""On-policy vs off-policy distillation of the same student, for the same token budget, via the stage code.

    python scripts/distill_compare.py                      # teacher: newest runs/*/sft/final, else the default model
    python scripts/distill_compare.py --teacher runs/quickstart/ppo/final --out runs/distill_compare
    python scripts/distill_compare.py --eval-only          # redo only the held-out evaluation of the saved students

A student is built from the teacher's layers (`--keep-layers`, default influence_15: the 15 of SmolLM2's 30
layers with the highest Block Influence) and warmed up by forward KL on teacher samples
(`--warmup-iterations`, shared: a freshly cut student is several nats per token from its teacher, and
reverse KL on its own broken samples collapses into one repeated token). From that one warm start, two
students are trained by `pipeline.stages.distill` with identical settings except the mixture:
  on-policy  (beta = 0): every sequence sampled by the student, labelled by the teacher (DAgger for tokens);
  off-policy (beta = 1): every sequence sampled by the teacher (behavior cloning / supervised KD).
Both get the same budget: iterations x rollout batch x max_new_tokens sampled tokens (the tokens actually
produced, up to EOS, are printed too). Each run is an ordinary run directory under --out
(`<out>/warm_start`, `<out>/on_policy`, `<out>/off_policy`).
Prints held-out pass rates of teacher and students, the per-token reverse / forward KL of each student to
the teacher at the states of its own samples (and of its greedy answers), and the reverse KL by response
position (buckets of 8 tokens), where compounding errors show up as a curve rising along the sequence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import parse_recipe  # noqa: E402
from pipeline.runner import run_recipe  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_teacher() -> str:
    """The newest SFT output under runs/, else the default model."""
    sft = sorted((ROOT / "runs").glob("*/sft/final"), key=lambda p: p.stat().st_mtime)
    return str(sft[-1]) if sft else DEFAULT_MODEL


def build_recipe(args, beta: float, name: str, student: dict | None = None, iterations: int | None = None,
                 divergence: str | None = None):
    keep = json.loads(args.keep_layers) if args.keep_layers.startswith("[") else args.keep_layers
    return parse_recipe({
        "run": {"name": name, "seed": args.seed, "output_dir": str(Path(args.out) / name)},
        "model": {"name_or_path": args.teacher},
        "stages": ["distill"],
        "distill": {
            "teacher_from": "base", "student": student or {"from_teacher": {"keep_layers": keep}},
            "prompts": args.prompts, "heldout_prompts": args.heldout,
            "beta": beta, "divergence": divergence or args.divergence, "estimator": args.estimator,
            "iterations": iterations or args.iterations, "rollout_batch_size": args.rollout_batch_size,
            "minibatch_size": args.minibatch_size, "micro_batch_size": args.minibatch_size,
            "epochs": args.epochs, "lr": args.lr, "max_new_tokens": args.max_new_tokens,
            "checkpoint_every": 10,  # an interrupted comparison resumes (run the same command again)
        },
    }, where=f"distill_compare ({name})")


def run_or_reevaluate(recipe, eval_only: bool) -> tuple[dict, dict]:
    """Train the student (a new run), or with --eval-only redo just the held-out evaluation of the
    student a finished run saved. -> (stage summary, held-out results)."""
    stage_dir = recipe.stage_dir("distill")
    if not eval_only:
        summary = run_recipe(recipe, force=True)["distill"]
        return summary, json.loads((stage_dir / "heldout.json").read_text())
    from pipeline.data import load_rows, prompt_examples
    from pipeline.models import resolve_precision
    from pipeline.stages.distill import build_models
    from pipeline.stages.distill_eval import heldout_eval
    from pipeline.utils import atomic_write_json

    summary = json.loads((stage_dir / "summary.json").read_text())
    cfg = recipe.distill
    cfg.student.name_or_path, cfg.student.from_teacher = str(stage_dir / "final"), None
    precision = resolve_precision(recipe.model)
    models = build_models(recipe, cfg, precision)
    result = heldout_eval(models, prompt_examples(load_rows(cfg.heldout_prompts), cfg.heldout_prompts), cfg,
                          precision, progress=True, seed=recipe.run.seed)
    result["prompts_file"] = cfg.heldout_prompts
    atomic_write_json(stage_dir / "heldout.json", result)
    return summary, result


def bucketed(curve: list[float], counts: list[int], width: int) -> list[tuple[str, float]]:
    """Token-weighted mean of a per-position curve over positions 1-8, 9-16, ..."""
    out = []
    for start in range(0, len(curve), width):
        c, n = curve[start:start + width], counts[start:start + width]
        out.append((f"{start + 1}-{start + len(c)}", sum(x * k for x, k in zip(c, n)) / max(sum(n), 1)))
    return out


def fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def print_table(results: dict[str, dict], summaries: dict[str, dict], width: int) -> None:
    on, off = results["on_policy"], results["off_policy"]
    keys = [k for k in ("warm_start", "on_policy", "off_policy") if k in results]
    names = {"warm_start": "warm start", "on_policy": "on-policy b=0", "off_policy": "off-policy b=1"}
    cols = ["teacher"] + [names[k] for k in keys]
    t_rate = on["teacher"]["pass_rate"]

    def each(f):
        return [f(results[k], summaries[k]) for k in keys]

    rows = [
        ("layers", summaries["on_policy"]["teacher_layers"], *each(lambda r, s: s["student_layers"])),
        ("held-out pass rate", fmt(t_rate), *each(lambda r, s: fmt(r["student"]["pass_rate"]))),
        ("  share of teacher's", "100%", *each(lambda r, s: fmt(r.get("pass_rate_ratio"), True))),
        ("reverse KL / token", "0", *each(lambda r, s: fmt(r["reverse_kl_per_token"]))),
        ("forward KL / token", "0", *each(lambda r, s: fmt(r["forward_kl_per_token"]))),
        ("  reverse KL, greedy states", "0", *each(lambda r, s: fmt(r.get("reverse_kl_per_token_greedy")))),
        ("response length", f"{on['teacher']['response_length']:.1f}",
         *each(lambda r, s: f"{r['student']['response_length']:.1f}")),
        ("ends with EOS", fmt(on["teacher"]["eos_share"]), *each(lambda r, s: fmt(r["student"]["eos_share"]))),
        ("distinct 4-grams", fmt(on["teacher"].get("distinct_4grams")),
         *each(lambda r, s: fmt(r["student"].get("distinct_4grams")))),
        ("rollout tokens / budget", "-", *each(lambda r, s: f"{s['rollout_tokens']}/{s['budget']}")),
        ("train + eval seconds", "-", *each(lambda r, s: f"{s['seconds']:.0f}")),
    ]
    print(f"\nHeld-out: {on['prompts']} prompts ({on['prompts_file']}), {on['max_new_tokens']} new tokens. Pass rate, "
          "length, EOS and distinct 4-grams: greedy answers. KLs: exact over the vocabulary at every state of each "
          "student's own samples (temperature 1), i.e. the per-token reverse KL of the student's sequence "
          "distribution; the greedy-state row is the same at the states of its greedy answers.")
    print(f"{'':<26}" + "".join(f"{c:>18}" for c in cols))
    for name, *vals in rows:
        print(f"{name:<26}" + "".join(f"{str(v):>18}" for v in vals))
    print(f"students keep teacher layers {summaries[keys[0]].get('student_kept_layers')}"
          + (" (both start from the warm start, which kept them)" if "warm_start" in keys else ""))
    print("\nReverse KL(student || teacher) per token by response position (mean over prompts reaching it)")
    print(f"{'positions':<26}" + "".join(f"{names[k]:>18}" for k in keys))
    curves = {k: dict(bucketed(results[k]["reverse_kl_by_position"], results[k]["prompts_by_position"], width))
              for k in keys}
    labels = list(dict.fromkeys(label for k in keys for label in curves[k]))
    for label in labels:
        print(f"{label:<26}" + "".join(f"{fmt(curves[k].get(label)):>18}" for k in keys))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher model (path, hub id or smollm2-135m-instruct); "
                   "default: the newest runs/*/sft/final, else smollm2-135m-instruct")
    p.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    p.add_argument("--heldout", default="eval/constraints/heldout.jsonl")
    p.add_argument("--out", default="runs/distill_compare")
    p.add_argument("--warmup-iterations", type=int, default=10,
                   help="iterations of a shared warm start (forward KL on teacher samples) before the two "
                   "students part; 0: both start from the cut-down teacher")
    p.add_argument("--keep-layers", default="influence_15",
                   help="every_2nd, every_3rd, first_K, influence_K or a JSON list")
    p.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    p.add_argument("--estimator", default="full", choices=["full", "sampled"])
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--rollout-batch-size", type=int, default=16)
    p.add_argument("--minibatch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket", type=int, default=8, help="positions per row of the by-position table")
    p.add_argument("--eval-only", action="store_true",
                   help="do not train: redo the held-out evaluation of the students the runs under --out saved")
    p.add_argument("--only", choices=["on_policy", "off_policy"],
                   help="train the warm start and one student, then stop (not in parallel: both would write the warm "
                   "start; --eval-only afterwards prints the table)")
    args = p.parse_args(argv)
    args.teacher = args.teacher or default_teacher()
    print(f"teacher: {args.teacher}", flush=True)
    results, summaries = {}, {}
    budget = args.iterations * args.rollout_batch_size * args.max_new_tokens
    student = None
    if args.warmup_iterations:
        # A student cut from the teacher's layers starts far from it (several nats per token): on its own
        # samples the teacher labels only broken states, and reverse KL falls into a repeated-token mode.
        # As in GKD / MiniLLM, both students start from one supervised warm start instead: forward KL on
        # teacher samples (beta = 1), which is behavior cloning of the teacher's next-token distributions.
        print(f"=== warm_start (beta = 1, forward KL): {args.warmup_iterations} iterations, shared by both students",
              flush=True)
        recipe = build_recipe(args, 1.0, "warm_start", iterations=args.warmup_iterations, divergence="forward_kl")
        summary, results["warm_start"] = run_or_reevaluate(recipe, args.eval_only)
        summaries["warm_start"] = {**summary, "budget": args.warmup_iterations * args.rollout_batch_size
                                   * args.max_new_tokens}
        student = {"name_or_path": str(recipe.stage_dir("distill") / "final")}
    for name, beta in (("on_policy", 0.0), ("off_policy", 1.0)):
        if args.only and name != args.only:
            continue
        print(f"=== {name} (beta = {beta}): {args.iterations} iterations x {args.rollout_batch_size} sequences x "
              f"{args.max_new_tokens} tokens = {budget} sampled-token budget", flush=True)
        recipe = build_recipe(args, beta, name, student=student)
        summary, results[name] = run_or_reevaluate(recipe, args.eval_only)
        summaries[name] = {**summary, "budget": budget}
    if args.only:
        return 0
    print_table(results, summaries, args.bucket)
    out = Path(args.out) / "comparison.json"
    out.write_text(json.dumps({"teacher": args.teacher, "args": vars(args), "heldout": results}, indent=1))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
