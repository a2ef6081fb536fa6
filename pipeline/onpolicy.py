"""The parts of the on-policy core over the token-level MDP that the one loop (`pipeline/loop.py`) runs.

State s_t = prompt + response tokens so far; action a_t = the next token; an episode ends at EOS or
at `max_new_tokens`. PPO and distillation differ only in how a rollout batch gets its rewards /
advantages (or teacher labels) and in the per-minibatch loss; everything here serves both.

    rollout:  sample_rows / sample_responses -> RolloutBatch(query, response, mask, ended[, sampler_logprobs])
    forward:  response_logits / policy_logprobs / response_hidden (the training forward, left padding)
    update:   optimise(batch, loss_fn, updaters): epochs x shuffled minibatches x micro-batches,
              loss normalised by the minibatch's total counted tokens (gradient accumulation
              and processes do not change it), a gradient clip per updater, optional early stop on approx KL.

Tensors: query (B, P) left-padded; response (B, T) right-padded after the first EOS;
`response_mask` True = a response token that counts (through the first EOS, nothing after it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import random
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional

import torch

from .distributed import global_sum, no_sync
from .decode import llama_decoder
from .generation import left_pad
from .rl import entropy_from_logits, logprobs_from_logits
from .rl.chunked import contiguous_head_input

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# The rollout record
# --------------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    query_ids: Tensor  # (B, P) left-padded prompt tokens
    query_mask: Tensor  # (B, P) 1 on real prompt tokens
    response_ids: Tensor  # (B, T) sampled tokens, pad after the first EOS
    response_mask: Tensor  # (B, T) bool, True through the first EOS
    logprobs: Tensor  # (B, T) behaviour log-probs, recomputed with the training forward
    ended: Tensor  # (B,) bool: EOS produced before max_new_tokens
    prompts: list = field(default_factory=list)  # per-row prompt examples (for scoring / logging)
    group: Optional[Tensor] = None  # (B,) index of the prompt, for RLOO's k samples per prompt
    ref_logprobs: Optional[Tensor] = None
    teacher_logprobs: Optional[Tensor] = None
    values: Optional[Tensor] = None
    scores: Optional[Tensor] = None  # (B,) sequence-level reward (e.g. normalised RM score)
    rewards: Optional[Tensor] = None  # (B, T) per-token reward
    advantages: Optional[Tensor] = None
    returns: Optional[Tensor] = None
    from_teacher: Optional[Tensor] = None  # (B,) bool, distillation mixture: which model sampled
    teacher_logits: Optional[Tensor] = None  # (B, T, V) distillation: the teacher's logits at each visited state
    rows: Optional[Tensor] = None  # (B,) each row's index in the rollout batch (kept by `index`: a loss can
                                   # record per-row figures from its own forward)
    sampler_logprobs: Optional[Tensor] = None  # (B, T) log-probs of the sampled tokens under the sampling
                                               # distribution, recorded during generation (0 after the first EOS)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def index(self, idx: Tensor) -> "RolloutBatch":
        out = {}
        il = idx.tolist()
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list) and v:
                out[f.name] = [v[i] for i in il]
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def to(self, device) -> "RolloutBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    @property
    def n_tokens(self) -> int:
        return int(self.response_mask.sum())


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Under bf16 autocast on a CPU with oneDNN bf16: sample with each Linear's weight prepacked in bf16
    # (`packed_cpu_linears`). Off: autocast's own casts, step by step.
    pack_cpu_weights: bool = True
    # On a CPU, a Llama-architecture model samples through `pipeline.decode` (the same forward without
    # generate's per-step work; weights packed as above under bf16 autocast). Off: transformers' generate.
    cpu_decoder: bool = True


# --------------------------------------------------------------------------------------------
# Forward passes with the same inputs as generation
# --------------------------------------------------------------------------------------------


def model_inputs(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor):
    """Concatenate prompt and response; position ids follow the attention mask (left padding)."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    # Left-padded rows: positions must count real tokens only, as during generation (docs/implementation_details.md).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any DDP / peft wrapper takes `logits_to_keep` (transformers' LMs do)."""
    m = getattr(model, "module", model)  # DDP
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    return _forward_takes(type(m), "logits_to_keep")


