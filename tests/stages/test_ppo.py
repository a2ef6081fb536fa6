"""The on-policy core and PPO on tiny models: a toy reward rises; accumulation does not change the
update; the LoRA reference is the SFT policy; rollouts stop at EOS and mask after it."""

import copy
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline.config import LoraConfig, ModelConfig, PPOConfig
from pipeline.models import resolve_precision
from pipeline.onpolicy import (
    RolloutBatch,
    UpdateSettings,
    encode_prompts,
    mask_after_eos,
    optimise,
    policy_logprobs,
    recompute_logprobs,
)
from pipeline.rlmodels import PPOModels, SharedValueHead, ValueModel
from pipeline.stages.ppo import train_ppo

PROMPTS = [{"prompt": [{"role": "user", "content": f"hello world {i}"}]} for i in range(8)]


class CountToken:
    """Toy reward: how often the target string appears in the response (scaled)."""

    def __init__(self, target="e"):
        self.target = target

    def score(self, rows, texts):
        return torch.tensor([t.count(self.target) / 4 for t in texts], dtype=torch.float32)


def tiny_models(advantage: str, lora: bool = False, critic_from: str = "policy"):
    from transformers import LlamaForSequenceClassification

    tok = build_tiny_tokenizer()
    policy = build_tiny_model(tok)
    reference = None
    if lora:
        from peft import get_peft_model

        from pipeline.models import peft_lora_config

        policy = get_peft_model(policy, peft_lora_config(LoraConfig(r=4, alpha=8, dropout=0.0,
                                                                    target_modules="all-linear")))
    else:
        reference = copy.deepcopy(policy).requires_grad_(False)
    critic = None
    if advantage == "gae" and critic_from == "shared":
        critic = SharedValueHead(policy.config.hidden_size)
    elif advantage == "gae":
        cfg = copy.deepcopy(build_tiny_model(tok).config)
        cfg.num_labels = 1
        critic = ValueModel(LlamaForSequenceClassification(cfg))
    models = PPOModels(policy=policy, tokenizer=tok, reference=reference, critic=critic)
    for m in (models.policy, models.reference, models.critic):
        if m is not None:
            m.eval()
    return models


@pytest.mark.parametrize("advantage", ["gae", "reinforce", "rloo"])
def test_ppo_raises_toy_reward(advantage, tmp_path):
    torch.manual_seed(0)
    models = tiny_models(advantage)
    cfg = PPOConfig(iterations=45, rollout_batch_size=16 if advantage != "rloo" else 8,
                    samples_per_prompt=2 if advantage == "rloo" else 1, minibatch_size=8, micro_batch_size=4,
                    epochs=2, lr=3e-3, critic_lr=3e-3, max_new_tokens=12, kl_coef=0.01, lora=None,
                    advantage=advantage, log_samples_every=10)
    prec = resolve_precision(ModelConfig(cpu_autocast="off"))
    hist = train_ppo(models, CountToken(), PROMPTS, cfg, prec, tmp_path, seed=0, progress=False)
    first = sum(h["ppo/score"] for h in hist[:5]) / 5
    last = sum(h["ppo/score"] for h in hist[-5:]) / 5
    assert last > first + 0.5, (first, last)
    for key in ("ppo/kl", "ppo/kl_coef", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/response_length",
                "ppo/eos_share", "ppo/tokens_per_s", "ppo/score_norm"):
        assert key in hist[-1]
    if advantage == "gae":
        assert "ppo/value_loss" in hist[-1] and "ppo/explained_variance" in hist[-1]
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "samples.jsonl").exists()


def _rollout(models, n=8, T=10, seed=0):
    tok = models.tokenizer
    torch.manual_seed(seed)
    q, qm = encode_prompts(tok, PROMPTS[:n], "cpu")
    r = torch.randint(3, len(tok), (n, T))
    r[0, 4] = tok.eos_token_id
    mask, ended = mask_after_eos(r, tok.eos_token_id)
    r = torch.where(mask, r, tok.pad_token_id)
    b = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=mask, logprobs=None, ended=ended,
                     prompts=PROMPTS[:n])
    b.logprobs = recompute_logprobs(models.policy, b, 1.0, 4) - 0.05
    b.advantages = torch.randn(n, T)
    return b


