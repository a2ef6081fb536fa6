"""Per-token log-probs, entropies and full-vocabulary divergences computed in chunks of positions, from the
final hidden states through the output layer, so the (B, T, V) float32 logits never exist at once.

Why: with V = 49,152, the float32 logits of 16 x 160 response tokens take 0.5 GB, and log-softmax,
entropy, the KLs and the reference / teacher forwards each add copies. Here the B*T positions are
flattened and cut into chunks of `chunk_size`; each chunk goes through the output layer, is upcast
to float32 (float64 stays float64), reduced to per-token numbers by the unchunked functions of
`logprobs.py` / `kl.py` (the same math, so the same values and gradients), and freed. With autograd
on, every chunk runs under `torch.utils.checkpoint` (non-reentrant): the forward keeps none of the
chunk's logits, and the backward recomputes one chunk's logits at a time (one extra output-layer
matmul per chunk). Peak memory holds one chunk of logits and its temporaries, not B*T*V. The idea
is that of Liger Kernel's fused linear cross-entropy (github.com/linkedin/Liger-Kernel) and
torchtune's `CEWithChunkedOutputLoss` (pytorch.org/torchtune): Liger can compute the gradient
inside the forward because its loss is fixed; here the per-token outputs feed arbitrary losses (PPO
ratios, clipping, KL penalties), so the backward recomputes instead.

Contract:
  - `hidden` (B, T, H): final hidden states at the positions that predict the T tokens (what the
    output layer would receive); `head`: the output layer or any callable (B*, H) -> (B*, V')
    (an nn.Linear, a peft LoRA layer, a tied embedding's Linear, `LMHead`).
  - `vocab_size` slices the logits to the tokenizer's vocabulary (padded embeddings);
    `temperature` divides them, as the sampler did.
  - Values are computed at every position, padding included; the caller masks. A teacher row with
    no finite logit at all (a position filled with -inf) is read as all zeros (uniform), so its
    value is finite and a zero-weighted position cannot turn a gradient into NaN.
  - `chunk_size` <= 0 or None: off, one plain pass (same as projecting all logits and calling the
    unchunked functions).
  - Gradients flow to `hidden` and the head's parameters (student side only for divergences).
  - Run the chunked call under the same autocast context as the model's forward: the output layer
    is applied here, outside the model's own forward.
  - The recomputation in backward re-runs the head (and, for an on-the-fly teacher, the teacher
    head) with the module state of backward time: a teacher obtained by a context such as peft's
    `disable_adapter()` must not be passed as `teacher_head` (the context is gone in backward);
    compute its logits or log-probs ahead instead.

k1 / k2 / k3 (kl.py) need only the two (B, T) log-prob tensors: `chunked_token_logprobs` on the
policy (with grad) and on the reference (under no_grad), then `kl_penalty`.

`causal_lm_hidden` gets (hidden, head) from a transformers causal LM, possibly peft- and DDP-wrapped.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.rl.kl import forward_kl_full, generalized_jsd_full, reverse_kl_full
from pipeline.rl.logprobs import entropy_from_logits, logprobs_from_logits

__all__ = [
    "DIVERGENCES",
    "LMHead",
    "causal_lm_hidden",
    "chunked_divergence",
    "chunked_divergences",
    "chunked_token_logprobs",
    "contiguous_head_input",
    "output_head",
]

Tensor = torch.Tensor
Head = Callable[[Tensor], Tensor]

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


# ------------------------------------------------------------------------------------ chunk driver


def _flat(hidden: Tensor, name: str) -> Tensor:
    if hidden.dim() != 3:
        raise ValueError(f"{name} must be (batch, tokens, hidden), got shape {tuple(hidden.shape)}")
    return hidden.reshape(-1, hidden.shape[-1])


def _bounds(n: int, chunk_size: Optional[int]) -> list[tuple[int, int]]:
    if not chunk_size or chunk_size <= 0:
        return [(0, n)]
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _run(fn: Callable[[int, int], tuple], n: int, chunk_size: Optional[int]) -> list[tuple]:
    """fn(start, end) -> tuple of (end - start,) tensors, for every chunk; under autograd each chunk
    is checkpointed so its logits are recomputed in backward instead of kept. A single chunk (n <= chunk_size)
    is not: its logits are the only ones alive either way, so checkpointing would buy no memory for a second
    output-layer matmul (and weight cast) and a second pass of the loss's elementwise work in backward."""
    bounds = _bounds(n, chunk_size)
    checkpointed = len(bounds) > 1 and torch.is_grad_enabled()
    return [checkpoint(fn, s, e, use_reentrant=False) if checkpointed else fn(s, e) for s, e in bounds]