@functools.lru_cache(maxsize=None)
def _forward_takes(cls: type, name: str) -> bool:
    """Whether `cls.forward` has a parameter `name` (once per class: response_logits runs per micro-batch)."""
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logits(model, batch: RolloutBatch) -> Tensor:
    """Logits that predict each response token: (B, T, V). Only the last T + 1 positions go through the
    output layer when the model allows it (prompt positions would cost a (P, V) projection for nothing)."""
    input_ids, attention_mask, position_ids = model_inputs(
        batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    P = batch.query_ids.shape[1]
    T = batch.response_ids.shape[1]
    contiguous_head_input(model)  # the kept slice folds into one mm, not a bmm over B copies of the head
    kwargs = {"logits_to_keep": T + 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **kwargs)
    if kwargs and out.logits.shape[1] == T + 1:
        return out.logits[:, :T]
    return out.logits[:, P - 1:P + T - 1]


def response_hidden(model, batch: RolloutBatch) -> tuple[Tensor, Any]:
    """(final hidden states that predict each response token (B, T, H), the output layer): what
    `response_logits` would project, for chunked log-probs and divergences (`rl/chunked.py`)."""
    from .rl.chunked import causal_lm_hidden

    input_ids, attention_mask, position_ids = model_inputs(
        batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    T = batch.response_ids.shape[1]
    hidden, head = causal_lm_hidden(model, input_ids, attention_mask, position_ids, keep=T + 1)
    return hidden[:, :T], head


def policy_logprobs(model, batch: RolloutBatch, temperature: float, with_entropy: bool = False,
                    vocab_size: Optional[int] = None, chunk_size: int = 0):
    """-> (logprobs (B,T), entropy (B,T) or None, logits (B,T,V) or None). Logits are divided by the sampling
    temperature so recomputed log-probs match the sampler. `vocab_size` slices padded vocabularies. With
    `chunk_size` the output layer runs over that many positions at a time (`rl.chunked_token_logprobs`): the
    same values and gradients without the full logits, which are then not returned (None)."""
    if chunk_size:
        from .rl.chunked import chunked_token_logprobs

        hidden, head = response_hidden(model, batch)
        logprobs, entropy = chunked_token_logprobs(hidden, head, batch.response_ids, temperature, chunk_size,
                                                   vocab_size, with_entropy)
        return logprobs, entropy, None
    logits = response_logits(model, batch)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logprobs = logprobs_from_logits(logits, batch.response_ids, temperature)
    entropy = entropy_from_logits(logits, temperature) if with_entropy else None
    return logprobs, entropy, logits


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def mask_after_eos(tokens: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """(B, T) sampled tokens -> (mask through the first EOS inclusive, ended (B,))."""
    is_eos = tokens == eos_id
    # Count EOS seen strictly before t: a token counts while none has been seen.
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = seen_before == 0
    return mask, is_eos.any(dim=1)


@torch.no_grad()
def sample_responses(model, tokenizer, query_ids: Tensor, query_mask: Tensor, settings: SamplingSettings,
                     autocast=None, greedy: bool = False, vocab_size: Optional[int] = None,
                     with_logprobs: bool = False) -> tuple[Tensor, ...]:
    """Sample with the KV cache from left-padded prompts. -> (response_ids, response_mask, ended), and with
    `with_logprobs` a fourth (B, T) float32 tensor: each sampled token's log-prob under softmax(logits /
    temperature) over the vocabulary, as the sampler computed it (its forward, its precision), 0 after the first
    EOS. That is the trainer's distribution (`policy_logprobs`) before top-k / top-p truncation, which act after
    the record (`logprobs_from: sampler` refuses them). No (B, T, V) scores are kept: `_SampledLogprobs` holds
    one step's (B, V) at a time. `vocab_size`: token ids >= it (padding rows of a larger embedding) are never
    sampled."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if with_logprobs and greedy:
        raise ValueError("sample_responses: with_logprobs records the sampling distribution; greedy has none")
    gen_model = contiguous_head_input(unwrap_for_generation(model))  # the prefill's last position: one mm
    was_training = gen_model.training
    gen_model.eval()
    # Sampling runs as generate's greedy search over scores our processors have already sampled from
    # (`_ExponentialRace`, last): every warper is therefore ours, in transformers' order (temperature, top-k,
    # top-p), and generate applies none of its own (nor the model's generation_config's).
    kw = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, use_cache=True,
              do_sample=False, temperature=None, top_k=None, top_p=None)
    processors = []
    if vocab_size is not None:
        # Never sample the padding rows of an embedding larger than the tokenizer (docs/implementation_details.md: padded vocabularies).
        processors.append(_MaskPaddedVocab(vocab_size))
    recorder = None
    race = None
    if not greedy:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if with_logprobs:
            # The record is softmax(logits / T) over the whole vocabulary, the trainer's distribution: before
            # top-k / top-p, which `logprobs_from: sampler` refuses.
            recorder = _SampledLogprobs()
            processors.append(recorder)
        if settings.top_k:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        race = _ExponentialRace()
        processors.append(race)
    if processors:
        kw.update(logits_processor=LogitsProcessorList(processors))
    with (autocast or contextlib.nullcontext()):
        decoder = llama_decoder(gen_model, settings.cpu_decoder and settings.pack_cpu_weights)
        if decoder is not None:
            out = decoder.generate(query_ids, query_mask, settings.max_new_tokens, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id, kw.get("logits_processor"))
        else:
            with packed_cpu_linears(gen_model, settings.pack_cpu_weights):
                out = gen_model.generate(input_ids=query_ids, attention_mask=query_mask, **kw)
    if was_training:
        gen_model.train()
    if race is not None:
        race.check()
    response = out[:, query_ids.shape[1]:]
    sampled = response.shape[1] > 0
    if not sampled:
        response = torch.full((query_ids.shape[0], 1), tokenizer.eos_token_id, device=query_ids.device)
    mask, ended = mask_after_eos(response, tokenizer.eos_token_id)
    if with_logprobs:
        logprobs = (torch.where(mask, recorder.result(response), 0.0) if sampled
                    else torch.zeros(response.shape, dtype=torch.float32, device=response.device))
    response = torch.where(mask, response, torch.full_like(response, tokenizer.pad_token_id))
    return (response, mask, ended, logprobs) if with_logprobs else (response, mask, ended)


def cpu_linears_packable(model) -> bool:
    """True inside a CPU bf16 autocast region, for a model on the CPU, where oneDNN runs bf16 matmuls."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    return (device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packed_linear_forward(weight: Tensor, bias: Optional[Tensor], x: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, "none", [], "")


@contextlib.contextmanager
def packed_cpu_linears(model, enabled: bool = True):
    """While sampling (no gradient) under CPU bf16 autocast: every `nn.Linear` of `model` (LoRA's base and adapter
    layers included) runs on its weight cast to bf16 and prepacked once by oneDNN
    (`torch.ops.mkldnn._reorder_linear_weight`), where autocast casts the fp32 weight at each call and the
    unpacked bf16 matmul runs a (batch, 576) x (576, 1536) product at 7-9 GB/s of weight read on the 2-core CPU
    of docs/results.md (71 us packed against 200-250 us). The same bf16 product, so the same tokens; the output
    is bf16, as autocast's. The weights change every step, so they are packed on entry (about 0.07 s for 81M
    parameters) and the original forwards come back on exit. Anything else (a GPU, fp32, no oneDNN bf16): a no-op.
    The packed forward records no gradient: only `generate` (which runs under `no_grad`) may run inside."""
    if not enabled or not cpu_linears_packable(model):
        yield
        return
    patched = []
    try:
        with torch.no_grad():
            for mod in model.modules():
                if type(mod) is torch.nn.Linear:
                    w = torch.ops.mkldnn._reorder_linear_weight(mod.weight.detach().to(torch.bfloat16))
                    b = None if mod.bias is None else mod.bias.detach().to(torch.bfloat16)
                    mod.forward = functools.partial(_packed_linear_forward, w, b)
                    patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward  # the instance attribute: the class's forward is back


class _ExponentialRace:
    """Last logits processor when sampling: draws each row's next token from softmax(scores) and returns scores
    that are 0 at that token and -inf elsewhere, so that generate's greedy step (argmax) takes it. The draw is the
    one `torch.multinomial` makes for one sample, argmax(p / E) over the vocabulary with E ~ Exp(1) independent
    (the exponential race: token i wins with probability p_i), but E is -log U from `torch.rand`, a vectorised
    kernel, where multinomial's `exponential_` took about 4 ms a token at batch 4 and 15 ms at batch 16 on
    SmolLM2's 49,152-entry vocabulary on 2 CPU cores (docs/results.md: sampling). Same RNG (the device's
    default generator), so seeds still fix the samples."""

    def __init__(self):
        self.nonfinite: Optional[Tensor] = None  # rows whose scores gave no distribution (NaN / all -inf), any step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        bad = ~torch.isfinite(probs.sum(dim=-1))  # kept on the device: checked once, after generate (no sync a step)
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        race = torch.rand_like(probs).log_().neg_()  # Exp(1); U = 0 gives +inf: that entry cannot win
        token = probs.div_(race).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

    def check(self) -> None:
        """Raise where a step's scores had no distribution (what `torch.multinomial` refuses)."""
        if self.nonfinite is not None and bool(self.nonfinite.any()):
            rows = self.nonfinite.nonzero().flatten().tolist()
            raise RuntimeError(
                f"sampling: the model's next-token scores were NaN or all -inf for batch rows {rows[:8]}: there is "
                "no distribution to sample from. Usually the weights diverged (look at the last logged losses and "
                "grad norms) or low precision overflowed (try `model.cpu_autocast: off` / fp32 on the GPU).")


class _SampledLogprobs:
    """Logits processor, last of the user's list: at each step it keeps log_softmax of the scores it is given
    (B, V), and at the next step gathers the token that step appended (`input_ids[:, -1]`), so one step's
    distribution is held at a time. `result(response)` adds the last step's token. generate may run a few steps
    past the end and drop them (transformers' deferred stop checks): only the first T records are kept."""

    def __init__(self):
        self.prev: Optional[Tensor] = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:].to(self.prev.device)).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, response: Tensor) -> Tensor:
        T = response.shape[1]
        steps = self.steps[:T]
        if len(steps) == T - 1 and self.prev is not None:
            steps.append(self.prev.gather(-1, response[:, T - 1:].to(self.prev.device)).squeeze(-1))
        if len(steps) != T:
            raise RuntimeError(f"recorded {len(self.steps) + (self.prev is not None)} sampling steps for "
                               f"{T} sampled tokens")
        return torch.stack(steps, dim=1).to(response.device)


