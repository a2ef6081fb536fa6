"""Held-out evaluation: pass-rate aggregation by hand, KL, RM metrics, the stage and the `pipeline eval` CLI."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from pipeline.cli import main
from pipeline.config import load_recipe, parse_recipe
from pipeline.runner import run_recipe
from pipeline.stages.eval import (generate_with_progress, model_name, paired_pass_test, pass_rates, per_id_paired,
                                  sequence_logprobs, set_name, win_rate)

ROOT = Path(__file__).resolve().parents[2]
LOWER, NO_COMMA, WORDS, QUOTE = ("change_case:english_lowercase", "punctuation:no_comma",
                                 "length_constraints:number_words", "startend:quotation")

HELDOUT = [
    {"prompt": "write a poem about the sea in lowercase", "instruction_id_list": [LOWER], "kwargs": [{}]},
    {"prompt": "Describe a cat. Do not use any commas.", "instruction_id_list": [NO_COMMA, WORDS],
     "kwargs": [{}, {"relation": "less than", "num_words": 50}]},
    {"prompt": "hello world"},  # a plain prompt: generated and measured, not checked
    {"prompt": '"wrap the whole answer in double quotes"', "instruction_id_list": [QUOTE], "kwargs": [{}]},
]


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ pure aggregation


def test_pass_rates_match_hand_computed_values():
    records = [
        {"prompt": "a", "instruction_id_list": [LOWER], "kwargs": [{}]},
        {"prompt": "b", "instruction_id_list": [NO_COMMA, WORDS],
         "kwargs": [{}, {"relation": "less than", "num_words": 5}]},
        {"prompt": "c"},  # no instructions: left out of every rate
        {"prompt": "d", "instruction_id_list": [QUOTE], "kwargs": [{}]},
        {"prompt": "e", "instruction_id_list": [LOWER], "kwargs": [{}]},
    ]
    responses = [
        "all lower here",          # lowercase: strict T, loose T
        "One, two",                # no_comma F (loose F: one line, no '*'); 2 words < 5 T
        "Anything At All",
        '"quoted"',                # quotation T
        "Sure!\nall lower here",   # lowercase strict F ('S'); loose T (first line removed)
    ]
    m = pass_rates(records, responses)
    assert m["n_checked"] == 4 and m["n_instructions"] == 5
    # prompt-level: strict [T, F, T, F] -> 2/4; loose [T, F, T, T] -> 3/4
    assert m["pass_rate"] == pytest.approx(0.5)
    assert m["pass_rate_loose"] == pytest.approx(0.75)
    # instruction-level over 5 instructions: strict T,F,T,T,F -> 3/5; loose T,F,T,T,T -> 4/5
    assert m["instruction_pass_rate"] == pytest.approx(0.6)
    assert m["instruction_pass_rate_loose"] == pytest.approx(0.8)
    assert m["per_id"][LOWER] == {"n": 2, "pass_rate": 0.5, "pass_rate_loose": 1.0}
    assert m["per_id"][NO_COMMA] == {"n": 1, "pass_rate": 0.0, "pass_rate_loose": 0.0}
    assert m["per_id"][WORDS]["pass_rate"] == 1.0 and m["per_id"][QUOTE]["pass_rate"] == 1.0
    assert pass_rates([{"prompt": "x"}], ["y"]) is None  # plain prompts only: no pass rate at all


def test_win_rate_counts_ties_half():
    # 1<2 loses, 2>1 wins, 3=3 ties, 3>0 wins: (0 + 1 + 0.5 + 1) / 4
    assert win_rate([1.0, 2.0, 3.0, 3.0], [2.0, 1.0, 3.0, 0.0]) == pytest.approx(0.625)


def test_paired_pass_test_is_mcnemars_exact_test():
    # 10 prompts gained, 2 lost, 8 passed by both, 5 by neither: 12 discordant prompts, k = min = 2.
    # two-sided p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * (1 + 12 + 66) / 4096 = 0.0385742...
    before = [False] * 10 + [True] * 2 + [True] * 8 + [False] * 5
    after = [True] * 10 + [False] * 2 + [True] * 8 + [False] * 5
    r = paired_pass_test(after, before)
    assert (r["n"], r["gained"], r["lost"]) == (25, 10, 2)
    assert r["difference"] == pytest.approx(8 / 25) and r["p_value"] == pytest.approx(158 / 4096)
    assert paired_pass_test(before, after)["p_value"] == pytest.approx(158 / 4096)  # symmetric
    assert paired_pass_test(before, after)["difference"] == pytest.approx(-8 / 25)
    # as many gained as lost, or none discordant: p = 1
    assert paired_pass_test([True, False], [False, True])["p_value"] == 1.0
    assert paired_pass_test([True, True], [True, True]) == {"n": 2, "gained": 0, "lost": 0, "difference": 0.0,
                                                           "p_value": 1.0}
    # 1 gained, 0 lost: p = 2 * 1 / 2 = 1; 6 gained, 0 lost: 2 / 64
    assert paired_pass_test([True], [False])["p_value"] == 1.0
    assert paired_pass_test([True] * 6, [False] * 6)["p_value"] == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="equal"):
        paired_pass_test([True], [True, False])


def test_per_id_paired_is_mcnemar_over_the_prompts_carrying_each_id():
    def checks(rows):  # rows: per prompt, [(id, strict)] or None for a plain prompt
        return [None if r is None else [{"id": i, "kwargs": {}, "strict": ok, "loose": ok} for i, ok in r]
                for r in rows]

    before = checks([[(LOWER, True), (NO_COMMA, True)], [(LOWER, True)], None, [(LOWER, False)], [(NO_COMMA, True)]])
    after = checks([[(LOWER, False), (NO_COMMA, True)], [(LOWER, False)], None, [(LOWER, True)], [(NO_COMMA, False)]])
    t = per_id_paired(after, before)
    # LOWER on prompts 0, 1, 3: lost 2 (0, 1), gained 1 (3): p = 2 * (1 + 3) / 8 = 1
    assert t[LOWER] == {"pass_rate": 1 / 3, "pass_rate_against": 2 / 3, "n": 3, "gained": 1, "lost": 2,
                        "difference": pytest.approx(-1 / 3), "p_value": 1.0, "regression": False}
    # NO_COMMA on prompts 0 and 4: lost 1 (4)
    assert (t[NO_COMMA]["n"], t[NO_COMMA]["gained"], t[NO_COMMA]["lost"]) == (2, 0, 1)
    # a planted regression: 8 of 8 lost -> p = 2 / 256, flagged; 8 gained is not a regression
    many = checks([[(QUOTE, True)]] * 8)
    none = checks([[(QUOTE, False)]] * 8)
    assert per_id_paired(none, many)[QUOTE]["regression"] is True
    assert per_id_paired(none, many)[QUOTE]["p_value"] == pytest.approx(2 / 256)
    assert per_id_paired(many, none)[QUOTE]["regression"] is False


def test_eval_progress_lines_when_stderr_is_not_a_terminal(tiny_model_dir, capsys):
    """Without a terminal (capsys's stderr is not one), generation logs plain progress lines; its answers are
    those of one `generate` call over all prompts (the same length-sorted batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "word " * n}] for n in (5, 1, 9, 3, 7, 2, 4)]
    assert not sys.stderr.isatty()
    got = generate_with_progress(model, tok, prompts, batch_size=2, desc="tiny on set", max_new_tokens=6)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "eval: tiny on set:" in line]
    assert [line.split(": ", 2)[2].split(",")[0] for line in lines] == ["2/7 prompts", "4/7 prompts", "6/7 prompts",
                                                                      "7/7 prompts"]
    assert "batch 4/4" in lines[-1]
    whole = generate(model, tok, prompts, batch_size=2, max_new_tokens=6)
    assert got.texts == whole.texts and got.response_ids == whole.response_ids and got.ended == whole.ended
    generate_with_progress(model, tok, prompts, batch_size=2, desc="tiny on set", max_new_tokens=6, tty=True)
    assert "[pipeline] eval:" not in capsys.readouterr().err  # on a terminal: the tqdm bar instead


