"""The run report, built from fixture run directories of fake summary.json / metrics.jsonl / results.json files
(no models): the headline and its Wilson intervals, per-instruction regressions, gained/lost samples, the key
curves, the filterable answers table, `pipeline report` on a run without evaluation, and the runner's report."""

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline.cli import main
from pipeline.report import (build_report, fmt, fmt_p, gained_lost, headline, key_panels, regression_lines, series,
                             smooth, split_reward_rows, wilson_interval)
from pipeline.stages.eval import paired_pass_test, per_id_paired, prompt_passes, summarize_checks

TITLE, LOWER, NO_COMMA = "detectable_format:title", "change_case:english_lowercase", "punctuation:no_comma"

# 26 held-out prompts: 0-9 carry TITLE, 10-19 LOWER, 20-25 NO_COMMA. Which prompts each model passes:
PASSES = {
    "base": set(range(0, 8)) | {10, 11, 12} | {20, 21, 22},
    "sft": set(range(0, 8)) | set(range(10, 18)) | {20, 21, 22},  # gains 13-17 (LOWER)
    "ppo": {0} | set(range(10, 19)) | {20, 21},  # loses TITLE 1-7 (planted regression) and 22; gains 18
}
MODELS = list(PASSES)


def _id_of(i: int) -> str:
    return TITLE if i < 10 else LOWER if i < 20 else NO_COMMA


def _checks(model: str) -> list:
    return [[{"id": _id_of(i), "kwargs": {}, "strict": i in PASSES[model], "loose": i in PASSES[model]}]
            for i in range(26)]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _results() -> dict:
    """results.json as the eval stage assembles it, from the same pure functions."""
    checks = {m: _checks(m) for m in MODELS}
    models = {}
    for m in MODELS:
        s = summarize_checks(checks[m])
        n = s["n_checked"]
        models[m] = {**s, "pass_rate_ci95": list(wilson_interval(round(s["pass_rate"] * n), n)),
                     "kl": {"base": 0.0, "sft": 0.02, "ppo": 0.09}[m], "rm_score_mean": {"base": 0.1, "sft": 0.5,
                                                                                        "ppo": 1.7}[m],
                     "response_length": 80.0, "eos_share": 0.9, "win_rate": 0.5}
    passes = {m: prompt_passes(checks[m]) for m in MODELS}
    return {
        "generation": {"decoding": "greedy", "max_new_tokens": 128, "seed": 0, "device": "cpu", "dtype": "float32"},
        "models": {m: f"runs/x/{m}" for m in MODELS},
        "reference": {"name": "base", "path": "smollm2-135m-instruct"},
        "baseline": "base", "reward_model": "runs/x/reward/final", "notes": [], "num_samples_in_report": 2,
        "sets": {"heldout": {
            "file": "eval/constraints/heldout.jsonl", "n_prompts": 26, "models": models,
            "paired": [{"model": b, "against": a, **paired_pass_test(passes[b], passes[a])}
                       for a, b in zip(MODELS, MODELS[1:])],
            "paired_reference": [{"model": m, "against": "base", **paired_pass_test(passes[m], passes["base"])}
                                 for m in MODELS[1:]],
            "per_id_paired": {"against": "base",
                              "models": {m: per_id_paired(checks[m], checks["base"]) for m in MODELS[1:]}},
        }},
    }


def _samples() -> list[dict]:
    return [{"set": "heldout", "model": m, "index": i, "prompt": f"prompt number {i}",
             "response": f"{m} answers {i}", "length": 5, "ended": True, "passed": i in PASSES[m],
             "instructions": [{"id": _id_of(i), "kwargs": {}, "passed": i in PASSES[m], "passed_loose": True}]}
            for m in MODELS for i in range(26)]


def _ppo_rows(components: bool = True, n: int = 30) -> list[dict]:
    rows = []
    for s in range(n):
        r = {"step": s, "ppo/score": 0.1 * s, "ppo/kl": 0.5 * s, "ppo/kl_coef": 0.2, "ppo/entropy": 2.0 - 0.01 * s,
             "ppo/pass_rate": 0.5 + 0.01 * (s % 5), "ppo/response_length": 60 + s, "ppo/clipfrac": 0.1 + 0.001 * s,
             "ppo/explained_variance": 0.02 * ((-1) ** s)}
        if components:
            r.update({"ppo/score/rm": 0.05 * s, "ppo/score/verifier": 0.5 + 0.01 * s})
        rows.append(r)
    rows[4]["ppo/clipfrac"] = "nan"  # MetricsLogger writes non-finite values as strings
    return rows