class _MaskPaddedVocab:
    """Logits processor: -inf on ids >= vocab_size, so samples stay inside the shared tokenizer vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores = scores.clone()
            scores[:, self.vocab_size:] = -float("inf")
        return scores


def hf_sample(model, tokenizer, query_ids: Tensor, query_mask: Tensor, settings: SamplingSettings,
              autocast=None, vocab_size: Optional[int] = None, seed: Optional[int] = None,
              with_logprobs: bool = False) -> tuple[Tensor, ...]:
    """The `hf` rollout engine: `sample_responses` (transformers `generate`), under `seed` when given."""
    with seeded_rng(seed, query_ids.device):
        return sample_responses(model, tokenizer, query_ids, query_mask, settings, autocast, vocab_size=vocab_size,
                                with_logprobs=with_logprobs)


hf_sample.returns_logprobs = True  # see `engine_returns_logprobs`


def engine_returns_logprobs(engine) -> bool:
    """Whether a rollout engine can return the sampled tokens' log-probs (`with_logprobs=True`): engines say
    so with a `returns_logprobs` attribute; one without it returns token ids only."""
    return bool(getattr(engine, "returns_logprobs", False))


def chunk_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, iteration, first row in the global batch, ...)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded_rng(seed: Optional[int], device):
    """Inside: torch's RNG (CPU, and the CUDA device in use) seeded with `seed`; the global streams are
    restored on exit. `seed=None`: the global streams, untouched."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@dataclass
