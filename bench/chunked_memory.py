"""Peak memory and time of per-token log-probs (+ entropy) and their backward, unchunked vs chunked.

Shapes of SmolLM2-135M (hidden 576, vocabulary 49,152) at a PPO micro-batch of 16 x 160 response tokens,
random weights, float32, no model body: only the output layer and the per-token math, which is where the
(B, T, V) logits live.
  - unchunked: logits = lm_head(hidden) (B, T, V), then `logprobs_from_logits` / `entropy_from_logits`
    (pipeline/rl/logprobs.py), as `onpolicy.policy_logprobs` does;
  - chunked: `chunked_token_logprobs` (pipeline/rl/chunked.py) with `--chunk` positions per chunk.
Each side runs once (forward + backward of sum(logprobs) + sum(entropy)) in its own subprocess. On CPU the
peak is the rise of the process's peak RSS (`resource.getrusage().ru_maxrss`) over the set-up (weights and
hidden states allocated and touched); on CUDA, `torch.cuda.max_memory_allocated` over the same. Time is wall
and process CPU seconds (all threads) of that one run, so on a shared machine read it as indicative.

    python bench/chunked_memory.py [--batch 16 --tokens 160 --vocab 49152 --hidden 576 --chunk 256]
                                   [--threads 1] [--device cpu|cuda] [--no-entropy] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from pipeline.rl import chunked_token_logprobs, entropy_from_logits, logprobs_from_logits

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    hidden = torch.randn(args.batch, args.tokens, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device)
    head.weight.grad = torch.zeros_like(head.weight)  # the gradient buffers exist before, as in training
    hidden.grad = torch.zeros_like(hidden)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    wall, cpu = time.perf_counter(), time.process_time()
    if args.mode == "unchunked":
        logits = head(hidden)
        lp = logprobs_from_logits(logits, targets)
        ent = None if args.no_entropy else entropy_from_logits(logits)
        del logits
    else:
        lp, ent = chunked_token_logprobs(hidden, head, targets, chunk_size=args.chunk, with_entropy=not args.no_entropy)
    loss = lp.sum() + (ent.sum() if ent is not None else 0.0)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "loss": float(loss)}
    if device.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-entropy", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--mode", choices=["unchunked", "chunked"], help=argparse.SUPPRESS)  # the subprocess side
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return

    results = {}
    for mode in ("unchunked", "chunked"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--device", args.device] + [
            f"--{k}={getattr(args, k)}" for k in ("batch", "tokens", "vocab", "hidden", "chunk", "threads")]
        cmd += ["--no-entropy"] if args.no_entropy else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{mode} side failed:\n{done.stderr[-2000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    logits_mib = args.batch * args.tokens * args.vocab * 4 / 2**20
    print(f"B={args.batch} T={args.tokens} V={args.vocab} H={args.hidden} chunk={args.chunk} device={args.device} "
          f"threads={args.threads} entropy={not args.no_entropy}; one float32 copy of the logits = {logits_mib:.0f} MiB")
    print(f"{'':<12}{'peak MiB':>10}{'wall s':>10}{'cpu s':>10}{'loss':>16}")
    for mode, r in results.items():
        print(f"{mode:<12}{r['peak_mib']:>10.0f}{r['wall_s']:>10.2f}{r['cpu_s']:>10.2f}{r['loss']:>16.6g}")
    u, c = results["unchunked"], results["chunked"]
    print(f"chunked / unchunked: peak {c['peak_mib'] / max(u['peak_mib'], 1e-9):.3f}, wall {c['wall_s'] / u['wall_s']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
