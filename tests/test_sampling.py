"""The rollout sampler's draw (`onpolicy._ExponentialRace`): generate's greedy step over scores our last logits
processor has already sampled from. It must draw from softmax(scores) exactly as `torch.multinomial` does, keep
top-k / top-p truncation, stay reproducible under a seed, and refuse scores that are no distribution."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline.onpolicy import SamplingSettings, _ExponentialRace, encode_prompts, hf_sample, sample_responses

PROMPTS = [{"prompt": [{"role": "user", "content": "hello world " * (1 + i % 3) + str(i)}]} for i in range(4)]


def test_the_race_draws_each_token_with_its_softmax_probability():
    """60,000 rows of the same scores: each token's frequency is its probability within 4 standard errors, a
    -inf score is never drawn, and the returned scores are 0 at the drawn token and -inf elsewhere. (A race on
    p * E, or on the raw scores, would miss these frequencies by several points.)"""
    torch.manual_seed(0)
    scores = torch.tensor([float("-inf"), 0.0, 1.0, 2.0, -1.0, 0.5])
    n = 60_000
    out = _ExponentialRace()(None, scores.expand(n, -1).clone())
    assert torch.equal((out == 0).sum(-1), torch.ones(n, dtype=torch.long))
    assert torch.isneginf(out[out != 0]).all()
    freq = torch.bincount(out.argmax(-1), minlength=6).double() / n
    p = torch.softmax(scores.double(), -1)
    assert freq[0] == 0
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)


def test_the_race_keeps_low_precision_scores_and_a_peaked_row():
    torch.manual_seed(1)
    scores = torch.tensor([[0.0, 30.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    out = _ExponentialRace()(None, scores)
    assert out.dtype == torch.bfloat16 and out[0].argmax() == 1


def test_sampled_rollouts_are_seeded_and_respect_top_k():
    """Same seed, same samples; a different seed, different samples; with top_k 3 every sampled token is among
    the 3 highest-scoring at its position (the truncation is still applied before the draw)."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    s = SamplingSettings(max_new_tokens=10, temperature=1.3)
    a = hf_sample(model, tok, q, qm, s, None, None, seed=5)
    b = hf_sample(model, tok, q, qm, s, None, None, seed=5)
    c = hf_sample(model, tok, q, qm, s, None, None, seed=6)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    k3 = SamplingSettings(max_new_tokens=10, temperature=1.3, top_k=3)
    r, m, _ = hf_sample(model, tok, q, qm, k3, None, None, seed=5)
    with torch.no_grad():
        ids = torch.cat([q, r], 1)
        logits = model(input_ids=ids, attention_mask=torch.cat([qm, m.long()], 1)).logits[:, q.shape[1] - 1:-1]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == r.unsqueeze(-1)).any(-1)[m].all()


def test_nan_scores_are_refused_with_the_rows_named():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight[:] = float("nan")
    q, qm = encode_prompts(tok, PROMPTS[:2], "cpu")
    with pytest.raises(RuntimeError, match=r"NaN or all -inf for batch rows \[0, 1\]"):
        sample_responses(model, tok, q, qm, SamplingSettings(max_new_tokens=3, temperature=0.7))


# --------------------------------------------------------------------------------------------
# Prepacked bf16 weights while sampling under CPU bf16 autocast (`packed_cpu_linears`)
# --------------------------------------------------------------------------------------------

bf16_cpu = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                              reason="oneDNN bf16 matmuls are not available on this CPU")


def _lora(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))


@bf16_cpu
@pytest.mark.parametrize("lora", [False, True])
def test_packed_linears_give_autocasts_logits_and_restore_the_forwards(lora):
    """Inside the context every nn.Linear (LoRA's included) runs the packed bf16 product; the logits equal
    autocast's own to bf16 rounding and the greedy tokens are the same; on exit no instance forward is left."""
    from pipeline.onpolicy import packed_cpu_linears

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    if lora:
        model = _lora(model)
        with torch.no_grad():  # a LoRA B of zeros would hide the adapter path
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    model.eval()
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=q, attention_mask=qm).logits.float()
        with packed_cpu_linears(model):
            assert all("forward" in vars(m) for m in linears)
            got = model(input_ids=q, attention_mask=qm).logits.float()
    assert not any("forward" in vars(m) for m in linears)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    s = SamplingSettings(max_new_tokens=8)
    auto = torch.autocast("cpu", dtype=torch.bfloat16)
    greedy = sample_responses(model, tok, q, qm, s, auto, greedy=True)[0]
    plain = sample_responses(model, tok, q, qm, SamplingSettings(max_new_tokens=8, pack_cpu_weights=False),
                             torch.autocast("cpu", dtype=torch.bfloat16), greedy=True)[0]
    assert torch.equal(greedy, plain)


def test_packed_linears_do_nothing_outside_cpu_bf16_autocast():
    from pipeline.onpolicy import cpu_linears_packable, packed_cpu_linears

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    assert not cpu_linears_packable(model)  # no autocast
    with packed_cpu_linears(model):
        assert not any("forward" in vars(m) for m in model.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_cpu_linears(model, enabled=False):
        assert not any("forward" in vars(m) for m in model.modules())
