"""Recipe options that no recipe sets, each checked by its effect (GitHub issue #17: "options that no recipe and no
test uses get a test or go"). Every test here fails when its option is ignored: the Trainer stages are stopped at
their Trainer and the arguments they built are read (and, where cheap, the real Trainer built from them); the PPO
options change a loss, a reward, a gradient or the KL coefficient of tiny random models; the upload flag reaches a
stubbed Hub client; `model.trust_remote_code` reaches a recorded `from_pretrained`."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, write_jsonl
from pipeline.config import ModelConfig, PPOConfig, parse_recipe
from pipeline.models import resolve_precision

PREC = resolve_precision(ModelConfig(cpu_autocast="off"))
PROMPTS = [{"prompt": [{"role": "user", "content": f"hello world {i}"}]} for i in range(8)]


@pytest.fixture(autouse=True)
def _close_loggers(monkeypatch):
    # The stages point the Trainer's TensorBoard writer at their directory through this variable: restore it.
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unused")
    yield
    from pipeline.utils import close_metrics_loggers

    close_metrics_loggers()


class Captured(Exception):
    """Raised by a stand-in Trainer class: carries the keyword arguments the stage built."""

    def __init__(self, kwargs):
        super().__init__("trainer captured")
        self.kwargs = kwargs


def _capture(**kwargs):
    raise Captured(kwargs)


def _recipe(tmp_path, model_dir, stage: str, section: dict, model: dict | None = None):
    return parse_recipe({
        "run": {"name": "t", "output_dir": str(tmp_path / "out"), "seed": 0, "report_to": "none"},
        "model": {"name_or_path": str(model_dir), "cpu_autocast": "off", **(model or {})},
        "stages": [stage],
        stage: section,
    })


# --------------------------------------------------------------------------------------------
# sft: grad_accum, group_by_length, warmup_ratio, weight_decay, eval_steps
# --------------------------------------------------------------------------------------------


def sft_trainer_kwargs(tmp_path, model_dir, monkeypatch, **sft) -> dict:
    from pipeline.stages import sft as sft_stage

    rows = [{"prompt": f"write about topic {i}", "completion": f"the answer {i} is" + " yes" * (i % 5)}
            for i in range(24)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    recipe = _recipe(tmp_path, model_dir, "sft", {"data": str(data), "lora": None, "batch_size": 4, **sft})
    with monkeypatch.context() as m, pytest.raises(Captured) as e:
        m.setattr("trl.SFTTrainer", _capture)
        sft_stage.run(recipe, tmp_path / "out" / "sft")
    return e.value.kwargs


def test_sft_trainer_options_reach_the_trainer(tmp_path, tiny_model_dir, monkeypatch):
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    default = sft_trainer_kwargs(tmp_path / "a", tiny_model_dir, monkeypatch)["args"]
    assert default.gradient_accumulation_steps == 1
    assert default.train_sampling_strategy == "group_by_length"
    assert default.get_warmup_steps(100) == 3  # warmup_ratio 0.03 of the steps
    assert default.weight_decay == 0.0
    assert default.eval_strategy == "epoch" and default.eval_steps is None  # eval_steps 0: once per epoch

    kw = sft_trainer_kwargs(tmp_path / "b", tiny_model_dir, monkeypatch, grad_accum=3, group_by_length=False,
                            warmup_ratio=0.25, weight_decay=0.1, eval_steps=7)
    args = kw["args"]
    assert args.gradient_accumulation_steps == 3
    assert args.train_sampling_strategy == "random"
    assert args.get_warmup_steps(100) == 25 and args.get_warmup_steps(8) == 2
    assert args.weight_decay == 0.1
    assert args.eval_strategy == "steps" and args.eval_steps == 7

    # What the Trainer makes of them: the weight decay is in the optimizer, batches are not length-grouped.
    trainer = SFTTrainer(**kw)
    assert not isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    assert trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps == 12
    opt = trainer.create_optimizer()
    assert max(g["weight_decay"] for g in opt.param_groups) == 0.1


# --------------------------------------------------------------------------------------------
# reward: grad_accum, group_by_length, use_margin
# --------------------------------------------------------------------------------------------


def reward_trainer_kwargs(tmp_path, model_dir, monkeypatch, model: dict | None = None, **reward) -> dict:
    from pipeline.stages import reward as reward_stage

    rows = [{"prompt": f"write about topic {i}", "chosen": f"the dog sleeps {i}" + " good" * (i % 4),
             "rejected": f"no bad {i}", "margin": 2.0 + i % 3} for i in range(16)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe = _recipe(tmp_path, model_dir, "reward", {"data": str(data), "init_from": "base", "lora": None,
                                                      "eval_fraction": 0.0, "batch_size": 4, **reward}, model)
    with monkeypatch.context() as m, pytest.raises(Captured) as e:
        m.setattr("trl.RewardTrainer", _capture)
        reward_stage.run(recipe, tmp_path / "out" / "reward")
    return e.value.kwargs


def _first_batch_loss(kwargs):
    """(the trainer's training loss, the Bradley-Terry loss with and without the batch's margins) on one batch
    of the real RewardTrainer built from the stage's arguments."""
    from trl import RewardTrainer

    from pipeline.rewards import bradley_terry_loss

    trainer = RewardTrainer(**kwargs)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    rc, rr = scores.chunk(2)
    margin = batch.get("margin")
    with_margin = bradley_terry_loss(rc, rr, margin) if margin is not None else None
    return trainer, loss, with_margin, bradley_terry_loss(rc, rr)


