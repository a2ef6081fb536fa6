"""AdamW step time on the shapes of a half-depth SmolLM2-135M student (15 layers + the tied embedding, 81M
parameters): torch's per-tensor loop (the default), `foreach` and the fused kernel that `onpolicy.adamw` picks.

    python bench/optimizer.py [--layers 15] [--steps 3]

The same random gradients for each; the first step (which allocates the state) is not timed. Nothing asserts
a speed.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    H, F, KV, V = 576, 1536, 192, 49152  # SmolLM2-135M: hidden, MLP, key/value width, vocabulary
    shapes = [(H, F)] * 3 * args.layers + [(H, H)] * 2 * args.layers + [(H, KV)] * 2 * args.layers + [(V, H)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, kw in (("loop (default)", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-5, weight_decay=0.0, **kw)
        opt.step()
        t = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        print(f"{name:<16}{(time.perf_counter() - t) / args.steps * 1000:8.0f} ms / step")


if __name__ == "__main__":
    main()
