"""A lean CPU decoder for Llama-architecture models: the prefill and decode steps written out, KV cache in
place, no per-step framework work.

Why: on a CPU a decode step at rollout batch sizes is a few dozen small matrix-vector products plus a few
hundred tiny elementwise ops; transformers' `generate` spends as long again in its per-step work (the
`DynamicCache`'s concatenations, mask and position building, module hooks, the flash-attention kernel on one
query). Measured on the 15-layer student of SmolLM2-135M, batch 4 (docs/results.md, session 15): 19-21 ms a
decode step through `generate` with prepacked bf16 weights, 14 ms here, of which 7.6 ms are the weight
products themselves.

What it computes is transformers' `LlamaForCausalLM` forward (RMSNorm in fp32, rotary embeddings from the
model's own `rotary_emb`, grouped-query attention, SiLU-gated MLP, the LM head), with
- the q/k/v and gate/up projections fused into one product each;
- under CPU bf16 autocast (`onpolicy.cpu_linears_packable`), every product on weights cast to bf16 and
  prepacked by oneDNN once per call (`torch.ops.mkldnn._reorder_linear_weight`), bf16 outputs as autocast's;
  otherwise fp32 products, as an fp32 model's;
- attention in fp32 by two batched matmuls over a preallocated cache (keys stored transposed);
- LoRA adapters (peft's `lora.Linear`) merged into the product's weight for the call.

And the decoding loop of `generate` with `do_sample=False`: the logits processors (ours sample: see
`onpolicy._ExponentialRace`) see the fp32 scores of the last position and the ids so far, the argmax is the
next token, finished rows get `pad_token_id`, and decoding stops when every row has produced an EOS or at
`max_new_tokens`. Output: prompt ids + new ids, as `generate` returns them.

`llama_decoder(model)` returns None for anything it does not cover (another architecture, a GPU, LoRA
variants such as DoRA, a generation config that would add its own logits processors, bf16 weights outside
autocast); callers then use `generate`. tests/test_decode.py checks the logits against transformers' forward
and the tokens against `generate`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class Unsupported(Exception):
    """The model (or this call) is outside what `LlamaDecoder` covers."""


# Generation-config fields whose non-default values make transformers add logits processors of its own.
_GENCFG_DEFAULTS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "diversity_penalty": (None, 0.0), "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
}


def _base_causal_lm(model):
    from .onpolicy import unwrap_for_generation

    model = unwrap_for_generation(model)  # DDP / accelerate wrappers
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def _linear_weight(mod) -> tuple[Tensor, Optional[Tensor]]:
    """The (weight, bias) a Linear or peft LoRA Linear applies in eval mode, adapters merged."""
    if type(mod) is torch.nn.Linear:
        return mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    base = getattr(mod, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(mod, "get_delta_weight"):
        raise Unsupported(f"{type(mod).__name__} is neither nn.Linear nor peft's lora.Linear")
    w = base.weight.detach()
    if not getattr(mod, "merged", False) and not getattr(mod, "disable_adapters", False):
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            if getattr(mod, "use_dora", {}).get(name, False) or getattr(mod, "lora_bias", {}).get(name, False):
                raise Unsupported(f"LoRA adapter {name!r} uses DoRA or a LoRA bias")
            w = w + mod.get_delta_weight(name).detach().to(w.dtype)
    return w, None if base.bias is None else base.bias.detach()


def _fused(mods: Sequence, packed: bool) -> tuple[Tensor, Optional[Tensor]]:
    pairs = [_linear_weight(m) for m in mods]
    dtype = torch.bfloat16 if packed else pairs[0][0].dtype
    w = torch.cat([p[0].to(dtype) for p in pairs]) if len(pairs) > 1 else pairs[0][0].to(dtype)
    if any(p[1] is not None for p in pairs):
        b = torch.cat([p[1].to(dtype) if p[1] is not None else w.new_zeros(p[0].shape[0]) for p in pairs])
    else:
        b = None
    if packed:
        w = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
    return w, b


def _supported_config(model) -> None:
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise Unsupported(f"model_type {getattr(cfg, 'model_type', None)!r} (only llama)")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        raise Unsupported("hidden_act other than silu, or pretraining_tp > 1")
    gen = getattr(model, "generation_config", None)
    for field, allowed in _GENCFG_DEFAULTS.items():
        if gen is not None and getattr(gen, field, None) not in allowed:
            raise Unsupported(f"generation_config.{field} = {getattr(gen, field)!r} adds a logits processor")


class LlamaDecoder:
    """One call's decoder: the weights as they are now (packed or fused once), a KV cache sized for the call."""

    def __init__(self, model, packed: bool):
        lm = _base_causal_lm(model)
        _supported_config(lm)
        inner = lm.model
        if type(inner.embed_tokens) is not torch.nn.Embedding:
            raise Unsupported(f"embedding {type(inner.embed_tokens).__name__}")
        self.packed = packed
        self.embed = inner.embed_tokens.weight.detach()
        self.rotary = inner.rotary_emb
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                qkv=_fused([a.q_proj, a.k_proj, a.v_proj], packed), o=_fused([a.o_proj], packed),
                gate_up=_fused([m.gate_proj, m.up_proj], packed), down=_fused([m.down_proj], packed),
                norm1=(layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon),
                norm2=(layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.variance_epsilon)))
        self.norm = (inner.norm.weight.detach(), inner.norm.variance_epsilon)
        self.head = _fused([lm.lm_head], packed)
        a0 = inner.layers[0].self_attn
        self.n_heads, self.n_kv = lm.config.num_attention_heads, lm.config.num_key_value_heads
        self.head_dim, self.scaling = a0.head_dim, a0.scaling
        self.inter = lm.config.intermediate_size

    # -- pieces ---------------------------------------------------------------------------------------
    def _linear(self, wb: tuple, x: Tensor) -> Tensor:
        w, b = wb
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), w, b, "none", [], "")
        return F.linear(x, w, b)

    @staticmethod
    def _rms(x: Tensor, wt: tuple) -> Tensor:
        w, eps = wt
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def _rope_tables(self, n_positions: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(n_positions, device=self.embed.device)[None]
        cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32, device=self.embed.device), pos)
        return cos[0].float(), sin[0].float()

    # -- the forward over new positions -----------------------------------------------------------------
    def _forward(self, ids: Tensor, positions: Tensor, start: int, bias: Tensor, last_only: bool) -> Tensor:
        """ids (B, Tq) at cache slots [start, start+Tq), positions (B, Tq); bias (B, 1, Tq, start+Tq) additive
        mask over keys. -> logits (B, V) of the last position when `last_only` else (B, Tq, V)."""
        B, Tq = ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        G, L = H // KV, start + Tq
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, Tq, D)
        half = D // 2
        h = self.embed[ids].float()  # (a no-op for fp32 weights)
        bias = bias[:, :, None].expand(B, 1, G, Tq, L).expand(B, KV, G, Tq, L).reshape(B * KV, G * Tq, L)
        for i, p in enumerate(self.layers):
            x = self._rms(h, p["norm1"])
            qkv = self._linear(p["qkv"], x).float().view(B, Tq, H + 2 * KV, D).transpose(1, 2)
            qk = qkv[:, :H + KV]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            self.k_t[i][:, :, :, start:L] = qk[:, H:].transpose(2, 3)
            self.v[i][:, :, start:L] = qkv[:, H + KV:]
            q = qk[:, :H].reshape(B * KV, G * Tq, D)
            scores = torch.baddbmm(bias, q, self.k_t[i][:, :, :, :L].reshape(B * KV, D, L), alpha=self.scaling)
            attn = torch.bmm(scores.softmax(-1), self.v[i][:, :, :L].reshape(B * KV, L, D))  # (B*KV, G*Tq, D)
            attn = attn.view(B, H, Tq, D).transpose(1, 2).reshape(B, Tq, H * D)
            h = h + self._linear(p["o"], attn).float()
            x = self._rms(h, p["norm2"])
            gu = self._linear(p["gate_up"], x)
            h = h + self._linear(p["down"], F.silu(gu[..., :self.inter]) * gu[..., self.inter:]).float()
        if last_only:
            h = h[:, -1]
        return self._linear(self.head, self._rms(h, self.norm))

    # -- generate -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_token_id: Union[int, Sequence[int]], pad_token_id: int,
                 logits_processor: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tensor:
        """`generate(..., do_sample=False)`'s result: (B, P + T) ids, T <= max_new_tokens. Autocast is off inside:
        the products are the packed bf16 ones or fp32 by construction, attention and norms run in fp32."""
        with torch.autocast("cpu", enabled=False):
            return self._generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                                  logits_processor)

    def _generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, logits_processor):
        B, P = input_ids.shape
        dev = input_ids.device
        total = P + max(max_new_tokens, 0)
        KV, D = self.n_kv, self.head_dim
        self.k_t = [torch.empty(B, KV, D, total, device=dev) for _ in self.layers]
        self.v = [torch.empty(B, KV, total, D, device=dev) for _ in self.layers]
        mask = attention_mask.bool()
        # Positions as generate builds them: cumsum of the mask - 1 (padding: 1); then +1 per new token.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        self.cos, self.sin = self._rope_tables(int(positions.max()) + max_new_tokens + 1)
        # Key j is visible to query slot i when j <= i and j is a real token; a slot always sees itself, so a
        # padding slot's row stays finite (its output is never read).
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        visible = (causal[None] & mask[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        bias = torch.zeros(B, 1, P, P, device=dev).masked_fill_(~visible[:, None], float("-inf"))
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev)
        ids = input_ids
        unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        if max_new_tokens <= 0:
            return ids
        logits = self._forward(input_ids, positions, 0, bias, last_only=True)
        last_pos = positions[:, -1:]
        step_bias = torch.zeros(B, 1, 1, total, device=dev)
        step_bias[:, 0, 0, :P] = torch.zeros(B, P, device=dev).masked_fill_(~mask, float("-inf"))
        for t in range(max_new_tokens):
            scores = logits.float()
            if logits_processor is not None:
                scores = logits_processor(ids, scores)
            nxt = scores.argmax(-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            ids = torch.cat([ids, nxt[:, None]], 1)
            unfinished &= ~torch.isin(nxt, eos)
            if t == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            last_pos = last_pos + 1
            logits = self._forward(nxt[:, None], last_pos, P + t, step_bias[..., :P + t + 1], last_only=True)
        self.k_t = self.v = None
        return ids


_ENABLED = [True]


def set_cpu_decoder(enabled: bool) -> None:
    """The recipe's `model.cpu_decoder` (the runner sets it for each stage): False sends every decode to
    transformers' generate."""
    _ENABLED[0] = bool(enabled)


def llama_decoder(model, enabled: bool = True) -> Optional[LlamaDecoder]:
    """A `LlamaDecoder` for `model` as it is now, or None where it does not apply (see the module doc): turned
    off (here or by `model.cpu_decoder: false`), the model is not on the CPU, is not a supported Llama, or has
    bf16 weights outside CPU bf16 autocast."""
    from .onpolicy import cpu_linears_packable

    if not (enabled and _ENABLED[0]):
        return None
    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    if param.device.type != "cpu":
        return None
    packed = cpu_linears_packable(model)
    if not packed and (torch.is_autocast_enabled("cpu") or param.dtype != torch.float32):
        return None
    try:
        return LlamaDecoder(model, packed)
    except (Unsupported, AttributeError) as err:
        _note_fallback(model, err)
        return None


_FALLBACK_NOTED: set = set()


def _note_fallback(model, err: Exception) -> None:
    key = type(_base_causal_lm(model)).__name__ + ":" + str(err)
    if key not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(key)
        from .utils import log

        log(f"decode: transformers' generate for this model ({err})")


def generate_ids(model, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_token_id: Union[int, Sequence[int]], pad_token_id: int, repetition_penalty: float = 1.0,
                 cpu_decoder: bool = True) -> Tensor:
    """Greedy decoding, `model.generate(..., do_sample=False)`'s (B, P + T) ids: through `LlamaDecoder` where it
    applies (call it inside the autocast region the model should run in), else through `generate`."""
    decoder = llama_decoder(model, cpu_decoder)
    if decoder is not None:
        processor = None
        if repetition_penalty != 1.0:
            from transformers import RepetitionPenaltyLogitsProcessor

            processor = RepetitionPenaltyLogitsProcessor(repetition_penalty)
        return decoder.generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, processor)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
              do_sample=False, temperature=None, top_k=None, top_p=None, use_cache=True)
    if repetition_penalty != 1.0:
        kw["repetition_penalty"] = repetition_penalty
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
