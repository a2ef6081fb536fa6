"""TRL 0.19 `PPOTrainer` for two iterations on CPU, timed; run by bench/ppo_vs_trl.py inside bench/.venv-trl019.

    bench/.venv-trl019/bin/python bench/trl019_ppo_step.py --model-dir DIR --prompts-json P.json --json out.json

This file runs under transformers 4.53 / trl 0.19.1 and imports nothing from `pipeline/`. The model
directory was written by transformers 5, so two things are translated for 4.53: the tokenizer is built
from tokenizer.json + tokenizer_config.json + chat_template.jinja (5.x names its class
`TokenizersBackend`, unknown to 4.x), and `rope_parameters.rope_theta` is copied to `rope_theta`
(4.x would otherwise fall back to 10000 and run a different model).

Policy and reference: AutoModelForCausalLM from DIR; reward model and critic:
AutoModelForSequenceClassification from DIR with num_labels=1 (fresh heads), all fp32 weights, full fine-tuning.
`--bf16` (ppo_vs_trl.py's `best` setting on a CPU with native bf16): `bf16=True, use_cpu=True` in PPOConfig
(transformers refuses bf16 on a machine without a bf16 GPU unless told the run is on CPU), which makes
accelerate autocast the forward of the model it prepares (the policy-and-value wrapper of the PPO epochs);
the rollout's forwards (generation, reference, reward, values) can run outside that wrapper, so `train()`
also runs under `torch.autocast("cpu", bfloat16)` here, as every forward of ours does under bf16 autocast.
Timing per iteration (wall and process CPU seconds) comes from hooks on the names PPOTrainer calls:
`batch_generation` (generate), the first `forward` with gradients on (start of the PPO epochs) and
`on_step_end` (end of the iteration).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def load_tokenizer(model_dir: Path):
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        **{k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)})
    template = model_dir / "chat_template.jinja"
    tok.chat_template = template.read_text() if template.exists() else cfg.get("chat_template")
    tok.padding_side = "left"
    return tok


def load_config(model_dir: Path, **overrides):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, **overrides)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    return config


class Timeline:
    """Timestamps of each iteration's phases, filled by the hooks installed in `instrument`."""

    def __init__(self):
        self.iter_start = None
        self.iterations: list[dict] = []
        self.current: dict = {}
        self.generated: list[int] = []  # response tokens through the first EOS, per iteration

    def begin(self):
        self.iter_start = time.perf_counter()
        self.iter_start_cpu = time.process_time()
        self.current = {}


def instrument(trl_ppo_module, timeline: Timeline, eos_id: int, pad_id: int):
    """Wrap the functions PPOTrainer.train looks up in its module's namespace."""
    from transformers import TrainerCallback

    orig_generation, orig_forward = trl_ppo_module.batch_generation, trl_ppo_module.forward

    def batch_generation(model, queries, *a, **kw):
        t, c = time.perf_counter(), time.process_time()
        query_responses, logits = orig_generation(model, queries, *a, **kw)
        timeline.current["generate_s"] = time.perf_counter() - t
        timeline.current["cpu_generate_s"] = time.process_time() - c
        timeline.current["gen_end"] = time.perf_counter()
        timeline.current["gen_end_cpu"] = time.process_time()
        response = query_responses[:, queries.shape[1]:]
        is_eos = response == eos_id
        # Through the first EOS inclusive (the PPO response mask), else every generated non-pad token.
        seen_before = torch.cumsum(is_eos.long(), 1) - is_eos.long()
        counted = (seen_before == 0) & ((response != pad_id) | is_eos)
        timeline.current["tokens"] = int(counted.sum())
        return query_responses, logits

    def forward(model, *a, **kw):
        if torch.is_grad_enabled() and "train_start" not in timeline.current:
            timeline.current["train_start"] = time.perf_counter()
            timeline.current["train_start_cpu"] = time.process_time()
        return orig_forward(model, *a, **kw)

    trl_ppo_module.batch_generation = batch_generation
    trl_ppo_module.forward = forward

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            timeline.begin()

        def on_step_end(self, args, state, control, **kw):
            c, end, end_cpu = timeline.current, time.perf_counter(), time.process_time()
            timeline.iterations.append({
                "seconds_per_iteration": end - timeline.iter_start, "generate_s": c["generate_s"],
                "score_s": c["train_start"] - c["gen_end"], "train_s": end - c["train_start"],
                "cpu_seconds_per_iteration": end_cpu - timeline.iter_start_cpu,
                "cpu_generate_s": c["cpu_generate_s"], "cpu_score_s": c["train_start_cpu"] - c["gen_end_cpu"],
                "cpu_train_s": end_cpu - c["train_start_cpu"], "tokens": c["tokens"]})
            timeline.begin()

    return StepTimer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts-json", required=True, help="a JSON list of chat-message lists, 2 x batch long")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (PPOConfig bf16=True, and train() under "
                    "torch.autocast): the `best` setting on a CPU with native bf16")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import trl
    import trl.trainer.ppo_trainer as trl_ppo
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorWithPadding
    from trl import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    model_dir = Path(args.model_dir)
    tok = load_tokenizer(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, config=load_config(model_dir), torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, config=load_config(model_dir), torch_dtype=torch.float32)
    seq_cfg = load_config(model_dir, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, config=seq_cfg, torch_dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, config=seq_cfg, torch_dtype=torch.float32)
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id

    messages = json.loads(Path(args.prompts_json).read_text())
    n = args.batch * args.iterations
    ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in messages[:n]]
    dataset = Dataset.from_dict({"input_ids": ids})

    out_dir = Path(args.json).parent / "trl_out"
    config = PPOConfig(
        output_dir=str(out_dir), report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, num_mini_batches=2,
        num_ppo_epochs=2, total_episodes=n, response_length=args.response_length,
        local_rollout_forward_batch_size=args.batch, stop_token="eos", temperature=1.0,
        num_sample_generations=0, missing_eos_penalty=None, bf16=args.bf16, fp16=False, logging_steps=1,
        optim="adamw_torch_fused",  # torch's fused AdamW, as ours (`onpolicy.adamw`); transformers >= 4.x offers it
        **({"use_cpu": True} if args.bf16 else {}),
    )
    timeline = Timeline()
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, eval_dataset=dataset,
                         callbacks=[instrument(trl_ppo, timeline, tok.eos_token_id, tok.pad_token_id)])
    # The same prompts in the same order as ours: TRL's loader shuffles, this one does not.
    trainer.dataloader = trainer.accelerator.prepare(DataLoader(
        dataset, batch_size=args.batch, shuffle=False, collate_fn=DataCollatorWithPadding(tok), drop_last=True))

    import contextlib

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    t = time.perf_counter()
    with autocast:
        trainer.train()
    wall = time.perf_counter() - t
    last = timeline.iterations[-1]
    fig = {**last, "tokens_per_s": last["tokens"] / last["seconds_per_iteration"],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "wall_s_all_iterations": wall, "iterations": timeline.iterations,
           "trl": trl.__version__, "torch": torch.__version__, "bf16": args.bf16}
    Path(args.json).write_text(json.dumps(fig, indent=2))
    print(json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