def test_reward_trainer_options_reach_the_trainer(tmp_path, tiny_model_dir, monkeypatch):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    kw = reward_trainer_kwargs(tmp_path / "a", tiny_model_dir, monkeypatch, center_coef=0.0)
    assert kw["args"].gradient_accumulation_steps == 1 and kw["args"].train_sampling_strategy == "group_by_length"
    # use_margin (default true) with a margin column: the rows carry it and TRL's loss subtracts it.
    assert kw["train_dataset"]["margin"][:3] == [2.0, 3.0, 4.0]
    trainer, loss, with_margin, plain = _first_batch_loss(kw)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    torch.testing.assert_close(loss, with_margin, atol=1e-5, rtol=1e-5)
    assert loss > plain + 0.5  # margins of 2-4 make the pairs much harder to satisfy

    kw = reward_trainer_kwargs(tmp_path / "b", tiny_model_dir, monkeypatch, center_coef=0.0, use_margin=False,
                               grad_accum=2, group_by_length=False)
    assert kw["args"].gradient_accumulation_steps == 2 and kw["args"].train_sampling_strategy == "random"
    assert "margin" not in kw["train_dataset"].column_names
    trainer, loss, with_margin, plain = _first_batch_loss(kw)
    assert with_margin is None and not isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# model.trust_remote_code
# --------------------------------------------------------------------------------------------


def _record_from_pretrained(monkeypatch) -> list:
    import transformers

    seen = []
    for name in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained

        def recording(path, *args, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("trust_remote_code")))
            return _real(path, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    return seen


@pytest.mark.parametrize("trust", [True, False])
def test_trust_remote_code_reaches_every_loader(tmp_path, tiny_model_dir, monkeypatch, trust):
    """Policy, tokenizer and critic (PPO), the reward model as a scorer, and the reward stage's own model."""
    from pipeline.rewards import RewardModelScorer
    from pipeline.rlmodels import build_ppo_models

    seen = _record_from_pretrained(monkeypatch)
    recipe = _recipe(tmp_path, tiny_model_dir, "ppo",
                     {"prompts": "p.jsonl", "policy_from": str(tiny_model_dir), "critic_from": "policy",
                      "lora": None}, model={"trust_remote_code": trust})
    models = build_ppo_models(recipe, recipe.ppo, PREC)
    assert models.critic is not None
    RewardModelScorer(str(tiny_model_dir), recipe.model, PREC)
    names = [n for n, _ in seen]
    assert names == ["AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
                     "AutoTokenizer", "AutoModelForSequenceClassification"]
    assert all(flag is trust for _, flag in seen), seen
    if trust:  # the reward stage loads its model itself (one case is enough)
        del seen[:]
        reward_trainer_kwargs(tmp_path / "rm", tiny_model_dir, monkeypatch, model={"trust_remote_code": True})
        assert ("AutoModelForSequenceClassification", True) in seen
        assert all(flag is True for _, flag in seen), seen


# --------------------------------------------------------------------------------------------
# hub_private (sft, reward, ppo, distill)
# --------------------------------------------------------------------------------------------


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/x/commit/abc"})()


@pytest.mark.parametrize("stage,data_key", [("sft", "data"), ("reward", "data"), ("ppo", "prompts"),
                                            ("distill", "prompts")])
def test_hub_private_reaches_the_upload(tmp_path, monkeypatch, stage, data_key):
    from pipeline.hub import push_stage

    monkeypatch.setattr("pipeline.hub.hub_token", lambda: "hf_test")
    monkeypatch.setattr("pipeline.hub._hub_offline", lambda: False)
    for private in (True, False):
        hub = FakeHub()
        monkeypatch.setattr("pipeline.hub.hub_api", lambda: hub)
        section = {data_key: "x.jsonl", "push_to_hub": True, "hub_model_id": "me/x"}
        if not private:
            section["hub_private"] = False  # default: true
        recipe = _recipe(tmp_path, "base-model", stage, section)
        final = recipe.stage_dir(stage) / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "config.json").write_text("{}")
        push_stage(recipe, stage)
        assert hub.calls[0] == ("create_repo", {"repo_id": "me/x", "repo_type": "model", "private": private,
                                                "exist_ok": True})


