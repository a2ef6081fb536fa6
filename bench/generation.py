"""Rollout generation, ours vs plain `model.generate`: response tokens per second, side by side.

    python bench/generation.py                         # batch 8 and 16, max_new_tokens 64, 3 repeats
    python bench/generation.py --batches 16 --max-new-tokens 64 128 --repeats 5
    python bench/generation.py --policy runs/quickstart/sft/final --json bench/results/generation.json
    python bench/generation.py --settings best         # or equal; default both (one table each)

Ours = `onpolicy.encode_prompts` + `onpolicy.sample_responses`, exactly what a PPO iteration runs.
Plain = what a user of transformers writes: the chat template rendered to text, then
`tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")` and
`model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=N)`.
Same model object (fp32 weights), prompts, batch, token limit, sampling distribution (temperature 1.0,
no top-k / top-p: `top_k=0` because transformers' own default is top-k 50), KV cache, and precision:
`--settings equal` runs both sides in fp32 with no autocast; `best` runs both under bf16 autocast where
`resolve_precision` turns it on for this CPU (`--cpu-autocast auto`: a CPU with native bf16,
`pipeline.models.cpu_has_native_bf16`), else fp32; `both` (default) prints one table each. In `best` ours
also records each sampled token's log-prob (`sample_responses(..., with_logprobs=True)`, where this
version has it), as a PPO iteration with `logprobs_from: sampler` does; plain `generate` records nothing,
so that is extra work on ours' side only. On a CPU ours decodes a Llama-architecture model through
`pipeline/decode.py` (fused products, weights prepacked for oneDNN under bf16 autocast, a preallocated KV cache,
no per-step `generate` work), as every rollout does; `--no-cpu-decoder` runs ours through `generate` with the
prepacked weights instead (`onpolicy.packed_cpu_linears`), the path before the decoder. A static KV cache with
torch.compile is not a side here: on this CPU it was no faster than the dynamic cache (docs/results.md)
(logits chunking is a training-forward option, not a sampling one). Tokens counted for both =
response tokens through the first EOS (the PPO response mask). Each configuration is warmed up once per
side, then the two sides alternate for `--repeats` rounds so machine load hits both alike; the median is
reported, and `paired`: the median over rounds of each round's own ratio of seconds per decode step (plain /
ours; a decode step is one new token for the whole batch, the same work on both sides). The two sides draw
different tokens (ours samples by an exponential race on `torch.rand`, `generate` by `torch.multinomial`), so
a round's answers, and how many steps it runs, differ between them; tokens per second count the tokens each
side's answers kept.
Tokens per second are given per wall second and per process CPU second (all threads,
`time.process_time`): on a machine shared with other jobs the CPU figure still measures the work each
side does, the wall figure mostly measures the other jobs. Throughput figures are what this machine gave
while the script ran; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models import load_policy, resolve_precision  # noqa: E402
from pipeline.onpolicy import SamplingSettings, encode_prompts, mask_after_eos, sample_responses  # noqa: E402

from bench_common import add_settings_arg, settings_list  # noqa: E402  (bench/, the script's own folder)

# Used when data/constraints/prompts.jsonl is absent (a fresh clone without the data build).
FALLBACK_PROMPTS = [
    "Explain photosynthesis to a ten-year-old in three sentences.",
    "Write a haiku about the first snow of winter.",
    "List five tips for staying focused while studying.",
    "Describe how a bicycle gear system works.",
    "Give me a short recipe for a tomato salad.",
    "What are the main differences between a lake and a pond?",
    "Write a two-sentence horror story set in a library.",
    "Summarise the water cycle in plain words.",
    "Suggest three names for a friendly robot and explain each.",
    "How do vaccines train the immune system? Keep it brief.",
    "Write a polite email declining a meeting invitation.",
    "Explain what a prime number is, with two examples.",
    "Describe the smell of rain to someone who has never experienced it.",
    "Give three reasons why people keep houseplants.",
    "Write a limerick about a cat who loves boxes.",
    "What should I pack for a one-day hike? Answer as a list.",
    "Explain the rules of tic-tac-toe.",
    "Write a short motivational message for a runner before a race.",
    "Why is the sky blue? Answer in one paragraph.",
    "Describe a sunrise over the sea in four sentences.",
    "Give two arguments for and two against homework.",
    "Explain how to make a paper airplane step by step.",
    "Write a thank-you note to a teacher.",
    "What is the difference between weather and climate?",
    "Invent a new holiday and describe how people celebrate it.",
    "Explain recursion to a beginner programmer.",
    "List four animals that live in the desert and one fact about each.",
    "Write a short dialogue between a bee and a flower.",
    "How does a refrigerator keep food cold?",
    "Give advice to someone starting their first job.",
    "Describe your ideal weekend in exactly three sentences.",
    "Explain why the moon has phases.",
]


def load_prompts(path: str) -> list:
    """Prompt examples (dicts with chat messages) from the data file, else the fixed list above."""
    if Path(path).exists():
        from pipeline.data import load_rows, prompt_examples

        return prompt_examples(load_rows(path), path)
    return [{"prompt": [{"role": "user", "content": p}]} for p in FALLBACK_PROMPTS]


def messages(ex) -> list[dict]:
    p = ex["prompt"] if isinstance(ex, dict) else ex
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def sampler_logprobs_kwargs(setting: str) -> dict:
    """`best`: ours records the sampled tokens' log-probs, as PPO's `logprobs_from: sampler` rollouts do (only where
    this version's `sample_responses` can)."""
    if setting == "best" and "with_logprobs" in inspect.signature(sample_responses).parameters:
        return {"with_logprobs": True}
    return {}


CPU_DECODER = [True]  # --no-cpu-decoder: ours through generate


def run_ours(model, tok, rows: list, max_new_tokens: int, precision, **kw) -> tuple[float, float, int, int]:
    """-> (seconds, CPU seconds, response tokens through the first EOS, decode steps run)."""
    t, c = time.perf_counter(), time.process_time()
    q, qm = encode_prompts(tok, rows, precision.device)
    settings = SamplingSettings(max_new_tokens, temperature=1.0)
    if not CPU_DECODER[0] and hasattr(settings, "cpu_decoder"):
        settings.cpu_decoder = False
    _, mask, *_ = sample_responses(model, tok, q, qm, settings, precision.autocast_ctx(), **kw)
    return time.perf_counter() - t, time.process_time() - c, int(mask.sum()), mask.shape[1]


@torch.no_grad()
def run_plain(model, tok, rows: list, max_new_tokens: int, precision) -> tuple[float, float, int, int]:
    t, c = time.perf_counter(), time.process_time()
    texts = [tok.apply_chat_template(messages(ex), tokenize=False, add_generation_prompt=True) for ex in rows]
    inputs = tok(texts, padding=True, padding_side="left", return_tensors="pt").to(precision.device)
    with precision.autocast_ctx():
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id)
    mask, _ = mask_after_eos(out[:, inputs["input_ids"].shape[1]:], tok.eos_token_id)
    return time.perf_counter() - t, time.process_time() - c, int(mask.sum()), mask.shape[1]