def test_eval_generation_stops_at_the_next_batch_after_sigterm(tiny_model_dir):
    """SIGTERM during evaluation stops before the next generate batch (nothing to save), not at the end."""
    import signal

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.checkpoint import Interrupted, InterruptFlag, set_active_flag

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "word " * n}] for n in (5, 1, 9, 3)]
    flag = InterruptFlag()
    set_active_flag(flag)
    try:
        assert len(generate_with_progress(model, tok, prompts, batch_size=2, desc="d", max_new_tokens=3).texts) == 4
        flag.signum = signal.SIGTERM
        with pytest.raises(Interrupted, match="SIGTERM received: stopped the eval stage .d, batch 1/2.") as e:
            generate_with_progress(model, tok, prompts, batch_size=2, desc="d", max_new_tokens=3)
        assert e.value.signum == signal.SIGTERM and "checkpoint" not in str(e.value)
    finally:
        set_active_flag(None)


def test_set_and_model_names():
    assert set_name("eval/constraints/heldout.jsonl") == "heldout"
    assert set_name("eval/ifeval/subset_supported.jsonl") == "ifeval_subset"
    assert model_name("sft") == "sft" and model_name("runs/q/ppo/final") == "ppo"
    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"


def test_eval_recipe_parses():
    recipe = load_recipe(ROOT / "recipes" / "eval.yaml")
    assert recipe.stages == ["eval"] and recipe.eval.models == ["base"] and not recipe.eval.do_sample
    assert [set_name(p) for p in recipe.eval.prompts] == ["heldout"] and recipe.eval.ifeval


