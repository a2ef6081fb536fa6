"""The run report: `report.md`, a self-contained `report.html` and PNG plots in `plots/`.

    build_report(run_dir) -> run_dir/report.md

The runner writes it at the end of every `pipeline run` (with or without an eval stage, and when a
stage failed: whatever finished is shown); `pipeline report RUN_DIR` rebuilds it. Every number comes
from a file the run wrote:
    run_info.json                 seed, recipe, versions
    <stage>/summary.json          the stage summaries
    <stage>/metrics.jsonl         training curves (sft, reward, ppo, distill)
    eval/results.json             the evaluation (or results.json at the top, as `pipeline eval
    eval/samples.jsonl            --output-dir DIR` writes them) and every answer
A stage or file that is absent leaves its section out. Non-finite logged values (written as the
strings "nan"/"inf") are shown as gaps in the plots and listed, never dropped silently.

What it shows, in order: a headline that answers "did it help?" (the held-out prompt-level pass rate
of each model with a 95% Wilson interval, and each step's paired gained/lost prompts and McNemar's
exact p, computed by the eval stage); instruction ids where a model is significantly worse than the
reference; a narrow table and one small chart of the same; the reward-vs-KL frontier of the evaluated
models; the key training curves, smoothed with the raw values faint behind (everything else in a
collapsed diagnostics section); the prompts each step gained and lost; the wide metrics table; the
stage summaries; and (HTML) every answer in a table filterable by instruction id and pass/fail.

The interval is Wilson's score interval (Wilson 1927; Brown, Cai & DasGupta 2001, "Interval Estimation
for a Binomial Proportion"), which keeps its coverage near 0 and 1 and on a hundred prompts, where the
normal approximation does not.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from .config import STAGE_NAMES
from .utils import atomic_write_text

ALPHA = 0.05  # significance level of the per-step and per-instruction flags
Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval

# metrics.jsonl key prefixes of each stage's curves.
PREFIXES = {"sft": ("sft/",), "reward": ("rm/", "reward/"), "ppo": ("ppo/",), "distill": ("distill/",)}

# The key panels of each stage: (title, metric names after the prefix, names used when none of the first
# is logged). Every other logged series goes to the stage's collapsed diagnostics figure.
KEY_PANELS: dict[str, list[tuple[str, tuple[str, ...], tuple[str, ...]]]] = {
    "sft": [("loss", ("loss", "eval_loss"), ()), ("pass rate", ("pass_rate", "eval_pass_rate"), ())],
    "reward": [("loss", ("loss", "eval_loss"), ()),
               ("accuracy", ("accuracy", "heldout_accuracy", "eval_accuracy"), ())],
    # The reward components apart when the PPO stage logs them (`ppo/score/rm`, `ppo/score/verifier`),
    # else the weighted total.
    "ppo": [("score", ("score/rm", "score/verifier"), ("score",)), ("KL to the reference", ("kl",), ()),
            ("pass rate (training prompts)", ("pass_rate",), ()), ("entropy", ("entropy",), ()),
            ("length (tokens)", ("response_length",), ()), ("critic explained variance", ("explained_variance",), ())],
    "distill": [("loss", ("loss",), ()), ("reverse KL", ("reverse_kl",), ()), ("forward KL", ("forward_kl",), ()),
                ("pass rate", ("pass_rate",), ()), ("length (tokens)", ("response_length",), ())],
}

EV_CAPTION = ("ppo/explained_variance = 1 - Var(return - value) / Var(return): near 0 (or below) the critic "
              "predicts the return no better than its mean, and the GAE advantages built on it are mostly noise.")

# results.json metric -> column header of the wide table; it keeps the columns that have a value.
COLUMNS = {
    "pass_rate": "prompt pass (strict)",
    "pass_rate_loose": "prompt pass (loose)",
    "instruction_pass_rate": "instr. pass (strict)",
    "instruction_pass_rate_loose": "instr. pass (loose)",
    "rm_score_mean": "RM score mean",
    "rm_score_std": "RM score std",
    "win_rate": "win rate vs {baseline}",
    "kl": "KL/token vs {reference}",
    "kl_per_response": "KL/response",
    "response_length": "length (tokens)",
    "eos_share": "ends with EOS",
}


# --------------------------------------------------------------------------------------------
# Formatting and statistics
# --------------------------------------------------------------------------------------------


def fmt(v: Any) -> str:
    """One number as every table shows it: 3 decimals (tiny values in e-notation), NaN/inf spelled out."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if 0 < abs(v) < 5e-4:
            return f"{v:.2e}"
        return f"{v:.3f}"
    return str(v)


