"""The one on-policy loop (`pipeline/loop.py`): PPO and distillation through the same function, the update's
early stop on approx KL (also across processes), and PPO's separate actor / critic updates and critic warm-up."""

import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import build_tiny_model, build_tiny_tokenizer
from pipeline import loop
from pipeline.config import DistillConfig, KeepLayersConfig, LoraConfig, ModelConfig, PPOConfig, StudentConfig
from pipeline.models import resolve_precision, student_from_teacher
from pipeline.onpolicy import RolloutBatch, UpdateSettings, Updater, optimise
from pipeline.rl import explained_variance
from pipeline.stages.distill import Distill, DistillModels
from pipeline.stages.ppo import PPO, make_loss_fn

from test_ppo import PROMPTS, CountToken, tiny_models

PREC = resolve_precision(ModelConfig(cpu_autocast="off"))


def ppo_cfg(**kw):
    base = dict(iterations=2, rollout_batch_size=4, samples_per_prompt=2, minibatch_size=4, micro_batch_size=4,
                epochs=1, lr=1e-2, critic_lr=1e-2, max_new_tokens=6, lora=None, advantage="gae",
                log_samples_every=1, checkpoint_every=0)
    base.update(kw)
    return PPOConfig(**base)


def distill_algo():
    tok = build_tiny_tokenizer()
    teacher = build_tiny_model(tok, n_layers=4).eval().requires_grad_(False)
    student = student_from_teacher(teacher, "every_2nd").eval()
    models = DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok))
    cfg = DistillConfig(student=StudentConfig(from_teacher=KeepLayersConfig("every_2nd")), iterations=2,
                        rollout_batch_size=4, minibatch_size=4, micro_batch_size=2, max_new_tokens=6, lr=1e-2,
                        beta=0.5, checkpoint_every=0, log_samples_every=1)
    return Distill(models, PROMPTS, cfg, PREC, seed=0), student


def test_ppo_and_distillation_run_through_the_same_loop_function(tmp_path):
    """One function, `loop.train`, runs both algorithms: each trains its model, logs under its own prefix and
    writes samples; the loop adds the shared bookkeeping (loss, grad norm, timings) to both."""
    torch.manual_seed(0)
    models = tiny_models("gae")
    ppo = PPO(models, CountToken(), PROMPTS, ppo_cfg(), PREC, seed=0)
    distill, student = distill_algo()
    before = {"ppo": [p.detach().clone() for p in models.policy.parameters()],
              "distill": [p.detach().clone() for p in student.parameters()]}
    hist = {"ppo": loop.train(ppo, tmp_path / "ppo", progress=False),
            "distill": loop.train(distill, tmp_path / "distill", progress=False)}
    after = {"ppo": list(models.policy.parameters()), "distill": list(student.parameters())}
    for name in ("ppo", "distill"):
        assert len(hist[name]) == 2
        assert any(not torch.equal(a, b) for a, b in zip(before[name], after[name])), name
        for key in ("loss", "grad_norm", "tokens_per_s", "time_train_s", "optimizer_steps", "skipped_steps"):
            assert f"{name}/{key}" in hist[name][-1], (name, key)
        assert (tmp_path / name / "metrics.jsonl").exists() and (tmp_path / name / "samples.jsonl").exists()
    assert "ppo/critic_grad_norm" in hist["ppo"][-1] and "ppo/explained_variance" in hist["ppo"][-1]
    assert "distill/reverse_kl" in hist["distill"][-1]


# --------------------------------------------------------------------------------------------
# Early stop on approx KL
# --------------------------------------------------------------------------------------------


class StepKL:
    """A loss whose reported approx KL grows with each minibatch: `slope * minibatch index + offset` on every row
    (the offset differs per process in the multi-process test). `nonfinite_at`: that minibatch's gradient is NaN."""

    def __init__(self, w, slope=0.1, offset=0.0, nonfinite_at=None):
        self.w, self.slope, self.offset, self.nonfinite_at, self.calls = w, slope, offset, nonfinite_at, 0

    def __call__(self, mb, n_tokens):
        k = self.calls
        self.calls += 1
        scale = float("nan") if k == self.nonfinite_at else 1.0
        loss = (self.w * mb.response_mask.float().sum()) * scale / n_tokens
        return loss, {"approx_kl": torch.tensor(self.slope * k + self.offset)}