# --------------------------------------------------------------------------------------------
# PPO: kl_estimator, kl_in, ent_coef, adaptive_kl / kl_target / kl_horizon, critic_max_grad_norm
# --------------------------------------------------------------------------------------------


class CountToken:
    """Toy reward: how often `e` appears in the response."""

    def score(self, rows, texts):
        return torch.tensor([t.count("e") / 4 for t in texts], dtype=torch.float32)


def ppo_cfg(**kw) -> PPOConfig:
    base = dict(iterations=1, rollout_batch_size=4, samples_per_prompt=1, minibatch_size=4, micro_batch_size=4,
                epochs=1, lr=1e-2, critic_lr=1e-2, max_new_tokens=6, lora=None, advantage="reinforce",
                log_samples_every=0, checkpoint_every=0, kl_coef=0.5)
    base.update(kw)
    return PPOConfig(**base)


def tiny_ppo_models(critic: bool = False, perturb_reference: bool = False):
    from transformers import LlamaForSequenceClassification

    from pipeline.rlmodels import PPOModels, ValueModel

    tok = build_tiny_tokenizer()
    policy = build_tiny_model(tok)
    reference = copy.deepcopy(policy).requires_grad_(False)
    if perturb_reference:  # a policy away from its reference: a KL that is not zero
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    value = None
    if critic:
        cfg = copy.deepcopy(policy.config)
        cfg.num_labels = 1
        value = ValueModel(LlamaForSequenceClassification(cfg))
    models = PPOModels(policy=policy, tokenizer=tok, reference=reference, critic=value)
    for m in (policy, reference, value):
        if m is not None:
            m.eval()
    return models


def synthetic_batch(B=4, T=5):
    """A rollout with hand-made behaviour and reference log-probs (one row ends early)."""
    from pipeline.onpolicy import RolloutBatch

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    batch = RolloutBatch(query_ids=torch.zeros(B, 1, dtype=torch.long), query_mask=torch.ones(B, 1, dtype=torch.long),
                         response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=mask,
                         logprobs=-2 * torch.rand(B, T, generator=g), ended=torch.ones(B, dtype=torch.bool))
    batch.ref_logprobs = -2 * torch.rand(B, T, generator=g)
    return batch