def make_training(run: Path, ppo_components: bool = True) -> Path:
    _write_json(run / "run_info.json", {"seed": 0, "recipe": "recipes/x.yaml", "started": "2025-01-01T00:00:00",
                                        "versions": {"torch": "2.x", "transformers": "5.x", "trl": "1.x"}})
    _write_json(run / "sft" / "summary.json", {"stage": "sft", "seconds": 12.5, "eval_loss": 1.2345, "steps": 40})
    write_jsonl(run / "sft" / "metrics.jsonl",
                [{"step": 0, "sft/eval_loss": 2.0}]
                + [{"step": s, "sft/loss": 3.0 - 0.05 * s, "sft/learning_rate": 1e-3} for s in range(1, 41, 5)]
                + [{"step": 40, "sft/eval_loss": 1.2345}])
    write_jsonl(run / "ppo" / "metrics.jsonl", _ppo_rows(ppo_components))
    _write_json(run / "ppo" / "summary.json", {"stage": "ppo", "iterations": 30, "ppo/score_last": 2.9})
    return run


def make_run(root: Path) -> Path:
    run = make_training(root / "run")
    # reward: held-out pairs before and after training (pairwise_metrics: with score_chosen), batches between
    write_jsonl(run / "reward" / "metrics.jsonl",
                [{"step": 0, "rm/accuracy": 0.5, "rm/margin": 0.0, "rm/score_chosen": 0.1, "rm/score_rejected": 0.1}]
                + [{"step": s, "rm/loss": 0.7 - 0.01 * s, "rm/accuracy": 0.9, "rm/margin": 1.0}
                   for s in range(2, 21, 2)]
                + [{"step": 20, "rm/accuracy": 0.7, "rm/margin": 0.8, "rm/score_chosen": 1.0,
                    "rm/score_rejected": 0.2}])
    _write_json(run / "eval" / "results.json", _results())
    write_jsonl(run / "eval" / "samples.jsonl", _samples())
    return run


# ------------------------------------------------------------------------------ statistics


def test_wilson_interval_matches_hand_computation():
    # k=8, n=10, z=1.96: p=0.8, z²=3.8416, 1+z²/n = 1.38416; centre (0.8 + 0.19208)/1.38416 = 0.7167380;
    # half 1.96/1.38416 * sqrt(0.016 + 0.009604) = 0.2265811 -> [0.490157, 0.943319] (textbook: 0.490, 0.943)
    lo, hi = wilson_interval(8, 10, z=1.96)
    assert lo == pytest.approx(0.490157, abs=2e-6) and hi == pytest.approx(0.943319, abs=2e-6)
    # k=0: [0, z²/(n+z²)] = 3.8416 / 13.8416
    assert wilson_interval(0, 10, z=1.96) == pytest.approx((0.0, 3.8416 / 13.8416))
    assert wilson_interval(10, 10, z=1.96) == pytest.approx((1 - 3.8416 / 13.8416, 1.0))
    # default z = 1.959964, k=50, n=100: centred at 0.5; half 1.959964/1.038415 * sqrt(0.0025 + 0.0000960365)
    # = 1.887459 * 0.0509513 = 0.0961685
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.5 - 0.0961685, 0.5 + 0.0961685), abs=2e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_is_exact_at_the_ends_and_the_chart_draws_a_zero_rate(tmp_path):
    # At k = 0 the formula's centre and half-width are equal; rounding left a 1.7e-18 lower bound, which
    # made matplotlib refuse the headline chart's (then negative) error bar when a model passed nothing.
    assert wilson_interval(0, 125)[0] == 0.0 and wilson_interval(125, 125)[1] == 1.0
    from pipeline.report import plot_pass_rates

    results = {"sets": {"heldout": {"models": {m: {"pass_rate": r, "n_checked": 125}
                                               for m, r in (("base", 0.0), ("sft", 1.0), ("ppo", 0.2))},
                                    "paired": []}}}
    assert plot_pass_rates(results, tmp_path / "pass_rates.png").exists()


