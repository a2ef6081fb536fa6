"""Users' own data: ShareGPT and plain-text formats, per-stage column mapping, hub options
(config / split / revision / data_files / streaming, read through the same `datasets.load_dataset` call
as the hub, on local files), `model.chat_template`, and `pipeline data --show`."""

from pathlib import Path

import pytest
import yaml

from conftest import CHAT_TEMPLATE, write_jsonl
from pipeline.cli import main
from pipeline.config import ModelConfig, RecipeError, dump_recipe, load_recipe
from pipeline.data import (
    DataError,
    MASK_CLOSE,
    MASK_OPEN,
    length_stats,
    load_rows,
    preference_examples,
    prompt_examples,
    render_prompt,
    sft_examples,
    tokenize_sft,
)
from pipeline.models import ModelError, load_tokenizer


def recipe_file(tmp_path: Path, body: dict) -> Path:
    data = {"run": {"name": "t", "output_dir": str(tmp_path / "out")}, "model": {"name_or_path": "m"}, **body}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_sharegpt_conversations_map_to_messages(tmp_path):
    p = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    (ex,) = sft_examples(load_rows(str(p)), str(p))
    assert ex == {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                  "completion": "hello"}
    # As prompts (PPO / eval), the trailing assistant turn is dropped.
    (pr,) = prompt_examples(load_rows(str(p)), str(p))
    assert pr["prompt"][-1] == {"role": "user", "content": "hi"} and len(pr["prompt"]) == 2


@pytest.mark.parametrize("turns,match", [
    ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], r"row 1: `conversations\[1\]\.from` is 'bot'"),
    ([{"from": "human", "text": "q"}], r"row 1: `conversations\[0\]` needs `from` and `value`"),
    ([{"from": "human", "value": "q"}], r"row 1: `conversations` must end with an `assistant` message"),
])
def test_sharegpt_errors_name_row_and_turn(tmp_path, turns, match):
    p = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": turns}])
    with pytest.raises(DataError, match=match):
        sft_examples(load_rows(str(p)), str(p))


def test_plain_text_trains_every_token_without_chat_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox jumps"}, {"text": "hello world"}])
    exs = sft_examples(load_rows(str(p)), str(p))
    assert exs == [{"text": "the quick brown fox jumps"}, {"text": "hello world"}]
    rows, stats = tokenize_sft(tok, exs, max_seq_len=512)
    assert stats.kept == 2
    for row, ex in zip(rows, exs):
        assert all(row["completion_mask"]) and len(row["completion_mask"]) == len(row["input_ids"])
        assert row["input_ids"][-1] == tok.eos_token_id
        text = tok.decode(row["input_ids"])
        assert text == ex["text"] + tok.eos_token and "<|im_start|>" not in text  # no chat template
    # Truncation cuts the text; every kept token is still trained.
    rows, stats = tokenize_sft(tok, exs[:1], max_seq_len=3)
    assert stats.truncated == 1 and len(rows[0]["input_ids"]) == 3 and rows[0]["completion_mask"] == [1, 1, 1]


def test_plain_text_is_sft_only(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "raw"}])
    r = load_recipe(recipe_file(tmp_path, {"stages": ["distill"], "distill": {
        "prompts": str(p), "warmup_data": str(p), "warmup_iterations": 1}}))
    with pytest.raises(DataError, match=r"`text` format; `distill.warmup_data` \(prompt \+ completion"):
        sft_examples(load_rows(r.distill.warmup_data), r.distill.warmup_data)
    with pytest.raises(DataError, match=r"row 1: no `prompt`.*columns: \{prompt: <column>\}"):
        prompt_examples(load_rows(str(p)), str(p))


# ---------------------------------------------------------------------------------------------
# Column mapping
# ---------------------------------------------------------------------------------------------


