"""scripts/evidence.py (issue #20): the fits and markers on synthetic curves with known answers, the verdicts,
the figures, bad arguments, and `--tiny` runs of each experiment end to end (tiny random models)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("evidence_script", ROOT / "scripts" / "evidence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["evidence_script"] = mod
    spec.loader.exec_module(mod)
    return mod


ev = _load_script()


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (no spin-waiting on a shared machine); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ fits and markers


def test_ols_recovers_a_known_slope_and_its_standard_error():
    x = list(range(1, 41))
    # y = 0.5 + 0.03 x + a zero-mean alternating wiggle: the fitted slope is 0.03 up to the wiggle's
    # small correlation with x; the standard error is positive.
    y = [0.5 + 0.03 * t + (0.01 if t % 2 else -0.01) for t in x]
    fit = ev.ols(x, y)
    assert fit["slope"] == pytest.approx(0.03, abs=2e-4)
    assert fit["intercept"] == pytest.approx(0.5, abs=5e-3)
    assert 0 < fit["slope_se"] < 1e-3
    exact = ev.ols([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])  # y = 1 + 2x exactly: no residual
    assert exact["slope"] == pytest.approx(2.0) and exact["intercept"] == pytest.approx(1.0)
    assert exact["slope_se"] == pytest.approx(0.0, abs=1e-12)
    assert ev.ols([1], [2.0])["slope"] is None and ev.ols([2, 2, 2], [1.0, 2.0, 3.0])["slope"] is None


def test_verdict_needs_two_standard_errors_in_the_predicted_direction():
    assert ev.verdict(0.1, 0.04) == "agrees"
    assert ev.verdict(0.1, 0.06) == "inconclusive"
    assert ev.verdict(-0.1, 0.04) == "disagrees"
    assert ev.verdict(-0.1, 0.04, predicted_sign=-1) == "agrees"
    assert ev.verdict(None, None) == "inconclusive"


def test_peak_marker_finds_the_peak_of_a_noisy_curve():
    # A parabola peaking at index 22 plus an alternating wiggle of +-0.08 (larger than the parabola's change
    # near its top): raw argmax would land on a wiggle; the smoothed curve's argmax is the true peak.
    xs = range(40)
    y = [0.6 - (t - 22) ** 2 / 800 + (0.08 if t % 2 else -0.08) for t in xs]
    assert max(range(40), key=lambda t: y[t]) != 22
    peak = ev.find_peak(y, 5)
    assert abs(peak["index"] - 22) <= 1
    assert len(peak["smoothed"]) == 40
    assert ev.find_peak([0.0, 1.0, 3.0, 1.0, 0.0], 1)["index"] == 2  # window 1: no smoothing
    assert ev.smooth([1.0, 2.0, 3.0, 4.0], 3) == pytest.approx([1.5, 2.0, 3.0, 3.5])  # shrunk at the ends


def test_distinct_ngrams_across_samples():
    assert ev.distinct_ngrams_across(["a b c d e"] * 4) == pytest.approx(0.25)  # 4 copies of 2 grams: 2 / 8
    assert ev.distinct_ngrams_across(["a b c d", "e f g h"]) == 1.0
    assert ev.distinct_ngrams_across(["a b", "c"]) is None
    assert ev.cumulative([1.0, 2.0, 3.0]) == [1.0, 3.0, 6.0]


# ------------------------------------------------------------------------------ results on synthetic runs


def _heldout(kl_at, T=30, reach=None):
    reach = reach or [20] * T
    return {"reverse_kl_by_position": [kl_at(t) for t in range(1, T + 1)], "prompts_by_position": reach,
            "reverse_kl_per_token": 0.1, "student": {"pass_rate": 0.2}, "teacher": {"pass_rate": 0.4}}


def test_compounding_fits_each_arm_and_the_gap():
    # off-policy KL grows as 0.1 + 0.02 t, on-policy stays at 0.1 + 0.002 t: gap slope 0.018.
    reach = [20] * 24 + [9] * 6  # the last 6 positions are reached by fewer than 10 answers: not fitted
    off = _heldout(lambda t: 0.1 + 0.02 * t + (0.001 if t % 2 else -0.001), reach=reach)
    on = _heldout(lambda t: 0.1 + 0.002 * t, reach=reach)
    res = ev.compounding_result(off, on, min_prompts=10)
    assert res["off_policy"]["positions"] == list(range(1, 25))
    assert res["off_policy"]["slope"] == pytest.approx(0.02, abs=1e-3)
    assert res["on_policy"]["slope"] == pytest.approx(0.002, abs=1e-9)
    assert res["gap"]["slope"] == pytest.approx(0.018, abs=1e-3)
    # cumulative KL of 0.1 + 0.002 t over t = 1..24: its slope is near the mean KL (about 0.125)
    assert res["on_policy"]["cumulative_slope"] == pytest.approx(0.1 + 0.002 * 12.5, rel=0.2)
    assert res["verdict"] == "agrees" and "agrees with the claim" in res["sentence"]
    flipped = ev.compounding_result(on, off, min_prompts=10)
    assert flipped["verdict"] == "disagrees"


def test_compounding_refuses_a_heldout_file_without_the_curve():
    with pytest.raises(ev.EvidenceError, match="reverse_kl_by_position"):
        ev.compounding_result({"student": {}}, _heldout(lambda t: 0.1), 10)


def _model_row(entropy, distinct, t_lp, n=12):
    # per-prompt values with a small prompt-to-prompt spread, so the paired standard error is finite
    per = {"entropy_per_token": [entropy + 0.01 * (i % 3) for i in range(n)],
           "distinct_4grams": [None if distinct is None else distinct + 0.01 * (i % 2) for i in range(n)],
           "teacher_logprob_per_token": [t_lp - 0.01 * (i % 3) for i in range(n)]}
    return {"entropy_per_token": entropy, "distinct_4grams": distinct, "teacher_logprob_per_token": t_lp,
            "pass_rate": 0.3, "own_logprob_per_token": -entropy, "response_length": 40.0, "eos_share": 1.0,
            "per_prompt": per}


def test_modes_verdict_from_paired_differences():
    rows = {"reverse_kl": _model_row(1.0, 0.6, -1.2), "forward_kl": _model_row(1.5, 0.8, -1.8)}
    res = ev.modes_result(rows)
    assert res["verdict"] == "agrees"
    assert res["predictions"]["lower_entropy"]["reverse_minus_forward"] == pytest.approx(-0.5)
    assert res["predictions"]["higher_teacher_logprob"]["reverse_minus_forward"] == pytest.approx(0.6)
    swapped = ev.modes_result({"reverse_kl": rows["forward_kl"], "forward_kl": rows["reverse_kl"]})
    assert swapped["verdict"] == "disagrees"
    mixed = ev.modes_result({"reverse_kl": _model_row(1.0, 0.8, -1.2), "forward_kl": _model_row(1.5, 0.6, -1.8)})
    assert mixed["verdict"] == "partly agrees"
    assert mixed["predictions"]["fewer_distinct_4grams"]["verdict"] == "disagrees"


def _history(pass_rate, rm, kl):
    return [{"step": i + 1, "ppo/score/rm": r, "ppo/score": r, "ppo/pass_rate": p, "ppo/kl_per_token": k}
            for i, (p, r, k) in enumerate(zip(pass_rate, rm, kl))] + [{"step": 0, "note": "not an iteration row"}]


def test_overopt_marks_the_pass_rate_peak_and_the_rm_after_it():
    n = 40
    pr = [0.3 + 0.3 * math.sin(math.pi * t / 30) for t in range(n)]  # peaks at t = 15, falls after
    rm = [0.05 * t for t in range(n)]  # climbs throughout
    kl = [0.01 * t for t in range(n)]
    res = ev.overopt_result(_history(pr, rm, kl), window=5)
    assert res["peak"]["iteration"] == 16  # index 15, steps start at 1
    assert res["rm_slope_after_peak"] == pytest.approx(0.05)
    assert res["rm_rises_after_peak"] and res["pass_rate_drop_after_peak"] > 0.2
    assert res["verdict"] == "agrees"
    rising = ev.overopt_result(_history([0.01 * t for t in range(n)], rm, kl), window=5)
    assert rising["verdict"] == "not observed" and rising["peak_at_end"]
    flat_rm = ev.overopt_result(_history(pr, [1.0] * 15 + [1.0 - 0.01 * t for t in range(25)], kl), window=5)
    assert flat_rm["verdict"] == "partly agrees" and not flat_rm["rm_rises_after_peak"]
    with pytest.raises(ev.EvidenceError, match="ppo/pass_rate"):
        ev.overopt_result([{"step": 1, "ppo/score": 0.0}], 5)


def test_figures_are_written(tmp_path):
    off = _heldout(lambda t: 0.1 + 0.02 * t)
    on = _heldout(lambda t: 0.1 + 0.002 * t)
    ev.plot_compounding(ev.compounding_result(off, on, 10), tmp_path / "c.png")
    rows = {"teacher": _model_row(1.2, 0.7, -1.0), "reverse_kl": _model_row(1.0, 0.6, -1.2),
            "forward_kl": _model_row(1.5, None, -1.8)}  # no 4-grams at all: plotted as "-"
    ev.plot_modes(ev.modes_result(rows), tmp_path / "m.png")
    pr = [0.3 + 0.3 * math.sin(math.pi * t / 30) for t in range(40)]
    ev.plot_overopt(ev.overopt_result(_history(pr, list(range(40)), [0.1] * 40), 5), tmp_path / "o.png")
    for name in ("c.png", "m.png", "o.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


# ------------------------------------------------------------------------------ the command line


def test_missing_models_and_bad_sizes_are_one_paragraph_errors(tmp_path, capsys):
    assert ev.main(["compounding", "--out", str(tmp_path / "a")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert ev.main(["overopt", "--out", str(tmp_path / "b")]) == 2
    assert "needs --reward" in capsys.readouterr().err
    assert ev.main(["overopt", "--reward", "r", "--ppo-samples-per-prompt", "1", "--out", str(tmp_path / "c")]) == 2
    assert "at least 2" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert ev.main(["modes", "--teacher", "t", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    # A teacher directory that does not exist: the pipeline's own one-paragraph ModelError, no traceback.
    code = ev.main(["compounding", "--teacher", str(tmp_path / "no_such_model"), "--out", str(tmp_path / "d"),
                    "--iterations", "1", "--max-heldout", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_tiny_sizes_apply_unless_given():
    args = ev.parse(["compounding", "--tiny", "--iterations", "5"])
    assert args.iterations == 5 and args.max_new_tokens == ev.SIZES["max_new_tokens"][1]
    real = ev.parse(["compounding"])
    assert real.keep_layers == "influence_15" and real.max_heldout == 48


# ------------------------------------------------------------------------------ --tiny end to end


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    return tmp_path_factory.mktemp("evidence")


def test_tiny_compounding_end_to_end(tiny_out, one_thread, capsys):
    assert ev.main(["compounding", "--tiny", "--out", str(tiny_out)]) == 0
    res = json.loads((tiny_out / "compounding.json").read_text())
    for arm in ("off_policy", "on_policy"):
        a = res[arm]
        assert {"positions", "kl_by_position", "cumulative_kl", "slope", "slope_se", "cumulative_slope",
                "pass_rate"} <= set(a)
        assert len(a["positions"]) == len(a["kl_by_position"]) >= 3
        assert all(k >= 0 for k in a["kl_by_position"])
        held = json.loads((tiny_out / "runs" / arm / "distill" / "heldout.json").read_text())
        assert a["kl_by_position"] == held["reverse_kl_by_position"][:len(a["positions"])]
    # The two arms differ only in the mixture: the resolved recipes say beta 1 constant vs 1 -> 0.
    import yaml

    off = yaml.safe_load((tiny_out / "runs" / "off_policy" / "recipe.resolved.yaml").read_text())["distill"]
    on = yaml.safe_load((tiny_out / "runs" / "on_policy" / "recipe.resolved.yaml").read_text())["distill"]
    assert (off["beta"], off["beta_schedule"], on["beta"], on["beta_schedule"]) == (1.0, "constant", 1.0, "linear")
    assert {k: v for k, v in off.items() if not k.startswith("beta")} == \
        {k: v for k, v in on.items() if not k.startswith("beta")}
    assert res["verdict"] in ("agrees", "disagrees", "inconclusive") and res["sentence"]
    assert (tiny_out / "compounding.png").stat().st_size > 0
    assert "== compounding ==" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_modes_end_to_end(tiny_out, one_thread):
    assert ev.main(["modes", "--tiny", "--out", str(tiny_out)]) == 0
    res = json.loads((tiny_out / "modes.json").read_text())
    assert set(res["models"]) == {"teacher", "reverse_kl", "forward_kl"}
    for row in res["models"].values():
        assert {"entropy_per_token", "distinct_4grams", "pass_rate", "teacher_logprob_per_token"} <= set(row)
        assert row["entropy_per_token"] > 0 and row["teacher_logprob_per_token"] < 0
        assert row["samples"] == ev.SIZES["max_heldout"][1] * ev.SIZES["samples_per_prompt"][1]
    # The teacher's own samples: its log-prob of them is the model's own log-prob.
    t = res["models"]["teacher"]
    assert t["teacher_logprob_per_token"] == pytest.approx(t["own_logprob_per_token"], abs=1e-4)
    assert set(res["predictions"]) == {"lower_entropy", "fewer_distinct_4grams", "higher_teacher_logprob"}
    assert (tiny_out / "runs" / "forward_kl" / "distill" / "final").is_dir()
    assert (tiny_out / "modes.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_overopt_end_to_end(tmp_path, one_thread):
    assert ev.main(["overopt", "--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "overopt.json").read_text())
    n = ev.SIZES["ppo_iterations"][1]
    assert res["iterations"] == list(range(1, n + 1))
    assert res["rm_key"] == "ppo/score/rm"  # the RM's own component, logged beside the weight-0 verifier
    assert len(res["rm_score"]) == len(res["pass_rate"]) == len(res["kl_per_token"]) == n
    assert 1 <= res["peak"]["iteration"] <= n and res["verdict"]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "overopt" / "ppo" / "metrics.jsonl").open()]
    assert all("ppo/score/verifier" in m for m in metrics if "ppo/pass_rate" in m)
    assert (tmp_path / "overopt.png").stat().st_size > 0
