"""One PPO iteration, timed: tokens/s and peak memory, split into generation, scoring and training.

    python bench/ppo.py                          # default model, LoRA, verifier reward, CPU
    python bench/ppo.py --policy runs/quickstart/sft/final --reward runs/quickstart/reward/final
    python bench/ppo.py --tiny                   # a tiny random model (smoke test of the script)
    python bench/ppo.py --logits-chunk-size 256 --logprobs-from sampler   # the speed options (ppo_vs_trl's `best`)
    python bench/ppo.py --cpu-autocast on --frozen-dtype bfloat16          # frozen models (reference, RM) in bf16
    python bench/ppo.py --critic-from shared     # the value head on the policy's hidden states (no second backbone)

Scoring = behaviour, reference and value forwards plus the reward. Peak memory is the process's
peak RSS (and the CUDA peak on a GPU). The first iteration is a warm-up and is not reported.
Besides wall seconds, each part's process CPU seconds (all threads; `time.process_time`) are reported:
on a machine shared with other jobs the CPU seconds still measure the work done, the wall seconds do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import LoraConfig, ModelConfig, PPOConfig, Recipe  # noqa: E402
from pipeline.data import load_rows, prompt_examples  # noqa: E402
from pipeline.models import resolve_precision  # noqa: E402
import pipeline.loop as loop  # noqa: E402
import pipeline.rlmodels as rlmodels  # noqa: E402
from pipeline.rlmodels import PPOModels, ValueModel  # noqa: E402
from pipeline.stages.ppo import build_models, train_ppo  # noqa: E402

from bench_common import CPUThroughput, has_field, optional_field  # noqa: E402  (bench/, the script's own folder)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def frozen_dtype_name(precision, model_cfg) -> str:
    """The frozen models' storage dtype (`model.frozen_dtype` resolved), or `-` on a version without it."""
    if not has_field(ModelConfig, "frozen_dtype"):
        return "-"
    from pipeline.models import frozen_dtype

    return str(frozen_dtype(precision, model_cfg)).removeprefix("torch.")


def tiny_models(critic_from: str = "policy"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import copy

    from conftest import build_tiny_model, build_tiny_tokenizer
    from transformers import LlamaForSequenceClassification

    tok = build_tiny_tokenizer()
    policy = build_tiny_model(tok)
    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    critic = (rlmodels.SharedValueHead(cfg.hidden_size) if critic_from == "shared"
              else ValueModel(LlamaForSequenceClassification(cfg)))
    m = PPOModels(policy=policy, tokenizer=tok, reference=copy.deepcopy(policy).requires_grad_(False), critic=critic)
    for x in (m.policy, m.reference, m.critic):
        x.eval()
    return m


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--reward", default="verifier", help="`verifier` or a reward-model directory")
    ap.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--minibatch-size", type=int, help="rows per optimizer step (default min(8, batch))")
    ap.add_argument("--micro-batch-size", type=int, help="rows per forward (default the minibatch size)")
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--cpu-autocast", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--frozen-dtype", help="model.frozen_dtype (auto, float32, bfloat16: the reference copy's and "
                    "the reward model's storage dtype; default the config's, auto); ignored, with a note, by a "
                    "version whose ModelConfig has no such field")
    ap.add_argument("--logits-chunk-size", type=int, help="ppo.logits_chunk_size (default the config's, 0: off)")
    ap.add_argument("--logprobs-from", help="ppo.logprobs_from (e.g. sampler); ignored, with a note, by a version "
                    "whose config has no such field")
    ap.add_argument("--critic-from", default="policy", help="ppo.critic_from: policy (a second backbone, as TRL's "
                    "PPOTrainer) or shared (a value head on the policy's hidden states); ignored, with a note, by a "
                    "version without `shared`")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    return ap


