"""Model loading: clear errors for missing models; a pad token distinct from EOS; precision choice."""

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import ModelError, ensure_pad_token, resolve_model_path, resolve_precision


def test_missing_model_messages(tmp_path):
    with pytest.raises(ModelError, match=r"model: ./nomodel does not exist"):
        resolve_model_path("./nomodel")
    with pytest.raises(ModelError, match=r"is not a model directory \(no config.json\)"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match=r"GGUF file .* not found"):
        resolve_model_path(str(tmp_path / "x.gguf"))


def test_pad_token_made_distinct_from_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.pad_token = tok.eos_token
    ensure_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|endoftext|>"


def test_precision_defaults_on_cpu():
    p = resolve_precision(ModelConfig(device="cpu", cpu_autocast="off"))
    assert p.device.type == "cpu" and p.dtype == torch.float32 and not p.autocast
    assert resolve_precision(ModelConfig(device="cpu", cpu_autocast="on")).autocast
    with pytest.raises(ModelError, match="not a dtype"):
        resolve_precision(ModelConfig(dtype="float8"))


@pytest.mark.slow
def test_builtin_default_model_loads_and_generates():
    from pipeline.generation import generate
    from pipeline.models import load_policy

    cfg = ModelConfig()
    model, tok = load_policy("smollm2-135m-instruct", cfg)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    out = generate(model, tok, ["Say hello."], max_new_tokens=8)
    assert out.texts[0].strip()


def test_bf16_autocast_loss_matches_fp32(tiny_model_dir):
    """CPU mixed precision is on by default only because the loss it computes matches fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = model(input_ids=ids, labels=ids).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(input_ids=ids, labels=ids).loss
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)