def _cat(parts: list[Optional[Tensor]], shape: torch.Size) -> Optional[Tensor]:
    """Chunks of (n, *extra) -> (*shape, *extra)."""
    if parts[0] is None:
        return None
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).view(*shape, *parts[0].shape[1:])


def _logits(head: Head, h: Tensor, vocab_size: Optional[int], name: str) -> Tensor:
    z = head(h)
    if vocab_size is not None:
        if z.shape[-1] < vocab_size:
            raise ValueError(f"{name} gives {z.shape[-1]} logits per position, fewer than vocab_size={vocab_size}")
        z = z[..., :vocab_size]
    return z


def _empty(shape: torch.Size, like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


# ------------------------------------------------------------------------------------ public functions


def chunked_token_logprobs(
    hidden: Tensor,
    lm_head: Head,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: Optional[int] = 0,
    vocab_size: Optional[int] = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """log softmax(head(hidden) / temperature) at `targets`, and optionally the entropy, chunk by chunk.

    hidden (B, T, H), targets (B, T) -> (logprobs (B, T), entropy (B, T) or None), float32 (float64
    for float64 inputs); equal to `logprobs_from_logits` / `entropy_from_logits` of the full logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    flat = _flat(hidden, "hidden")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden {tuple(hidden.shape[:2])} (batch, tokens)")
    shape = hidden.shape[:2]
    if flat.shape[0] == 0:
        return _empty(shape, hidden), (_empty(shape, hidden) if with_entropy else None)
    flat_targets = targets.reshape(-1)

    def chunk(s: int, e: int):
        z = _logits(lm_head, flat[s:e], vocab_size, "lm_head").unsqueeze(0)  # (1, n, V)
        lp = logprobs_from_logits(z, flat_targets[s:e].unsqueeze(0), temperature)[0]
        ent = entropy_from_logits(z, temperature)[0] if with_entropy else None
        return lp, ent

    outs = _run(chunk, flat.shape[0], chunk_size)
    return _cat([o[0] for o in outs], shape), _cat([o[1] for o in outs], shape)


def _divergence_fn(kind: str, jsd_beta: float) -> Callable[[Tensor, Tensor, float], Tensor]:
    if kind == "reverse_kl":
        return reverse_kl_full
    if kind == "forward_kl":
        return forward_kl_full
    if kind == "jsd":
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        return lambda s, t, temperature: generalized_jsd_full(s, t, jsd_beta, temperature)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def _no_dead_rows(z: Tensor) -> Tensor:
    """Rows whose logits are all -inf (no distribution: padding) -> zeros, so log-softmax gives no NaN."""
    dead = torch.isneginf(z.amax(-1, keepdim=True))
    return torch.where(dead, torch.zeros((), dtype=z.dtype, device=z.device), z)


def chunked_divergence(
    student_hidden: Tensor,
    student_head: Head,
    teacher: Tensor,
    teacher_head: Optional[Head] = None,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    chunk_size: Optional[int] = 0,
    vocab_size: Optional[int] = None,
    jsd_beta: float = 0.5,
) -> Tensor:
    """Per-token divergence over the vocabulary between the student and the teacher, chunk by chunk.

    student_hidden (B, T, H) through `student_head`. `teacher`: the teacher's logits (B, T, V) when
    `teacher_head` is None, else the teacher's hidden states (B, T, H_t), whose logits are made one
    chunk at a time through `teacher_head` (under no_grad) and never stored. kind: reverse_kl
    KL(p_s || p_t), forward_kl KL(p_t || p_s) or jsd (generalized JSD with `jsd_beta`), as
    `reverse_kl_full` / `forward_kl_full` / `generalized_jsd_full` of kl.py. -> (B, T), differentiable
    w.r.t. the student side only.
    """
    fn = _divergence_fn(kind, jsd_beta)
    return chunked_divergences(student_hidden, student_head, teacher, [fn], teacher_head, temperature, chunk_size,
                               vocab_size)[0]


def chunked_divergences(
    student_hidden: Tensor,
    student_head: Head,
    teacher: Tensor,
    fns: Sequence[Callable[..., Tensor]],
    teacher_head: Optional[Head] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = 0,
    vocab_size: Optional[int] = None,
) -> list[Tensor]:
    """Several per-token divergences from the same chunks of logits: each of `fns`, called as
    fn(student_logits, teacher_logits, temperature=temperature) on (1, n, V) logits -> (1, n), is applied to
    every chunk, so each chunk's logits are made once (and once more in backward) for all of them, e.g. the
    main divergence and `losses.topk_forward_kl`. Inputs as `chunked_divergence`. -> one (B, T) per fn (a fn
    may return (1, n, k): then (B, T, k); a fn that returns a tuple gives one entry per element, in order)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s_flat = _flat(student_hidden, "student_hidden")
    t_flat = _flat(teacher.detach(), "teacher logits" if teacher_head is None else "teacher hidden")
    shape = student_hidden.shape[:2]
    if tuple(teacher.shape[:2]) != tuple(shape):
        raise ValueError(f"teacher {tuple(teacher.shape[:2])} and student {tuple(shape)} (batch, tokens) differ")
    if s_flat.shape[0] == 0:
        return [_empty(shape, student_hidden) for _ in fns]

    def teacher_logits(s: int, e: int) -> Tensor:
        if teacher_head is None:
            z = t_flat[s:e]
            return z[..., :vocab_size] if vocab_size is not None else z
        with torch.no_grad():
            return _logits(teacher_head, t_flat[s:e], vocab_size, "teacher_head")

    def chunk(s: int, e: int):
        zs = _logits(student_head, s_flat[s:e], vocab_size, "student_head").unsqueeze(0)
        zt = _no_dead_rows(teacher_logits(s, e)).unsqueeze(0)
        outs = []
        for fn in fns:
            out = fn(zs, zt, temperature=temperature)
            outs.extend(o[0] for o in (out if isinstance(out, tuple) else (out,)))
        return tuple(outs)

    outs = _run(chunk, s_flat.shape[0], chunk_size)
    return [_cat([o[i] for o in outs], shape) for i in range(len(outs[0]))]


# ------------------------------------------------------------------------------------ models


class LMHead(nn.Module):
    """A causal LM's output layer plus the logit transform its forward applies after it.

    transformers' causal LMs compute `logits = lm_head(hidden)`, then some rescale: Cohere multiplies by
    `config.logit_scale`, Granite divides by `config.logits_scaling`, Gemma 2/3 soft-cap with
    `config.final_logit_softcapping` (cap * tanh(logits / cap)). Applied here per chunk, in that order.
    """

    def __init__(self, head: nn.Module, scale: float = 1.0, softcap: Optional[float] = None):
        super().__init__()
        self.head = head
        self.scale = float(scale)
        self.softcap = None if softcap is None else float(softcap)

    def forward(self, hidden: Tensor) -> Tensor:
        z = self.head(hidden)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def extra_repr(self) -> str:
        return f"scale={self.scale}, softcap={self.softcap}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / accelerate (`.module`) and peft (`get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _config_number(config, name: str) -> Optional[float]:
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return None if value is None else float(value)


def output_head(model: nn.Module) -> LMHead:
    """The output layer of a causal LM (under any DDP / peft wrapper) with its logit transform."""
    core = _unwrap(model)
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(core).__name__} has no output layer (get_output_embeddings() is None): "
                         "chunked logits need a causal LM with an lm_head")
    scale = _config_number(core.config, "logit_scale") or 1.0
    divisor = _config_number(core.config, "logits_scaling")
    if divisor:
        scale = scale / divisor
    return LMHead(head, scale=scale, softcap=_config_number(core.config, "final_logit_softcapping"))


