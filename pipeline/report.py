"""The run report: `report.md`, a self-contained `report.html` and PNG plots in `plots/`.

    build_report(run_dir) -> run_dir/report.md      (the eval stage calls it at its end)

Every number comes from a file the run wrote; nothing is recomputed here:
    run_info.json                 seed, recipe, versions
    <stage>/summary.json          the stage summaries
    <stage>/metrics.jsonl         training curves (sft, reward, ppo, distill)
    eval/results.json             the models x metrics tables (or results.json at the top, as
    eval/samples.jsonl            `pipeline eval --output-dir DIR` writes them) and the samples
A stage or file that is absent leaves its section out. Non-finite logged values (written as the
strings "nan"/"inf") are shown as gaps in the plots and listed, never dropped silently.
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

# metrics.jsonl keys each stage's curves show: (key prefixes, families shown or None for all).
# A family is the name after the prefix without `eval_`, so `loss` and `eval_loss` share a panel.
CURVES = {
    "sft": (("sft/",), ("loss", "pass_rate")),
    "reward": (("rm/", "reward/"), ("loss", "accuracy", "pass_rate")),
    "ppo": (("ppo/",), None),
    "distill": (("distill/",), None),
}

# results.json metric -> column header; the tables keep the columns that have a value.
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
# Formatting
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


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table for stdout."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


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
            rows.append(json.loads(line))
        except json.JSONDecodeError:
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


def _family(key: str, prefix: str) -> str:
    name = key[len(prefix):]
    return name[5:] if name.startswith("eval_") else name


def curve_panels(stage: str, rows: list[dict]) -> dict[str, list[str]]:
    """family -> keys plotted in its panel, for one stage's metrics rows."""
    prefixes, families = CURVES[stage]
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if _number(v) is not None))
    panels: dict[str, list[str]] = {}
    for k in keys:
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if prefix is None:
            continue
        fam = _family(k, prefix)
        if families is None or fam in families:
            panels.setdefault(fam, []).append(k)
    return panels


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot state)
# --------------------------------------------------------------------------------------------