def test_smooth_is_a_bias_corrected_ema():
    # span 3: a = 0.5; [0, 2]: s1 = (0.5*0*0.5 + 0.5*2) / (0.25 + 0.5) = 1 / 0.75
    assert smooth([0.0, 2.0], span=3) == pytest.approx([0.0, 4 / 3])
    assert smooth([1.0, 1.0, 1.0], span=5) == pytest.approx([1.0, 1.0, 1.0])
    out = smooth([0.0, float("nan"), 2.0], span=3)  # a gap stays a gap; the average skips it
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == pytest.approx(4 / 3)
    assert smooth([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]  # short series: no smoothing


def test_fmt():
    assert fmt(None) == "–" and fmt(0.625) == "0.625" and fmt(112.5) == "112.500" and fmt(3) == "3"
    assert fmt(float("nan")) == "nan" and fmt(1.2e-5) == "1.20e-05"
    assert fmt_p(0.0390625) == "0.039" and fmt_p(1e-5) == "1e-05" and fmt_p(1.0) == "1"


# ------------------------------------------------------------------------------ headline, flags, samples


def test_headline_gives_each_model_with_interval_and_each_step():
    results = _results()
    (line,) = headline(results)
    # base passes 14 of 26, sft 19, ppo 12; each with its Wilson interval
    for m, k in (("base", 14), ("sft", 19), ("ppo", 12)):
        lo, hi = wilson_interval(k, 26)
        assert f"{m} {k / 26:.2f} [{lo:.2f}, {hi:.2f}]" in line
    # base -> sft: gained 5 (13-17), lost 0: p = 2/32; sft -> ppo: gained 1, lost 8: p = 2*(1+9)/512
    assert "sft 0.73 [0.54, 0.86] (gained 5, lost 0, p 0.062)" in line
    assert "(gained 1, lost 8, p 0.039)" in line
    assert line.index("base 0.54") < line.index("sft 0.73") < line.index("ppo 0.46")
    # overall ppo vs base: gained 6, lost 8 of 14 discordant: p = 2*6476/16384 = 0.79
    assert "Overall, ppo vs base: -0.08 (gained 6, lost 8, p 0.79): not distinguishable from noise" in line


def test_per_id_regression_flags_a_planted_regression_but_not_a_small_drop():
    results = _results()
    tests = results["sets"]["heldout"]["per_id_paired"]["models"]
    # TITLE on ppo: 8 of 10 -> 1 of 10, 7 lost, none gained: p = 2/128
    assert tests["ppo"][TITLE] == {"pass_rate": 0.1, "pass_rate_against": 0.8, "n": 10, "gained": 0, "lost": 7,
                                   "difference": -0.7, "p_value": pytest.approx(2 / 128), "regression": True}
    # NO_COMMA on ppo: 3 of 6 -> 2 of 6 (1 lost): a drop, not significant
    assert tests["ppo"][NO_COMMA]["lost"] == 1 and tests["ppo"][NO_COMMA]["regression"] is False
    assert not any(t["regression"] for t in tests["sft"].values())
    flags = regression_lines(results)
    assert flags == [f"REGRESSION: {TITLE} 0.80 -> 0.10 (ppo vs base on heldout, 10 instructions: "
                     "gained 0, lost 7, p 0.016)"]
    # a significant *gain* is not a regression: swapped, base vs ppo gains TITLE (flagged: LOWER, 6 lost)
    swapped = {"sets": {"h": {"per_id_paired": {"against": "ppo", "models": {"base": per_id_paired(
        _checks("base"), _checks("ppo"))}}}}}
    assert [line.split()[1] for line in regression_lines(swapped)] == [LOWER]


def test_gained_and_lost_samples_are_the_prompts_that_changed():
    samples = _samples()
    assert gained_lost(samples, "heldout", "base", "sft") == ([13, 14, 15, 16, 17], [])
    assert gained_lost(samples, "heldout", "sft", "ppo") == ([18], [1, 2, 3, 4, 5, 6, 7, 22])
    # rows without a pass verdict (plain prompts) are neither
    plain = [{**r, "passed": None} if r["index"] == 18 else r for r in samples]
    assert gained_lost(plain, "heldout", "sft", "ppo")[0] == []


# ------------------------------------------------------------------------------ the report


def test_report_from_fixture_run(tmp_path):
    run = make_run(tmp_path)
    md = build_report(run).read_text()
    # headline first, then the regression flag and the narrow table
    assert md.index("**Headline.**") < md.index("REGRESSION: detectable_format:title") < md.index(
        "| model | pass rate [95% CI] | vs previous: gained / lost, p |")
    lo, hi = wilson_interval(19, 26)
    assert f"| sft | 0.731 [{lo:.3f}, {hi:.3f}] | base: +5 / −0, p 0.062 |" in md
    assert md.index("vs previous") < md.index("All evaluation metrics")  # the wide table comes later
    # the per-id table marks the regression
    assert re.search(rf"\| {TITLE} \| 10 \| 0.800 \| 0.800 \| 0.100 ▼ p 0.016 \|", md)
    # gained and lost samples, num_samples_in_report = 2 of each
    assert "### sft → ppo on heldout: gained 1, lost 8" in md
    section = md[md.index("### sft → ppo"):]
    assert "**gained**: heldout #18" in section and "**lost**: heldout #1" in section
    assert "**lost**: heldout #2" in section and "heldout #3" not in section
    row = next(line for line in section.splitlines() if "sft answers 1<br>" in line)
    assert "ppo answers 1<br>" in row and "✓ " + TITLE in row and "✗ " + TITLE in row
    # curves: key panels and separate diagnostics; constant series named, not plotted
    for name in ("pass_rates", "frontier", "sft_curves", "reward_curves", "ppo_curves", "ppo_reward_vs_kl",
                 "ppo_diagnostics", "reward_diagnostics"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
        assert f"(plots/{name}.png)" in md
    assert "Constant over the run (not plotted): `ppo/kl_coef` = 0.200." in md
    assert "`ppo/clipfrac`: 1 non-finite value(s), first at step 4." in md
    assert "read the critic as noise" in md  # explained variance near 0
    assert "(ppo/score/rm, without the verifier)" in md
    # stage summaries
    assert "| eval_loss | 1.234 |" in md and "| steps | 40 |" in md

    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 8 and "src='plots/" not in html  # self-contained
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)  # no external assets: works offline
    assert "<details><summary>ppo diagnostics" in html and "function applyFilter()" in html
    # every answer, with what the filter reads: instruction ids with their pass, the prompt's pass, the model
    assert html.count("<tr data-set='heldout'") == 3 * 26
    assert f"data-model='ppo' data-pass='0' data-ids='{TITLE}=0'" in html
    assert f"data-model='sft' data-pass='1' data-ids='{LOWER}=1'" in html
    assert f"<option value='{TITLE}'>" in html and "<option value='0'>fail</option>" in html


def test_key_panels_split_reward_components_and_heldout_accuracy(tmp_path):
    panels, diag, constant = key_panels("ppo", _ppo_rows(components=True))
    assert panels[0] == ("score", ["ppo/score/rm", "ppo/score/verifier"])
    assert [t for t, _ in panels] == ["score", "KL to the reference", "pass rate (training prompts)", "entropy",
                                      "length (tokens)", "critic explained variance"]
    assert diag["score"] == ["ppo/score"] and "clipfrac" in diag and constant == ["ppo/kl_coef"]
    panels, diag, _ = key_panels("ppo", _ppo_rows(components=False))
    assert panels[0] == ("score", ["ppo/score"]) and "score" not in diag
    # without components the reward-vs-KL caption says the total mixes the terms
    run = make_training(tmp_path / "r", ppo_components=False)
    assert "did not log them apart" in build_report(run).read_text()

    rows = split_reward_rows([{"step": 0, "rm/accuracy": 0.5, "rm/score_chosen": 0.1},
                              {"step": 5, "rm/accuracy": 0.9, "rm/loss": 0.3},
                              {"step": 10, "rm/accuracy": 0.8, "rm/loss": 0.2},
                              {"step": 10, "rm/accuracy": 0.7, "rm/score_chosen": 1.0}])
    assert series(rows, "rm/heldout_accuracy") == ([0, 10], [0.5, 0.7])
    assert series(rows, "rm/accuracy") == ([5, 10], [0.9, 0.8])  # training batches only
    panels, _, _ = key_panels("reward", rows)
    assert ("accuracy", ["rm/accuracy", "rm/heldout_accuracy"]) in panels


def test_pipeline_report_on_a_run_without_eval(tmp_path, capsys):
    run = make_training(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert "report.md" in capsys.readouterr().out
    md = (run / "report.md").read_text()
    assert "No eval ran" in md and "Training curves" in md and "Stage summaries" in md
    assert "`ppo/score/rm` 0.000 → 1.450 (steps 0–29)" in md  # first -> last logged value
    assert "Every answer" not in md and "pass rate [95% CI]" not in md
    assert (run / "plots" / "sft_curves.png").exists() and (run / "plots" / "ppo_curves.png").exists()
    assert (run / "report.html").read_text().count("data:image/png;base64,") == 4
    rc = main(["report", str(tmp_path / "missing")])
    assert rc == 2 and "no such run directory" in capsys.readouterr().err


def test_report_with_missing_stages_and_bad_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No stage outputs found" in build_report(empty).read_text()
    # `pipeline eval --output-dir DIR` layout: results.json at the top, no stages, no samples
    cli = tmp_path / "cli"
    _write_json(cli / "results.json", _results())
    md = build_report(cli).read_text()
    assert "**Headline.**" in md and "Training curves" not in md and "Every answer" not in md
    # a run killed mid-write: a truncated metrics line and an unreadable summary are reported, not fatal
    run = tmp_path / "killed"
    write_jsonl(run / "sft" / "metrics.jsonl", [{"step": 1, "sft/loss": 2.0}, {"step": 2, "sft/loss": 1.5}])
    with open(run / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "sft/lo')
    (run / "sft" / "summary.json").write_text("{")
    md = build_report(run).read_text()
    assert "1 malformed line(s) skipped" in md and "summary.json: unreadable" in md
    assert (run / "plots" / "sft_curves.png").exists()


def test_series_keeps_the_latest_run_when_steps_restart():
    rows = [{"step": s, "k": float(s)} for s in (1, 2, 3)] + [{"step": 2, "k": 20.0}, {"step": 3, "k": 30.0}]
    assert series(rows, "k") == ([1, 2, 3], [1.0, 20.0, 30.0])
    assert math.isnan(series([{"step": 1, "k": "nan"}], "k")[1][0])  # NaN kept


# ------------------------------------------------------------------------------ the runner writes it


def _fake_stage(name: str, fail: bool = False):
    def run(recipe, stage_dir):
        key = {"sft": "sft/loss", "ppo": "ppo/kl"}[name]
        write_jsonl(stage_dir / "metrics.jsonl", [{"step": s, key: 1.0 / (s + 1)} for s in range(5)])
        if fail:
            raise RuntimeError(f"{name} broke")
        return {"steps": 5}
    return types.SimpleNamespace(run=run)


def test_runner_writes_the_report_without_eval_and_after_a_failed_stage(tmp_path, monkeypatch):
    from pipeline import runner
    from pipeline.config import parse_recipe

    def recipe(out):
        return parse_recipe({"run": {"output_dir": str(tmp_path / out)}, "model": {"name_or_path": "tiny"},
                             "stages": ["sft", "ppo"],
                             "sft": {"data": "x.jsonl"}, "ppo": {"policy_from": "sft", "prompts": "p.jsonl"}})

    monkeypatch.setattr(runner, "stage_module", lambda s: _fake_stage(s))
    runner.run_recipe(recipe("ok"))
    md = (tmp_path / "ok" / "report.md").read_text()
    assert "No eval ran" in md and "(plots/sft_curves.png)" in md and "(plots/ppo_curves.png)" in md

    monkeypatch.setattr(runner, "stage_module", lambda s: _fake_stage(s, fail=s == "ppo"))
    with pytest.raises(RuntimeError, match="ppo broke"):
        runner.run_recipe(recipe("failed"))
    md = (tmp_path / "failed" / "report.md").read_text()
    assert "| steps | 5 |" in md and "(plots/ppo_curves.png)" in md  # sft finished; ppo's curves so far


def test_report_failure_does_not_hide_the_run(tmp_path, monkeypatch, capsys):
    from pipeline import runner

    monkeypatch.setitem(sys.modules, "pipeline.report", types.SimpleNamespace(
        build_report=lambda out: (_ for _ in ()).throw(ValueError("boom"))))
    runner.write_report(tmp_path)
    assert "report: not written (ValueError: boom)" in capsys.readouterr().err
