"""Driver for tests/stages/test_multiprocess.py: PPO (train_ppo, toy reward) and distillation (the real
stage through `run_recipe`) on tiny models, in one process or under `accelerate launch`.

    python tests/stages/mp_driver.py OUT_DIR [--fault local_token_count]
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml tests/stages/mp_driver.py OUT_DIR

Writes OUT_DIR/ppo/metrics.jsonl and OUT_DIR/run/distill/metrics.jsonl (main process only).
`--fault local_token_count`: each process normalises the loss by its own token count instead of the
minibatch's count over all processes, so DDP's mean over processes gives ~N times the right gradient
(the "sum instead of mean" bug); the test checks that it would notice.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's tiny models

from conftest import build_tiny_model, build_tiny_tokenizer, write_jsonl  # noqa: E402

ROLLOUT = 8  # global rollout batch: 8 rows on one process, 4 + 4 on two
PROMPTS = [f"write a short poem about the sea {i}" for i in range(16)]


class CountToken:
    """Toy reward: how often `e` appears in the response."""

    def score(self, rows, texts):
        return torch.tensor([t.count("e") / 4 for t in texts], dtype=torch.float32)


def run_ppo(out: Path) -> None:
    from transformers import LlamaForSequenceClassification

    from pipeline.config import ModelConfig, PPOConfig
    from pipeline.distributed import accelerate_precision
    from pipeline.rlmodels import ValueModel
    from pipeline.stages.ppo import PPOModels, train_ppo

    precision, accelerator = accelerate_precision(ModelConfig(cpu_autocast="off"))
    tok = build_tiny_tokenizer()
    policy = build_tiny_model(tok, seed=0)
    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    torch.manual_seed(1)
    critic = ValueModel(LlamaForSequenceClassification(cfg))
    models = PPOModels(policy=policy.eval(), tokenizer=tok, reference=copy.deepcopy(policy).requires_grad_(False),
                       critic=critic.eval())
    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    ppo = PPOConfig(iterations=3, rollout_batch_size=ROLLOUT, minibatch_size=ROLLOUT, micro_batch_size=2,
                    generation_batch_size=ROLLOUT // 2, epochs=2, lr=3e-3, critic_lr=3e-3, max_new_tokens=8,
                    kl_coef=0.05, lora=None, advantage="gae", log_samples_every=0, checkpoint_every=0)
    train_ppo(models, CountToken(), prompts, ppo, precision, out / "ppo", seed=0, accelerator=accelerator,
              progress=False)


def run_distill(out: Path) -> None:
    from pipeline.config import parse_recipe
    from pipeline.runner import run_recipe

    from accelerate import PartialState

    teacher_dir, prompts, heldout = out / "teacher", out / "prompts.jsonl", out / "heldout.jsonl"
    demos = out / "demos.jsonl"
    if PartialState().is_main_process:  # the inputs, written once; the others wait for them
        tok = build_tiny_tokenizer()
        teacher = build_tiny_model(tok, n_layers=4, seed=1)
        with torch.no_grad():
            teacher.model.norm.weight.mul_(6.0)  # peaked next-token distributions
        teacher.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        write_jsonl(prompts, [{"prompt": p} for p in PROMPTS])
        write_jsonl(heldout, [{"prompt": p} for p in PROMPTS[:2]])
        write_jsonl(demos, [{"prompt": p, "completion": p[::-1]} for p in PROMPTS])
    PartialState().wait_for_everyone()
    recipe = parse_recipe({
        "run": {"output_dir": str(out / "run"), "seed": 0}, "stages": ["distill"],
        "model": {"name_or_path": str(teacher_dir), "cpu_autocast": "off"},
        "distill": {"teacher_from": "base", "student": {"from_teacher": {"keep_layers": "every_2nd"}},
                    "prompts": str(prompts), "heldout_prompts": str(heldout), "beta": 0.5,
                    "iterations": 3, "rollout_batch_size": ROLLOUT, "minibatch_size": ROLLOUT,
                    "micro_batch_size": 2, "generation_batch_size": ROLLOUT // 2, "epochs": 2, "lr": 3e-3,
                    "max_new_tokens": 8, "log_samples_every": 1, "checkpoint_every": 2,
                    "warmup_data": str(demos), "warmup_iterations": 2, "warmup_divergence": "forward_kl"}},
        str(out / "recipe.yaml"))
    run_recipe(recipe)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--fault", choices=["local_token_count"])
    args = ap.parse_args()
    if args.fault == "local_token_count":
        import pipeline.onpolicy as onpolicy

        onpolicy.global_sum = lambda x, accelerator: x
    run_ppo(args.out)
    run_distill(args.out)


if __name__ == "__main__":
    main()