def test_gradient_accumulation_invariance():
    """One minibatch of 8 in one micro-batch or in 4 micro-batches of 2 gives the same update."""
    from pipeline.rl import policy_loss

    results = []
    for micro in (8, 2):
        models = tiny_models("reinforce")
        batch = _rollout(models)
        params = [p for p in models.policy.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)

        def loss_fn(mb, n_tokens):
            lp, _, _ = policy_logprobs(models.policy, mb, 1.0)
            return policy_loss(lp, mb.logprobs, mb.advantages, mb.response_mask, 0.2, n_tokens)

        optimise(batch, loss_fn, opt, params, UpdateSettings(1, 8, micro, 1e9), torch.Generator().manual_seed(0))
        results.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_mask_after_eos():
    eos = 2
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    mask, ended = mask_after_eos(tokens, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_recomputed_logprobs_match_generation_scores():
    """Behaviour log-probs recomputed with the training forward (left padding, position ids,
    temperature) equal the sampler's own scores."""
    from pipeline.onpolicy import SamplingSettings

    models = tiny_models("reinforce")
    tok, model = models.tokenizer, models.policy
    q, qm = encode_prompts(tok, [PROMPTS[0], {"prompt": [{"role": "user", "content": "hi"}]}], "cpu")
    torch.manual_seed(0)
    temp = 0.7
    out = model.generate(input_ids=q, attention_mask=qm, max_new_tokens=6, do_sample=True, temperature=temp,
                         top_k=None, top_p=None, output_scores=True, return_dict_in_generate=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    r = out.sequences[:, q.shape[1]:]
    mask, ended = mask_after_eos(r, tok.eos_token_id)
    gen_lp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(-1, r.unsqueeze(-1))[..., 0]
    b = RolloutBatch(query_ids=q, query_mask=qm, response_ids=torch.where(mask, r, tok.pad_token_id),
                     response_mask=mask, logprobs=None, ended=ended)
    lp = recompute_logprobs(model, b, temp, 8)
    torch.testing.assert_close(lp[mask], gen_lp[mask], atol=1e-4, rtol=1e-4)


def test_lora_reference_is_the_merged_sft_policy():
    """With LoRA: policy = merged SFT + fresh adapter; adapter disabled == the SFT model itself."""
    models = tiny_models("reinforce", lora=True)
    sft = build_tiny_model(models.tokenizer)  # same seed: the weights under the adapter
    batch = _rollout(models)
    # Move the adapter away from its zero init so the policy differs from the reference.
    with torch.no_grad():
        for n, p in models.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    with models.reference_ctx():
        ref = recompute_logprobs(models.ref_model, batch, 1.0, 8)
    expect = recompute_logprobs(sft, batch, 1.0, 8)
    pol = recompute_logprobs(models.policy, batch, 1.0, 8)
    torch.testing.assert_close(ref, expect, atol=1e-5, rtol=1e-5)
    assert (pol - ref).abs().max() > 1e-3


def test_kl_of_identical_policies_is_zero():
    from pipeline.rl import kl_penalty

    models = tiny_models("reinforce")
    batch = _rollout(models)
    ref = recompute_logprobs(models.reference, batch, 1.0, 8)
    pol = recompute_logprobs(models.policy, batch, 1.0, 8)
    for kind in ("k1", "k2", "k3"):
        assert kl_penalty(pol, ref, kind)[batch.response_mask].abs().max() < 1e-6


def test_prompt_longer_than_context_is_refused_before_compute():
    from pipeline.data import DataError
    from pipeline.onpolicy import check_prompt_lengths

    tok = build_tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "hi"}]},
            {"prompt": [{"role": "user", "content": "the quick brown fox " * 50}]}]
    check_prompt_lengths(tok, rows[:1], "p.jsonl", 512, 64)
    with pytest.raises(DataError, match=r"p.jsonl: row 2: the prompt is \d+ tokens; with max_new_tokens=64 it exceeds"):
        check_prompt_lengths(tok, rows, "p.jsonl", 128, 64)


def test_response_logits_projects_only_response_positions_and_matches_full_logits(monkeypatch):
    """With `logits_to_keep` (transformers' LMs, also under peft) the output layer sees only the last T + 1
    positions; the logits equal the slice of the full-sequence logits."""
    import pipeline.onpolicy as onpolicy
    from peft import LoraConfig, get_peft_model

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok).eval()
    assert onpolicy.accepts_logits_to_keep(model)
    lora = get_peft_model(build_tiny_model(tok), LoraConfig(r=4, target_modules="all-linear"))
    assert onpolicy.accepts_logits_to_keep(lora)
    B, P, T, V = 2, 5, 4, model.config.vocab_size
    torch.manual_seed(0)
    qm = torch.ones(B, P, dtype=torch.long)
    qm[0, :2] = 0
    batch = RolloutBatch(query_ids=torch.randint(3, V, (B, P)), query_mask=qm, response_ids=torch.randint(3, V, (B, T)),
                         response_mask=torch.ones(B, T, dtype=torch.bool), logprobs=torch.zeros(B, T),
                         ended=torch.ones(B, dtype=torch.bool))
    kept = onpolicy.response_logits(model, batch)
    monkeypatch.setattr(onpolicy, "accepts_logits_to_keep", lambda m: False)
    full = onpolicy.response_logits(model, batch)
    assert kept.shape == full.shape == (B, T, V)
    assert torch.allclose(kept, full, atol=1e-5)
