"""The lean CPU decoder (`pipeline.decode`): the same logits as transformers' Llama forward, the same tokens as
`generate`, LoRA merged, and a fallback to `generate` for whatever it does not cover."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline.decode import LlamaDecoder, llama_decoder
from pipeline.onpolicy import SamplingSettings, _ExponentialRace, encode_prompts, hf_sample, sample_responses

PROMPTS = [{"prompt": [{"role": "user", "content": "hello world " * (1 + 2 * i) + str(i)}]} for i in range(4)]

bf16_cpu = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                   and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                              reason="oneDNN bf16 matmuls are not available on this CPU")


class _Record:
    """A logits processor that keeps every step's scores (and changes nothing)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def _model(tok, **cfg):
    model = build_tiny_model(tok, seed=0, **cfg).eval()
    return model


def _hf_greedy(model, tok, q, qm, n, processors=None):
    kw = dict(max_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False,
              temperature=None, top_k=None, top_p=None)
    if processors is not None:
        kw["logits_processor"] = LogitsProcessorList(processors)
    with torch.no_grad():
        return model.generate(input_ids=q, attention_mask=qm, **kw)


def test_prefill_and_decode_logits_equal_transformers_forward_with_left_padding():
    """Every step's scores (prompt of ragged length, left-padded; then each new token) equal the last-position
    logits of transformers' forward over the whole sequence so far, to 1e-5, in fp32."""
    tok = build_tiny_tokenizer()
    model = _model(tok)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    assert (qm == 0).any(), "the prompts must be ragged, so that left padding is exercised"
    rec = _Record()
    out = LlamaDecoder(model, packed=False).generate(q, qm, 6, tok.eos_token_id, tok.pad_token_id, rec)
    assert len(rec.scores) == out.shape[1] - q.shape[1] > 1
    with torch.no_grad():
        for t, got in enumerate(rec.scores):
            ids = out[:, :q.shape[1] + t]
            mask = torch.cat([qm, torch.ones(ids.shape[0], t, dtype=qm.dtype)], 1)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_layers,hidden", [(2, 32), (3, 64)])
