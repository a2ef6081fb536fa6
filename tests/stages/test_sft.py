"""SFT on a tiny model: the loss goes down; the output directory loads with plain transformers/peft."""

import json

import pytest

from conftest import write_jsonl
from pipeline.config import parse_recipe
from pipeline.runner import run_recipe


def _recipe(tmp_path, model_dir, **sft):
    rows = [{"prompt": f"write about topic {i} in lowercase", "completion": f"the answer {i} is in lowercase"}
            for i in range(40)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    return parse_recipe({
        "run": {"name": "t", "output_dir": str(tmp_path / "out"), "seed": 0},
        "model": {"name_or_path": str(model_dir), "cpu_autocast": "off"},
        "stages": ["sft"],
        "sft": {"data": str(data), "batch_size": 8, "logging_steps": 1, **sft},
    })


def test_sft_full_finetune_lowers_loss(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(tmp_path, tiny_model_dir, lr=1e-2, epochs=3, lora=None, eval_fraction=0.1)
    summary = run_recipe(recipe)["sft"]
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.5
    final = tmp_path / "out" / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    assert model.config.vocab_size == len(tok)
    rows = [json.loads(line) for line in (tmp_path / "out" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("sft/loss" in r for r in rows) and any("sft/eval_loss" in r for r in rows)
    assert json.loads((tmp_path / "out" / "sft" / "summary.json").read_text())["stage"] == "sft"
    assert (tmp_path / "out" / "recipe.resolved.yaml").exists() and (tmp_path / "out" / "run_info.json").exists()


def test_sft_lora_keeps_adapter_beside_merged_weights(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, tiny_model_dir, lr=5e-3, epochs=2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    summary = run_recipe(recipe)["sft"]
    assert summary["lora"] and summary["eval_loss"] < summary["eval_loss_before"]
    final = tmp_path / "out" / "sft" / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, final / "adapter")
    x = torch.tensor([[1, 5, 9, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, with_adapter(x).logits, atol=1e-4, rtol=1e-4)