def toy_batch(B=8, T=3):
    return RolloutBatch(query_ids=torch.zeros(B, 1, dtype=torch.long), query_mask=torch.ones(B, 1, dtype=torch.long),
                        response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=torch.ones(B, T, dtype=torch.bool),
                        logprobs=torch.zeros(B, T), ended=torch.ones(B, dtype=torch.bool))


def run_step_kl(target, nonfinite_at=None, batch=None, minibatch=2, accelerator=None, offset=0.0):
    w = torch.nn.Parameter(torch.tensor(1.0))
    loss = StepKL(w, offset=offset, nonfinite_at=nonfinite_at)
    out = optimise(batch or toy_batch(), loss, [Updater("policy", torch.optim.SGD([w], lr=0.1), [w])], None,
                   UpdateSettings(epochs=2, minibatch_size=minibatch, micro_batch_size=minibatch, max_grad_norm=1e9,
                                  target_approx_kl=target), torch.Generator().manual_seed(0), accelerator)
    return out, loss.calls


def test_target_approx_kl_stops_the_epochs():
    # 8 rows in minibatches of 2, 2 epochs = 8 minibatches; approx KL 0.0, 0.1, 0.2, ... passes 0.15 at the third.
    out, calls = run_step_kl(None)
    assert (calls, out["optimizer_steps"], out["early_stop"]) == (8, 8, 0.0)
    out, calls = run_step_kl(0.15)
    assert (calls, out["optimizer_steps"], out["early_stop"]) == (3, 3, 1.0)


def test_a_skipped_minibatch_still_checks_the_early_stop():
    # The third minibatch (approx KL 0.2 > 0.15) has a NaN gradient: its step is skipped, and the epochs stop there.
    out, calls = run_step_kl(0.15, nonfinite_at=2)
    assert (calls, out["optimizer_steps"], out["skipped_steps"], out["early_stop"]) == (3, 2, 1, 1.0)


def test_ppo_target_approx_kl_reaches_the_update(tmp_path):
    """The PPO loss reports `approx_kl` under the name `optimise` reads (it used to be `ppo/approx_kl`, so the
    target never fired): a tiny target stops every iteration after its first minibatch."""
    torch.manual_seed(0)
    cfg = ppo_cfg(advantage="rloo", epochs=3, minibatch_size=2, target_approx_kl=1e-12, iterations=1)
    hist = loop.train(PPO(tiny_models("rloo"), CountToken(), PROMPTS, cfg, PREC), tmp_path, progress=False)
    assert hist[-1]["ppo/early_stop"] == 1.0 and hist[-1]["ppo/optimizer_steps"] < 12


class GlooAccelerator:
    """The few accelerate calls `optimise` makes, over a gloo process group (no DDP wrapping needed here)."""

    device = torch.device("cpu")

    def __init__(self, world):
        self.num_processes = world

    def reduce(self, t, reduction="sum"):
        dist.all_reduce(t)
        return t

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()


def _two_process_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Each process holds half of the 8 rows; its local approx KL is off by +/-0.04, the mean is the 1-process one.
        out, calls = run_step_kl(0.15, batch=toy_batch(B=4), minibatch=1, accelerator=GlooAccelerator(2),
                                 offset=0.04 if rank == 0 else -0.04)
        queue.put((rank, calls, out["early_stop"]))
    finally:
        dist.destroy_process_group()


def test_one_and_two_processes_stop_at_the_same_minibatch():
    """The decision uses the approx KL averaged over processes, so every process stops at the minibatch the
    single process stops at. (Deciding on the local value, rank 0 would stop one minibatch earlier, here at
    0.24 > 0.15 instead of 0.16 < 0.15 on rank 1, and DDP would hang in the next all-reduce.)"""
    single, _ = run_step_kl(0.15)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_process_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [calls for _, calls, _ in results] == [3, 3] == [single["optimizer_steps"]] * 2
    assert all(stop == 1.0 for _, _, stop in results)