def test_sft_column_mapping(tmp_path):
    p = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "say hi", "output": "hi", "input": ""},
                                                {"instruction": "say yo", "output": "yo", "input": ""}])
    # Without the mapping: refused, with the hint.
    with pytest.raises(DataError, match=r"alpaca.jsonl: row 1 has fields \['input', 'instruction', 'output'\].*"
                                        r"sft.columns: \{prompt: instruction, completion: output\}"):
        sft_examples(load_rows(str(p)), str(p))
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": str(p), "eval_data": str(p), "columns": {"prompt": "instruction", "completion": "output"}}}))
    for spec in (r.sft.data, r.sft.eval_data):
        exs = sft_examples(load_rows(spec), spec)
        assert [e["completion"] for e in exs] == ["hi", "yo"]
        assert exs[1]["prompt"] == [{"role": "user", "content": "say yo"}]
    assert r.sft.data == str(p)  # still the plain path wherever it is printed or compared


def test_missing_mapped_column_names_file_row_and_both_names(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2", "answer": "a"}])
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": str(p), "columns": {"prompt": "instruction", "completion": "output"}}}))
    with pytest.raises(DataError) as e:
        load_rows(r.sft.data)
    msg = str(e.value)
    assert "a.jsonl: row 2" in msg and "`output`" in msg and "`completion`" in msg and "sft.columns" in msg


def test_reward_and_prompt_column_mapping(tmp_path):
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "good": "yes", "bad": "no"}])
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"question": "q1"}, {"question": "q2"}])
    r = load_recipe(recipe_file(tmp_path, {
        "stages": ["reward", "ppo", "distill"],
        "reward": {"data": str(prefs), "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
        "ppo": {"prompts": str(prompts), "policy_from": "base", "reward_from": "reward", "columns": {"prompt": "question"}},
        "distill": {"prompts": str(prompts), "teacher_from": "ppo", "columns": {"prompt": "question"}},
    }))
    (pair,), _ = preference_examples(load_rows(r.reward.data), r.reward.data)
    assert (pair["prompt"][0]["content"], pair["chosen"], pair["rejected"]) == ("q", "yes", "no")
    for spec in (r.ppo.prompts, r.distill.prompts):
        assert [e["prompt"][0]["content"] for e in prompt_examples(load_rows(spec), spec)] == ["q1", "q2"]


def test_column_mapping_keys_are_checked(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `sft.columns.promt`.*Did you mean `prompt`"):
        load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {"data": "d.jsonl", "columns": {"promt": "q"}}}))
    with pytest.raises(RecipeError, match=r"`ppo.columns.chosen`: the ppo stage reads no `chosen` column"):
        load_recipe(recipe_file(tmp_path, {"stages": ["ppo"], "ppo": {"prompts": "q.jsonl", "policy_from": "base",
                                                                     "columns": {"chosen": "x"}}}))


# ---------------------------------------------------------------------------------------------
# Hub options, on local data through the same load_dataset call
# ---------------------------------------------------------------------------------------------


def test_hub_options_are_passed_to_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {"max_rows": 7, "data": {
        "path": "org/ds", "config": "cfg1", "split": "validation", "revision": "abc123"}}}))
    rows = load_rows(r.sft.data, r.sft.max_rows)
    assert calls == [("org/ds", {"split": "validation", "name": "cfg1", "revision": "abc123"})]
    assert len(rows) == 7 and rows[-1]["completion"] == "c6"
    assert str(r.sft.data) == "org/ds[cfg1]:validation"
    # Strings keep working: `name:split`, no options.
    load_rows("org/other:test")
    assert calls[-1] == ("org/other", {"split": "test"})