class Generation:
    """How one process samples its rows of the global rollout batch.

    `engine(model, tokenizer, query_ids, query_mask, settings, autocast, vocab_size, seed)` returns
    (response_ids, response_mask, ended): `hf_sample`, or `rollout_vllm.VLLMEngine`; an engine whose
    `returns_logprobs` is true also takes `with_logprobs=True` and then returns the sampled tokens' log-probs
    fourth (`sample_responses`). `chunk_size` rows
    per engine call (None: all at once). With `seed` (this iteration's), each chunk samples under
    `chunk_seed(seed, first row of the chunk in the global batch)`, so a row's sample does not depend on
    how the global batch is split over processes, as long as each process's share is a whole number of
    chunks. Without it, sampling draws from the global RNG stream (per process).
    """

    engine: Callable = hf_sample
    chunk_size: Optional[int] = None
    seed: Optional[int] = None
    first_row: int = 0  # this process's first row in the global batch

    def chunks(self, n_rows: int) -> list[tuple[int, int, Optional[int]]]:
        """(start, end, seed or None) of each engine call over this process's `n_rows` rows."""
        size = self.chunk_size or max(n_rows, 1)
        return [(s, min(s + size, n_rows), None if self.seed is None else chunk_seed(self.seed, self.first_row + s))
                for s in range(0, n_rows, size)]


