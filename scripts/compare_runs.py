"""Paired comparison of models evaluated in different runs on the same prompt set.

    python scripts/compare_runs.py BASE_EVAL_DIR:MODEL OTHER_EVAL_DIR:MODEL [...] [--set heldout]

Each argument names an eval stage's output directory (holding samples.jsonl) and a model evaluated there
(`runs/quickstart/eval:ppo`). The first is the baseline: every other model is compared with it prompt by
prompt (gained / lost prompts and McNemar's exact p, as the eval stage does within one run), and each line
also gives the run's PPO figures when its `ppo/metrics.jsonl` is beside the eval directory (seconds per
iteration, explained variance of the last iteration, KL).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.eval import paired_pass_test  # noqa: E402


def passes(spec: str, set_name: str) -> tuple[str, dict[int, bool], dict]:
    eval_dir, model = spec.rsplit(":", 1)
    rows = [json.loads(line) for line in (Path(eval_dir) / "samples.jsonl").read_text().splitlines() if line.strip()]
    mine = [r for r in rows if r["model"] == model and r["set"] == set_name and "passed" in r]
    if not mine:
        raise SystemExit(f"{eval_dir}/samples.jsonl: no rows for model {model!r} on set {set_name!r}")
    kl = [r["kl"] / max(r["length"], 1) for r in mine if "kl" in r]
    return spec, {r["index"]: r["passed"] for r in mine}, {"kl_per_token": sum(kl) / len(kl) if kl else None}


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


if __name__ == "__main__":
    main()
