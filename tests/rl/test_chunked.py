"""Chunked per-token math (pipeline/rl/chunked.py) against the unchunked functions on full logits.

Everything in float64 on tiny random models: values and gradients must agree to 1e-6 for every chunk
size (off, 1, one that does not divide B*T, exactly B*T, larger than B*T), with ragged rows
(left-padded prompts, right-padded responses), temperature != 1 and an embedding padded beyond the
tokenizer's vocabulary. The memory claim is checked by counting bytes, not by timing.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.rl import (
    causal_lm_hidden,
    chunked_divergence,
    chunked_token_logprobs,
    entropy_from_logits,
    forward_kl_full,
    generalized_jsd_full,
    kl_penalty,
    logprobs_from_logits,
    output_head,
    reverse_kl_full,
)

VOCAB = 100  # the "tokenizer's" vocabulary
PADDED_VOCAB = 112  # the embedding / output layer, padded beyond it
P, T = 5, 6  # prompt and response widths of the batch
PROMPT_LENS = [5, 2, 3]
RESPONSE_LENS = [6, 3, 1]
CHUNKS = [0, 1, 4, 7, 18, 64]  # B*T = 18: off, 1, not dividing, dividing, exactly B*T, above B*T
TOL = 1e-6
FULL = {"reverse_kl": reverse_kl_full, "forward_kl": forward_kl_full,
        "jsd": lambda s, t, temperature: generalized_jsd_full(s, t, 0.3, temperature)}


def tiny_llama(seed: int, tie: bool = True, vocab: int = PADDED_VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # larger logits than the default init, so the distributions are far from uniform
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def ragged_batch(seed: int = 1):
    """Left-padded prompts, right-padded responses; inputs built as onpolicy.model_inputs does."""
    g = torch.Generator().manual_seed(seed)
    B = len(PROMPT_LENS)
    query = torch.zeros(B, P, dtype=torch.long)
    qmask = torch.zeros(B, P, dtype=torch.bool)
    resp = torch.zeros(B, T, dtype=torch.long)  # pad id 0 after each response
    rmask = torch.zeros(B, T, dtype=torch.bool)
    for i, (pl, rl) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        query[i, P - pl:] = torch.randint(1, VOCAB, (pl,), generator=g)
        qmask[i, P - pl:] = True
        resp[i, :rl] = torch.randint(1, VOCAB, (rl,), generator=g)
        rmask[i, :rl] = True
    input_ids = torch.cat([query, resp], 1)
    attention_mask = torch.cat([qmask, rmask], 1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, resp, rmask


def full_logits(model, batch):
    """The unchunked path: every position through the output layer, sliced to the response and vocabulary."""
    input_ids, attention_mask, position_ids, _, _ = batch
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, P - 1:P + T - 1, :VOCAB]


def response_hidden(model, batch):
    input_ids, attention_mask, position_ids, _, _ = batch
    hidden, head = causal_lm_hidden(model, input_ids, attention_mask, position_ids, keep=T + 1)
    return hidden[:, :T], head


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, want):
    assert len(got) == len(want)
    n_nonzero = 0
    for a, b in zip(got, want):
        a = torch.zeros_like(b) if a is None else a
        assert b is not None
        assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()
        n_nonzero += int(b.abs().max() > 1e-8)
    assert n_nonzero > 0  # the comparison is not between two all-zero gradients


def weights(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Random per-token loss weights, zero on padding: the caller's masking."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask


# ------------------------------------------------------------------------------------ log-probs, entropy


@pytest.fixture(scope="module")
def policy():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=7, tie=False)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_unchunked_with_gradients(policy, chunk_size, temperature):
    batch = ragged_batch()
    resp, rmask = batch[3], batch[4]
    params = [p for p in policy.parameters() if p.requires_grad]
    w1, w2 = weights(rmask, 2), weights(rmask, 3)

    logits = full_logits(policy, batch)
    lp_ref = logprobs_from_logits(logits, resp, temperature)
    ent_ref = entropy_from_logits(logits, temperature)
    g_ref = grads((lp_ref * w1 + ent_ref * w2).sum(), params)

    hidden, head = response_hidden(policy, batch)
    lp, ent = chunked_token_logprobs(hidden, head, resp, temperature=temperature, chunk_size=chunk_size,
                                     vocab_size=VOCAB, with_entropy=True)
    assert lp.dtype == torch.float64 and lp.shape == resp.shape
    # every position, padding included, equals the unchunked value
    assert torch.allclose(lp, lp_ref, atol=TOL, rtol=0)
    assert torch.allclose(ent, ent_ref, atol=TOL, rtol=0)
    assert_grads_close(grads((lp * w1 + ent * w2).sum(), params), g_ref)


def test_vocab_slicing_changes_the_result(policy):
    """The padded rows of the output layer are really cut off: without slicing the log-probs differ."""
    batch = ragged_batch()
    hidden, head = response_hidden(policy, batch)
    with torch.no_grad():
        sliced, _ = chunked_token_logprobs(hidden, head, batch[3], chunk_size=4, vocab_size=VOCAB)
        unsliced, _ = chunked_token_logprobs(hidden, head, batch[3], chunk_size=4)
        ref = logprobs_from_logits(full_logits(policy, batch), batch[3])
    assert torch.allclose(sliced, ref, atol=TOL, rtol=0)
    assert (sliced - unsliced).abs().max() > 1e-3


def test_no_grad_path_matches_and_keeps_no_graph(policy):
    batch = ragged_batch()
    with torch.no_grad():
        hidden, head = response_hidden(policy, batch)
        lp, ent = chunked_token_logprobs(hidden, head, batch[3], 0.7, chunk_size=5, vocab_size=VOCAB,
                                         with_entropy=True)
        logits = full_logits(policy, batch)
    assert lp.grad_fn is None and ent.grad_fn is None
    assert torch.allclose(lp, logprobs_from_logits(logits, batch[3], 0.7), atol=TOL, rtol=0)
    assert torch.allclose(ent, entropy_from_logits(logits, 0.7), atol=TOL, rtol=0)


@pytest.mark.parametrize("chunk_size", [0, 3, 7, 100])
def test_linear_head_with_bias_and_direct_hidden_gradient(chunk_size):
    """A plain nn.Linear head with a bias (padded vocabulary); gradients w.r.t. the hidden states too."""
    torch.manual_seed(3)
    head = torch.nn.Linear(8, PADDED_VOCAB, bias=True).double()
    hidden = (3 * torch.randn(4, 5, 8, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, VOCAB, (4, 5))
    w = torch.randn(4, 5, dtype=torch.float64)
    inputs = [hidden, head.weight, head.bias]

    logits = head(hidden)[..., :VOCAB]
    want = logprobs_from_logits(logits, targets, 1.3) * w + entropy_from_logits(logits, 1.3)
    lp, ent = chunked_token_logprobs(hidden, head, targets, 1.3, chunk_size, VOCAB, with_entropy=True)
    got = lp * w + ent
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert_grads_close(grads(got.sum(), inputs), grads(want.sum(), inputs))


def test_empty_batches_and_bad_arguments():
    head = torch.nn.Linear(8, VOCAB)
    for shape in ((0, 4), (2, 0)):
        lp, ent = chunked_token_logprobs(torch.zeros(*shape, 8), head, torch.zeros(shape, dtype=torch.long),
                                         chunk_size=3, with_entropy=True)
        assert lp.shape == shape and ent.shape == shape and lp.dtype == torch.float32
        assert chunked_divergence(torch.zeros(*shape, 8), head, torch.zeros(*shape, VOCAB), chunk_size=3).shape == shape
    hidden = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs(hidden, head, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_logprobs(hidden, head, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_divergence(hidden, head, torch.randn(2, 3, VOCAB), kind="tvd")
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        chunked_token_logprobs(hidden, head, torch.zeros(2, 3, dtype=torch.long), vocab_size=VOCAB + 1)


# ------------------------------------------------------------------------------------ k1 / k2 / k3


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("chunk_size", [0, 4, 64])
def test_kl_estimators_match_unchunked_with_gradients(policy, teacher, kind, chunk_size):
    """Policy log-probs with gradient, reference log-probs under no_grad (as at rollout time)."""
    batch = ragged_batch()
    resp, rmask = batch[3], batch[4]
    params = [p for p in policy.parameters() if p.requires_grad]
    w = weights(rmask, 4)
    with torch.no_grad():
        ref_lp_full = logprobs_from_logits(full_logits(teacher, batch), resp, 0.7)
        ref_hidden, ref_head = response_hidden(teacher, batch)
        ref_lp, _ = chunked_token_logprobs(ref_hidden, ref_head, resp, 0.7, chunk_size, VOCAB)
    assert torch.allclose(ref_lp, ref_lp_full, atol=TOL, rtol=0)

    k_ref = kl_penalty(logprobs_from_logits(full_logits(policy, batch), resp, 0.7), ref_lp_full, kind)
    hidden, head = response_hidden(policy, batch)
    lp, _ = chunked_token_logprobs(hidden, head, resp, 0.7, chunk_size, VOCAB)
    k = kl_penalty(lp, ref_lp, kind)
    assert torch.allclose(k, k_ref, atol=TOL, rtol=0)
    assert_grads_close(grads((k * w).sum(), params), grads((k_ref * w).sum(), params))


# ------------------------------------------------------------------------------------ exact divergences


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("teacher_side", ["logits", "hidden"])
def test_divergences_match_unchunked_with_gradients(policy, teacher, kind, chunk_size, teacher_side):
    batch = ragged_batch()
    rmask = batch[4]
    params = [p for p in policy.parameters() if p.requires_grad]
    t_params = list(teacher.parameters())
    w = weights(rmask, 5)
    temperature = 0.8

    t_logits = full_logits(teacher, batch)  # with autograd on: the chunked function must detach it
    want = FULL[kind](full_logits(policy, batch), t_logits.detach(), temperature=temperature)
    g_want = grads((want * w).sum(), params)

    hidden, head = response_hidden(policy, batch)
    if teacher_side == "logits":
        got = chunked_divergence(hidden, head, t_logits, None, kind, temperature, chunk_size, VOCAB, jsd_beta=0.3)
    else:
        t_hidden, t_head = response_hidden(teacher, batch)
        got = chunked_divergence(hidden, head, t_hidden, t_head, kind, temperature, chunk_size, VOCAB, jsd_beta=0.3)
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert got.min() > 1e-4  # two different models: no degenerate all-zero comparison
    loss = (got * w).sum()
    g_all = grads(loss, params + t_params)
    assert_grads_close(g_all[:len(params)], g_want)
    assert all(g is None for g in g_all[len(params):])  # the teacher side is detached


def test_teacher_rows_without_finite_logits_give_no_nan_gradient():
    """A padded position whose teacher logits are all -inf: finite value, finite (zero-weighted) gradients."""
    torch.manual_seed(4)
    head = torch.nn.Linear(8, VOCAB).double()
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 3, VOCAB, dtype=torch.float64)
    t_logits[1, 2] = float("-inf")  # padding filled with -inf
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        div = chunked_divergence(hidden, head, t_logits, kind=kind, chunk_size=2, jsd_beta=0.3)
        assert torch.isfinite(div).all()
        (g,) = torch.autograd.grad(torch.where(mask, div, 0.0).sum(), hidden)
        assert torch.isfinite(g).all() and g[1, 2].abs().max() == 0
        # the counted positions are those of the unchunked function
        want = FULL[kind](head(hidden)[:, :2], t_logits[:, :2], temperature=1.0)
        assert torch.allclose(div[:, :2], want, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------ LoRA (peft), DDP


def test_lora_adapter_gradients_match_unchunked():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(seed=2, tie=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "lm_head"])).double()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)  # the head has LoRA
    batch = ragged_batch()
    resp, rmask = batch[3], batch[4]
    w = weights(rmask, 6)

    for chunk_size in (0, 5, 64):
        logits = full_logits(model, batch)
        want = logprobs_from_logits(logits, resp, 0.9) * w + entropy_from_logits(logits, 0.9) * w.flip(0)
        hidden, head = response_hidden(model, batch)
        lp, ent = chunked_token_logprobs(hidden, head, resp, 0.9, chunk_size, VOCAB, with_entropy=True)
        got = lp * w + ent * w.flip(0)
        assert torch.allclose(got, want, atol=TOL, rtol=0)
        assert_grads_close(grads(got.sum(), params), grads(want.sum(), params))


def test_through_ddp_wrapper_runs_its_forward(tmp_path):
    """Under DDP the wrapper's own forward must run (it arms the gradient all-reduce)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = tiny_llama(seed=5)
        wrapped = DDP(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
        batch = ragged_batch()
        hidden, head = response_hidden(wrapped, batch)
        assert calls == [1]
        lp, _ = chunked_token_logprobs(hidden, head, batch[3], chunk_size=4, vocab_size=VOCAB)
        with torch.no_grad():
            want = logprobs_from_logits(full_logits(model, batch), batch[3])
        assert torch.allclose(lp, want, atol=TOL, rtol=0)
        lp.sum().backward()  # the reducer expects this backward; it would raise if the forward were bypassed badly
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ logit transforms


def test_gemma2_final_logit_softcapping_is_applied_per_chunk():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=PADDED_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                       final_logit_softcapping=2.0, pad_token_id=0)
    model = Gemma2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    # no padding here: this tiny float64 Gemma 2 (eager attention) turns left-padded rows into NaN by itself
    input_ids, _, _, resp, rmask = ragged_batch()
    batch = (input_ids, torch.ones_like(input_ids), torch.arange(P + T).expand_as(input_ids), resp, rmask)
    head = output_head(model)
    assert head.softcap == 2.0
    params = list(model.parameters())
    logits = full_logits(model, batch)
    assert logits.abs().max() > 1.0  # the cap is active
    want = logprobs_from_logits(logits, batch[3], 0.7)
    hidden, head = response_hidden(model, batch)
    got, _ = chunked_token_logprobs(hidden, head, batch[3], 0.7, chunk_size=4, vocab_size=VOCAB)
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert_grads_close(grads(got.sum(), params), grads(want.sum(), params))