def test_builder_with_data_files_and_streaming(tmp_path):
    files = [write_jsonl(tmp_path / f"part{k}.jsonl", [{"prompt": f"p{k}{i}", "completion": "c"} for i in range(5)])
             for k in range(2)]
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": {"path": "json", "data_files": [str(f) for f in files]}}}))
    exs = sft_examples(load_rows(r.sft.data), r.sft.data)
    assert [e["prompt"][0]["content"] for e in exs] == [f"p{k}{i}" for k in range(2) for i in range(5)]
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": {"path": "json", "data_files": str(files[1]), "streaming": True}}}))
    assert [row["prompt"] for row in load_rows(r.sft.data, 3)] == ["p10", "p11", "p12"]


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"q": "a", "c": "x"}, {"q": "b", "c": "y"}]),
        "test": datasets.Dataset.from_list([{"q": "t", "c": "z"}]),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": str(tmp_path / "saved"), "eval_data": {"path": str(tmp_path / "saved"), "split": "test"},
        "columns": {"prompt": "q", "completion": "c"}}}))
    assert [e["completion"] for e in sft_examples(load_rows(r.sft.data), r.sft.data)] == ["x", "y"]
    assert [e["completion"] for e in sft_examples(load_rows(r.sft.eval_data), r.sft.eval_data)] == ["z"]
    bad = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": {"path": str(tmp_path / "saved"), "split": "dev"}}}))
    with pytest.raises(DataError, match=r"no split `dev`; its splits: train, test"):
        load_rows(bad.sft.data)


def test_data_mapping_round_trips_through_the_resolved_recipe(tmp_path):
    r = load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {
        "data": {"path": "org/ds", "config": "c", "revision": "r1"}, "eval_data": "org/ds:test"}}))
    d = r.to_dict()["sft"]
    assert d["data"] == {"path": "org/ds", "config": "c", "revision": "r1"} and d["eval_data"] == "org/ds:test"
    (tmp_path / "resolved.yaml").write_text(dump_recipe(r))
    again = load_recipe(tmp_path / "resolved.yaml")
    assert dump_recipe(again) == dump_recipe(r) and again.sft.data.source.revision == "r1"
    with pytest.raises(RecipeError, match=r"unknown key `sft.data.revison`.*Did you mean `revision`"):
        load_recipe(recipe_file(tmp_path, {"stages": ["sft"], "sft": {"data": {"path": "o/d", "revison": "x"}}}))