# ------------------------------------------------------------------------------ KL


def test_sequence_logprobs_batched_equals_one_row_at_a_time(tiny_model_dir, tiny_tokenizer):
    """Left-padded batches with cumsum position ids give each row's unpadded log-probs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 9, 6)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (5, 2, 0)]
    got = sequence_logprobs(model, prompts, responses, tiny_tokenizer.pad_token_id, len(tiny_tokenizer), batch_size=3)
    for p, r, s in zip(prompts, responses, got):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r).view(-1, 1)).sum().item()
        assert s == pytest.approx(expected, abs=1e-4)


@pytest.fixture
def two_models(tmp_path, tiny_model_dir):
    from conftest import save_tiny

    twin = shutil.copytree(tiny_model_dir, tmp_path / "twin")  # same weights, loaded as a different model
    other = save_tiny(tmp_path / "other", seed=1)
    return twin, other


def test_eval_stage_metrics_kl_to_itself_zero_and_report(tmp_path, tiny_model_dir, two_models, capsys):
    twin, other = two_models
    prompts = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    recipe = parse_recipe({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name_or_path": str(tiny_model_dir), "cpu_autocast": "off"},
        "stages": ["eval"],
        "eval": {"models": ["base", str(twin), str(other)], "prompts": [str(prompts)], "max_new_tokens": 12,
                 "batch_size": 3},
    })
    summary = run_recipe(recipe)["eval"]
    out = tmp_path / "run" / "eval"
    results = json.loads((out / "results.json").read_text())
    models = results["sets"]["heldout"]["models"]
    assert list(models) == ["base", "twin", "other"] and results["reference"]["name"] == "base"
    assert results["generation"]["decoding"] == "greedy" and results["generation"]["max_new_tokens"] == 12
    # KL of a model to itself is 0: `twin` is scored by a real reference forward, `base` by definition.
    assert models["base"]["kl"] == 0.0
    assert abs(models["twin"]["kl"]) < 1e-6
    assert abs(models["other"]["kl"]) > 1e-3
    samples = _read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 * len(HELDOUT)
    for name, m in models.items():
        rows = [s for s in samples if s["model"] == name]
        # every number follows from the samples written beside it
        assert m == {**m, **pass_rates(HELDOUT, [r["response"] for r in rows])}
        assert m["response_length"] == pytest.approx(sum(r["length"] for r in rows) / len(rows))
        assert m["eos_share"] == pytest.approx(sum(r["ended"] for r in rows) / len(rows))
        assert m["kl"] == pytest.approx(sum(r["kl"] for r in rows) / max(1, sum(r["length"] for r in rows)))
        assert m["rm_score_mean"] is None and m["win_rate"] is None  # no reward model given
    # Paired prompt-level comparison of each listed model with the one before it, from the same samples.
    paired = results["sets"]["heldout"]["paired"]
    assert [(p["model"], p["against"]) for p in paired] == [("twin", "base"), ("other", "twin")]
    for p in paired:
        now = {s["index"]: s["passed"] for s in samples if s["model"] == p["model"] and "instructions" in s}
        was = {s["index"]: s["passed"] for s in samples if s["model"] == p["against"] and "instructions" in s}
        assert p["gained"] == sum(now[i] and not was[i] for i in now)
        assert p["lost"] == sum(was[i] and not now[i] for i in now) and p["n"] == len(now) == 3
    checked = [s for s in samples if s["index"] == 1]
    assert all([i["id"] for i in s["instructions"]] == [NO_COMMA, WORDS] for s in checked)
    assert "instructions" not in samples[2] and samples[2]["prompt"] == "hello world"
    # per instruction id, each model against the reference (base), from the same samples (issue #22)
    per = results["sets"]["heldout"]["per_id_paired"]
    assert per["against"] == "base" and list(per["models"]) == ["twin", "other"]
    for model, ids in per["models"].items():
        for i, t in ids.items():
            def marks(m):
                return [x["passed"] for s in samples if s["model"] == m
                        for x in s.get("instructions", []) if x["id"] == i]

            now, was = marks(model), marks("base")
            assert (t["n"], t["gained"], t["lost"]) == (len(now), sum(a and not b for a, b in zip(now, was)),
                                                       sum(b and not a for a, b in zip(now, was)))
    assert [p["model"] for p in results["sets"]["heldout"]["paired_reference"]] == ["twin", "other"]
    assert len(models["base"]["pass_rate_ci95"]) == 2
    metrics = _read_jsonl(out / "metrics.jsonl")[-1]
    assert metrics["eval/heldout/other/pass_rate"] == models["other"]["pass_rate"]
    assert f"eval/heldout/base/instruction_pass_rate/{LOWER}" in metrics
    assert summary["heldout/base/pass_rate"] == models["base"]["pass_rate"]
    assert "heldout" in capsys.readouterr().out  # the compact table
    report = (tmp_path / "run" / "report.md").read_text()
    assert "heldout" in report and "twin" in report and (tmp_path / "run" / "report.html").exists()
    assert "McNemar" in report


def test_unknown_instruction_id_is_an_error_naming_file_and_row(tmp_path, tiny_model_dir, capsys):
    typo = {"prompt": "x", "instruction_id_list": ["punctuation:no_comas"], "kwargs": [{}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [HELDOUT[0], typo])
    rc = main(["eval", "--models", str(tiny_model_dir), "--prompts", str(bad), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "row 2" in err and "punctuation:no_comas" in err
    assert "did you mean 'punctuation:no_comma'" in err and not (tmp_path / "o" / "results.json").exists()


# ------------------------------------------------------------------------------ CLI and reward model


class FakeScorer:
    """Stands in for pipeline.rewards.RewardModelScorer: a deterministic score from the text."""

    calls: list = []

    def __init__(self, path, model_cfg, precision):
        self.path = path

    @staticmethod
    def fn(text: str) -> float:
        return float(sum(map(ord, text)) % 7)

    def score(self, prompts, responses):
        FakeScorer.calls.append(prompts)
        return torch.tensor([self.fn(r) for r in responses])


def test_cli_writes_results_with_rm_scores_and_win_rate(tmp_path, tiny_model_dir, two_models, monkeypatch, capsys):
    _, other = two_models
    monkeypatch.setitem(sys.modules, "pipeline.rewards", types.SimpleNamespace(RewardModelScorer=FakeScorer))
    prompts = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    out = tmp_path / "cli"
    rc = main(["eval", "--models", str(tiny_model_dir), str(other), "--prompts", str(prompts), "--output-dir", str(out),
               "--reward-model", "rm-dir", "--max-new-tokens", "8"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    models = results["sets"]["heldout"]["models"]
    assert results["reference"]["name"] == "model" and results["baseline"] == "model"  # the first model listed
    assert models["model"]["kl"] == 0.0 and models["model"]["win_rate"] == 0.5  # all ties with itself
    samples = _read_jsonl(out / "samples.jsonl")
    score = {(s["model"], s["index"]): FakeScorer.fn(s["response"]) for s in samples}
    scores = [score[("other", i)] for i in range(len(HELDOUT))]
    base = [score[("model", i)] for i in range(len(HELDOUT))]
    assert models["other"]["rm_score_mean"] == pytest.approx(sum(scores) / len(scores))
    assert models["other"]["rm_score_std"] == pytest.approx(torch.tensor(scores, dtype=torch.float64).std().item())
    wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, base)) / len(scores)
    assert models["other"]["win_rate"] == pytest.approx(wins)
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in FakeScorer.calls[-1])  # chat messages
    out_text = capsys.readouterr().out
    assert "win" in out_text and "heldout" in out_text and (out / "report.md").exists()


def test_rm_metrics_skipped_with_a_note_when_the_scorer_is_unavailable(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pipeline.rewards", None)  # import fails
    prompts = write_jsonl(tmp_path / "p.jsonl", HELDOUT[:2])
    rc = main(["eval", "--models", str(tiny_model_dir), "--prompts", str(prompts), "--output-dir", str(tmp_path / "o"),
               "--reward-model", "rm-dir", "--max-new-tokens", "4"])
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert rc == 0 and results["reward_model"] is None
    assert any("RewardModelScorer" in n for n in results["notes"])
    assert results["sets"]["p"]["models"]["model"]["rm_score_mean"] is None
