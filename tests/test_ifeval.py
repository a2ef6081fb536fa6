"""pipeline.ifeval: lm-evaluation-harness's IFEval offline. The NLTK punkt_tab paths (installed / missing,
never a download), the adapter agreeing with the harness's own `process_results`, the real harness run
(`simple_evaluate`) on a tiny model through `pipeline eval --ifeval`, and the contamination guard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import ifeval
from pipeline.checkers import check_record

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "constraints"


# ----------------------------------------------------------------------- NLTK punkt_tab


@pytest.fixture
def fresh_tokenizer(monkeypatch, tmp_path):
    """NLTK's search path replaced by `tmp_path/nltk_data` (empty unless the test fills it)."""
    import nltk

    ifeval.harness()  # imported once, whatever the data (the import itself must not download: see below)
    ifeval.reset_sentence_tokenizer()
    data = tmp_path / "nltk_data"
    data.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(data)])
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download was called"))
    yield data
    ifeval.reset_sentence_tokenizer()


def _install_punkt(data: Path, abbreviations: list[str]) -> None:
    english = data / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ifeval.PUNKT_FILES:
        (english / name).write_text("", encoding="utf-8")
    (english / "abbrev_types.txt").write_text("\n".join(abbreviations) + "\n", encoding="utf-8")


TEXT = "Dr. Smith came home. He left again."
SENTENCES = "length_constraints:number_sentences"


def test_punkt_missing_uses_the_untrained_fallback_and_warns_once(fresh_tokenizer, capsys):
    assert ifeval.ensure_sentence_tokenizer() == "untrained-punkt"
    assert ifeval.ensure_sentence_tokenizer() == "untrained-punkt"
    err = capsys.readouterr().err
    assert err.count("punkt_tab") >= 1 and err.count("[pipeline] IFEval") == 1
    for affected in ifeval.AFFECTED_BY_PUNKT:
        assert affected in err
    # No abbreviation list: "Dr." ends a sentence, so three sentences.
    assert ifeval.harness().instructions_util.count_sentences(TEXT) == 3
    assert check_record(TEXT, [SENTENCES], [{"num_sentences": 3, "relation": "at least"}]) == [True]
    words = ifeval.harness().instructions_util.nltk.word_tokenize("THE NASA team. OK.")
    assert words == ["THE", "NASA", "team", ".", "OK", "."]


def test_punkt_installed_is_used(fresh_tokenizer, capsys):
    _install_punkt(fresh_tokenizer, ["dr"])
    assert ifeval.ensure_sentence_tokenizer() == "punkt_tab"
    assert "punkt_tab" not in capsys.readouterr().err
    assert ifeval.harness().instructions_util.count_sentences(TEXT) == 2  # "dr" is an abbreviation
    assert check_record(TEXT, [SENTENCES], [{"num_sentences": 3, "relation": "at least"}]) == [False]


