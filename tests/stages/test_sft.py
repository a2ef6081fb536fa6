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
    # A local base with no `model.hub_id` is named by its absolute path, not the path as written; cards
    # replace PEFT's empty template (tests/test_outputs.py covers hub ids and moved run directories).
    cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    card = (final / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "Model Card for Model ID" not in card
    assert "library_name: transformers" in (final / "README.md").read_text()


def test_response_start_weights_hand_values():
    import torch

    from pipeline.stages.sft import response_start_weights

    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0],   # 4 trained positions
                         [0, 1, 1, 0, 0, 0, 0],   # 2: both are "start"
                         [0, 0, 0, 0, 0, 0, 0]])  # none
    w = response_start_weights(mask, n_tokens=3, weight=5.0)
    assert w.tolist() == [[0, 0, 5, 5, 5, 1, 0], [0, 5, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    assert response_start_weights(mask, n_tokens=0, weight=5.0).tolist() == mask.float().tolist()


def test_weighted_token_loss_is_split_invariant_and_plain_at_weight_one():
    import torch

    from pipeline.stages.sft import response_start_weights, weighted_token_loss

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 9, generator=g) * 3
    mask = torch.rand(6, 9, generator=g) > 0.3
    logp = logp * mask  # the fused head returns 0 at masked positions
    n = int(mask.sum())
    plain = weighted_token_loss(logp, response_start_weights(mask, 2, 1.0), n)
    torch.testing.assert_close(plain, -logp[mask].mean())
    w = response_start_weights(mask, 2, 4.0)
    whole = weighted_token_loss(logp, w, n)
    # micro-batches of 2 rows with the step's token count (what the Trainer passes) add up to the whole
    parts = sum(weighted_token_loss(logp[i:i + 2], w[i:i + 2], n) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)
    by_hand = (-(logp * mask).sum() + 3.0 * -(logp * (w == 4.0)).sum()) / n
    torch.testing.assert_close(whole, by_hand)


def test_weighted_trainer_loss_weights_the_first_response_tokens(tmp_path, tiny_model_dir):
    """The training loss of the weighted trainer equals a hand computation from plain logits, and the
    positions it weights are the first tokens of the completion (not the prompt, not the template)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from pipeline.data import sft_examples, tokenize_sft
    from pipeline.stages.sft import _weighted_trainer_cls

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": f"write about topic {i}", "completion": "yes the sea" + " hello" * i} for i in range(4)]
    toks, _ = tokenize_sft(tok, sft_examples(rows, "t.jsonl"), 64)
    args = TRLSFTConfig(output_dir=str(tmp_path / "c"), per_device_train_batch_size=4, report_to=[],
                        completion_only_loss=True, max_length=64, remove_unused_columns=False, use_cpu=True)
    trainer = _weighted_trainer_cls(SFTTrainer)(model=model, args=args, train_dataset=datasets.Dataset.from_list(toks),
                                                processing_class=tok, start_tokens=2, start_weight=3.0)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))

    labels = batch["labels"]
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * mask
    w = torch.ones_like(nll)
    for r in range(len(w)):
        first = mask[r].nonzero()[:2, 0]
        w[r, first] = 3.0
        assert tok.decode(tgt[r, first]).startswith("yes")  # the completion's first tokens
    torch.testing.assert_close(loss.detach(), (w * nll).sum() / mask.sum(), atol=1e-5, rtol=1e-5)
    # the path for a TRL without the fused head (log-probs from the logits) agrees with the fused one
    fused = trainer.token_logprobs(trainer.model, dict(batch), fused=True)
    plain = trainer.token_logprobs(trainer.model, dict(batch), fused=False)
    assert fused[2] is not None and getattr(trainer, "_fused_head", True)  # the installed TRL's fused head was used
    torch.testing.assert_close(plain[1], fused[1])
    torch.testing.assert_close(plain[0].detach(), fused[0].detach(), atol=1e-5, rtol=1e-5)
    # a model no TRL patched (an older TRL): asked for the fused head, it falls back to the logits
    from types import SimpleNamespace

    unpatched = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    host = SimpleNamespace()
    fallback = type(trainer).token_logprobs(host, unpatched, dict(batch), fused=True)
    assert host._fused_head is False
    torch.testing.assert_close(fallback[0].detach(), fused[0].detach(), atol=1e-5, rtol=1e-5)


def test_sft_response_start_weight_runs_and_lowers_the_loss(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir, lr=1e-2, epochs=2, lora=None, eval_fraction=0.1,
                     response_start_weight=4.0, response_start_tokens=3)
    summary = run_recipe(recipe)["sft"]
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.5