# --------------------------------------------------------------------------------------------
# PPO: separate actor and critic updates, critic warm-up, value diagnostics
# --------------------------------------------------------------------------------------------


def policy_after_one_update(critic_optimizer: str, vf_coef: float):
    torch.manual_seed(0)
    models = tiny_models("gae")
    cfg = ppo_cfg(critic_optimizer=critic_optimizer, vf_coef=vf_coef, max_grad_norm=0.5)
    algo = PPO(models, CountToken(), PROMPTS, cfg, PREC, seed=0)
    updaters = algo.setup(loop.Process(None, 1, 0), 0)
    torch.manual_seed(1)
    batch, _ = algo.collect(1, False, loop.Generation(), loop.Throughput())
    batch.returns = batch.returns + 1000.0  # a critic far from the returns: a huge value-loss gradient
    out = optimise(batch, make_loss_fn(models, cfg, algo.kl_ctl, PREC), updaters, None,
                   UpdateSettings(1, 8, 8, cfg.max_grad_norm), torch.Generator().manual_seed(0))
    return [p.detach().clone() for p in models.policy.parameters()], out


def test_a_huge_critic_gradient_leaves_the_policy_step_unchanged():
    small, out_small = policy_after_one_update("separate", vf_coef=1e-6)
    huge, out_huge = policy_after_one_update("separate", vf_coef=1e6)
    assert all(torch.equal(a, b) for a, b in zip(small, huge))
    assert out_huge["critic_grad_norm"] > 1e3 * out_small["critic_grad_norm"]
    assert out_huge["grad_norm"] == out_small["grad_norm"]
    # With one optimizer and one clip over both (the old behaviour), the critic's gradient shrinks the policy's step.
    shared_small, _ = policy_after_one_update("shared", vf_coef=1e-6)
    shared_huge, _ = policy_after_one_update("shared", vf_coef=1e6)
    assert any(not torch.equal(a, b) for a, b in zip(shared_small, shared_huge))


def test_critic_warmup_leaves_the_policy_bit_identical(tmp_path):
    torch.manual_seed(0)
    models = tiny_models("gae")
    policy0 = copy.deepcopy(models.policy.state_dict())
    critic0 = copy.deepcopy(models.critic.state_dict())
    cfg = ppo_cfg(critic_warmup=2, iterations=0)
    hist = loop.train(PPO(models, CountToken(), PROMPTS, cfg, PREC), tmp_path, progress=False)
    assert len(hist) == 2 and all(h["ppo/warmup"] == 1.0 for h in hist)
    assert all(torch.equal(v, models.policy.state_dict()[k]) for k, v in policy0.items())
    assert any(not torch.equal(v, models.critic.state_dict()[k]) for k, v in critic0.items())
    assert "ppo/critic_grad_norm" in hist[-1] and "ppo/clipfrac" not in hist[-1]


def test_explained_variance_against_a_hand_computation():
    # R = [1, 2, 3], V = [1.5, 2, 2.5]: Var[R] = 2/3, R - V = [-0.5, 0, 0.5], Var = 1/6 -> 1 - (1/6)/(2/3) = 0.75.
    mask = torch.tensor([[True, True, True, False]])
    ev = explained_variance(torch.tensor([[1.5, 2.0, 2.5, 9.0]]), torch.tensor([[1.0, 2.0, 3.0, -9.0]]), mask)
    assert ev.item() == pytest.approx(0.75, abs=1e-6)


# --------------------------------------------------------------------------------------------
# logits_chunk_size: the stages' losses without the full logits
# --------------------------------------------------------------------------------------------


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("chunk", [5, 1000])
def test_ppo_loss_and_gradient_are_the_same_with_chunked_logits(chunk):
    torch.manual_seed(0)
    models = tiny_models("rloo")
    algo = PPO(models, CountToken(), PROMPTS, ppo_cfg(advantage="rloo"), PREC)
    torch.manual_seed(1)
    batch, _ = algo.collect(1, False, loop.Generation(), loop.Throughput())
    out = {}
    for c in (0, chunk):
        cfg = ppo_cfg(advantage="rloo", logits_chunk_size=c, ent_coef=0.01)
        models.policy.zero_grad(set_to_none=True)
        loss, stats = make_loss_fn(models, cfg, algo.kl_ctl, PREC)(batch, float(batch.n_tokens))
        loss.backward()
        out[c] = (loss.detach(), stats["entropy"], _grads(models.policy))
    assert torch.allclose(out[0][0], out[chunk][0], atol=1e-6)
    assert torch.allclose(out[0][1], out[chunk][1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][2], out[chunk][2]))
    assert len(out[0][2]) == len(out[chunk][2]) > 0