def _expected_rewards(batch, scores, per_token_kl, coef):
    mask = batch.response_mask
    rewards = torch.where(mask, -coef * per_token_kl, 0.0)
    last = mask.sum(-1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_sets_the_per_token_penalty_in_the_rewards(estimator):
    from pipeline.stages.ppo import assign_advantages

    batch = synthetic_batch()
    scores = torch.tensor([1.0, -0.5, 0.25, 2.0])
    assign_advantages(batch, scores, ppo_cfg(kl_estimator=estimator), kl_coef=0.5)
    log_r = batch.ref_logprobs - batch.logprobs
    by_hand = {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": log_r.exp() - 1 - log_r}
    torch.testing.assert_close(batch.rewards, _expected_rewards(batch, scores, by_hand[estimator], 0.5))
    for other in set(by_hand) - {estimator}:
        assert not torch.allclose(batch.rewards, _expected_rewards(batch, scores, by_hand[other], 0.5))


def test_kl_in_loss_takes_the_kl_out_of_the_rewards():
    from pipeline.stages.ppo import assign_advantages

    scores = torch.tensor([1.0, -0.5, 0.25, 2.0])
    in_reward, in_loss = synthetic_batch(), synthetic_batch()
    assign_advantages(in_reward, scores, ppo_cfg(kl_in="reward"), kl_coef=0.5)
    assign_advantages(in_loss, scores, ppo_cfg(kl_in="loss"), kl_coef=0.5)
    k1 = torch.where(in_reward.response_mask, in_reward.logprobs - in_reward.ref_logprobs, 0.0)
    torch.testing.assert_close(in_reward.rewards.sum(-1), scores - 0.5 * k1.sum(-1))
    torch.testing.assert_close(in_loss.rewards, _expected_rewards(in_loss, scores, torch.zeros(4, 5), 0.0))


def _rollout(models, n=4, T=6):
    """Random responses to the prompts, with the policy's and the reference's log-probs and random advantages."""
    from pipeline.onpolicy import RolloutBatch, encode_prompts, mask_after_eos, recompute_logprobs

    tok = models.tokenizer
    g = torch.Generator().manual_seed(0)
    q, qm = encode_prompts(tok, PROMPTS[:n], "cpu")
    r = torch.randint(3, len(tok), (n, T), generator=g)
    r[0, 3] = tok.eos_token_id
    mask, ended = mask_after_eos(r, tok.eos_token_id)
    batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=torch.where(mask, r, tok.pad_token_id),
                         response_mask=mask, logprobs=None, ended=ended, prompts=PROMPTS[:n])
    batch.logprobs = recompute_logprobs(models.policy, batch, 1.0, n)
    batch.ref_logprobs = recompute_logprobs(models.reference, batch, 1.0, n)
    batch.advantages = torch.randn(n, T, generator=g)
    return batch


def _loss_and_grads(models, cfg, batch, kl_coef=0.5):
    from pipeline.rl import FixedKLController
    from pipeline.stages.ppo import make_loss_fn

    models.policy.zero_grad(set_to_none=True)
    loss, stats = make_loss_fn(models, cfg, FixedKLController(kl_coef), PREC)(batch, float(batch.n_tokens))
    loss.backward()
    return loss.detach(), stats, [p.grad.clone() for p in models.policy.parameters()]


def test_kl_in_loss_adds_the_k3_term_to_the_loss():
    models = tiny_ppo_models(perturb_reference=True)
    batch = _rollout(models)
    in_reward, _, g_reward = _loss_and_grads(models, ppo_cfg(kl_in="reward"), batch)
    in_loss, _, g_loss = _loss_and_grads(models, ppo_cfg(kl_in="loss"), batch)
    log_r = torch.where(batch.response_mask, batch.ref_logprobs - batch.logprobs, 0.0)
    k3 = torch.where(batch.response_mask, log_r.exp() - 1 - log_r, 0.0)
    assert k3.sum() > 1e-3  # the reference really differs
    torch.testing.assert_close(in_loss - in_reward, 0.5 * k3.sum() / batch.n_tokens, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(g_reward, g_loss))


def test_ent_coef_subtracts_the_entropy_bonus():
    models = tiny_ppo_models()
    batch = _rollout(models)
    plain, stats, g_plain = _loss_and_grads(models, ppo_cfg(ent_coef=0.0), batch)
    bonus, _, g_bonus = _loss_and_grads(models, ppo_cfg(ent_coef=0.1), batch)
    assert stats["entropy"] > 1.0  # a random model over a 400-token vocabulary
    torch.testing.assert_close(bonus - plain, -0.1 * stats["entropy"], atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(g_plain, g_bonus))


def test_adaptive_kl_moves_the_coefficient_after_an_iteration(tmp_path):
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n = sequences in
    the rollout batch. The first iteration's policy is its reference (KL 0): error -0.2."""
    from pipeline import loop
    from pipeline.stages.ppo import PPO

    coefs = {}
    for adaptive in (False, True):
        torch.manual_seed(0)
        cfg = ppo_cfg(iterations=2, adaptive_kl=adaptive, kl_coef=0.1, kl_target=0.5, kl_horizon=8)
        hist = loop.train(PPO(tiny_ppo_models(), CountToken(), PROMPTS, cfg, PREC), tmp_path / str(adaptive),
                          progress=False)
        assert hist[0]["ppo/kl"] == 0.0
        coefs[adaptive] = [h["ppo/kl_coef"] for h in hist]
    assert coefs[False] == [0.1, 0.1]
    assert coefs[True][0] == 0.1 and coefs[True][1] == pytest.approx(0.1 * (1 - 0.2 * 4 / 8))


@pytest.mark.parametrize("target,horizon,kl,factor", [
    (1.0, 16, 1.1, 1 + 0.1 * 4 / 16),      # KL 10% above the target: +10% of n / horizon
    (6.0, 16, 1.1, 1 - 0.2 * 4 / 16),      # far below the target: the error is clipped to -0.2
    (1.0, 10000, 1.1, 1 + 0.1 * 4 / 10000),
])
def test_kl_target_and_horizon_set_the_adaptive_step(target, horizon, kl, factor):
    from pipeline.stages.ppo import PPO

    cfg = ppo_cfg(adaptive_kl=True, kl_coef=0.2, kl_target=target, kl_horizon=horizon)
    algo = PPO(tiny_ppo_models(), CountToken(), PROMPTS, cfg, PREC)
    algo.end_iteration({"ppo/kl": kl})
    assert algo.kl_ctl.value == pytest.approx(0.2 * factor, rel=1e-9)


def _grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


@pytest.mark.parametrize("critic_clip", [None, 1e-3])
def test_critic_max_grad_norm_clips_the_critic_alone(critic_clip):
    """After `optimise`, the gradients are the clipped ones the optimizers stepped with: the critic's norm is its
    own clip (`critic_max_grad_norm`, else `max_grad_norm`), the policy's is bounded by `max_grad_norm`."""
    from pipeline import loop
    from pipeline.onpolicy import UpdateSettings, optimise
    from pipeline.stages.ppo import PPO

    torch.manual_seed(0)
    models = tiny_ppo_models(critic=True)
    cfg = ppo_cfg(advantage="gae", max_grad_norm=0.5, critic_max_grad_norm=critic_clip)
    algo = PPO(models, CountToken(), PROMPTS, cfg, PREC)
    updaters = algo.setup(loop.Process(None, 1, 0), 0)
    batch, _ = algo.collect(1, False, loop.Generation(), loop.Throughput())
    batch.returns = batch.returns + 100.0  # a critic far from the returns: a large value-loss gradient
    out = optimise(batch, algo.loss_fn(False, batch), updaters, None,
                   UpdateSettings(1, len(batch), len(batch), cfg.max_grad_norm), torch.Generator().manual_seed(0))
    assert out["optimizer_steps"] == 1 and out["critic_grad_norm"] > 1.0
    critic_params = [p for p in models.critic.parameters() if p.requires_grad]
    assert _grad_norm(critic_params) == pytest.approx(critic_clip or 0.5, rel=1e-3)
    assert _grad_norm(list(models.policy.parameters())) == pytest.approx(min(out["grad_norm"], 0.5), rel=1e-3)


# --------------------------------------------------------------------------------------------
# max_nonfinite_steps (ppo, distill)
# --------------------------------------------------------------------------------------------


def _nan_losses(algo) -> list:
    """Make every loss of `algo` NaN (its gradients too); returns the list of iterations collected."""
    real_loss, real_collect, collected = algo.loss_fn, algo.collect, []

    def loss_fn(warmup, batch):
        fn = real_loss(warmup, batch)

        def nan(mb, n_tokens):
            loss, stats = fn(mb, n_tokens)
            return loss * float("nan"), stats

        return nan

    def collect(it, *args):
        collected.append(it)
        return real_collect(it, *args)

    algo.loss_fn, algo.collect = loss_fn, collect
    return collected


def _distill_algo(**kw):
    from pipeline.config import DistillConfig, KeepLayersConfig, StudentConfig
    from pipeline.models import student_from_teacher
    from pipeline.stages.distill import Distill, DistillModels

    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=2).eval().requires_grad_(False)
    student = student_from_teacher(teacher, "every_2nd").eval()
    models = DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok))
    cfg = DistillConfig(student=StudentConfig(from_teacher=KeepLayersConfig("every_2nd")), rollout_batch_size=4,
                        minibatch_size=4, micro_batch_size=4, max_new_tokens=4, checkpoint_every=0,
                        log_samples_every=0, **kw)
    return Distill(models, PROMPTS, cfg, PREC, seed=0)


@pytest.mark.parametrize("stage,limit", [("ppo", 1), ("ppo", 2), ("distill", 2)])
def test_max_nonfinite_steps_stops_after_that_many_iterations(tmp_path, stage, limit):
    from pipeline import loop
    from pipeline.stages.ppo import PPO

    torch.manual_seed(0)
    if stage == "ppo":
        algo = PPO(tiny_ppo_models(), CountToken(), PROMPTS, ppo_cfg(iterations=6, max_nonfinite_steps=limit), PREC)
    else:
        algo = _distill_algo(iterations=6, max_nonfinite_steps=limit)
    collected = _nan_losses(algo)
    with pytest.raises(FloatingPointError, match=rf"{stage}: {limit} iterations in a row with non-finite gradients"):
        loop.train(algo, tmp_path, progress=False)
    assert collected == list(range(1, limit + 1))
    trained = next(iter(algo.checkpoint_models().values()))
    assert all(torch.isfinite(p).all() for p in trained.parameters())  # no NaN step reached the weights