def sample_rows(model, tokenizer, rows: list, settings: SamplingSettings, device, generation: Generation,
                seed: Optional[int] = None, autocast=None, vocab_size: Optional[int] = None,
                with_logprobs: bool = False) -> RolloutBatch:
    """Encode prompt examples and sample one response each with the generation engine. -> RolloutBatch
    without behaviour log-probs (`logprobs`: the caller recomputes them or takes the sampler's); with
    `with_logprobs`, `sampler_logprobs` holds the sampler's (the engine must return them)."""
    q, qm = encode_prompts(tokenizer, rows, device)
    lp = None
    if with_logprobs:
        if not engine_returns_logprobs(generation.engine):
            raise ValueError(f"rollout engine {generation.engine!r} returns no log-probs")
        r, rm, ended, lp = generation.engine(model, tokenizer, q, qm, settings, autocast, vocab_size, seed,
                                             with_logprobs=True)
    else:
        r, rm, ended = generation.engine(model, tokenizer, q, qm, settings, autocast, vocab_size, seed)
    return RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm, logprobs=None, ended=ended,
                        prompts=list(rows), sampler_logprobs=lp)


def unwrap_for_generation(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def pad_responses(token_lists: list[list[int]], eos_id: int, pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Engine outputs (token ids, EOS included when sampled) -> (response_ids (B, T) padded after the first
    EOS or the row's end, response_mask, ended): the shapes `onpolicy.sample_responses` returns."""
    seqs = [list(t) or [eos_id] for t in token_lists]
    T = max(len(t) for t in seqs)
    response = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    within = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, t in enumerate(seqs):
        response[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        within[i, :len(t)] = True
    mask, ended = mask_after_eos(response, eos_id)
    mask &= within
    response = torch.where(mask, response, torch.full_like(response, pad_id))
    return response.to(device), mask.to(device), ended.to(device)


def demonstration_batch(tokenizer, rows: list, max_new_tokens: int, device) -> RolloutBatch:
    """Fixed demonstrations ({"prompt", "completion"}) as the states of a batch: the prompt left-padded as
    for sampling, the completion's tokens (through the chat template's end-of-turn EOS, cut at
    `max_new_tokens`) as the response. `from_teacher` is True on every row (not the student's samples)."""
    from .data import completion_token_ids

    q, qm = encode_prompts(tokenizer, rows, device)
    seqs = [completion_token_ids(tokenizer, ex["prompt"], ex["completion"])[:max_new_tokens] for ex in rows]
    r, rm, ended = pad_responses(seqs, tokenizer.eos_token_id, tokenizer.pad_token_id, device)
    batch = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm, logprobs=None, ended=ended,
                         prompts=list(rows))
    batch.from_teacher = torch.ones(len(rows), dtype=torch.bool, device=device)
    batch.rows = torch.arange(len(rows), device=device)
    return batch


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Stack rollout batches sampled separately (e.g. teacher and student parts of a mixture)."""
    if len(batches) == 1:
        return batches[0]
    P = max(b.query_ids.shape[1] for b in batches)
    T = max(b.response_ids.shape[1] for b in batches)

    def pad(t: Tensor, width: int, left: bool, value) -> Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([filler, t] if left else [t, filler], dim=1)

    out: dict[str, Any] = {}
    for f in fields(RolloutBatch):
        vals = [getattr(b, f.name) for b in batches]
        if all(v is None for v in vals):
            out[f.name] = None
        elif f.name in ("query_ids", "query_mask"):
            fill = pad_id if f.name == "query_ids" else 0
            out[f.name] = torch.cat([pad(v, P, True, fill) for v in vals])
        elif isinstance(vals[0], Tensor) and vals[0].dim() == 2:
            fill = pad_id if f.name == "response_ids" else (False if vals[0].dtype == torch.bool else 0)
            out[f.name] = torch.cat([pad(v, T, False, fill) for v in vals])
        elif isinstance(vals[0], Tensor) and vals[0].dim() == 3:  # (B, T, V), e.g. teacher_logits
            out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, 0, 0, T - v.shape[1])) for v in vals])
        elif isinstance(vals[0], Tensor):
            out[f.name] = torch.cat(vals)
        elif isinstance(vals[0], list):
            out[f.name] = [x for v in vals for x in v]
        else:
            out[f.name] = vals[0]
    return RolloutBatch(**out)


@torch.no_grad()
def recompute_logprobs(model, batch: RolloutBatch, temperature: float, micro_batch_size: int, autocast=None,
                       vocab_size: Optional[int] = None, chunk_size: int = 0) -> Tensor:
    """Log-probs of the sampled tokens under `model`, in micro-batches, with the training forward."""
    return in_micro_batches(model, batch, micro_batch_size, autocast, lambda mb: policy_logprobs(
        model, mb, temperature, vocab_size=vocab_size, chunk_size=chunk_size)[0])


def logprobs_gap_due(it: int, every: int) -> bool:
    """Whether iteration `it` (from 1) measures the sampler / recompute log-prob gap: the first and every
    `every`-th; `every` 0: never."""
    return every > 0 and (it == 1 or it % every == 0)


@torch.no_grad()
def logprobs_gap(sampler: Tensor, recomputed: Tensor, mask: Tensor) -> dict[str, float]:
    """Sampler minus recompute log-probs over the counted response tokens: mean |gap|, max |gap|, mean gap
    (docs/implementation_details.md: reading the gap). Empty when no token counts."""
    mask = mask.bool()
    if not mask.any():
        return {}
    d = (sampler.float() - recomputed.float())[mask]
    return {"mean_abs": float(d.abs().mean()), "max_abs": float(d.abs().max()), "mean": float(d.mean())}


@torch.no_grad()
def in_micro_batches(model, batch: RolloutBatch, micro_batch_size: int, autocast, fn: Callable) -> Tensor:
    """`fn(micro_batch)` over the batch in micro-batches, `model` in eval mode (restored after), concatenated."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(batch), micro_batch_size):
        mb = batch.index(torch.arange(start, min(start + micro_batch_size, len(batch))))
        with (autocast or contextlib.nullcontext()):
            outs.append(fn(mb))
    if was_training:
        model.train()
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


class PromptSampler:
    """Cycles through prompts in seeded shuffled passes; its position is saved for resume."""

    def __init__(self, examples: list, seed: int):
        if not examples:
            raise ValueError("no prompts to sample from")
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list:
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._shuffle()
            out.append(self.examples[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def expand_prompts(examples: list, k: int) -> tuple[list, Tensor]:
    """Each prompt k times, contiguous (RLOO's leave-one-out groups; k samples per prompt). -> (rows, group)."""
    rows = [ex for ex in examples for _ in range(k)]
    group = torch.arange(len(examples)).repeat_interleave(k)
    return rows, group


def pass_rate(rows: list, texts: list[str]) -> Optional[float]:
    """Share of responses that follow all their instructions (rows with checkers only; None if none)."""
    from .checkers import check_record

    judged = [all(check_record(t, ex["instruction_id_list"], ex["kwargs"]))
              for ex, t in zip(rows, texts) if isinstance(ex, dict) and ex.get("instruction_id_list")]
    return sum(judged) / len(judged) if judged else None


def check_prompt_lengths(tokenizer, examples: list, spec: str, max_positions: Optional[int],
                         max_new_tokens: int) -> None:
    """Refuse, before any compute, prompts that leave no room for the response in the context."""
    from .data import DataError, prompt_token_ids

    if not max_positions:
        return
    for i, ex in enumerate(examples, start=1):
        n = len(prompt_token_ids(tokenizer, ex["prompt"] if isinstance(ex, dict) else ex))
        if n + max_new_tokens > max_positions:
            raise DataError(
                f"{spec}: row {i}: the prompt is {n} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's context of {max_positions} tokens. Shorten the prompt or lower max_new_tokens.")


def encode_prompts(tokenizer, examples: list, device, max_prompt_tokens: Optional[int] = None):
    """Prompt examples -> left-padded (query_ids, query_mask) through the one chat-template path."""
    from .data import prompt_token_ids

    seqs = []
    for ex in examples:
        ids = prompt_token_ids(tokenizer, ex["prompt"] if isinstance(ex, dict) else ex)
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]  # keep the end: the instruction and the opened assistant turn
        seqs.append(ids)
    return left_pad(seqs, tokenizer.pad_token_id, device)


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


@dataclass
class UpdateSettings:
    epochs: int = 1
    minibatch_size: int = 8
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0  # for updaters that set none of their own
    target_approx_kl: Optional[float] = None  # stop the epoch loop when approx KL passes this


@dataclass
class Updater:
    """One optimizer over one set of parameters, with its own gradient clip and grad-norm metric. PPO's
    actor and critic each get one (as verl and OpenRLHF do), so a fresh critic's large gradients never set
    the clip of the policy's step; distillation has one (the student)."""

    name: str  # "policy", "critic", "student": the checkpoint key; metric `grad_norm` / `<name>_grad_norm`
    optimizer: Any
    params: list
    max_grad_norm: Optional[float] = None  # None: UpdateSettings.max_grad_norm
    metric: str = "grad_norm"


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, lr: float, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW (eps 1e-5, no weight decay) over `params` (tensors or param groups). `fused` None: torch's fused
    kernel where every parameter sits on a device that has one (CPU, CUDA): the same update as the per-tensor
    loop, in one kernel per step (81M parameters on 2 CPU cores: 45 ms a step against 202, docs/results.md);
    transformers' Trainer defaults to it with torch >= 2.8. Fused needs floating-point parameters."""
    if fused is None:
        tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        fused = bool(tensors) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0, fused=fused or None)


class OptimizerSet:
    """The updaters' optimizers as one checkpointable object (state_dict keyed by updater name)."""

    def __init__(self, updaters: list[Updater]):
        self.updaters = updaters

    def state_dict(self) -> dict:
        return {u.name: u.optimizer.state_dict() for u in self.updaters}

    def load_state_dict(self, state: dict) -> None:
        for u in self.updaters:
            u.optimizer.load_state_dict(state[u.name])


LossFn = Callable[[RolloutBatch, float], tuple[Tensor, dict[str, Tensor]]]


def optimise(batch: RolloutBatch, loss_fn: LossFn, optimizer, params: Optional[list], settings: UpdateSettings,
             generator: torch.Generator, accelerator=None, models: tuple = ()) -> dict[str, float]:
    """Several epochs of shuffled minibatch updates on one rollout batch.

    `optimizer`: a list of `Updater`s (each steps its own parameters with its own clip), or one torch
    optimizer over `params` (one updater). `loss_fn(micro_batch, n_tokens)` returns a loss already divided by
    `n_tokens`, the number of counted tokens in the whole minibatch (over all processes), so splitting a
    minibatch into micro-batches or processes leaves the gradient unchanged (docs/implementation_details.md:
    normalise by total tokens). A non-finite gradient norm in any updater skips the minibatch's step for all
    of them. With `target_approx_kl`, the epochs stop after the first minibatch, stepped or skipped, whose
    approx KL (the loss's `approx_kl` stat, averaged over all processes, so every process stops at the same
    minibatch) passes it. Returns token-weighted means of the loss stats over the stepped minibatches.
    """
    updaters = optimizer if isinstance(optimizer, list) else [Updater("model", optimizer, list(params))]
    world = accelerator.num_processes if accelerator is not None else 1
    totals: dict[str, float] = {}
    weight_total = 0.0
    steps = skipped = 0
    stopped_early = False
    B = len(batch)
    for _epoch in range(settings.epochs):
        perm = torch.randperm(B, generator=generator)
        for start in range(0, B, settings.minibatch_size):
            mb_idx = perm[start:start + settings.minibatch_size]
            n_local = float(batch.response_mask[mb_idx.to(batch.response_mask.device)].sum())
            n_tokens = global_sum(n_local, accelerator)
            if n_tokens == 0:
                continue
            for u in updaters:
                u.optimizer.zero_grad(set_to_none=True)
            micro = list(mb_idx.split(settings.micro_batch_size))
            mb_stats: dict[str, float] = {}
            for j, idx in enumerate(micro):
                mb = batch.index(idx)
                # DDP averages gradients over processes: scale by world so the result is sum / n_tokens.
                sync = j == len(micro) - 1
                with no_sync(accelerator, models, enabled=not sync):
                    loss, stats = loss_fn(mb, n_tokens / world)
                    if accelerator is not None:
                        accelerator.backward(loss)
                    else:
                        loss.backward()
                w = mb.n_tokens / n_tokens * world
                for k, v in stats.items():
                    mb_stats[k] = mb_stats.get(k, 0.0) + float(v) * w
                mb_stats["loss"] = mb_stats.get("loss", 0.0) + float(loss.detach())
            norms = {u.metric: torch.nn.utils.clip_grad_norm_(
                u.params, u.max_grad_norm if u.max_grad_norm is not None else settings.max_grad_norm)
                for u in updaters}
            if all(torch.isfinite(n) for n in norms.values()):
                for u in updaters:
                    u.optimizer.step()
                steps += 1
                mb_stats.update({k: float(n) for k, n in norms.items()})
                for k, v in mb_stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                weight_total += 1
            else:
                for u in updaters:
                    u.optimizer.zero_grad(set_to_none=True)
                skipped += 1
            if settings.target_approx_kl is not None and "approx_kl" in mb_stats:
                approx_kl = global_sum(mb_stats["approx_kl"], accelerator) / world
                if approx_kl > settings.target_approx_kl:
                    stopped_early = True
                    break
        if stopped_early:
            break
    out = {k: v / max(weight_total, 1) for k, v in totals.items()}
    out.update(optimizer_steps=steps, skipped_steps=skipped, early_stop=float(stopped_early))
    return out


# --------------------------------------------------------------------------------------------
# Bookkeeping shared by the loop drivers
# --------------------------------------------------------------------------------------------


class Throughput:
    def __init__(self):
        self.t0 = time.time()
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str):
        t = time.time()
        yield
        self.parts[name] = self.parts.get(name, 0.0) + time.time() - t

    def reset(self):
        self.parts = {}


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