def run_setting(model, tok, prompts: list, args, precision, setting: str) -> list[dict]:
    rows_out = []
    kw = sampler_logprobs_kwargs(setting)
    for max_new in args.max_new_tokens:
        for batch in args.batches:
            # Both sides get the same prompts on each repeat; successive repeats take the next slice.
            slices = [[prompts[(r * batch + i) % len(prompts)] for i in range(batch)] for r in range(args.repeats + 1)]
            run_ours(model, tok, slices[0], max_new, precision, **kw)  # warm-up
            run_plain(model, tok, slices[0], max_new, precision)
            ours, plain = [], []
            for r, rows in enumerate(slices[1:]):
                # The same seed before each side (the samplers differ, so the tokens do too; see `paired`).
                torch.manual_seed(args.seed * 100003 + r)
                ours.append(run_ours(model, tok, rows, max_new, precision, **kw))
                torch.manual_seed(args.seed * 100003 + r)
                plain.append(run_plain(model, tok, rows, max_new, precision))
            row = {"setting": setting, "autocast_bf16": precision.autocast, "ours_sampler_logprobs": bool(kw),
                   "batch": batch, "max_new_tokens": max_new}
            for name, runs in (("ours", ours), ("plain", plain)):
                row[f"{name}_tokens_per_s"] = statistics.median(n / s for s, _, n, _ in runs)
                row[f"{name}_tokens_per_cpu_s"] = statistics.median(n / c for _, c, n, _ in runs)
                row[f"{name}_runs"] = [{"seconds": s, "cpu_seconds": c, "tokens": n, "steps": k}
                                       for s, c, n, k in runs]
            row["ratio"] = row["ours_tokens_per_s"] / row["plain_tokens_per_s"]
            # Seconds per decode step, round by round: equal work per step on both sides, while the medians above
            # may come from rounds (and sides) that ran different numbers of steps.
            row["paired_ratio"] = statistics.median((p[0] / p[3]) / (o[0] / o[3]) for o, p in zip(ours, plain))
            row["cpu_ratio"] = row["ours_tokens_per_cpu_s"] / row["plain_tokens_per_cpu_s"]
            rows_out.append(row)
            print(f"  {setting} batch {batch:>3} max_new_tokens {max_new:>4}: "
                  f"ours {[f'{n} tokens / {k} steps in {s:.2f}s ({c:.2f} CPU s)' for s, c, n, k in ours]}, "
                  f"plain {[f'{n} tokens / {k} steps in {s:.2f}s ({c:.2f} CPU s)' for s, c, n, k in plain]}",
                  flush=True)
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-autocast", default="auto", choices=["auto", "on", "off"],
                    help="bf16 autocast in the `best` setting (auto: on a CPU with native bf16); `equal` is always off")
    add_settings_arg(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads (default torch's); 1 makes the CPU seconds a "
                    "steadier measure of work on a busy machine (no threads spinning while another waits)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--no-cpu-decoder", action="store_true",
                    help="ours samples through transformers' generate (prepacked weights), not pipeline/decode.py")
    args = ap.parse_args()
    CPU_DECODER[0] = not args.no_cpu_decoder
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = settings_list(args.settings)
    precisions = {st: resolve_precision(ModelConfig(name_or_path=args.policy,
                                                    cpu_autocast="off" if st == "equal" else args.cpu_autocast))
                  for st in settings}
    # fp32 weights in both settings (the precision's dtype is fp32 on CPU either way); only the autocast differs.
    model, tok = load_policy(args.policy, ModelConfig(name_or_path=args.policy), precisions[settings[0]])
    model.eval()
    prompts = load_prompts(args.prompts)
    print(f"device {precisions[settings[0]].device}, settings "
          f"{', '.join(f'{st} (bf16 autocast {p.autocast})' for st, p in precisions.items())}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (1 min), "
          f"{len(prompts)} prompts")
    rows_out = []
    for setting in settings:
        rows_out += run_setting(model, tok, prompts, args, precisions[setting], setting)

    for setting in settings:
        print(f"\n== setting: {setting} (bf16 autocast {precisions[setting].autocast}, both sides; ours records "
              f"sampled log-probs: {bool(sampler_logprobs_kwargs(setting))}) ==")
        print(f"{'batch':>6}{'max_new':>9}{'ours tok/s':>12}{'plain tok/s':>13}{'ours/plain':>12}"
              f"{'ours tok/CPU s':>16}{'plain tok/CPU s':>17}{'ours/plain':>12}{'paired':>8}")
        for r in rows_out:
            if r["setting"] != setting:
                continue
            print(f"{r['batch']:>6}{r['max_new_tokens']:>9}{r['ours_tokens_per_s']:>12.1f}"
                  f"{r['plain_tokens_per_s']:>13.1f}{r['ratio']:>12.2f}{r['ours_tokens_per_cpu_s']:>16.1f}"
                  f"{r['plain_tokens_per_cpu_s']:>17.1f}{r['cpu_ratio']:>12.2f}{r['paired_ratio']:>8.2f}")
    print(f"(median of {args.repeats}; paired: the median over rounds of plain / ours seconds per decode step, "
          f"one new token for the whole batch; load average {os.getloadavg()[0]:.2f} at the end)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"settings": {st: {"autocast_bf16": p.autocast} for st, p in precisions.items()}, "rows": rows_out},
            indent=2))


if __name__ == "__main__":
    main()