def _contiguous_input(module: nn.Module, args: tuple):
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def contiguous_head_input(model: nn.Module) -> nn.Module:
    """Give the output layer of `model` (under any DDP / peft wrapper) contiguous input; -> `model`. Idempotent.

    Why: transformers' causal LMs apply the output layer to a slice, `lm_head(hidden[:, -logits_to_keep:])`
    (`logits_to_keep=1` in `generate`'s prefill, T + 1 for response logits), which is not contiguous. With no
    gradient, `torch.matmul` then does not fold (B, k, H) into (B*k, H): it expands the (V, H) weight to
    (B, H, V) and runs `bmm`, which on the CPU first copies the expanded weight, B copies of the whole output
    layer (4 x 576 x 49,152 in bf16: 226 MB and about 0.2 s per call on the 2-core CPU of docs/results.md) for
    a product that `mm` does on the folded rows. A forward pre-hook makes the (B, k, H) input contiguous (a
    copy of B*k*H numbers), so the product folds into one `mm`. Same values; the hook is not saved with the
    model."""
    core = _unwrap(model)
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if isinstance(head, nn.Module) and not getattr(head, "_pipeline_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._pipeline_contiguous_input = True
    return model


def _body(core: nn.Module) -> nn.Module:
    body = core.get_decoder() if hasattr(core, "get_decoder") else None
    if body is None or body is core:
        body = getattr(core, getattr(core, "base_model_prefix", "model"), None)
    if not isinstance(body, nn.Module):
        raise ValueError(f"{type(core).__name__}: cannot find the decoder body (get_decoder() / base_model_prefix) "
                         "whose last hidden state feeds the output layer")
    return body


def _takes_logits_to_keep(core: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(type(core).forward).parameters
    except (TypeError, ValueError):
        return False


_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _dropout_active(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in module.modules())


def causal_lm_hidden(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    keep: int = 0,
) -> tuple[Tensor, LMHead]:
    """(last hidden states (B, keep or L, H), output head) of a causal LM, without projecting every position.

    The model is called through its outermost wrapper, so DDP arms its gradient all-reduce and peft
    runs its own forward, with `logits_to_keep=1` (one position goes through the output layer); a
    forward hook on the decoder body captures its `last_hidden_state` (after the final norm: what the
    output layer receives). `keep` > 0 keeps the last `keep` positions, like `logits_to_keep`: for a
    prompt of P and a response of T tokens, `keep=T + 1` then `[:, :T]` gives the states that predict
    the response. The first call per model checks that the head applied to the kept position
    reproduces the model's own logit (catching a logit transform `LMHead` does not know).
    """
    core = _unwrap(model)
    if not _takes_logits_to_keep(core):
        raise ValueError(f"{type(core).__name__}.forward takes no `logits_to_keep`; chunked logits need it to keep the "
                         "model from projecting every position (transformers' causal LMs take it); set the chunk "
                         "size to 0 for this model")
    contiguous_head_input(core)
    head, body = output_head(core), _body(core)
    captured: list = []
    handle = body.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"{type(core).__name__}: the decoder body {type(body).__name__} ran {len(captured)} times in "
                         "one forward (expected once); cannot take its last hidden state")
    body_out = captured[0]
    hidden = body_out.last_hidden_state if hasattr(body_out, "last_hidden_state") else body_out[0]
    if core not in _CHECKED and not _dropout_active(head):
        _check_head(core, head, hidden, out.logits)
        _CHECKED.add(core)
    return (hidden[:, -keep:] if keep else hidden), head


def _check_head(core: nn.Module, head: LMHead, hidden: Tensor, logits: Tensor) -> None:
    with torch.no_grad():
        mine = head(hidden[:, -1:]).float()
        theirs = logits[:, -1:].float()
        if mine.shape != theirs.shape:
            raise ValueError(f"{type(core).__name__}: output layer gives {tuple(mine.shape)} logits, the model "
                             f"{tuple(theirs.shape)}")
        diff = (mine - theirs).abs().max().item()
        # bf16 autocast matmuls agree to ~1e-2 relative; an unknown soft-cap or rescale differs by far more
        tol = 2e-2 * (1.0 + theirs.abs().max().item())
    if not diff <= tol:
        raise ValueError(f"{type(core).__name__}: the output layer applied to the last hidden state does not reproduce "
                         f"the model's logits (max difference {diff:.3g}); its forward transforms logits in a way "
                         "pipeline/rl/chunked.py does not know (known: logit_scale, logits_scaling, "
                         "final_logit_softcapping). Set the chunk size to 0 for this model.")