def test_importing_the_harness_never_downloads(tmp_path):
    # A fresh interpreter with no punkt_tab anywhere NLTK looks: nltk.download must not be reached.
    code = ("import nltk, sys; nltk.data.path[:] = [sys.argv[1]]\n"
            "def boom(*a, **k): raise SystemExit('download attempted')\n"
            "nltk.download = boom\n"
            "from pipeline.ifeval import harness, ensure_sentence_tokenizer\n"
            "h = harness(); print(ensure_sentence_tokenizer(), h.instructions_util.count_sentences('The sea is calm. The sky is blue.'))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["untrained-punkt", "2"]
    assert "Downloaded punkt_tab" not in out.stdout + out.stderr


# ----------------------------------------------------------------------- the adapter = the harness


def test_adapter_matches_the_harness_process_results_on_public_ifeval():
    utils = ifeval.harness().utils
    records = ifeval.load_ifeval()
    assert len(records) == 541
    responses = [
        "THE ANSWER IS SHORT. MY ANSWER IS YES.",
        '<<A Title>>\n* one point, with a comma\n* another point\n\nSection 1 [name]\n***\nP.S. bye. '
        "Is there anything else I can help with?",
    ]
    compared = 0
    for r in records:
        letters = [kw.get("letter") for i, kw in zip(r["instruction_id_list"], r["kwargs"])
                   if i == "keywords:letter_frequency"]
        if any(not ("a" <= str(x).lower() <= "z") for x in letters):
            continue  # keys 1122 and 1129: the harness checks a random letter (see checkers.check_record)
        for resp in responses + [r["prompt"]]:
            want = utils.process_results(r, [resp])
            assert check_record(resp, r["instruction_id_list"], r["kwargs"]) == want["inst_level_strict_acc"], r
            assert check_record(resp, r["instruction_id_list"], r["kwargs"], loose=True) == \
                want["inst_level_loose_acc"], r
            compared += 1
    assert compared == 539 * 3


# ----------------------------------------------------------------------- the harness run


def test_pipeline_eval_ifeval_runs_the_harness_offline(tiny_model_dir, tmp_path):
    from conftest import save_tiny
    from pipeline.cli import main

    other = save_tiny(tmp_path / "other" / "model", seed=1)  # a second model, named model_2
    out = tmp_path / "eval"
    assert main(["eval", "--models", str(tiny_model_dir), str(other), "--ifeval", "--limit", "3",
                 "--max-gen-toks", "4", "--batch-size", "3", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    s = results["sets"][ifeval.SET_NAME]
    keys = [r["key"] for r in ifeval.load_ifeval()[:3]]
    assert s["n_prompts"] == 3 and s["n_prompts_in_file"] == 541 and not s["comparable_to_published"]
    assert s["generation"]["max_gen_toks"] == 4 and s["generation"]["do_sample"] is False
    assert s["generation"]["chat_template"] is True
    assert s["sentence_tokenizer"] in ("punkt_tab", "untrained-punkt")
    assert s["scorer"].startswith("lm-evaluation-harness 0.4.13") and "PipelineLM" in s["scorer"]
    g = s["generation"]
    assert g["backend"] == "pipeline" and "PipelineLM" in g["generator"] and g["batch_size"] == 3
    assert all(st["prompts"] == 3 and st["generated_tokens"] <= 3 * 4 for st in g["per_model"].values())
    names = list(s["models"])
    assert len(names) == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for name in names:
        m, per_prompt = s["models"][name], s["per_prompt"][name]
        assert [p["key"] for p in per_prompt] == keys
        # Our summary of the per-prompt verdicts equals the harness's own aggregates.
        assert m["pass_rate"] == pytest.approx(m["harness"]["prompt_level_strict_acc"])
        assert m["pass_rate_loose"] == pytest.approx(m["harness"]["prompt_level_loose_acc"])
        assert m["instruction_pass_rate"] == pytest.approx(m["harness"]["inst_level_strict_acc"])
        assert m["instruction_pass_rate_loose"] == pytest.approx(m["harness"]["inst_level_loose_acc"])
        # The harness's per-prompt verdicts are the adapter's verdicts on the same responses.
        rows = [r for r in samples if r["set"] == ifeval.SET_NAME and r["model"] == name]
        assert [r["key"] for r in rows] == keys
        for row, p in zip(rows, per_prompt):
            ids = [i["id"] for i in row["instructions"]]
            kwargs = [i["kwargs"] for i in row["instructions"]]
            assert check_record(row["response"], ids, kwargs) == p["strict"]
            assert check_record(row["response"], ids, kwargs, loose=True) == p["loose"]
    # The second model against the first, on the same prompts' strict prompt-level verdicts.
    before, now = ([all(p["strict"]) for p in s["per_prompt"][n]] for n in names)
    gained = sum(a and not b for a, b in zip(now, before))
    lost = sum(b and not a for a, b in zip(now, before))
    assert [(p["model"], p["against"], p["n"], p["gained"], p["lost"]) for p in s["paired"]] == \
        [(names[1], names[0], 3, gained, lost)]
    # Per instruction id against the first model, from the same verdicts: what the report flags regressions from.
    per_id = s["per_id_paired"]
    assert per_id["against"] == names[0] and set(per_id["models"]) == {names[1]}
    ids = [i for p in samples if p["set"] == ifeval.SET_NAME and p["model"] == names[0] for i in
           (x["id"] for x in p["instructions"])]
    tests = per_id["models"][names[1]]
    assert set(tests) == set(ids) and sum(t["n"] for t in tests.values()) == len(ids)
    assert any(n.startswith(ifeval.SET_NAME) for n in results["notes"])
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert f"eval/{ifeval.SET_NAME}/{names[0]}/pass_rate" in metrics
    assert ifeval.SET_NAME in (out / "report.md").read_text()


def test_eval_keys_parse(tmp_path):
    from pipeline.config import RecipeError, load_recipe

    r = load_recipe(ROOT / "recipes" / "quickstart.yaml",
                    ["eval.ifeval=true", "eval.ifeval_limit=5", "eval.ifeval_max_gen_toks=256"])
    assert (r.eval.ifeval, r.eval.ifeval_limit, r.eval.ifeval_max_gen_toks) == (True, 5, 256)
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml").eval.ifeval is False
    with pytest.raises(RecipeError, match="ifeval_limit"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["eval.ifeval_limit=many"])


def test_cli_needs_prompts_or_ifeval(capsys):
    from pipeline.cli import main

    assert main(["eval", "--models", "base"]) == 2
    assert "--ifeval" in capsys.readouterr().err
    assert main(["eval", "--models", "base", "--prompts", "x.jsonl", "--limit", "3"]) == 2
    assert "--ifeval only" in capsys.readouterr().err


# ----------------------------------------------------------------------- contamination guard


def test_guard_catches_a_planted_ifeval_prompt(tmp_path):
    from pipeline.data import DataError

    planted = ifeval.load_ifeval()[100]
    # Changed case and whitespace, a prefix and a suffix: still the opening ten words of the prompt.
    text = "Please help me.  " + "  ".join(planted["prompt"].upper().split(" ")) + " Thanks!"
    rows = [{"prompt": "Write about the ocean in lowercase."}, {"prompt": text}]
    assert ifeval.find_ifeval_prompts([r["prompt"] for r in rows]) == [(1, planted["key"])]
    assert ifeval.find_ifeval_prompts([[{"role": "user", "content": text}]]) == [(0, planted["key"])]
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=rf"sft.jsonl row 2: .*IFEval prompt key {planted['key']}"):
        ifeval.assert_no_ifeval_prompts([f])
    # Nine of the ten opening words are not enough.
    nine = " ".join(planted["prompt"].split()[:9])
    assert ifeval.find_ifeval_prompts([nine]) == []


def test_shipped_training_data_has_no_ifeval_prompt():
    files = [DATA / n for n in ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl")]
    assert ifeval.assert_no_ifeval_prompts(files) > 1000
