"""`logprobs_from: sampler` (issue #21): the sampler's own log-probs of the tokens it sampled, recorded during
`generate` without keeping (batch, steps, vocabulary) scores, equal the training forward's recompute in fp32; PPO
uses them as behaviour log-probs and skips the recompute forward; the sampler-minus-recompute gap is logged; the
settings under which the sampler's distribution is not the trainer's are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline import loop
from pipeline.cli import main
from pipeline.config import ModelConfig, PPOConfig, RecipeError
from pipeline.models import resolve_precision
from pipeline.onpolicy import (
    Generation, RolloutBatch, SamplingSettings, encode_prompts, hf_sample, logprobs_gap, logprobs_gap_due,
    recompute_logprobs, sample_responses,
)
from pipeline.rlmodels import PPOModels
from pipeline.stages.ppo import PPO, make_rollout

PREC = resolve_precision(ModelConfig(cpu_autocast="off"))  # fp32, no autocast
# Prompts of different lengths: the batch is left-padded (ragged).
PROMPTS = [{"prompt": [{"role": "user", "content": "hello world " * (1 + i % 4) + str(i)}]} for i in range(8)]


def eos_prone_model(tok, eos_bias: float = 2.0, seed: int = 0):
    """A tiny random model whose output layer has a bias towards EOS, so that sampled responses end at different
    lengths (a random 400-token model almost never samples EOS). Sampler and trainer share the layer."""
    model = build_tiny_model(tok, seed=seed)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tok.eos_token_id] = eos_bias
    model.lm_head = biased
    return model.eval()


def response_scores(model, q, qm, r, temperature):
    """logits / T that predict each response token, from one plain full-sequence forward (no pipeline code)."""
    ids = torch.cat([q, r], 1)
    att = torch.cat([qm.long(), torch.ones_like(r)], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits.float()
    P, T = q.shape[1], r.shape[1]
    return logits[:, P - 1:P + T - 1] / temperature


def independent_logprobs(model, q, qm, r, temperature):
    """log softmax(logits / T) at each response token: what the recorded log-probs are compared with."""
    return torch.log_softmax(response_scores(model, q, qm, r, temperature), -1).gather(-1, r.unsqueeze(-1))[..., 0]


# --------------------------------------------------------------------------------------------
# (a) the recorded log-probs equal the recompute in fp32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_recompute_in_fp32(temperature):
    tok = build_tiny_tokenizer()
    model = eos_prone_model(tok)
    q, qm = encode_prompts(tok, PROMPTS, "cpu")
    assert (qm == 0).any()  # left padding present
    settings = SamplingSettings(max_new_tokens=12, temperature=temperature)
    torch.manual_seed(3)
    r, m, ended, lp = sample_responses(model, tok, q, qm, settings, with_logprobs=True)
    # Recording does not change what is sampled: the same seed without it gives the same tokens.
    torch.manual_seed(3)
    r2, m2, ended2 = sample_responses(model, tok, q, qm, settings)
    assert torch.equal(r, r2) and torch.equal(m, m2)
    lengths = m.sum(1)
    assert ended.any() and not ended.all(), lengths  # ragged: some rows stop at EOS, some run to the end
    assert lengths.min() < lengths.max()
    assert lp.shape == r.shape and lp.dtype == torch.float32
    assert (lp[~m] == 0).all()  # nothing after the first EOS
    assert (lp[m] < 0).all()
    batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=m, logprobs=None, ended=ended)
    rec = recompute_logprobs(model, batch, temperature, micro_batch_size=3)
    assert (lp - rec)[m].abs().max() < 1e-4
    own = independent_logprobs(model, q, qm, r, temperature)
    assert (lp - own)[m].abs().max() < 1e-4
    # The EOS tokens themselves are counted and matched.
    eos_at = (r == tok.eos_token_id) & m
    assert eos_at.any() and (lp - own)[eos_at].abs().max() < 1e-4


def test_recorded_logprobs_are_the_untruncated_distribution_and_the_engine_passes_them():
    """With top-k the record is still softmax(logits / T) over the whole vocabulary (the trainer's), which is
    why `logprobs_from: sampler` refuses top-k: the behaviour policy would be the truncated one. The `hf` engine
    (with a seed, as `Generation` chunks call it) returns the same four tensors."""
    tok = build_tiny_tokenizer()
    model = eos_prone_model(tok)
    q, qm = encode_prompts(tok, PROMPTS[:4], "cpu")
    settings = SamplingSettings(max_new_tokens=8, temperature=0.9, top_k=5)
    r, m, ended, lp = hf_sample(model, tok, q, qm, settings, None, None, seed=11, with_logprobs=True)
    z = response_scores(model, q, qm, r, 0.9)
    full = torch.log_softmax(z, -1).gather(-1, r.unsqueeze(-1))[..., 0]
    top5 = z.topk(5, dim=-1).values
    truncated = z.gather(-1, r.unsqueeze(-1))[..., 0] - torch.logsumexp(top5, -1)  # what top-5 sampled from
    assert (r.unsqueeze(-1) == z.topk(5, dim=-1).indices).any(-1)[m].all()  # every sampled token is in the top 5
    assert (lp - full)[m].abs().max() < 1e-4
    assert (truncated - lp)[m].min() > 1e-3  # the truncated distribution's log-probs are not what is recorded
    r2, m2, _ = hf_sample(model, tok, q, qm, settings, None, None, seed=11)
    assert torch.equal(r, r2)


def test_logprobs_gap_figures_and_schedule():
    s = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    r = torch.tensor([[-1.1, -1.8, -9.0], [-0.5, 5.0, 5.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    g = logprobs_gap(s, r, m)
    assert g["max_abs"] == pytest.approx(0.2)
    assert g["mean_abs"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    assert g["mean"] == pytest.approx((0.1 - 0.2 + 0.0) / 3)
    assert logprobs_gap(s, r, torch.zeros_like(m)) == {}
    assert [it for it in range(1, 12) if logprobs_gap_due(it, 5)] == [1, 5, 10]
    assert not any(logprobs_gap_due(it, 0) for it in range(1, 12))


# --------------------------------------------------------------------------------------------
# (b) PPO with `logprobs_from: sampler` logs the gap, and the logged rows are within it
# --------------------------------------------------------------------------------------------


class CountE:
    def score(self, rows, texts):
        return torch.tensor([t.count("e") / 4 for t in texts], dtype=torch.float32)


def tiny_ppo_models():
    tok = build_tiny_tokenizer()
    policy = eos_prone_model(tok)
    return PPOModels(policy=policy, tokenizer=tok, reference=copy.deepcopy(policy).requires_grad_(False), critic=None)


def ppo_cfg(**kw):
    base = dict(iterations=3, rollout_batch_size=4, samples_per_prompt=1, minibatch_size=4, micro_batch_size=2,
                epochs=1, lr=1e-2, max_new_tokens=8, temperature=0.8, lora=None, advantage="reinforce",
                log_samples_every=0, checkpoint_every=0, logprobs_gap_every=1, logprobs_gap_rows=3)
    base.update(kw)
    return PPOConfig(**base)


def test_ppo_with_sampler_logprobs_logs_a_gap_that_bounds_the_recompute(tmp_path):
    torch.manual_seed(0)
    models = tiny_ppo_models()
    cfg = ppo_cfg(logprobs_from="sampler")
    algo = PPO(models, CountE(), PROMPTS, cfg, PREC, seed=0)
    seen = []
    collect = algo.collect

    def spy(it, warmup, generation, timer):
        batch, info = collect(it, warmup, generation, timer)
        n = cfg.logprobs_gap_rows
        # The policy before this iteration's update: recompute the logged rows here, independently.
        own = independent_logprobs(models.policy, batch.query_ids[:n], batch.query_mask[:n],
                                   batch.response_ids[:n], cfg.temperature)
        seen.append((batch.logprobs[:n].clone(), own, batch.response_mask[:n].clone(),
                     batch.logprobs is batch.sampler_logprobs))
        return batch, info

    algo.collect = spy
    hist = loop.train(algo, tmp_path, progress=False)
    assert len(hist) == len(seen) == 3
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for h, row, (sampler, own, mask, is_behaviour) in zip(hist, logged, seen):
        assert is_behaviour  # the sampler's log-probs are the behaviour log-probs
        for k in ("mean_abs", "max_abs", "mean"):
            assert f"ppo/logprobs_gap/{k}" in h and f"ppo/logprobs_gap/{k}" in row
        max_abs = h["ppo/logprobs_gap/max_abs"]
        assert 0 <= h["ppo/logprobs_gap/mean_abs"] <= max_abs < 1e-4  # fp32: the same numbers up to rounding
        assert abs(h["ppo/logprobs_gap/mean"]) <= h["ppo/logprobs_gap/mean_abs"]
        assert (sampler - own)[mask].abs().max() <= max_abs + 1e-6


def test_recompute_also_logs_the_gap_on_its_iterations_only(tmp_path):
    torch.manual_seed(0)
    cfg = ppo_cfg(logprobs_gap_every=2, iterations=3)
    hist = loop.train(PPO(tiny_ppo_models(), CountE(), PROMPTS, cfg, PREC, seed=0), tmp_path, progress=False)
    has = ["ppo/logprobs_gap/max_abs" in h for h in hist]
    assert has == [True, True, False]  # iteration 1 and every 2nd
    assert hist[0]["ppo/logprobs_gap/max_abs"] < 1e-4
    cfg = ppo_cfg(logprobs_gap_every=0, iterations=1)
    hist = loop.train(PPO(tiny_ppo_models(), CountE(), PROMPTS, cfg, PREC, seed=0), tmp_path / "never",
                      progress=False)
    assert not any(k.startswith("ppo/logprobs_gap/") for k in hist[0])


# --------------------------------------------------------------------------------------------
# (c) refused: sampler with top-k / top-p (and where it does not apply)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def recipe_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n' * 3)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))

    def write(ppo_extra: str) -> str:
        (tmp_path / "r.yaml").write_text(
            "run: {name: t, output_dir: out}\nmodel: {name_or_path: m}\nstages: [ppo]\n"
            f"ppo: {{policy_from: base, reward_from: m, prompts: prompts.jsonl, {ppo_extra}}}\n")
        return "r.yaml"

    return write


@pytest.mark.parametrize("extra, expect", [
    ("logprobs_from: sampler, top_k: 5", ["`ppo.logprobs_from: sampler`", "`ppo.top_k: 5`", "`ppo.top_k: 0`"]),
    ("logprobs_from: sampler, top_p: 0.9", ["`ppo.logprobs_from: sampler`", "`ppo.top_p: 0.9`", "`ppo.top_p: 1.0`"]),
    ("logprobs_from: sampler, rollout_engine: vllm", ["`ppo.logprobs_from: sampler`", "`ppo.rollout_engine: hf`"]),
    ("logprobs_from: sampled", ["'recompute', 'sampler'", "Did you mean 'sampler'"]),
    ("logprobs_gap_rows: 0", ["`ppo.logprobs_gap_rows` must be >= 1"]),
])
def test_validate_refuses_sampler_logprobs_that_are_not_the_behaviour_policys(recipe_env, capsys, extra, expect):
    code = main(["validate", recipe_env(extra)])
    out = capsys.readouterr()
    text = out.err + out.out
    assert code == 2, text
    assert text.startswith("error: ") and "Traceback" not in text, text
    for piece in expect:
        assert piece in text, (piece, text)


def test_validate_accepts_sampler_logprobs_with_full_sampling(recipe_env, capsys):
    code = main(["validate", recipe_env("logprobs_from: sampler, temperature: 0.7")])
    text = "".join(capsys.readouterr())
    assert "logprobs_from" not in text, text
    assert code == 0, text


def test_the_loop_refuses_sampler_logprobs_set_after_parsing_or_without_an_engine_that_returns_them(tmp_path,
                                                                                                      monkeypatch):
    cfg = ppo_cfg(logprobs_from="sampler")
    cfg.top_k = 5  # changed after the config was built: the loop checks again before any compute
    with pytest.raises(RecipeError, match=r"`ppo.top_k: 5`"):
        loop.train(PPO(tiny_ppo_models(), CountE(), PROMPTS, cfg, PREC), tmp_path, progress=False)

    def ids_only(model, tok, q, qm, settings, autocast=None, vocab_size=None, seed=None):
        return hf_sample(model, tok, q, qm, settings, autocast, vocab_size, seed)

    monkeypatch.setattr(loop, "rollout_engine", lambda *a, **k: ids_only)
    with pytest.raises(RecipeError, match="returns none"):
        loop.train(PPO(tiny_ppo_models(), CountE(), PROMPTS, ppo_cfg(logprobs_from="sampler"), PREC),
                   tmp_path / "b", progress=False)
    # With `recompute`, an engine without log-probs still runs: the gap is simply not logged.
    hist = loop.train(PPO(tiny_ppo_models(), CountE(), PROMPTS, ppo_cfg(iterations=1), PREC), tmp_path / "c",
                      progress=False)
    assert "ppo/logprobs_gap/max_abs" not in hist[0] and "ppo/loss" in hist[0]


def test_distillation_refuses_the_option():
    from pipeline.config import DistillConfig

    with pytest.raises(RecipeError, match=r"`distill.logprobs_from: sampler` is not used by distillation"):
        DistillConfig(logprobs_from="sampler")


# --------------------------------------------------------------------------------------------
# (d) one forward less
# --------------------------------------------------------------------------------------------


def count_full_forwards(model, mode: str, gap: bool) -> tuple[int, RolloutBatch, dict]:
    """Policy forwards over whole sequences (prompt + response), i.e. the training forward; generate's own
    are the prompt (prefill) and one token at a time."""
    from pipeline.onpolicy import Throughput

    tok = build_tiny_tokenizer()
    reference = copy.deepcopy(model).requires_grad_(False)  # its forwards are not the policy's
    models = PPOModels(policy=model, tokenizer=tok, reference=reference, critic=None)
    calls = []

    def hook(module, args, kwargs):
        calls.append(kwargs["input_ids"].shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cfg = ppo_cfg(logprobs_from=mode, micro_batch_size=2, logprobs_gap_rows=3)
        torch.manual_seed(5)
        batch, info = make_rollout(models, CountE(), PROMPTS[:4], cfg, 0.05, PREC, Throughput(),
                                   generation=Generation(), measure_gap=gap)
    finally:
        handle.remove()
    full = batch.query_ids.shape[1] + batch.response_ids.shape[1]
    return sum(n == full for n in calls), batch, info


def test_sampler_mode_skips_the_recompute_forward():
    tok = build_tiny_tokenizer()
    model = eos_prone_model(tok)
    n_recompute, b1, _ = count_full_forwards(model, "recompute", gap=False)
    n_sampler, b2, info = count_full_forwards(model, "sampler", gap=False)
    assert torch.equal(b1.response_ids, b2.response_ids)  # the same samples either way
    assert n_recompute == 2  # 4 rows in micro-batches of 2
    assert n_sampler == 0
    assert not any(k.startswith("ppo/logprobs_gap/") for k in info["stats"])
    # The behaviour log-probs agree (fp32), so the KL penalty and advantages see the same numbers.
    assert (b1.logprobs - b2.logprobs)[b1.response_mask].abs().max() < 1e-4
    # On a gap iteration the sampler mode recomputes only the gap's 3 rows (2 micro-batches of at most 2).
    n_gap, _, info = count_full_forwards(model, "sampler", gap=True)
    assert n_gap == 2 and "ppo/logprobs_gap/max_abs" in info["stats"]
