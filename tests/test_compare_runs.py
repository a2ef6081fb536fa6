"""`scripts/compare_runs.py`: paired prompt-level and per-id comparisons of models from two runs' samples.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write(eval_dir: Path, model: str, verdicts: list[tuple[bool, bool]]) -> None:
    """One prompt per entry, with two instructions: `a` (verdict 0) and `b` (verdict 1)."""
    eval_dir.mkdir(parents=True)
    rows = [{"set": "heldout", "model": model, "index": i, "passed": a and b,
             "instructions": [{"id": "x:a", "passed": a}, {"id": "x:b", "passed": b}]}
            for i, (a, b) in enumerate(verdicts)]
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_per_id_flags_the_id_the_other_run_lost(tmp_path):
    # 10 prompts. Base follows `a` everywhere and `b` nowhere; the other run loses `a` on 8 prompts (p = 2/2^8 =
    # 0.0078) and gains `b` on 2 of them (p 0.5): a regression on x:a only; prompt level: 0 gained, 0 lost.
    _write(tmp_path / "base" / "eval", "base", [(True, False)] * 10)
    _write(tmp_path / "other" / "eval", "ppo", [(False, i < 2) for i in range(8)] + [(True, False)] * 2)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), f"{tmp_path}/base/eval:base",
                          f"{tmp_path}/other/eval:ppo", "--per-id"], capture_output=True, text=True, check=True).stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| x:")}
    assert rows["x:a"] == ["10", "1.00", "0.20", "0", "8", "0.0078", "REGRESSION"]
    assert rows["x:b"] == ["10", "0.00", "0.20", "2", "0", "0.5", ""]
    assert "baseline" in out and "pass 0.000 on 10 prompts" in out


def test_kl_per_token_is_the_eval_stages_summed_kl_over_summed_tokens(tmp_path):
    # Two answers: KL 3 over 1 token and KL 1 over 9 tokens -> (3 + 1) / (1 + 9) = 0.4 (a mean of ratios gives 1.56).
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_runs

    d = tmp_path / "run" / "eval"
    d.mkdir(parents=True)
    rows = [{"set": "heldout", "model": "ppo", "index": i, "passed": True, "instructions": [], "kl": kl, "length": n}
            for i, (kl, n) in enumerate([(3.0, 1), (1.0, 9)])]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, _, figures = compare_runs.passes(f"{d}:ppo", "heldout")
    assert abs(figures["kl_per_token"] - 0.4) < 1e-12
