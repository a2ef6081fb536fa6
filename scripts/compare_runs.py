"""Paired comparison of models evaluated in different runs on the same prompt set.

    python scripts/compare_runs.py BASE_EVAL_DIR:MODEL OTHER_EVAL_DIR:MODEL [...] [--set heldout] [--per-id]

Each argument names an eval stage's output directory (holding samples.jsonl) and a model evaluated there
(`runs/quickstart/eval:ppo`). The first is the baseline: every other model is compared with it prompt by
prompt (gained / lost prompts and McNemar's exact p, as the eval stage does within one run), and each line
also gives the run's PPO figures when its `ppo/metrics.jsonl` is beside the eval directory (seconds per
iteration, explained variance of the last iteration, KL).

`--per-id`: then, for each other model, the instruction-level strict pass per instruction id against the
baseline (gained / lost instructions and McNemar's exact p over the prompts carrying the id), as the eval stage's
per-id table; ids significantly worse than the baseline are marked REGRESSION (`report.is_regression`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.eval import paired_pass_test, per_id_paired  # noqa: E402


def rows_of(spec: str, set_name: str) -> list[dict]:
    eval_dir, model = spec.rsplit(":", 1)
    rows = [json.loads(line) for line in (Path(eval_dir) / "samples.jsonl").read_text().splitlines() if line.strip()]
    mine = [r for r in rows if r["model"] == model and r["set"] == set_name and "passed" in r]
    if not mine:
        raise SystemExit(f"{eval_dir}/samples.jsonl: no rows for model {model!r} on set {set_name!r}")
    return mine


def instruction_checks(spec: str, set_name: str) -> dict[int, list[dict]]:
    """index -> the prompt's instructions as `per_id_paired` reads them (`id`, `strict`)."""
    return {r["index"]: [{"id": i["id"], "strict": bool(i["passed"])} for i in r["instructions"]]
            for r in rows_of(spec, set_name) if r.get("instructions")}


def per_id_table(base_spec: str, spec: str, set_name: str) -> str:
    base, other = instruction_checks(base_spec, set_name), instruction_checks(spec, set_name)
    idx = sorted(set(base) & set(other))
    table = per_id_paired([other[i] for i in idx], [base[i] for i in idx])
    lines = [f"{spec} against {base_spec}, per instruction id (strict, instruction level):",
             "| instruction id | n | baseline | this | gained | lost | p | |", "|---|---|---|---|---|---|---|---|"]
    for iid, t in table.items():
        lines.append(f"| {iid} | {t['n']} | {t['pass_rate_against']:.2f} | {t['pass_rate']:.2f} | {t['gained']} | "
                     f"{t['lost']} | {t['p_value']:.2g} | {'REGRESSION' if t['regression'] else ''} |")
    return "\n".join(lines)


def passes(spec: str, set_name: str) -> tuple[str, dict[int, bool], dict]:
    mine = rows_of(spec, set_name)
    scored = [r for r in mine if "kl" in r]
    # The eval stage's `kl`: the answers' summed KL over their summed tokens (not a mean of per-answer ratios).
    kl = sum(r["kl"] for r in scored) / max(1, sum(r["length"] for r in scored)) if scored else None
    return spec, {r["index"]: r["passed"] for r in mine}, {"kl_per_token": kl}


def ppo_figures(eval_dir: str) -> dict:
    path = Path(eval_dir).parent / "ppo" / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    main = [r for r in rows if not r.get("ppo/warmup")]
    secs = [sum(v for k, v in r.items() if k.startswith("ppo/time_") and isinstance(v, (int, float))) for r in rows]
    out = {"iterations": f"{len(rows) - len(main)}+{len(main)}", "stage_s": sum(secs),
           "s_per_it": sum(secs) / max(len(rows), 1), "kl_seq": main[-1].get("ppo/kl") if main else None}
    ev = [r["ppo/explained_variance"] for r in rows if isinstance(r.get("ppo/explained_variance"), (int, float))]
    if ev:
        out["ev_last"], out["ev_max"] = ev[-1], max(ev)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="EVAL_DIR:MODEL, the first is the baseline")
    ap.add_argument("--set", default="heldout")
    ap.add_argument("--per-id", action="store_true", help="also the per-instruction-id table of each model")
    args = ap.parse_args()
    base_spec, base, _ = passes(args.runs[0], args.set)
    print(f"baseline {base_spec}: pass {sum(base.values()) / len(base):.3f} on {len(base)} prompts")
    print("| run | pass | gained | lost | p | KL/token (eval) | KL/response (last it.) | PPO s | s/iter | iterations | EV last | EV max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.runs:
        _, p, fig = passes(spec, args.set)
        idx = sorted(set(base) & set(p))
        test = paired_pass_test([p[i] for i in idx], [base[i] for i in idx])
        f = ppo_figures(spec.rsplit(":", 1)[0])
        num = lambda x, d=3: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
        print(f"| {spec} | {sum(p[i] for i in idx) / len(idx):.3f} | {test['gained']} | {test['lost']} | "
              f"{test['p_value']:.3g} | {num(fig['kl_per_token'])} | {num(f.get('kl_seq'), 2)} | {num(f.get('stage_s'), 0)} | "
              f"{num(f.get('s_per_it'), 1)} | {f.get('iterations', '–')} | {num(f.get('ev_last'), 2)} | "
              f"{num(f.get('ev_max'), 2)} |")
    if args.per_id:
        for spec in args.runs[1:]:
            print()
            print(per_id_table(args.runs[0], spec, args.set))


if __name__ == "__main__":
    main()