def test_greedy_tokens_equal_generate(n_layers, hidden):
    tok = build_tiny_tokenizer()
    model = _model(tok, n_layers=n_layers, hidden=hidden)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    ref = _hf_greedy(model, tok, q, qm, 12)
    got = llama_decoder(model).generate(q, qm, 12, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(got, ref)


def test_rows_that_end_get_padding_and_decoding_stops_when_all_have_ended():
    """Make EOS the argmax after the first new token for row 0 only (a processor), then for all rows: row 0 is
    padded after its EOS, and no step runs after every row has ended: the decoder's output equals generate's."""
    tok = build_tiny_tokenizer()
    model = _model(tok)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    eos = tok.eos_token_id

    def force(input_ids, scores):
        step = input_ids.shape[1] - q.shape[1]
        scores = scores.clone()
        rows = [0] if step == 1 else (list(range(scores.shape[0])) if step >= 3 else [])
        scores[rows, eos] = 1e4
        return scores

    ref = _hf_greedy(model, tok, q, qm, 10, [force])
    got = llama_decoder(model).generate(q, qm, 10, eos, tok.pad_token_id, force)
    assert torch.equal(got, ref)
    new = got[:, q.shape[1]:]
    assert new.shape[1] == 4 and new[0, 1] == eos and (new[0, 2:] == tok.pad_token_id).all()


def test_sampled_rollouts_equal_the_generate_path_under_a_seed():
    """sample_responses through the decoder and through transformers' generate (cpu_decoder off) draw the same
    tokens and record the same log-probs under the same seed (temperature, top-k, the race)."""
    tok = build_tiny_tokenizer()
    model = _model(tok)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    s = SamplingSettings(max_new_tokens=10, temperature=0.8, top_k=20)
    off = SamplingSettings(max_new_tokens=10, temperature=0.8, top_k=20, cpu_decoder=False)
    a = hf_sample(model, tok, q, qm, s, None, len(tok), seed=3, with_logprobs=True)
    b = hf_sample(model, tok, q, qm, off, None, len(tok), seed=3, with_logprobs=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[3], b[3], atol=1e-5, rtol=1e-5)


def test_lora_adapters_are_merged_and_dora_falls_back():
    from peft import LoraConfig, get_peft_model

    tok = build_tiny_tokenizer()
    model = get_peft_model(_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a LoRA B of zeros would hide the adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    ref = _hf_greedy(model, tok, q, qm, 8)
    assert torch.equal(llama_decoder(model).generate(q, qm, 8, tok.eos_token_id, tok.pad_token_id), ref)
    with model.disable_adapter():
        plain = _hf_greedy(model, tok, q, qm, 8)
        assert torch.equal(llama_decoder(model).generate(q, qm, 8, tok.eos_token_id, tok.pad_token_id), plain)
    assert not torch.equal(plain, ref)
    dora = get_peft_model(_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                                  task_type="CAUSAL_LM"))
    assert llama_decoder(dora) is None


def test_fallbacks_other_models_generation_config_and_bf16_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tiny_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    assert llama_decoder(gpt2) is None
    model = _model(tok)
    assert llama_decoder(model, enabled=False) is None
    model.generation_config.repetition_penalty = 1.3  # generate would add its own processor
    assert llama_decoder(model) is None
    model.generation_config.repetition_penalty = 1.0
    assert llama_decoder(model) is not None
    assert llama_decoder(model.to(torch.bfloat16)) is None  # bf16 weights outside autocast: generate's precision
    # and sample_responses still samples through generate for the unsupported model
    q, qm = encode_prompts(tok, PROMPTS[:2], "cpu")
    r, m, e = sample_responses(gpt2.eval(), tok, q, qm, SamplingSettings(max_new_tokens=3))
    assert r.shape == (2, 3)


@bf16_cpu
@pytest.mark.parametrize("lora", [False, True])
def test_bf16_packed_decoder_matches_autocast_logits(lora):
    """Under CPU bf16 autocast the decoder packs bf16 weights; its first-step scores equal autocast's forward to
    bf16 rounding (2% of the logits' scale), and most greedy tokens agree with autocast's generate."""
    from peft import LoraConfig, get_peft_model

    tok = build_tiny_tokenizer()
    model = _model(tok, hidden=64)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model.eval()
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    rec = _Record()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dec = llama_decoder(model)
        assert dec is not None and dec.packed
        out = dec.generate(q, qm, 6, tok.eos_token_id, tok.pad_token_id, rec)
        pos = (qm.cumsum(-1) - 1).masked_fill(qm == 0, 1)
        ref = model(input_ids=q, attention_mask=qm, position_ids=pos).logits[:, -1].float()
        hf = _hf_greedy(model, tok, q, qm, 6)
    assert (rec.scores[0] - ref).abs().max() <= 0.02 * ref.abs().max()
    agree = (out[:, q.shape[1]:q.shape[1] + 1] == hf[:, q.shape[1]:q.shape[1] + 1]).float().mean()
    assert agree >= 0.75


def test_the_race_through_the_decoder_samples_each_row_from_its_softmax():
    """Sampling = the decoder's argmax over the race's scores: with one new token and 4000 copies of one prompt,
    the first token's frequencies match softmax(first-step logits) within 4 standard errors."""
    tok = build_tiny_tokenizer()
    model = _model(tok)
    q, qm = encode_prompts(tok, PROMPTS[:1], "cpu")
    n = 4000
    q, qm = q.expand(n, -1).contiguous(), qm.expand(n, -1).contiguous()
    rec = _Record()
    torch.manual_seed(0)
    out = llama_decoder(model).generate(q, qm, 1, tok.eos_token_id, tok.pad_token_id,
                                        LogitsProcessorList([rec, _ExponentialRace()]))
    p = torch.softmax(rec.scores[0][0].double(), -1)
    freq = torch.bincount(out[:, -1], minlength=p.numel()).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se + 1e-3).all()


def test_tune_malloc_is_opt_in_and_respects_glibcs_variables(monkeypatch):
    """Off by default; on with PIPELINE_MALLOC_THRESHOLD_MB; a no-op where glibc's own variable is set."""
    import sys

    from pipeline.utils import tune_malloc

    monkeypatch.delenv("PIPELINE_MALLOC_THRESHOLD_MB", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert tune_malloc() is False
    monkeypatch.setenv("PIPELINE_MALLOC_THRESHOLD_MB", "0")
    assert tune_malloc() is False
    monkeypatch.setenv("PIPELINE_MALLOC_THRESHOLD_MB", "256")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert tune_malloc() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            pytest.skip("no glibc mallopt here")
        assert tune_malloc() is True


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_eval_generation_is_the_same_with_and_without_the_decoder(penalty):
    """`generation.generate` (the eval stage's greedy answers, with the optional repetition penalty) gives the same
    answers through the decoder as through transformers' generate (`model.cpu_decoder: false`)."""
    from pipeline.decode import set_cpu_decoder
    from pipeline.generation import generate

    tok = build_tiny_tokenizer()
    model = _model(tok)
    prompts = [p["prompt"] for p in PROMPTS]
    try:
        set_cpu_decoder(False)
        ref = generate(model, tok, prompts, max_new_tokens=10, batch_size=3, repetition_penalty=penalty)
    finally:
        set_cpu_decoder(True)
    got = generate(model, tok, prompts, max_new_tokens=10, batch_size=3, repetition_penalty=penalty)
    assert got.response_ids == ref.response_ids and got.ended == ref.ended


def test_attention_and_mlp_biases_are_kept():
    """A Llama with q/k/v/o and MLP biases (`attention_bias`, `mlp_bias`): the same greedy tokens as generate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    ref = _hf_greedy(model, tok, q, qm, 10)
    assert torch.equal(llama_decoder(model).generate(q, qm, 10, tok.eos_token_id, tok.pad_token_id), ref)
