"""Data formats load; errors name file, row and field; the SFT loss mask covers the response only."""

import json

import pytest

from conftest import write_jsonl
from pipeline.data import (
    DataError,
    completion_token_ids,
    detect_format,
    load_rows,
    preference_examples,
    prompt_examples,
    render_prompt,
    sft_examples,
    tokenize_sft,
)


def test_conversational_messages(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]}])
    (ex,) = sft_examples(load_rows(str(p)), str(p))
    assert ex["prompt"][-1] == {"role": "user", "content": "hi"} and len(ex["prompt"]) == 2
    assert ex["completion"] == "hello"


def test_prompt_completion_strings_and_messages(tmp_path):
    p = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "hi", "completion": "hello"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
    ])
    exs = sft_examples(load_rows(str(p)), str(p))
    assert [e["completion"] for e in exs] == ["hello", "yo"]
    assert exs[0]["prompt"] == exs[1]["prompt"] == [{"role": "user", "content": "hi"}]


def test_preference_explicit_and_implicit_prompt(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 1.5},
        {"chosen": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "g"}],
         "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
    ])
    exs, skipped = preference_examples(load_rows(str(p)), str(p))
    assert skipped == 0 and exs[0]["margin"] == 1.5
    assert exs[1]["prompt"] == [{"role": "user", "content": "q2"}]
    assert (exs[1]["chosen"], exs[1]["rejected"]) == ("g", "b")


def test_ranked_list_expands_and_skips_ties(tmp_path):
    # D > C > A = B: pairs D>C, D>A, D>B, C>A, C>B; the tie A=B is skipped by default.
    row = {"prompt": "q", "responses": ["A", "B", "C", "D"], "ranks": [3, 3, 2, 1]}
    p = write_jsonl(tmp_path / "r.jsonl", [row])
    exs, skipped = preference_examples(load_rows(str(p)), str(p))
    assert skipped == 1
    assert sorted((e["chosen"], e["rejected"]) for e in exs) == sorted(
        [("D", "C"), ("D", "A"), ("D", "B"), ("C", "A"), ("C", "B")])
    exs, skipped = preference_examples(load_rows(str(p)), str(p), keep_ties=True)
    assert len(exs) == 6 and skipped == 0 and sum(e["tie"] for e in exs) == 1


def test_prompt_only_and_ifeval_records(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "plain"},
        {"prompt": "no commas please", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ])
    exs = prompt_examples(load_rows(str(p)), str(p))
    assert exs[0]["prompt"][0]["content"] == "plain" and "instruction_id_list" not in exs[0]
    assert exs[1]["instruction_id_list"] == ["punctuation:no_comma"]


def test_unknown_instruction_id_names_file_and_row(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a"}, {"prompt": "b", "instruction_id_list": [
        "punctuation:no_coma"], "kwargs": [{}]}])
    with pytest.raises(DataError, match=r"q.jsonl: row 2.*punctuation:no_coma"):
        prompt_examples(load_rows(str(p)), str(p))


def test_csv_and_parquet(tmp_path):
    import datasets

    rows = [{"prompt": "hi", "completion": "hello"}, {"prompt": "a", "completion": "b"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "d.csv", index=False)
    ds.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        exs = sft_examples(load_rows(str(tmp_path / name)), name)
        assert [e["completion"] for e in exs] == ["hello", "b"]


def test_json_array_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "hi", "completion": "x"}]))
    assert load_rows(str(tmp_path / "d.json")) == [{"prompt": "hi", "completion": "x"}]


@pytest.mark.parametrize("rows,match", [
    ([{"prompt": "hi", "completion": "x"}, {"prompt": "hi"}], r"row 2: missing field `completion`"),
    ([{"prompt": "hi", "completion": "x"}, {"prompt": "", "completion": "x"}], r"row 2: field `prompt` is empty"),
    ([{"prompt": 3, "completion": "x"}], r"row 1: field `prompt` must be a non-empty string or a list"),
    ([{"instruction": "x", "output": "y"}], r"row 1 has fields \['instruction', 'output'\].*SFT needs one of.*columns"),
    ([{"messages": [{"role": "user", "content": "q"}]}], r"row 1: `messages` must end with an `assistant`"),
])
def test_sft_errors_name_file_row_field(tmp_path, rows, match):
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=match) as e:
        sft_examples(load_rows(str(p)), str(p))
    assert "bad.jsonl" in str(e.value)


def test_malformed_json_line_and_missing_file_and_empty(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 2 \(line 2\) is not valid JSON"):
        load_rows(str(p))
    with pytest.raises(DataError, match="data file not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_rows(str(tmp_path / "latin.jsonl"))


def test_detect_format():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}) == "preference"
    assert detect_format({"prompt": "", "completion": ""}) == "prompt_completion"
    assert detect_format({"prompt": ""}) == "prompt_only"


def test_loss_mask_covers_completion_tokens_only(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "write about the sea"}]
    (row,), stats = tokenize_sft(tok, [{"prompt": prompt, "completion": "the sea is blue"}], max_seq_len=512)
    ids, mask = row["input_ids"], row["completion_mask"]
    trained = [t for t, m in zip(ids, mask) if m]
    masked = [t for t, m in zip(ids, mask) if not m]
    # Rendered and masked: the prompt (with the opened assistant turn) is masked; the reply and its EOS are trained.
    assert tok.decode(masked) == render_prompt(tok, prompt)
    assert tok.decode(trained) == "the sea is blue<|im_end|>"
    assert trained[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id
    assert mask == sorted(mask), "mask is 0 on the prompt then 1 on the response"
    assert completion_token_ids(tok, prompt, "the sea is blue") == trained


def test_rows_truncated_to_nothing_are_counted_not_trained(tiny_tokenizer):
    tok = tiny_tokenizer
    long_prompt = [{"role": "user", "content": "the quick brown fox " * 40}]
    short = [{"role": "user", "content": "hi"}]
    rows, stats = tokenize_sft(tok, [{"prompt": long_prompt, "completion": "x"},
                                     {"prompt": short, "completion": "the dog sleeps " * 30}], max_seq_len=32)
    assert stats.rows == 2 and stats.kept == 1 and stats.no_trainable_tokens == 1 and stats.truncated == 2
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == 32 and sum(rows[0]["completion_mask"]) > 0


@pytest.mark.parametrize("rows,fn,match", [
    ([{"prompt": "hi", "completion": "  "}], sft_examples, r"row 1: field `completion` is an empty response"),
    ([{"prompt": "q", "chosen": "a", "rejected": ""}], lambda r, s: preference_examples(r, s),
     r"row 1: field `rejected` is an empty response"),
])
def test_zero_length_responses_are_errors(tmp_path, rows, fn, match):
    p = write_jsonl(tmp_path / "z.jsonl", rows)
    with pytest.raises(DataError, match=match):
        fn(load_rows(str(p)), str(p))