def test_distill_full_loss_gradient_and_recorded_kls_are_the_same_with_chunked_logits():
    from pipeline.stages.distill import StateStats, make_loss_fn as distill_loss_fn, make_rollout

    algo, student = distill_algo()
    torch.manual_seed(2)
    batch, _ = make_rollout(algo.models, PROMPTS[:6], algo.cfg, 0.5, PREC, loop.Throughput(),
                            torch.Generator().manual_seed(0), student_pass=False)
    out = {}
    for c in (0, 7):
        cfg = copy.copy(algo.cfg)
        cfg.logits_chunk_size = c
        recorder = StateStats(batch)
        student.zero_grad(set_to_none=True)
        loss, _ = distill_loss_fn(algo.models, cfg, PREC, recorder)(batch, float(batch.n_tokens))
        loss.backward()
        out[c] = (loss.detach(), _grads(student), recorder.reverse_kl, recorder.entropy)
    assert torch.allclose(out[0][0], out[7][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][1], out[7][1]))
    assert torch.allclose(out[0][2], out[7][2], atol=1e-5) and torch.allclose(out[0][3], out[7][3], atol=1e-5)


@pytest.mark.parametrize("critic_from", ["policy", "shared"])
def test_accumulation_invariance_covers_the_actor_and_the_critic(critic_from):
    """PPO's real loss (clipped surrogate + value loss) with separate actor / critic updaters: one minibatch of 8 in
    one micro-batch or in 4 of 2 gives the same policy and critic weights (each clipped by its own norm), with the
    critic on its own backbone or a head on the policy's."""
    out = []
    for micro in (8, 2):
        torch.manual_seed(0)
        models = tiny_models("gae", critic_from=critic_from)
        if critic_from == "shared":
            torch.nn.init.normal_(models.critic.head.weight, std=0.1)  # so the value loss reaches the backbone
        cfg = ppo_cfg(micro_batch_size=micro, max_grad_norm=0.05, critic_max_grad_norm=0.05)
        algo = PPO(models, CountToken(), PROMPTS, cfg, PREC, seed=0)
        updaters = algo.setup(loop.Process(None, 1, 0), 0)
        torch.manual_seed(1)
        batch, _ = algo.collect(1, False, loop.Generation(), loop.Throughput())
        optimise(batch, make_loss_fn(models, cfg, algo.kl_ctl, PREC), updaters, None,
                 UpdateSettings(1, 8, micro, cfg.max_grad_norm), torch.Generator().manual_seed(0))
        out.append([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (models.policy, models.critic)])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# critic_from: shared (a value head on the policy's own hidden states)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_a_shared_value_head_trains_through_the_loop_and_checkpoints_the_head_alone(tmp_path, lora):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    models = tiny_models("gae", lora=lora, critic_from="shared")
    head0 = copy.deepcopy(models.critic.state_dict())
    policy0 = [p.detach().clone() for p in models.policy.parameters()]
    cfg = ppo_cfg(iterations=3, checkpoint_every=2, lora=LoraConfig(r=4, alpha=8, dropout=0.0) if lora else None)
    hist = loop.train(PPO(models, CountToken(), PROMPTS, cfg, PREC), tmp_path, progress=False)
    assert len(hist) == 3 and "ppo/explained_variance" in hist[-1] and "ppo/critic_grad_norm" in hist[-1]
    assert any(not torch.equal(v, models.critic.state_dict()[k]) for k, v in head0.items())
    assert any(not torch.equal(a, b) for a, b in zip(policy0, models.policy.parameters()))
    saved = load_file(str(tmp_path / "checkpoints" / "iter-000002" / "critic.safetensors"))
    assert sorted(saved) == ["head.bias", "head.weight"]  # the head, not a copy of the policy