def _figure(n_panels: int, ncols: int = 3, panel: tuple[float, float] = (4.2, 3.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _plot_keys(ax, rows: list[dict], keys: list[str]) -> None:
    for k in keys:
        x, y = series(rows, k)
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=k)
    if len(keys) > 1:
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_curves(stage: str, rows: list[dict], out: Path) -> Optional[Path]:
    panels = curve_panels(stage, rows)
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (fam, keys) in zip(axes, panels.items()):
        _plot_keys(ax, rows, keys)
        ax.set_title(f"{stage}: {fam}", fontsize=9)
    fig.savefig(out, dpi=90)
    return out


def plot_reward_vs_kl(rows: list[dict], out: Path) -> Optional[Path]:
    """PPO over-optimisation view: RM score (and checker pass rate) against KL, one point per iteration."""
    pts = [(r["step"], _number(r.get("ppo/kl")), _number(r.get("ppo/score")), _number(r.get("ppo/pass_rate")))
           for r in rows if "step" in r]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    fig, (ax,) = _figure(1, panel=(7.5, 4.5))
    steps, kl, score, pr = zip(*pts)
    ax.plot(kl, score, color="0.75", linewidth=1, zorder=1)
    sc = ax.scatter(kl, score, c=steps, cmap="viridis", s=18, zorder=2, label="ppo/score (RM)")
    fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel("ppo/kl (nats per response, to the reference)")
    ax.set_ylabel("ppo/score (reward model)")
    if any(p is not None for p in pr):
        ax2 = ax.twinx()
        ax2.plot([k for k, p in zip(kl, pr) if p is not None], [p for p in pr if p is not None],
                 color="tab:red", marker="x", linestyle="none", label="ppo/pass_rate (checkers)")
        ax2.set_ylabel("ppo/pass_rate (checkers)", color="tab:red")
        ax2.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("PPO: reward-model score and checker pass rate vs KL\n"
                 "(RM score rising while the pass rate falls = over-optimisation)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=90)
    return out


def plot_pass_rates(stage_rows: dict[str, list[dict]], out: Path) -> Optional[Path]:
    keys = [(s, k) for s, rows in stage_rows.items()
            for fam, ks in curve_panels(s, rows).items() if fam.endswith("pass_rate") for k in ks]
    if not keys:
        return None
    fig, (ax,) = _figure(1, panel=(7.0, 4.0))
    for s, k in keys:
        x, y = series(stage_rows[s], k)
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=k)
    ax.set_xlabel("step (of each stage)")
    ax.set_ylabel("checker pass rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=90)
    return out


def nonfinite_notes(stage: str, rows: list[dict]) -> list[str]:
    out = []
    for keys in curve_panels(stage, rows).values():
        for k in keys:
            x, y = series(rows, k)
            bad = [s for s, v in zip(x, y) if not math.isfinite(v)]
            if bad:
                out.append(f"`{k}`: {len(bad)} non-finite value(s), first at step {bad[0]}.")
    return out


# --------------------------------------------------------------------------------------------
# The document: a list of blocks rendered twice (Markdown and HTML)
# --------------------------------------------------------------------------------------------


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
            out.append(f"![{b[2]}]({b[1]})")
        elif kind == "table":
            headers, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
                     "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}pre{white-space:pre-wrap;margin:0;font-size:13px}
blockquote{border-left:3px solid #ccc;margin:0;padding-left:1em;white-space:pre-wrap}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}"""


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def to_html(blocks: list[tuple], base: Path, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "quote":
            out.append(f"<blockquote>{html.escape(b[1])}</blockquote>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((base / b[1]).read_bytes()).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        elif kind == "table":
            pre = len(b) > 3 and b[3]
            cell = (lambda c: f"<td><pre>{html.escape(str(c))}</pre></td>") if pre else \
                   (lambda c: f"<td>{_inline(str(c))}</td>")
            rows = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in b[2])
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
    out.append("</body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def eval_section(results: dict) -> list[tuple]:
    g = results.get("generation", {})
    ref = (results.get("reference") or {}).get("name", "reference")
    baseline = results.get("baseline") or "baseline"
    blocks: list[tuple] = [("h", 2, "Held-out evaluation")]
    blocks.append(("p", f"Decoding: {g.get('decoding', '?')}, max_new_tokens {g.get('max_new_tokens', '?')}, "
                        f"seed {g.get('seed', '?')}, {g.get('device', '?')} {g.get('dtype', '')}"
                        f"{' + bf16 autocast' if g.get('bf16_autocast') else ''}. KL reference: `{ref}`"
                        + (f"; win rate vs `{baseline}` by the reward model." if results.get("baseline") else ".")))
    if results.get("kl_estimator"):
        blocks.append(("p", f"KL: {results['kl_estimator']}."))
    if results.get("notes"):
        blocks.append(("list", results["notes"]))
    for name, s in results.get("sets", {}).items():
        models = s.get("models", {})
        cols = [k for k in COLUMNS if any(m.get(k) is not None for m in models.values())]
        blocks.append(("h", 3, f"{name} ({s.get('n_prompts', '?')} prompts, `{s.get('file', '?')}`)"))
        headers = ["model"] + [COLUMNS[k].format(baseline=baseline, reference=ref) for k in cols]
        blocks.append(("table", headers, [[m] + [fmt(v.get(k)) for k in cols] for m, v in models.items()]))
        per_id = {m: v.get("per_id") or {} for m, v in models.items()}
        ids = list(dict.fromkeys(i for d in per_id.values() for i in d))
        if ids:
            n = {i: d[i]["n"] for d in per_id.values() for i in d}  # the same prompts for every model
            rows = [[i, n[i]] + [fmt(d.get(i, {}).get("pass_rate")) for d in per_id.values()] for i in ids]
            blocks.append(("p", "Instruction-level pass rate (strict) per instruction id:"))
            blocks.append(("table", ["instruction id", "n"] + list(models), rows))
        if s.get("paired"):
            blocks.append(("p", "Prompt-level pass (strict), each model against the one listed before it, paired "
                                "on the same prompts: prompts gained and lost, the difference, and McNemar's exact "
                                "two-sided p (how often a difference this large arises when neither is better):"))
            blocks.append(("table", ["model", "against", "gained", "lost", "difference", "p"],
                           [[p["model"], p["against"], p["gained"], p["lost"], f"{p['difference']:+.3f}",
                             f"{p['p_value']:.3g}"] for p in s["paired"]]))
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


def samples_section(results: dict, samples: list[dict], n_samples: Optional[int]) -> list[tuple]:
    n = n_samples if n_samples is not None else results.get("num_samples_in_report", 3)
    if not samples or n <= 0:
        return []
    by_key = {(r.get("set"), r.get("index"), r.get("model")): r for r in samples}
    models = list(results.get("models") or dict.fromkeys(r.get("model") for r in samples))
    blocks: list[tuple] = [("h", 2, "Sample responses")]
    for name in results.get("sets", {}):
        for i in range(n):
            rows = [by_key.get((name, i, m)) for m in models]
            first = next((r for r in rows if r is not None), None)
            if first is None:
                break
            blocks.append(("p", f"**{name} #{i}**"))
            blocks.append(("quote", first.get("prompt", "")))
            blocks.append(("table", models, [[_response_cell(r) for r in rows]], True))
    return blocks


def curves_section(run_dir: Path, plots: Path, notes: list[str]) -> list[tuple]:
    blocks: list[tuple] = []
    stage_rows = {s: _read_jsonl(run_dir / s / "metrics.jsonl", notes) for s in CURVES}
    stage_rows = {s: rows for s, rows in stage_rows.items() if rows}
    for stage, rows in stage_rows.items():
        png = plot_curves(stage, rows, plots / f"{stage}_curves.png")
        if png is not None:
            caption = f"{stage} training curves ({stage}/metrics.jsonl)"
            blocks.append(("img", f"plots/{png.name}", caption))
        bad = nonfinite_notes(stage, rows)
        if bad:
            blocks.append(("list", bad))
    if "ppo" in stage_rows:
        png = plot_reward_vs_kl(stage_rows["ppo"], plots / "ppo_reward_vs_kl.png")
        if png is not None:
            blocks += [("h", 3, "PPO: reward vs KL"),
                       ("img", f"plots/{png.name}", "ppo/score and ppo/pass_rate against ppo/kl")]
    png = plot_pass_rates(stage_rows, plots / "pass_rate.png")
    if png is not None:
        blocks += [("h", 3, "Checker pass rate over training steps"), ("img", f"plots/{png.name}", "pass rate by step")]
    return ([("h", 2, "Training curves")] + blocks) if blocks else []


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

    `results_path`: the eval results to show (default: `find_results(run_dir)`)."""
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
    if results:
        blocks += eval_section(results)
    blocks += curves_section(run_dir, plots, notes)
    blocks += summaries_section(run_dir, notes)
    if results:
        samples = _read_jsonl(results_path.parent / "samples.jsonl", notes)
        blocks += samples_section(results, samples, n_samples)
    if len(blocks) == 1:
        blocks.append(("p", f"No stage outputs found in `{run_dir}`."))
    if notes:
        blocks += [("h", 2, "Notes"), ("list", notes)]
    atomic_write_text(run_dir / "report.md", to_markdown(blocks))
    atomic_write_text(run_dir / "report.html", to_html(blocks, run_dir, title))
    return run_dir / "report.md"