def fmt_p(p: float) -> str:
    """A p-value: two significant digits, e-notation below 0.001 (`0.038`, `1e-05`)."""
    return f"{p:.0e}" if 0 < p < 1e-3 else f"{p:.2g}"


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table for stdout."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for k successes in n trials:
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), p = k/n. (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Exact at the ends: k = 0 gives centre == half, and rounding there would leave a 1e-18 lower bound.
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def is_regression(test: dict, alpha: float = ALPHA) -> bool:
    """A paired test (`eval.paired_pass_test` output) says significantly worse: p < alpha, more lost than gained."""
    return test["p_value"] < alpha and test["lost"] > test["gained"]


def _ci(m: dict) -> Optional[tuple[float, float]]:
    """The 95% interval of a model's prompt-level pass rate (results.json's, else from pass_rate and n)."""
    if m.get("pass_rate_ci95"):
        return tuple(m["pass_rate_ci95"])
    n = m.get("n_checked")
    if m.get("pass_rate") is None or not n:
        return None
    return wilson_interval(round(m["pass_rate"] * n), n)


def regression_lines(results: dict, alpha: float = ALPHA) -> list[str]:
    """One line per (model, instruction id) significantly worse than the reference, from `per_id_paired`."""
    out = []
    for name, s in (results.get("sets") or {}).items():
        per = s.get("per_id_paired") or {}
        for model, ids in (per.get("models") or {}).items():
            for i, t in ids.items():
                if is_regression(t, alpha):
                    out.append(f"REGRESSION: {i} {t['pass_rate_against']:.2f} -> {t['pass_rate']:.2f} "
                               f"({model} vs {per.get('against')} on {name}, {t['n']} instructions: "
                               f"gained {t['gained']}, lost {t['lost']}, p {fmt_p(t['p_value'])})")
    return out


# --------------------------------------------------------------------------------------------
# Reading what the run wrote (tolerant: a killed run leaves half files)
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, notes: list[str]) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{path}: unreadable ({e}); left out.")
        return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    if not path.exists():
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path}: {bad} malformed line(s) skipped.")
    return rows


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)  # MetricsLogger writes non-finite values as strings
    return None


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`. A step at or below the previous one (a rerun or resume appended to
    the file) replaces the points from there on, so the curve is the latest run's."""
    pts: list[tuple[float, float]] = []
    for r in rows:
        v = _number(r.get(key))
        if v is None or "step" not in r:
            continue
        while pts and pts[-1][0] >= r["step"]:
            pts.pop()
        pts.append((r["step"], v))
    return [p[0] for p in pts], [p[1] for p in pts]


HELDOUT_RM_KEYS = ("accuracy", "margin", "score_chosen", "score_rejected")


def split_reward_rows(rows: list[dict]) -> list[dict]:
    """The reward stage logs `rm/accuracy` twice: per training batch (TRL's RewardTrainer, through the
    metrics callback) and on the held-out pairs before and after training (`pairwise_metrics`, the rows
    that also carry `rm/score_chosen`). The held-out rows' keys are renamed `rm/heldout_*` so the two are
    separate series."""
    out = []
    for r in rows:
        if "rm/score_chosen" in r:
            r = {(f"rm/heldout_{k[3:]}" if k.startswith("rm/") and k[3:] in HELDOUT_RM_KEYS else k): v
                 for k, v in r.items()}
        out.append(r)
    return out


def stage_keys(stage: str, rows: list[dict]) -> list[str]:
    """The stage's numeric metric keys, in first-logged order."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if _number(v) is not None)
    return [k for k in keys if k.startswith(PREFIXES[stage])]


def _name(stage: str, key: str) -> str:
    prefix = next(p for p in PREFIXES[stage] if key.startswith(p))
    return key[len(prefix):]


def _family(name: str) -> str:
    """`eval_loss` and `loss` share a diagnostics panel; so do `heldout_margin` and `margin`."""
    for pre in ("eval_", "heldout_"):
        if name.startswith(pre):
            return name[len(pre):]
    return name


def is_constant(values: list[float]) -> bool:
    """Three or more finite values, all equal: a setting echoed every step, not a curve."""
    finite = [v for v in values if math.isfinite(v)]
    return len(finite) >= 3 and max(finite) - min(finite) <= 1e-12 * max(1.0, abs(finite[0]))


def smooth(values: list[float], span: Optional[int] = None) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): weight a = 2 / (span + 1),
    s_t = sum_i a(1-a)^(t-i) v_i / sum_i a(1-a)^(t-i), so s_0 = v_0. Non-finite values are skipped (NaN
    out, the average carries on). Default span: a tenth of the series, between 1 (no smoothing) and 50."""
    span = span or max(1, min(50, len(values) // 10))
    if span <= 1:
        return list(values)
    a = 2.0 / (span + 1)
    num = den = 0.0
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        num = (1 - a) * num + a * v
        den = (1 - a) * den + a
        out.append(num / den)
    return out


def key_panels(stage: str, rows: list[dict]) -> tuple[list[tuple[str, list[str]]], dict[str, list[str]], list[str]]:
    """(key panels [(title, keys)], diagnostics panels {family: keys}, constant keys) of one stage."""
    keys = stage_keys(stage, rows)
    vals = {k: series(rows, k)[1] for k in keys}
    constant = [k for k in keys if is_constant(vals[k])]
    live = [k for k in keys if k not in constant]
    by_name = {_name(stage, k): k for k in live}
    used: set[str] = set()
    panels = []
    for title, names, fallback in KEY_PANELS.get(stage, []):
        found = [by_name[n] for n in names if n in by_name] or [by_name[n] for n in fallback if n in by_name]
        if found:
            panels.append((title, found))
            used.update(found)
    diag: dict[str, list[str]] = {}
    for k in live:
        if k not in used:
            diag.setdefault(_family(_name(stage, k)), []).append(k)
    return panels, diag, constant


def nonfinite_notes(stage: str, rows: list[dict]) -> list[str]:
    out = []
    for k in stage_keys(stage, rows):
        x, y = series(rows, k)
        bad = [s for s, v in zip(x, y) if not math.isfinite(v)]
        if bad:
            out.append(f"`{k}`: {len(bad)} non-finite value(s), first at step {bad[0]}.")
    return out


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot state)
# --------------------------------------------------------------------------------------------


def _figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _label(stage: str, key: str) -> str:
    name = _name(stage, key)
    if name.startswith(("eval_", "heldout_")):
        return f"{key} (held-out)"
    if stage == "reward" and name in HELDOUT_RM_KEYS:
        return f"{key} (training batches)"
    return key


def _plot_series(ax, x: list[float], y: list[float], label: str, color) -> None:
    """Raw values faint, the smoothed curve over them; short series (<= 8 points) raw with markers."""
    if len(x) <= 8:
        ax.plot(x, y, marker="o", markersize=4, color=color, label=label)
        return
    ax.plot(x, y, color=color, alpha=0.25, linewidth=1)
    ax.plot(x, smooth(y), color=color, linewidth=1.8, label=label)


def _draw_panels(panels: list[tuple[str, list[str]]], stage: str, rows: list[dict], out: Path,
                 ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)) -> Optional[Path]:
    if not panels:
        return None
    fig, axes = _figure(len(panels), ncols=ncols, panel=panel)
    for ax, (title, keys) in zip(axes, panels):
        for i, k in enumerate(keys):
            x, y = series(rows, k)
            _plot_series(ax, x, y, _label(stage, k), f"C{i}")
        if len(keys) > 1 or stage == "reward":
            ax.legend(fontsize=7)
        if keys == [PREFIXES[stage][0] + "explained_variance"]:
            ax.axhline(0.0, color="0.4", linewidth=0.8, linestyle="--")  # the critic predicts nothing
        ax.set_title(f"{stage}: {title}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=90)
    return out


def plot_reward_vs_kl(rows: list[dict], out: Path) -> Optional[tuple[Path, str]]:
    """PPO over-optimisation view, one point per iteration: the reward model's own score against the
    KL to the reference, with the checker pass rate on a second axis. (path, caption)."""
    have = lambda k: any(_number(r.get(k)) is not None for r in rows)  # noqa: E731
    y_key = "ppo/score/rm" if have("ppo/score/rm") else "ppo/score"
    _, kl = series(rows, "ppo/kl")
    steps, y = series(rows, y_key)
    by_step_kl = dict(zip(*series(rows, "ppo/kl")))
    pts = [(s, by_step_kl[s], v) for s, v in zip(steps, y) if s in by_step_kl]
    if not pts or not kl:
        return None
    fig, (ax,) = _figure(1, panel=(7.5, 4.5))
    steps, kl, score = (list(t) for t in zip(*pts))
    if len(pts) > 8:
        ax.plot(smooth(kl), smooth(score), color="0.5", linewidth=1.2, zorder=1)
    sc = ax.scatter(kl, score, c=steps, cmap="viridis", s=18, zorder=2)
    fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel("ppo/kl (nats per response, to the reference)")
    if y_key == "ppo/score/rm":
        ax.set_ylabel("ppo/score/rm (reward model alone)")
        caption = ("Reward-model score (ppo/score/rm, without the verifier) and checker pass rate against KL, one "
                   "point per iteration: the RM score rising while the pass rate falls is over-optimisation.")
    else:
        ax.set_ylabel("ppo/score (all reward terms, weighted)")
        caption = ("ppo/score is the weighted sum of every reward term (reward model and verifier alike): this run "
                   "did not log them apart, so the plot cannot separate reward-model over-optimisation from "
                   "verifier gains. Checker pass rate on the right axis.")
    ps, pr = series(rows, "ppo/pass_rate")
    pr_at = dict(zip(ps, pr))
    pairs = [(k, pr_at[s]) for s, k in zip(steps, kl) if s in pr_at]
    if pairs:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pairs], [p[1] for p in pairs], color="tab:red", marker="x", linestyle="none",
                 alpha=0.5 if len(pairs) > 8 else 1.0)
        if len(pairs) > 8:
            ax2.plot(smooth([p[0] for p in pairs]), smooth([p[1] for p in pairs]), color="tab:red", linewidth=1.2)
        ax2.set_ylabel("ppo/pass_rate (checkers)", color="tab:red")
    ax.set_title("PPO: reward vs KL (color: iteration)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=90)
    return out, caption


def _model_order(s: dict) -> list[str]:
    """The set's models in the recipe's order: the paired chain (base, sft, ppo, ...), others first."""
    chain = []
    for p in s.get("paired", []):
        for m in (p["against"], p["model"]):
            if m not in chain:
                chain.append(m)
    return [m for m in s.get("models", {}) if m not in chain] + chain


def plot_pass_rates(results: dict, out: Path) -> Optional[Path]:
    """The headline chart: each model's held-out pass rate with its 95% Wilson interval, and each step's
    gained/lost prompts and McNemar p written between the two models it compares."""
    sets = {n: s for n, s in (results.get("sets") or {}).items()
            if any(_ci(m) for m in s.get("models", {}).values())}
    if not sets:
        return None
    fig, axes = _figure(len(sets), ncols=2, panel=(5.5, 3.0))
    for ax, (name, s) in zip(axes, sets.items()):
        models = [m for m in _model_order(s) if _ci(s["models"][m])]
        rates = [s["models"][m]["pass_rate"] for m in models]
        cis = [_ci(s["models"][m]) for m in models]
        x = list(range(len(models)))
        ax.errorbar(x, rates, yerr=[[max(0.0, r - c[0]) for r, c in zip(rates, cis)],
                                        [max(0.0, c[1] - r) for r, c in zip(rates, cis)]],
                    fmt="o", capsize=4, color="C0")
        for p in s.get("paired", []):
            if p["model"] in models and p["against"] in models:
                i, j = models.index(p["against"]), models.index(p["model"])
                strong = p["p_value"] < ALPHA
                ax.annotate(f"+{p['gained']}/−{p['lost']}\np {fmt_p(p['p_value'])}", ((i + j) / 2, 1.02),
                            ha="center", va="bottom", fontsize=7, color="C3" if strong else "0.35",
                            fontweight="bold" if strong else "normal")
        ax.set_xticks(x, models, fontsize=8)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_ylim(0, 1.18)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("prompt-level pass", fontsize=8)
        ax.set_title(f"{name}: pass rate, 95% Wilson interval", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(out, dpi=90)
    return out


def plot_frontier(results: dict, out: Path) -> Optional[Path]:
    """Reward vs KL over the evaluated models: one labelled point per model (RM score mean and pass rate
    against the KL/token to the reference), per prompt set."""
    panels = []
    for name, s in (results.get("sets") or {}).items():
        models = _model_order(s)
        for key, label in (("rm_score_mean", "RM score (mean)"), ("pass_rate", "prompt-level pass")):
            pts = [(m, s["models"][m]["kl"], s["models"][m][key]) for m in models
                   if s["models"][m].get("kl") is not None and s["models"][m].get(key) is not None]
            if len(pts) >= 2:
                panels.append((name, label, pts))
    if not panels:
        return None
    fig, axes = _figure(len(panels), ncols=2, panel=(4.8, 3.4))
    for ax, (name, label, pts) in zip(axes, panels):
        ax.plot([p[1] for p in pts], [p[2] for p in pts], color="0.8", linewidth=1, zorder=1)
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="C0", zorder=2)
        for m, x, y in pts:
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.margins(0.15)
        ax.set_xlabel(f"KL/token to {(results.get('reference') or {}).get('name', 'the reference')}", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{name}: {label} vs KL", fontsize=9)
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=90)
    return out


# --------------------------------------------------------------------------------------------
# The document: a list of blocks rendered twice (Markdown and HTML)
# --------------------------------------------------------------------------------------------
# ("h", level, text) ("p", text) ("quote", text) ("list", items) ("img", path, caption)
# ("table", headers, rows[, pre]) ("details", summary, blocks) ("answers", samples rows, models)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", "<br>")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "quote":
            out.append("\n".join("> " + line for line in b[1].splitlines()))
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "img":
            out.append(f"![{Path(b[1]).stem}]({b[1]})\n\n*{b[2]}*")
        elif kind == "table":
            headers, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
                     "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "details":  # GitHub renders <details>; other viewers show the content
            out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n{to_markdown(b[2]).rstrip()}\n\n"
                       "</details>")
        elif kind == "answers":
            out.append(f"Every answer ({len(b[1])}) is in `report.html`, filterable by instruction id and "
                       "pass/fail, and in `samples.jsonl` beside `results.json`.")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}pre{white-space:pre-wrap;margin:0;font-size:13px}
blockquote{border-left:3px solid #ccc;margin:0;padding-left:1em;white-space:pre-wrap}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}details{margin:1em 0}summary{cursor:pointer;font-weight:600}
figcaption{font-size:13px;color:#555;max-width:900px}.headline{font-size:16px;background:#f6f8fa;padding:.6em 1em;
border-left:4px solid #0969da}.regression{color:#b00020;font-weight:600}
#answers td div{max-height:14em;overflow:auto;white-space:pre-wrap;font-size:13px}
#answers{table-layout:fixed;width:100%}#answers .pass{color:#1a7f37}#answers .fail{color:#b00020}
.filters label{margin-right:1em}"""

_FILTER_JS = """function applyFilter(){
 var id=document.getElementById('f-id').value, st=document.getElementById('f-pass').value,
     m=document.getElementById('f-model').value, s=document.getElementById('f-set').value, shown=0;
 var rows=document.querySelectorAll('#answers tbody tr');
 for(var i=0;i<rows.length;i++){
  var d=rows[i].dataset, ok=(!m||d.model===m)&&(!s||d.set===s), p=d.pass;
  if(ok&&id){var hit=null, ids=d.ids?d.ids.split(' '):[];
   for(var j=0;j<ids.length;j++){
    if(ids[j].lastIndexOf(id+'=',0)===0&&ids[j].length===id.length+2){hit=ids[j].slice(-1);break;}}
   ok=hit!==null; p=hit;}
  if(ok&&st) ok=(p===st);
  rows[i].style.display=ok?'':'none'; if(ok) shown++;
 }
 document.getElementById('f-count').textContent=shown+' of '+rows.length+' answers shown';
}"""


def _inline(text: str) -> str:
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def _select(el_id: str, label: str, options: list[tuple[str, str]]) -> str:
    opts = "".join(f"<option value='{html.escape(v, quote=True)}'>{html.escape(t)}</option>" for v, t in options)
    return f"<label>{html.escape(label)} <select id='{el_id}' onchange='applyFilter()'>{opts}</select></label>"


def answers_html(samples: list[dict], models: list[str]) -> str:
    """Every answer in one table, filterable (inline script, no external assets) by prompt set, model,
    instruction id and pass/fail. With an instruction id chosen, pass/fail is that instruction's."""
    ids = sorted({i["id"] for r in samples for i in r.get("instructions", [])})
    sets = list(dict.fromkeys(str(r.get("set")) for r in samples))
    head = ("<div class='filters'>"
            + _select("f-set", "set", [("", "all")] + [(s, s) for s in sets])
            + _select("f-model", "model", [("", "all")] + [(m, m) for m in models])
            + _select("f-id", "instruction id", [("", "any")] + [(i, i) for i in ids])
            + _select("f-pass", "result", [("", "all"), ("1", "pass"), ("0", "fail")])
            + "<span id='f-count'></span></div>")
    rows = []
    for r in samples:
        ins = r.get("instructions", [])
        passed = r.get("passed")
        pass_cell = "–" if passed is None else ("<span class='pass'>pass</span>" if passed
                                                else "<span class='fail'>fail</span>")
        marks = "<br>".join(f"<span class='{'pass' if i['passed'] else 'fail'}'>{'✓' if i['passed'] else '✗'}"
                            f"</span> {html.escape(i['id'])}" for i in ins)
        extra = []
        if not r.get("ended", True):
            extra.append("(no EOS: cut at max_new_tokens)")
        if "rm_score" in r:
            extra.append(f"RM {fmt(r['rm_score'])}")
        id_marks = " ".join(f"{i['id']}={int(bool(i['passed']))}" for i in ins)
        attrs = (f" data-set='{html.escape(str(r.get('set')), quote=True)}'"
                 f" data-model='{html.escape(str(r.get('model')), quote=True)}'"
                 f" data-pass='{'' if passed is None else int(bool(passed))}'"
                 f" data-ids='{html.escape(id_marks, quote=True)}'")
        rows.append(f"<tr{attrs}><td>{html.escape(str(r.get('set')))} #{r.get('index')}</td>"
                    f"<td>{html.escape(str(r.get('model')))}</td><td>{pass_cell}</td><td>{marks or '–'}</td>"
                    f"<td><div>{html.escape(str(r.get('prompt', '')))}</div></td>"
                    f"<td><div>{html.escape(str(r.get('response', '')))}"
                    f"{('<br><em>' + html.escape(' · '.join(extra)) + '</em>') if extra else ''}</div></td></tr>")
    table = ("<table id='answers'><colgroup><col style='width:8%'><col style='width:8%'><col style='width:5%'>"
             "<col style='width:17%'><col style='width:27%'><col style='width:35%'></colgroup>"
             "<thead><tr><th>prompt</th><th>model</th><th>result</th><th>instructions</th><th>prompt text</th>"
             "<th>response</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return head + table + f"<script>{_FILTER_JS}\napplyFilter();</script>"


def to_html(blocks: list[tuple], base: Path, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    out.append(_html_blocks(blocks, base))
    out.append("</body></html>")
    return "\n".join(out)


def _html_blocks(blocks: list[tuple], base: Path) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            cls = " class='headline'" if b[1].startswith("**Headline") else \
                  " class='regression'" if b[1].startswith("REGRESSION") else ""
            out.append(f"<p{cls}>{_inline(b[1])}</p>")
        elif kind == "quote":
            out.append(f"<blockquote>{html.escape(b[1])}</blockquote>")
        elif kind == "list":
            out.append("<ul>" + "".join(
                f"<li{' class=regression' if str(i).startswith('REGRESSION') else ''}>{_inline(str(i))}</li>"
                for i in b[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((base / b[1]).read_bytes()).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(Path(b[1]).stem)}'>"
                       f"<figcaption>{_inline(b[2])}</figcaption></figure>")
        elif kind == "table":
            pre = len(b) > 3 and b[3]
            cell = (lambda c: f"<td><pre>{html.escape(str(c))}</pre></td>") if pre else \
                   (lambda c: f"<td>{_inline(str(c))}</td>")
            rows = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in b[2])
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(b[1])}</summary>{_html_blocks(b[2], base)}</details>")
        elif kind == "answers":
            out.append(f"<details><summary>Every answer ({len(b[1])}): filter by instruction id and pass/fail"
                       f"</summary>{answers_html(b[1], b[2])}</details>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _step_text(p: dict) -> str:
    return f"gained {p['gained']}, lost {p['lost']}, p {fmt_p(p['p_value'])}"


def _verdict(p: dict) -> str:
    if p["p_value"] < ALPHA:
        return "a significant improvement" if p["gained"] > p["lost"] else "significantly worse"
    return f"not distinguishable from noise (p ≥ {ALPHA})"


def headline(results: dict) -> list[str]:
    """One line per prompt set: did the run help on held-out prompts?"""
    lines = []
    for name, s in (results.get("sets") or {}).items():
        models = _model_order(s)
        ms = s.get("models", {})
        rated = [m for m in models if _ci(ms[m])]
        if rated:
            step = {p["model"]: p for p in s.get("paired", [])}
            parts = []
            for m in rated:
                lo, hi = _ci(ms[m])
                text = f"{m} {ms[m]['pass_rate']:.2f} [{lo:.2f}, {hi:.2f}]"
                if m in step and step[m]["against"] in rated:
                    text += f" ({_step_text(step[m])})"
                parts.append(text)
            n = ms[rated[0]].get("n_checked", "?")
            line = (f"**{name}** ({n} prompts with checked instructions; prompt-level pass, 95% interval; each step "
                    f"against the one before, McNemar exact p): " + " → ".join(parts) + ".")
            overall = {p["model"]: p for p in s.get("paired_reference", [])}
            last = rated[-1]
            p = overall.get(last) or (step.get(last) if len(rated) == 2 else None)
            if p is not None:
                line += (f" Overall, {last} vs {p['against']}: {p['difference']:+.2f} ({_step_text(p)}): "
                         f"{_verdict(p)}.")
            lines.append(line)
        elif any(ms[m].get("rm_score_mean") is not None for m in models):
            parts = [f"{m} {fmt(ms[m].get('rm_score_mean'))}" + (f" (win rate {fmt(ms[m]['win_rate'])})"
                                                                  if ms[m].get("win_rate") is not None else "")
                     for m in models]
            lines.append(f"**{name}** ({s.get('n_prompts', '?')} prompts, no checked instructions): mean reward-model "
                         f"score " + " → ".join(parts) + ".")
        else:
            lines.append(f"**{name}**: no prompt carries checked instructions and no reward model scored the answers; "
                         "see the metrics table.")
    return lines


def overview_section(results: dict, plots: Path) -> list[tuple]:
    """Headline, regressions, the narrow table and the small pass-rate chart."""
    lines = headline(results)
    blocks: list[tuple] = ([("p", "**Headline.** " + lines[0])] if len(lines) == 1 else
                           [("p", "**Headline.**"), ("list", lines)])
    flags = regression_lines(results)
    per = [s["per_id_paired"] for s in (results.get("sets") or {}).values() if s.get("per_id_paired")]
    if flags:
        blocks.append(("list", flags))
    elif per:
        against = ", ".join(dict.fromkeys(str(p.get("against")) for p in per))
        blocks.append(("p", f"No instruction id is significantly worse than {against} for any model "
                            f"(instruction-level pass, McNemar exact p < {ALPHA})."))
    for name, s in (results.get("sets") or {}).items():
        ms = s.get("models", {})
        rated = [m for m in _model_order(s) if _ci(ms[m])]
        if not rated:
            continue
        step = {p["model"]: p for p in s.get("paired", [])}
        rows = []
        for m in rated:
            lo, hi = _ci(ms[m])
            p = step.get(m)
            rows.append([m, f"{fmt(ms[m]['pass_rate'])} [{lo:.3f}, {hi:.3f}]",
                         f"{p['against']}: +{p['gained']} / −{p['lost']}, p {fmt_p(p['p_value'])}" if p else "–"])
        blocks += [("h", 3, f"{name}: prompt-level pass ({ms[rated[0]].get('n_checked', '?')} prompts, "
                            f"`{s.get('file', '?')}`)"),
                   ("table", ["model", "pass rate [95% CI]", "vs previous: gained / lost, p"], rows)]
    png = plot_pass_rates(results, plots / "pass_rates.png")
    if png is not None:
        blocks.append(("img", f"plots/{png.name}",
                       "Held-out prompt-level pass rate of each model with its 95% Wilson interval; between two "
                       "models, prompts gained / lost by the step and McNemar's exact p (red: p < 0.05)."))
    return blocks


def frontier_section(results: dict, plots: Path) -> list[tuple]:
    png = plot_frontier(results, plots / "frontier.png")
    if png is None:
        return []
    ref = (results.get("reference") or {}).get("name", "the reference")
    return [("h", 2, "Reward vs KL over the evaluated models"),
            ("img", f"plots/{png.name}",
             f"One point per evaluated model: reward-model score and pass rate on the held-out prompts against the "
             f"KL/token of its answers to {ref}. A model that buys RM score with KL but not pass rate is "
             "over-optimising the reward model.")]


def metrics_section(results: dict) -> list[tuple]:
    """The wide tables: every metric, per instruction id, and each model against the reference."""
    g = results.get("generation", {})
    ref = (results.get("reference") or {}).get("name", "reference")
    baseline = results.get("baseline") or "baseline"
    blocks: list[tuple] = [("h", 2, "All evaluation metrics")]
    blocks.append(("p", f"Decoding: {g.get('decoding', '?')}, max_new_tokens {g.get('max_new_tokens', '?')}, "
                        f"seed {g.get('seed', '?')}, {g.get('device', '?')} {g.get('dtype', '')}"
                        f"{' + bf16 autocast' if g.get('bf16_autocast') else ''}. KL reference: `{ref}`"
                        + (f"; win rate vs `{baseline}` by the reward model." if results.get("baseline") else ".")))
    if results.get("kl_estimator"):
        blocks.append(("p", f"KL: {results['kl_estimator']}."))
    if results.get("notes"):
        blocks.append(("list", results["notes"]))
    for name, s in (results.get("sets") or {}).items():
        models = {m: s["models"][m] for m in _model_order(s)}
        cols = [k for k in COLUMNS if any(m.get(k) is not None for m in models.values())]
        blocks.append(("h", 3, f"{name} ({s.get('n_prompts', '?')} prompts, `{s.get('file', '?')}`)"))
        headers = ["model"] + [COLUMNS[k].format(baseline=baseline, reference=ref) for k in cols]
        blocks.append(("table", headers, [[m] + [fmt(v.get(k)) for k in cols] for m, v in models.items()]))
        per_id = {m: v.get("per_id") or {} for m, v in models.items()}
        ids = list(dict.fromkeys(i for d in per_id.values() for i in d))
        if ids:
            tests = (s.get("per_id_paired") or {}).get("models", {})
            against = (s.get("per_id_paired") or {}).get("against")

            def cell(m: str, i: str) -> str:
                v = fmt(per_id[m].get(i, {}).get("pass_rate"))
                t = tests.get(m, {}).get(i)
                if t and t["p_value"] < ALPHA and t["gained"] != t["lost"]:
                    v += f" {'▼' if t['lost'] > t['gained'] else '▲'} p {fmt_p(t['p_value'])}"
                return v

            n = {i: d[i]["n"] for d in per_id.values() for i in d}  # the same prompts for every model
            rows = [[i, n[i]] + [cell(m, i) for m in models] for i in ids]
            blocks.append(("p", "Instruction-level pass rate (strict) per instruction id"
                                + (f"; ▼/▲: significantly worse/better than {against} on the prompts carrying the "
                                   f"id (McNemar exact p < {ALPHA})" if tests else "") + ":"))
            blocks.append(("table", ["instruction id", "n"] + list(models), rows))
        if s.get("paired_reference"):
            blocks.append(("p", "Prompt-level pass, each model against the reference on the same prompts:"))
            blocks.append(("table", ["model", "against", "gained", "lost", "difference", "p"],
                           [[p["model"], p["against"], p["gained"], p["lost"], f"{p['difference']:+.3f}",
                             fmt_p(p["p_value"])] for p in s["paired_reference"]]))
    return blocks


def _response_cell(row: Optional[dict]) -> str:
    if row is None:
        return "–"
    marks = " ".join(("✓ " if i["passed"] else "✗ ") + i["id"] for i in row.get("instructions", []))
    extra = [marks] if marks else []
    if not row.get("ended", True):
        extra.append("(no EOS: cut at max_new_tokens)")
    if "rm_score" in row:
        extra.append(f"RM {fmt(row['rm_score'])}")
    return row.get("response", "") + ("\n\n" + "\n".join(extra) if extra else "")


def gained_lost(samples: list[dict], set_name: str, before: str, after: str) -> tuple[list[int], list[int]]:
    """Prompt indices of a set where `after` passes and `before` fails (gained), and the reverse (lost)."""
    passed = {(r.get("model"), r.get("index")): r["passed"] for r in samples
              if r.get("set") == set_name and r.get("passed") is not None}
    idx = sorted({i for (m, i) in passed if m == after and (before, i) in passed})
    gained = [i for i in idx if passed[(after, i)] and not passed[(before, i)]]
    lost = [i for i in idx if passed[(before, i)] and not passed[(after, i)]]
    return gained, lost


def samples_section(results: dict, samples: list[dict], n_samples: Optional[int]) -> list[tuple]:
    """The prompts each step gained and lost (up to n of each), both answers side by side. Without
    checked instructions: the first n prompts with every model's answer."""
    n = n_samples if n_samples is not None else results.get("num_samples_in_report", 3)
    if not samples or n <= 0:
        return []
    by_key = {(r.get("set"), r.get("index"), r.get("model")): r for r in samples}
    blocks: list[tuple] = []
    for name, s in (results.get("sets") or {}).items():
        for p in s.get("paired", []):
            a, b = p["against"], p["model"]
            gained, lost = gained_lost(samples, name, a, b)
            blocks.append(("h", 3, f"{a} → {b} on {name}: gained {len(gained)}, lost {len(lost)}"))
            for kind, idx in (("gained", gained), ("lost", lost)):
                for i in idx[:n]:
                    first = by_key.get((name, i, b)) or by_key.get((name, i, a)) or {}
                    blocks.append(("p", f"**{kind}**: {name} #{i}"))
                    blocks.append(("quote", first.get("prompt", "")))
                    blocks.append(("table", [a, b], [[_response_cell(by_key.get((name, i, a))),
                                                      _response_cell(by_key.get((name, i, b)))]], True))
    if blocks:
        return [("h", 2, "What each step gained and lost"),
                ("p", f"Held-out prompts the later model passes and the earlier fails (gained), and the reverse "
                      f"(lost), up to {n} of each:")] + blocks
    models = list(results.get("models") or dict.fromkeys(r.get("model") for r in samples))
    for name in results.get("sets", {}):
        for i in range(n):
            rows = [by_key.get((name, i, m)) for m in models]
            first = next((r for r in rows if r is not None), None)
            if first is None:
                break
            blocks.append(("p", f"**{name} #{i}**"))
            blocks.append(("quote", first.get("prompt", "")))
            blocks.append(("table", models, [[_response_cell(r) for r in rows]], True))
    return ([("h", 2, "Sample responses")] + blocks) if blocks else []


def read_stage_rows(run_dir: Path, notes: list[str]) -> dict[str, list[dict]]:
    rows = {s: _read_jsonl(run_dir / s / "metrics.jsonl", notes) for s in PREFIXES}
    if rows.get("reward"):
        rows["reward"] = split_reward_rows(rows["reward"])
    return {s: r for s, r in rows.items() if r}


def curves_section(stage_rows: dict[str, list[dict]], plots: Path) -> list[tuple]:
    blocks: list[tuple] = []
    for stage, rows in stage_rows.items():
        panels, diag, constant = key_panels(stage, rows)
        inner: list[tuple] = []
        png = _draw_panels(panels, stage, rows, plots / f"{stage}_curves.png")
        if png is not None:
            caption = (f"{stage}/metrics.jsonl, key series: smoothed (exponential moving average) over the raw "
                       "values (faint).")
            if stage == "reward":
                caption += (" Accuracy on training batches and on the held-out pairs (before and after training) are "
                            "separate lines.")
            if stage == "ppo" and any(k == "ppo/explained_variance" for _, ks in panels for k in ks):
                caption += " " + EV_CAPTION
                _, ev = series(rows, "ppo/explained_variance")
                tail = [v for v in ev[-max(1, len(ev) // 4):] if math.isfinite(v)]
                if tail and sum(tail) / len(tail) < 0.2:
                    mean = round(sum(tail) / len(tail), 2) + 0.0  # no "-0.00"
                    caption += (f" In this run it averages {mean:.2f} over the last quarter of training: read the "
                                "critic as noise.")
            inner.append(("img", f"plots/{png.name}", caption))
        if stage == "ppo":
            rk = plot_reward_vs_kl(rows, plots / "ppo_reward_vs_kl.png")
            if rk is not None:
                inner.append(("img", f"plots/{rk[0].name}", rk[1]))
        if constant:
            inner.append(("p", "Constant over the run (not plotted): " + ", ".join(
                f"`{k}` = {fmt(next(v for v in series(rows, k)[1] if math.isfinite(v)))}" for k in constant) + "."))
        bad = nonfinite_notes(stage, rows)
        if bad:
            inner.append(("list", bad))
        if diag:
            dpng = _draw_panels([(fam, keys) for fam, keys in diag.items()], stage, rows,
                                plots / f"{stage}_diagnostics.png", ncols=4, panel=(3.4, 2.5))
            inner.append(("details", f"{stage} diagnostics: {sum(map(len, diag.values()))} more series",
                          [("img", f"plots/{dpng.name}", f"{stage}: every other logged series")]))
        if inner:
            blocks += [("h", 3, stage)] + inner
    return ([("h", 2, "Training curves")] + blocks) if blocks else []


# metric (after the stage prefix) whose first and last logged values sum up a stage's training
PROGRESS_KEYS = {"sft": ("eval_loss", "loss"), "reward": ("heldout_accuracy",), "ppo": ("score/rm", "score", "kl"),
                 "distill": ("reverse_kl", "pass_rate")}


def training_lines(stage_rows: dict[str, list[dict]]) -> list[str]:
    """First -> last logged value of each stage's main series (for a run without evaluation)."""
    out = []
    for stage, rows in stage_rows.items():
        parts = []
        for name in PROGRESS_KEYS.get(stage, ()):
            key = PREFIXES[stage][0] + name
            x, y = series(rows, key)
            pts = [(s, v) for s, v in zip(x, y) if math.isfinite(v)]
            if len(pts) >= 2:
                parts.append(f"`{key}` {fmt(pts[0][1])} → {fmt(pts[-1][1])} "
                             f"(steps {fmt(pts[0][0])}–{fmt(pts[-1][0])})")
            if stage == "sft" and parts:
                break
        if parts:
            out.append(f"{stage}: " + "; ".join(parts))
    return out


def summaries_section(run_dir: Path, notes: list[str]) -> list[tuple]:
    blocks: list[tuple] = []
    for stage in STAGE_NAMES:
        summary = _read_json(run_dir / stage / "summary.json", notes)
        if not summary:
            continue
        rows = [[k, fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v)[:120]]
                for k, v in summary.items() if k != "stage"]
        blocks += [("h", 3, stage), ("table", ["key", "value"], rows)]
    return ([("h", 2, "Stage summaries")] + blocks) if blocks else []


def find_results(run_dir: Path) -> Optional[Path]:
    """`<run>/eval/results.json` for a recipe run; `<dir>/results.json` for `pipeline eval`."""
    return next((p for p in (run_dir / "eval" / "results.json", run_dir / "results.json") if p.exists()), None)


def build_report(run_dir: str | Path, n_samples: Optional[int] = None, results_path: str | Path | None = None) -> Path:
    """Write `<run_dir>/report.md`, `report.html` and `plots/*.png` from the run's files.

    `results_path`: the eval results to show (default: `find_results(run_dir)`); `n_samples`: gained and
    lost prompts shown per step (default: results.json's `num_samples_in_report`)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    title = f"Run report: {run_dir.resolve().name}"
    blocks: list[tuple] = [("h", 1, title)]
    info = _read_json(run_dir / "run_info.json", notes)
    if info:
        v = info.get("versions", {})
        blocks.append(("p", f"Recipe `{info.get('recipe')}`, seed {info.get('seed')}, started {info.get('started')}; "
                            f"torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}, "
                            f"trl {v.get('trl', '?')}."))
    results_path = Path(results_path) if results_path else find_results(run_dir)
    results = _read_json(results_path, notes) if results_path else None
    stage_rows = read_stage_rows(run_dir, notes)
    summaries = summaries_section(run_dir, notes)
    if results:
        blocks += overview_section(results, plots)
        blocks += frontier_section(results, plots)
    elif stage_rows or summaries:
        blocks.append(("p", "**Headline.** No eval ran: this run has no `eval/results.json` (no eval stage in the "
                            "recipe, or it did not finish), so nothing here says whether training helped on held-out "
                            "prompts. Training curves and stage summaries only."))
        lines = training_lines(stage_rows)
        if lines:
            blocks += [("p", "First → last logged value (training data, not held-out):"), ("list", lines)]
    blocks += curves_section(stage_rows, plots)
    if results:
        samples = _read_jsonl(results_path.parent / "samples.jsonl", notes)
        blocks += samples_section(results, samples, n_samples)
        blocks += metrics_section(results)
        if samples:
            models = [m for s in results.get("sets", {}).values() for m in _model_order(s)]
            blocks += [("h", 2, "Every answer"), ("answers", samples, list(dict.fromkeys(models)))]
    blocks += summaries
    if len(blocks) == 1:
        blocks.append(("p", f"No stage outputs found in `{run_dir}`."))
    if notes:
        blocks += [("h", 2, "Notes"), ("list", notes)]
    atomic_write_text(run_dir / "report.md", to_markdown(blocks))
    atomic_write_text(run_dir / "report.html", to_html(blocks, run_dir, title))
    return run_dir / "report.md"