def test_shared_values_and_logprobs_come_from_one_forward_equal_to_separate_ones():
    """`recompute_logprobs_values` (one policy forward) gives the log-probs of `recompute_logprobs` and the values
    of `recompute_values` over the same policy, chunked output layer or not."""
    from pipeline.onpolicy import recompute_logprobs
    from pipeline.rlmodels import recompute_values
    from pipeline.stages.ppo import recompute_logprobs_values

    torch.manual_seed(0)
    models = tiny_models("gae", critic_from="shared")
    torch.nn.init.normal_(models.critic.head.weight)  # non-zero values
    algo = PPO(models, CountToken(), PROMPTS, ppo_cfg(), PREC)
    batch, _ = algo.collect(1, False, loop.Generation(), loop.Throughput())
    for chunk in (0, 3):
        cfg = ppo_cfg(logits_chunk_size=chunk, micro_batch_size=3)
        lp, v = recompute_logprobs_values(models, batch, cfg)
        torch.testing.assert_close(lp, recompute_logprobs(models.policy, batch, cfg.temperature, 2))
        torch.testing.assert_close(v, recompute_values(models.critic, batch, 5, policy=models.policy))
        assert v.abs().sum() > 0


def test_the_shared_heads_value_loss_reaches_the_policy_backbone_and_warmup_leaves_it_untouched(tmp_path):
    torch.manual_seed(0)
    models = tiny_models("gae", critic_from="shared")
    torch.nn.init.normal_(models.critic.head.weight)  # at zero (its start) no gradient passes the head
    cfg = ppo_cfg()
    algo = PPO(models, CountToken(), PROMPTS, cfg, PREC, seed=0)
    batch, _ = algo.collect(1, False, loop.Generation(), loop.Throughput())
    batch.returns = batch.returns + 5.0
    batch.advantages = torch.zeros_like(batch.advantages)  # no policy-gradient term: only the value loss
    for warmup, reaches in ((False, True), (True, False)):
        models.policy.zero_grad(set_to_none=True)
        models.critic.zero_grad(set_to_none=True)
        loss, stats = make_loss_fn(models, cfg, algo.kl_ctl, PREC, train_policy=not warmup)(batch, float(batch.n_tokens))
        loss.backward()
        assert models.critic.head.weight.grad.abs().sum() > 0 and stats["value_loss"] > 0
        backbone = [p.grad for p in models.policy.model.layers.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in backbone) == reaches
    # Whole warm-up iterations through the loop: the policy stays bit-identical.
    torch.manual_seed(0)
    models = tiny_models("gae", critic_from="shared")
    policy0 = copy.deepcopy(models.policy.state_dict())
    hist = loop.train(PPO(models, CountToken(), PROMPTS, ppo_cfg(critic_warmup=2, iterations=0), PREC), tmp_path,
                      progress=False)
    assert len(hist) == 2 and all(torch.equal(v, models.policy.state_dict()[k]) for k, v in policy0.items())


def test_fused_adamw_gives_the_per_tensor_loops_update_and_is_the_default_on_cpu():
    """`onpolicy.adamw`: torch's fused kernel where the device has one (CPU here), the same weights as the
    per-tensor loop after a few steps with param groups of different learning rates."""
    from pipeline.onpolicy import adamw

    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_tiny_model(build_tiny_tokenizer())
        params = list(model.parameters())
        opt = adamw([{"params": params[:3], "lr": 2e-2}, {"params": params[3:], "lr": 1e-2}], 1e-2, fused=fused)
        for step in range(3):
            torch.manual_seed(step)
            x = torch.randint(0, 60, (2, 7))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        out[fused] = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(out[True], out[False], atol=1e-6, rtol=1e-5)
    assert adamw([torch.nn.Parameter(torch.ones(2))], 1e-3).defaults["fused"]
    assert not adamw([torch.nn.Parameter(torch.ones(2))], 1e-3, fused=False).defaults["fused"]