# ---------------------------------------------------------------------------------------------
# model.chat_template
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def base_tokenizer_dir(tmp_path, tiny_tokenizer):
    """The tiny tokenizer without a chat template: a base model's."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def test_tokenizer_without_template_is_refused_with_the_fix(base_tokenizer_dir):
    with pytest.raises(ModelError, match=r"has no chat template.*Set `model.chat_template` to `zephyr`"):
        load_tokenizer(base_tokenizer_dir, ModelConfig())


@pytest.mark.parametrize("setting,prompt_text", [
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("zephyr", "<|user|>\nhi<|im_end|>\n<|assistant|>\n"),
])
def test_named_chat_templates(base_tokenizer_dir, setting, prompt_text):
    tok = load_tokenizer(base_tokenizer_dir, ModelConfig(chat_template=setting))
    prompt = [{"role": "user", "content": "hi"}]
    assert render_prompt(tok, prompt) == prompt_text
    (row,), _ = tokenize_sft(tok, [{"prompt": prompt, "completion": "the sea"}], max_seq_len=64)
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert tok.decode(trained).strip() == "the sea<|im_end|>"  # the reply ends at EOS


def test_jinja_file_template_and_bad_names(tmp_path, base_tokenizer_dir):
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE.replace("<|im_start|>", "<|im_start|>>"))
    tok = load_tokenizer(base_tokenizer_dir, ModelConfig(chat_template=str(tmp_path / "t.jinja")))
    assert render_prompt(tok, "hi").startswith("<|im_start|>>user")
    with pytest.raises(RecipeError, match=r"`model.chat_template`: 'chatmll' is not a template name \(chatml, zephyr"):
        load_recipe(recipe_file(tmp_path, {"model": {"name_or_path": "m", "chat_template": "chatmll"}, "stages": []}))
    with pytest.raises(RecipeError, match=r"template file .*missing.jinja not found"):
        load_recipe(recipe_file(tmp_path, {"model": {"name_or_path": "m", "chat_template": "missing.jinja"},
                                           "stages": []}))


# ---------------------------------------------------------------------------------------------
# pipeline data
# ---------------------------------------------------------------------------------------------


def test_length_stats():
    assert length_stats([5, 1, 3, 2, 4]) == {"min": 1, "median": 3, "p95": 5, "max": 5}
    assert length_stats(list(range(1, 101))) == {"min": 1, "median": 50.5, "p95": 95, "max": 100}


def test_pipeline_data_show(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    rows = [{"q": "write about the sea", "a": "the sea is blue"},
            {"q": "the quick brown fox " * 10, "a": "the dog sleeps"}]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    rp = recipe_file(tmp_path, {"model": {"name_or_path": str(tiny_model_dir)}, "stages": ["sft"],
                                "sft": {"data": str(p), "max_seq_len": 40, "columns": {"prompt": "q", "completion": "a"}}})
    assert main(["data", str(rp), "--stage", "sft", "--show", "1"]) == 0
    out = capsys.readouterr().out
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "write about the sea"}]
    n_prompt = [len(tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"])
                for r in sft_examples([{"prompt": x["q"], "completion": x["a"]} for x in rows], "x")]
    assert "format: prompt_completion" in out and "rows: 2 -> 2 examples" in out
    stat = next(line for line in out.splitlines() if line.startswith("prompt (masked)")).split()
    assert [int(stat[-4]), int(stat[-1])] == [min(n_prompt), max(n_prompt)]
    assert "longer than sft.max_seq_len=40: 1" in out
    # One example, rendered: the prompt masked, the reply and its EOS trained.
    assert out.count("--- example") == 1
    expected = MASK_OPEN + render_prompt(tok, prompt) + MASK_CLOSE + "the sea is blue<|im_end|>"
    assert expected in out

    # Plain text: nothing masked.
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}])
    assert main(["data", str(rp), f"sft.data={t}", "sft.columns=null", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: text" in out and "hello world<|im_end|>" in out and MASK_OPEN + "<" not in out


def test_pipeline_data_reward_and_prompts(tmp_path, tiny_model_dir, capsys):
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hello"}, {"prompt": "hello world"}])
    rp = recipe_file(tmp_path, {"model": {"name_or_path": str(tiny_model_dir)}, "stages": ["reward", "ppo"],
                                "reward": {"data": str(prefs), "init_from": "base"},
                                "ppo": {"prompts": str(prompts), "policy_from": "base"}})
    assert main(["data", str(rp), "--stage", "reward", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "rows: 1 -> 1 pairs" in out and "chosen:\n" in out and "yes<|im_end|>" in out and "no<|im_end|>" in out
    assert main(["data", str(rp), "--stage", "ppo", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "rows: 2 -> 2 prompts" in out and out.count("--- prompt") == 2
    assert "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n" in out
    assert main(["data", str(rp), "--stage", "sft"]) == 2  # a user error, not a traceback
    assert "the recipe has no `sft` section" in capsys.readouterr().err


def test_chatml_needs_its_tokens_zephyr_uses_the_models_eos(tmp_path):
    """A base vocabulary without <|im_start|>/<|im_end|> (EOS `</s>`): chatml is refused, zephyr ends turns at EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the sea is blue and the sky is grey"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "b")
    with pytest.raises(ModelError, match=r"`chatml` needs the tokens <\|im_start\|>, <\|im_end\|>.*Use `zephyr`"):
        load_tokenizer(str(tmp_path / "b"), ModelConfig(chat_template="chatml"))
    tok = load_tokenizer(str(tmp_path / "b"), ModelConfig(chat_template="zephyr"))
    prompt = [{"role": "user", "content": "the sea"}]
    (row,), _ = tokenize_sft(tok, [{"prompt": prompt, "completion": "is blue"}], max_seq_len=128)
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert trained[-1] == tok.eos_token_id and tok.decode(trained) == "is blue</s>"
