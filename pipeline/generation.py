"""Batched generation with left padding and the KV cache, shared by evaluation, data scripts and RL.

Prompts are rendered by `data.render_prompt` (the one chat-template path). Responses are cut at the
first EOS; `ended` says whether EOS was produced before the token limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import prompt_token_ids
from .decode import generate_ids


@dataclass
class Generations:
    texts: list[str]
    response_ids: list[list[int]]  # up to and including EOS when produced
    ended: list[bool]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids (B,T), attention_mask (B,T)) padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def truncate_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> tuple[list[int], bool]:
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return [t for t in tokens if t != pad_id], False


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    autocast=None,
    progress: bool = False,
    desc: str = "generating",
) -> Generations:
    """Generate one response per prompt (messages or strings). Greedy unless do_sample.

    ``repetition_penalty`` > 1 divides the logits of tokens already in the sequence (HF's CTRL-style
    penalty); 1.0 leaves decoding unchanged.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    # Sort by length so batches pad little; restore the order at the end.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts, ids_out, ended = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    # Sampling goes through transformers' generate; greedy through `decode.generate_ids` (below).
    gen_kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, do_sample=True,
                      temperature=temperature, top_k=top_k or None, top_p=top_p)
    if repetition_penalty != 1.0:
        gen_kwargs["repetition_penalty"] = repetition_penalty
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        input_ids, attn = left_pad([encoded[i] for i in idx], pad, device)
        with (autocast or nullcontext()):
            if do_sample:
                out = model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
            else:  # greedy: the lean CPU decoder where it applies (pipeline/decode.py), else generate
                out = generate_ids(model, input_ids, attn, max_new_tokens, eos, pad, repetition_penalty)
        for row, i in enumerate(idx):
            toks, done = truncate_at_eos(out[row, input_ids.shape[1]:].tolist(), eos, pad)
            ids_out[i], ended[i] = toks, done
            texts[i] = tokenizer.decode(toks, skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    if was_training:
        model.train()
    return Generations(texts=texts, response_ids=ids_out, ended=ended)
