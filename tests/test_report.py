"""The run report, built from a fixture run directory of fake summary.json / metrics.jsonl / results.json files."""

import json
from pathlib import Path

from conftest import write_jsonl
from pipeline.report import build_report, fmt, series

LOWER = "change_case:english_lowercase"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _results(models=("base", "ppo")) -> dict:
    metrics = {
        "base": {"pass_rate": 0.625, "pass_rate_loose": 0.6875, "instruction_pass_rate": 0.7123,
                 "instruction_pass_rate_loose": 0.75, "kl": 0.0, "kl_per_response": 0.0, "response_length": 97.25,
                 "eos_share": 0.875, "rm_score_mean": 0.1234, "rm_score_std": 1.5, "win_rate": 0.5,
                 "per_id": {LOWER: {"n": 8, "pass_rate": 0.375, "pass_rate_loose": 0.5}}},
        "ppo": {"pass_rate": 0.8125, "pass_rate_loose": 0.875, "instruction_pass_rate": 0.8461,
                "instruction_pass_rate_loose": 0.9, "kl": 0.0417, "kl_per_response": 3.9, "response_length": 112.5,
                "eos_share": 0.6, "rm_score_mean": 2.345, "rm_score_std": 0.9, "win_rate": 0.7812,
                "per_id": {LOWER: {"n": 8, "pass_rate": 0.9, "pass_rate_loose": 1.0}}},
    }
    return {
        "generation": {"decoding": "greedy", "max_new_tokens": 128, "seed": 0, "device": "cpu", "dtype": "float32",
                       "bf16_autocast": True},
        "models": {m: f"runs/x/{m}" for m in models},
        "reference": {"name": "base", "path": "smollm2-135m-instruct"},
        "baseline": "base",
        "reward_model": "runs/x/reward/final",
        "notes": [],
        "num_samples_in_report": 2,
        "sets": {"heldout": {"file": "eval/constraints/heldout.jsonl", "n_prompts": 16,
                             "models": {m: metrics[m] for m in models}}},
    }


def _samples(models=("base", "ppo")) -> list[dict]:
    return [{"set": "heldout", "model": m, "index": i, "prompt": f"prompt number {i}",
             "response": f"{m} says hello {i}", "length": 5, "ended": m == "base",
             "instructions": [{"id": LOWER, "kwargs": {}, "passed": m == "ppo", "passed_loose": True}]}
            for m in models for i in range(3)]


def make_run(root: Path) -> Path:
    run = root / "run"
    _write_json(run / "run_info.json", {"seed": 0, "recipe": "recipes/x.yaml", "started": "2025-01-01T00:00:00",
                                        "versions": {"torch": "2.x", "transformers": "5.x", "trl": "1.x"}})
    _write_json(run / "sft" / "summary.json", {"stage": "sft", "seconds": 12.5, "eval_loss": 1.2345, "steps": 40})
    write_jsonl(run / "sft" / "metrics.jsonl",
                [{"step": 0, "sft/eval_loss": 2.0}]
                + [{"step": s, "sft/loss": 3.0 - 0.05 * s, "sft/learning_rate": 1e-3} for s in range(1, 41, 5)]
                + [{"step": 40, "sft/eval_loss": 1.2345}])
    write_jsonl(run / "reward" / "metrics.jsonl",
                [{"step": s, "rm/loss": 0.7 - 0.01 * s, "rm/accuracy": 0.5 + 0.01 * s} for s in range(0, 20, 2)])
    ppo = [{"step": s, "ppo/score": 0.1 * s, "ppo/kl": 0.5 * s, "ppo/reward": 0.05 * s,
            "ppo/pass_rate": 0.5 + 0.02 * s - 0.004 * s * s, "ppo/clipfrac": 0.1} for s in range(10)]
    ppo[4]["ppo/clipfrac"] = "nan"  # MetricsLogger writes non-finite values as strings
    write_jsonl(run / "ppo" / "metrics.jsonl", ppo)
    _write_json(run / "ppo" / "summary.json", {"stage": "ppo", "iterations": 10, "ppo/score_last": 0.9})
    _write_json(run / "eval" / "results.json", _results())
    write_jsonl(run / "eval" / "samples.jsonl", _samples())
    return run


def test_report_from_fixture_run_has_tables_plots_and_samples(tmp_path):
    run = make_run(tmp_path)
    md_path = build_report(run)
    assert md_path == run / "report.md"
    md = md_path.read_text()
    # the models x metrics table, every number as results.json has it
    for v in ("0.625", "0.688", "0.712", "0.812", "0.846", "2.345", "0.781", "0.042", "97.250", "112.500", "0.875"):
        assert v in md, v
    assert "| base | 0.625 | 0.688 | 0.712 | 0.750 | 0.123 | 1.500 | 0.500 |" in md
    assert "win rate vs base" in md and "KL/token vs base" in md
    assert f"| {LOWER} | 8 | 0.375 | 0.900 |" in md  # per-id table
    # stage summaries come from summary.json
    assert "| eval_loss | 1.234 |" in md and "| steps | 40 |" in md
    # plots exist and are linked relative to the report
    for name in ("sft_curves", "reward_curves", "ppo_curves", "ppo_reward_vs_kl", "pass_rate"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
        assert f"(plots/{name}.png)" in md
    assert "`ppo/clipfrac`: 1 non-finite value(s), first at step 4." in md
    # samples side by side: one table row holds both models' answers to the same prompt
    row = next(line for line in md.splitlines() if "base says hello 0" in line)
    assert "ppo says hello 0" in row and "✗ " + LOWER in row and "✓ " + LOWER in row
    assert "base says hello 2" not in md  # num_samples_in_report = 2
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "src='plots/" not in html  # self-contained
    assert "0.625" in html and "ppo says hello 1" in html


def test_report_with_missing_stages_and_bad_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No stage outputs found" in build_report(empty).read_text()
    # `pipeline eval --output-dir DIR` layout: results.json at the top, no stages, no samples
    cli = tmp_path / "cli"
    _write_json(cli / "results.json", _results(models=("base",)))
    md = build_report(cli).read_text()
    assert "0.625" in md and "Training curves" not in md and "Sample responses" not in md
    assert not list((cli / "plots").glob("*.png"))
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
    assert series([{"step": 1, "k": "nan"}], "k")[1][0] != series([{"step": 1, "k": "nan"}], "k")[1][0]  # NaN kept


def test_fmt():
    assert fmt(None) == "–" and fmt(0.625) == "0.625" and fmt(112.5) == "112.500" and fmt(3) == "3"
    assert fmt(float("nan")) == "nan" and fmt(1.2e-5) == "1.20e-05"