def test_unknown_logit_transform_is_refused():
    """A model whose forward does something to the logits that the head path does not: a clear error."""

    class Halved(type(tiny_llama(seed=0))):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = tiny_llama(seed=0)
    model.__class__ = Halved
    batch = ragged_batch()
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        response_hidden(model, batch)


# ------------------------------------------------------------------------------------ memory


B_MEM, T_MEM, H_MEM, V_MEM, CHUNK_MEM = 8, 64, 16, 2000, 8
LOGITS_BYTES = B_MEM * T_MEM * V_MEM * 4  # one float32 copy of the full logits: 4 MB


def _mem_inputs():
    torch.manual_seed(0)
    head = torch.nn.Linear(H_MEM, V_MEM, bias=False)
    hidden = torch.randn(B_MEM, T_MEM, H_MEM, requires_grad=True)
    targets = torch.randint(0, V_MEM, (B_MEM, T_MEM))
    return head, hidden, targets


def _unchunked(head, hidden, targets):
    logits = head(hidden)
    return logprobs_from_logits(logits, targets), entropy_from_logits(logits)


def _chunked(head, hidden, targets):
    return chunked_token_logprobs(hidden, head, targets, chunk_size=CHUNK_MEM, with_entropy=True)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward during fn's forward."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    head, hidden, targets = _mem_inputs()
    with saved_tensors_hooks(pack, lambda t: t):
        lp, ent = fn(head, hidden, targets)
    params = {p.untyped_storage().data_ptr() for p in (head.weight, hidden)}  # held by the caller anyway
    return sum(n for ptr, n in storages.items() if ptr not in params)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and still alive (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                ref = self.live.get(st.data_ptr())
                if ref is None or ref[0].expired():
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _peak_bytes(fn) -> int:
    head, hidden, targets = _mem_inputs()
    with PeakLiveBytes() as mode:
        lp, ent = fn(head, hidden, targets)
        (lp.sum() + ent.sum()).backward()
        del lp, ent
    assert hidden.grad is not None and head.weight.grad is not None
    return mode.peak


def test_chunked_path_saves_no_full_logits_for_backward():
    unchunked = _saved_bytes(_unchunked)
    chunked = _saved_bytes(_chunked)
    assert unchunked >= LOGITS_BYTES  # the unchunked path keeps at least one (B, T, V) float32 tensor
    assert chunked < LOGITS_BYTES / 50  # the chunked path keeps only small per-position tensors


def test_chunked_peak_memory_is_a_fraction_of_the_full_logits():
    unchunked = _peak_bytes(_unchunked)
    chunked = _peak_bytes(_chunked)
    assert unchunked >= 2 * LOGITS_BYTES  # logits, log-softmax, probabilities, their gradients...
    # 8 of 512 positions per chunk: a few chunk-sized (64 kB) temporaries plus the head's gradient (128 kB)
    assert chunked < LOGITS_BYTES / 4
    assert chunked < unchunked / 10


class _OpLog(TorchDispatchMode):
    """The aten ops run inside the mode."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _head_ops(model, keep: int) -> tuple[list[str], torch.Tensor]:
    ids = torch.randint(1, VOCAB, (3, 7))
    with torch.no_grad(), _OpLog() as log:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    return log.ops, logits


def test_contiguous_head_input_folds_the_kept_positions_into_one_mm():
    """Without the hook, a frozen model's forward with logits_to_keep (a non-contiguous slice; a teacher's or a
    reference's: `torch.matmul` folds anyway when the weight requires grad) runs the output layer as a bmm over
    an expanded copy of its weight; with it, one mm over the folded rows, and the same logits."""
    from pipeline.rl.chunked import contiguous_head_input

    model = tiny_llama(0).requires_grad_(False)
    for keep in (1, 4):
        plain_ops, plain = _head_ops(model, keep)
        assert "aten.bmm" in plain_ops  # the case the hook exists for (else this test tests nothing)
    contiguous_head_input(model)
    contiguous_head_input(model)  # idempotent: one hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    for keep in (1, 4):
        ops, _ = _head_ops(model, keep)
        assert "aten.bmm" not in ops and "aten.mm" in ops
    ids = torch.randint(1, VOCAB, (3, 7))
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=False, logits_to_keep=4).logits
        b = model(input_ids=ids, use_cache=False).logits[:, -4:]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class _CountingHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.calls = head, 0

    def forward(self, x):
        self.calls += 1
        return self.head(x)


@pytest.mark.parametrize("chunk_size, calls", [(18, 1), (64, 1), (7, 6), (9, 4)])
def test_a_single_chunk_is_not_checkpointed(chunk_size, calls):
    """B*T = 18 positions: one chunk runs the output layer once (forward only, nothing recomputed in backward);
    k > 1 chunks run it 2k times (each chunk's forward and its recomputation). Gradients equal either way."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, VOCAB, bias=False).double()
    hidden = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (3, 6))
    counting = _CountingHead(head)
    lp, ent = chunked_token_logprobs(hidden, counting, targets, chunk_size=chunk_size, with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert counting.calls == calls
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    logits = head(ref_hidden)
    (logprobs_from_logits(logits, targets).sum() + entropy_from_logits(logits).sum()).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=0, atol=TOL)
