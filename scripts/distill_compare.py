"""On-policy vs off-policy distillation of the same student, for the same token budget, via the stage code.

    python scripts/distill_compare.py                      # teacher: newest runs/*/sft/final, else the default model
    python scripts/distill_compare.py --teacher runs/quickstart/ppo/final --out runs/distill_compare
    python scripts/distill_compare.py --only on_policy & python scripts/distill_compare.py --only off_policy; wait
    python scripts/distill_compare.py                      # then: both runs are reused, the table printed

Two students are built from the teacher's layers (`--keep-layers`, default every_2nd: 15 of SmolLM2's 30)
and trained by `pipeline.stages.distill` with identical settings except the mixture:
  on-policy  (beta = 0): every sequence sampled by the student, labelled by the teacher (DAgger for tokens);
  off-policy (beta = 1): every sequence sampled by the teacher (behavior cloning / supervised KD).
Both get the same budget: iterations x rollout batch x max_new_tokens sampled tokens (the tokens actually
produced, up to EOS, are printed too). Each run is an ordinary run directory under --out
(`<out>/on_policy`, `<out>/off_policy`); a finished run with the same recipe is reused.
Prints held-out pass rates of teacher and students, the per-token reverse / forward KL of each student to
the teacher at the states of its own greedy answers, and the reverse KL by response position (buckets of
8 tokens), where compounding errors show up as a curve rising along the sequence.
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


def build_recipe(args, beta: float, name: str):
    keep = json.loads(args.keep_layers) if args.keep_layers.startswith("[") else args.keep_layers
    return parse_recipe({
        "run": {"name": name, "seed": args.seed, "output_dir": str(Path(args.out) / name)},
        "model": {"name_or_path": args.teacher},
        "stages": ["distill"],
        "distill": {
            "teacher_from": "base", "student": {"from_teacher": {"keep_layers": keep}},
            "prompts": args.prompts, "heldout_prompts": args.heldout,
            "beta": beta, "divergence": args.divergence, "estimator": args.estimator,
            "iterations": args.iterations, "rollout_batch_size": args.rollout_batch_size,
            "minibatch_size": args.minibatch_size, "micro_batch_size": args.minibatch_size,
            "epochs": args.epochs, "lr": args.lr, "max_new_tokens": args.max_new_tokens,
            "checkpoint_every": 10,  # an interrupted comparison resumes (run the same command again)
        },
    }, where=f"distill_compare ({name})")


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
    t_rate = on["teacher"]["pass_rate"]
    cols = ("teacher", "on-policy b=0", "off-policy b=1")
    rows = [
        ("layers", summaries["on_policy"]["teacher_layers"], summaries["on_policy"]["student_layers"],
         summaries["off_policy"]["student_layers"]),
        ("held-out pass rate", fmt(t_rate), fmt(on["student"]["pass_rate"]), fmt(off["student"]["pass_rate"])),
        ("  share of teacher's", "100%", fmt(on.get("pass_rate_ratio"), True), fmt(off.get("pass_rate_ratio"), True)),
        ("reverse KL / token", "0", fmt(on["reverse_kl_per_token"]), fmt(off["reverse_kl_per_token"])),
        ("forward KL / token", "0", fmt(on["forward_kl_per_token"]), fmt(off["forward_kl_per_token"])),
        ("response length", f"{on['teacher']['response_length']:.1f}", f"{on['student']['response_length']:.1f}",
         f"{off['student']['response_length']:.1f}"),
        ("ends with EOS", fmt(on["teacher"]["eos_share"]), fmt(on["student"]["eos_share"]),
         fmt(off["student"]["eos_share"])),
        ("rollout tokens / budget", "-", *(f"{summaries[k]['rollout_tokens']}/{summaries[k]['budget']}"
                                           for k in ("on_policy", "off_policy"))),
        ("train + eval seconds", "-", f"{summaries['on_policy']['seconds']:.0f}",
         f"{summaries['off_policy']['seconds']:.0f}"),
    ]
    print(f"\nHeld-out: {on['prompts']} prompts ({on['prompts_file']}), greedy, {on['max_new_tokens']} new tokens; "
          "KLs are exact over the vocabulary at the states of each student's own answers.")
    print(f"{'':<26}" + "".join(f"{c:>18}" for c in cols))
    for name, *vals in rows:
        print(f"{name:<26}" + "".join(f"{str(v):>18}" for v in vals))
    print(f"students keep teacher layers {summaries['on_policy'].get('student_kept_layers')}")
    print("\nReverse KL(student || teacher) per token by response position (mean over prompts reaching it)")
    print(f"{'positions':<26}{'on-policy b=0':>18}{'off-policy b=1':>18}")
    b_on = bucketed(on["reverse_kl_by_position"], on["prompts_by_position"], width)
    b_off = dict(bucketed(off["reverse_kl_by_position"], off["prompts_by_position"], width))
    for label, v in b_on:
        print(f"{label:<26}{v:>18.3f}{fmt(b_off.get(label)):>18}")
    for label, v in b_off.items():
        if label not in dict(b_on):
            print(f"{label:<26}{'-':>18}{v:>18.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher model (path, hub id or smollm2-135m-instruct); "
                   "default: the newest runs/*/sft/final, else smollm2-135m-instruct")
    p.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    p.add_argument("--heldout", default="eval/constraints/heldout.jsonl")
    p.add_argument("--out", default="runs/distill_compare")
    p.add_argument("--keep-layers", default="every_2nd",
                   help="every_2nd, every_3rd, first_K, influence_K or a JSON list")
    p.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    p.add_argument("--estimator", default="full", choices=["full", "sampled"])
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--rollout-batch-size", type=int, default=16)
    p.add_argument("--minibatch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket", type=int, default=8, help="positions per row of the by-position table")
    p.add_argument("--only", choices=["on_policy", "off_policy"],
                   help="train one student and stop (run the two in parallel, then once more to print the table)")
    args = p.parse_args(argv)
    args.teacher = args.teacher or default_teacher()
    print(f"teacher: {args.teacher}", flush=True)
    results, summaries = {}, {}
    budget = args.iterations * args.rollout_batch_size * args.max_new_tokens
    for name, beta in (("on_policy", 0.0), ("off_policy", 1.0)):
        if args.only and name != args.only:
            continue
        print(f"=== {name} (beta = {beta}): {args.iterations} iterations x {args.rollout_batch_size} sequences x "
              f"{args.max_new_tokens} tokens = {budget} sampled-token budget", flush=True)
        recipe = build_recipe(args, beta, name)
        summary = run_recipe(recipe, force=True)["distill"]
        stage_dir = recipe.stage_dir("distill")
        results[name] = json.loads((stage_dir / "heldout.json").read_text())
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