def prepare(args):
    """-> (models, reward, prompts, cfg, precision, model_cfg) for the PPO run `args` (build_parser's) describes."""
    from pipeline.rewards import RewardModelScorer, VerifierReward

    model_extra = optional_field(ModelConfig, "frozen_dtype", args.frozen_dtype, "--frozen-dtype")
    model_cfg = ModelConfig(name_or_path=args.policy, cpu_autocast=args.cpu_autocast, **model_extra)
    precision = resolve_precision(model_cfg)
    minibatch = args.minibatch_size or min(8, args.batch)
    extra = {}
    if args.logits_chunk_size is not None:
        extra["logits_chunk_size"] = args.logits_chunk_size
    extra.update(optional_field(PPOConfig, "logprobs_from", args.logprobs_from, "--logprobs-from"))
    critic_from = args.critic_from
    if critic_from == "shared" and not hasattr(rlmodels, "SharedValueHead"):
        print("note: this version has no `critic_from: shared`; the critic is a second backbone (policy)")
        critic_from = "policy"
    cfg = PPOConfig(policy_from="base", reward_from=args.reward, critic_from=critic_from, prompts=args.prompts,
                    iterations=args.iterations, rollout_batch_size=args.batch, minibatch_size=minibatch,
                    micro_batch_size=args.micro_batch_size or minibatch, max_new_tokens=args.max_new_tokens,
                    lora=None if args.no_lora else LoraConfig(), log_samples_every=0, **extra)
    if args.tiny:
        models = tiny_models(cfg.critic_from)
        if has_field(ModelConfig, "frozen_dtype"):  # as build_ppo_models stores a full fine-tuning reference
            from pipeline.models import frozen_dtype

            models.reference.to(frozen_dtype(precision, model_cfg))
        prompts = [{"prompt": [{"role": "user", "content": f"hello world {i}"}]} for i in range(32)]

        class Toy:
            def score(self, rows, texts):
                return torch.tensor([float(len(t)) for t in texts])

        reward = Toy()
    else:
        recipe = Recipe(model=model_cfg)
        models = build_models(recipe, cfg, precision)
        prompts = prompt_examples(load_rows(args.prompts), args.prompts)
        reward = VerifierReward() if args.reward == "verifier" else RewardModelScorer(args.reward, model_cfg, precision)
    return models, reward, prompts, cfg, precision, model_cfg


def main() -> None:
    args = build_parser().parse_args()
    models, reward, prompts, cfg, precision, model_cfg = prepare(args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    loop.Throughput = CPUThroughput  # the one loop makes one per iteration
    hist = train_ppo(models, reward, prompts, cfg, precision, out, seed=0, progress=False)
    wall = time.time() - t0
    h = hist[-1]  # the first iteration warms up kernels and caches
    parts = {k: h[f"ppo/time_{k}_s"] for k in ("generate", "score", "train")}
    total = sum(parts.values())
    tokens = h["ppo/response_length"] * args.batch
    fig = {
        "device": str(precision.device), "autocast_bf16": precision.autocast, "policy": args.policy,
        "batch": args.batch, "max_new_tokens": args.max_new_tokens, "response_tokens": tokens,
        "logits_chunk_size": cfg.logits_chunk_size, "logprobs_from": getattr(cfg, "logprobs_from", "-"),
        "frozen_dtype": frozen_dtype_name(precision, model_cfg), "critic_from": cfg.critic_from,
        "seconds_per_iteration": total, **{f"{k}_s": v for k, v in parts.items()},
        "tokens_per_s": tokens / total, "generate_tokens_per_s": tokens / parts["generate"],
        "peak_rss_mb": peak_rss_mb(), "wall_s_all_iterations": wall,
    }
    cpu = CPUThroughput.made[-1].cpu
    fig.update({f"cpu_{k}_s": cpu.get(k, 0.0) for k in ("generate", "score", "train")})
    fig["cpu_seconds_per_iteration"] = sum(cpu.values())
    if torch.cuda.is_available():
        fig["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"{'figure':<26}{'value':>14}")
    for k, v in fig.items():
        print(f"{k:<26}{v:>14.2f}" if isinstance(v, float) else f"{k:<26}{str(v):>14}")
    print(f"split: generation {parts['generate'] / total:.0%}, scoring {parts['score'] / total:.0%}, "
          f"training {parts['train'] / total:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
