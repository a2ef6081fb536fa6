"""On-policy distillation, ours vs TRL's `DistillationTrainer`: seconds/step, tokens/s, peak RSS, held-out KL.

    python bench/distill_vs_trl.py                         # 8 steps, batch 4, 32 new tokens (a few minutes)
    python bench/distill_vs_trl.py --steps 30 --batch 16 --max-new-tokens 64 --json bench/results/distill.json
    python bench/distill_vs_trl.py --only ours             # or --only trl
    python bench/distill_vs_trl.py --settings best         # or equal; default both (one table each)

Ours = the `distill` stage's loop (`stages.distill.build_models` + `train_distill`, on the shared RL core:
rollout -> teacher labels every visited state -> `onpolicy.optimise`). Theirs = TRL's `DistillationTrainer`
(trl 1.16, the installed one; it runs in the same Python as ours). Each side runs in its own subprocess
(`--side`), so each peak RSS is its own; each saves its final student, and this process then evaluates both
students (and the untrained one) with the same function on the same held-out prompts.

Matched on both sides:
  - teacher: the default model (SmolLM2-135M-Instruct, the cached safetensors directory), fp32 (ours stores it
    in bf16 in `best` where autocast is on, below), frozen;
  - student: the teacher's embeddings, final norm, lm_head and the decoder layers `--keep-layers` keeps
    (default every_2nd: 15 of 30), built by `stages.distill.student_from_teacher` on both sides, so both
    start from identical weights; full fine-tuning, fp32 weights, the precision of each setting (below),
    no gradient checkpointing (TRL's default turns it on; turned off here), dropout off;
  - divergence: on-policy reverse KL(student || teacher) over the full vocabulary at every response token,
    summed over response tokens / response tokens in the batch. Ours: beta 0 (every sequence sampled by
    the student), divergence reverse_kl, estimator full. TRL: beta 1.0 (its generalized JSD at beta = 1 is
    the reverse KL), and it always samples from the student (trl 1.16 has no `lmbda`; it is fully on-policy);
  - prompts: the same `--steps x --batch` prompts in the same order (our PromptSampler's order, seed 0;
    TRL gets them in that order with shuffle_dataset off), the chat template, left padding;
  - sampling: temperature 1.0, no top-k / top-p, stop at EOS, `--max-new-tokens`; the divergence at
    temperature 1.0;
  - update: one optimizer step per rollout batch of `--batch` prompts (ours: epochs 1, minibatch = micro-batch
    = batch; TRL: per_device_train_batch_size = batch, gradient_accumulation_steps 1), AdamW with the same
    lr, betas (0.9, 0.999), eps 1e-5, weight decay 0, constant lr (no warm-up), gradient clipping at 1.0,
    torch's fused AdamW kernel (ours: `onpolicy.adamw`; TRL: `optim="adamw_torch_fused"`, transformers'
    default with torch >= 2.8);
    `--steps` steps.
Settings (`--settings`, default both, one table each, all in this one run):
  equal: fp32 with no autocast on both sides (ours: cpu_autocast off, frozen_dtype float32; TRL: bf16 off), our
    defaults otherwise (logits_chunk_size 0: ours materialises the logits);
  best: each side's fastest settings that keep the math. Ours: bf16 autocast on a CPU with native bf16
    (AMX-BF16 / AVX512-BF16, `pipeline.models.cpu_has_native_bf16`), else fp32, with the frozen teacher stored
    in bf16 there (`model.frozen_dtype: bfloat16`; the student is cut from its fp32 weights first);
    `logits_chunk_size` 256 (the divergence from the hidden states through the lm_head in chunks of positions);
    `logprobs_from` stays at its default (distillation takes the student's log-probs from its labelling forward,
    which it runs anyway).
    TRL's: on the same CPUs, `bf16=True` (with `use_cpu=True`) and its whole `train()` under
    torch.autocast(cpu, bf16), so its generation and teacher forwards get bf16 as ours do; it already
    chunks the vocabulary (below); its teacher keeps fp32 weights (autocast casts them at every forward). On a
    CPU without native bf16 both sides stay fp32.
  The held-out evaluation runs in fp32 with no autocast in both settings, on every student.
Known differences in the work done, not equalised (they are part of what is compared):
  - ours runs a no-grad "label" pass of the teacher (full logits kept) before the update, TRL runs the teacher
    forward inside the loss; neither runs a no-grad student pass (ours takes the logged per-token KLs /
    entropy from the update's forward, `stages.distill.StateStats`; before that change it ran one);
  - TRL computes the divergence from the hidden states through the lm_head in vocabulary chunks (never the
    full (B, T, V) logits); ours materialises the logits in `equal` and chunks positions in `best`;
  - the sampled responses differ (different RNG streams), so response lengths and tokens per step differ;
    tokens/s divides by each side's own response tokens.
Timing: per step, generation (sampling) and the rest (label + update), in wall seconds and in process CPU
seconds (all threads, `time.process_time`): on a machine shared with other jobs the CPU seconds still
measure the work each side does, the wall seconds mostly measure the other jobs. The first step is a
warm-up and is not in the means (with --steps 1 it is all there is). Tokens = response tokens through the
first EOS.

Held-out figure: the final student answers the first `--heldout` prompts of eval/constraints/heldout.jsonl
greedily (`--max-new-tokens`), and the exact reverse KL(student || teacher) over the full vocabulary at
temperature 1 is averaged over those answer tokens (`stages.distill.label_states`, the function the distill
stage's held-out evaluation uses). Both final students, and the untrained one, go through the same code.
With few steps the difference between the two students is mostly sampling noise; nothing here asserts a
speed or a quality.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import (  # noqa: E402  (bench/, the script's own folder)
    CPUThroughput, add_settings_arg, best_bf16, best_onpolicy_kwargs, print_ratio_table, setting_model_kwargs,
    settings_list,
)

MODEL = "smollm2-135m-instruct"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ordered_prompts(path: str, n: int, seed: int = 0) -> list:
    """The first n prompt examples our PromptSampler (`seed`) hands out, in its order."""
    from pipeline.data import load_rows, prompt_examples
    from pipeline.onpolicy import PromptSampler

    return PromptSampler(prompt_examples(load_rows(path), path), seed=seed).next(n)


def keep_layers_spec(s: str):
    return [int(x) for x in s.split(",")] if "," in s else s


def model_config(setting: str = "equal"):
    """Ours' model settings: fp32 without autocast, frozen teacher in fp32 (`equal`, and the held-out evaluation);
    bf16 autocast in `best` on a CPU with native bf16, with the frozen teacher stored in bf16 there
    (`bench_common.setting_model_kwargs`)."""
    from pipeline.config import ModelConfig

    autocast = "on" if setting == "best" and best_bf16() else "off"
    return ModelConfig(name_or_path=MODEL, cpu_autocast=autocast, **setting_model_kwargs(setting))


def trl_bf16(setting: str) -> bool:
    return setting == "best" and best_bf16()


def summarise(steps: list[dict]) -> dict:
    """Means over the steps after the first (warm-up); `steps`: dicts with generate_s, update_s, their CPU
    seconds cpu_generate_s, cpu_update_s, and tokens."""
    timed = steps[1:] or steps
    mean = {k: sum(s[k] for s in timed) / len(timed)
            for k in ("generate_s", "update_s", "cpu_generate_s", "cpu_update_s", "tokens")}
    wall, cpu = mean["generate_s"] + mean["update_s"], mean["cpu_generate_s"] + mean["cpu_update_s"]
    tokens = mean.pop("tokens")
    return {"seconds_per_step": wall, "cpu_seconds_per_step": cpu, **mean, "tokens_per_step": tokens,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "timed_steps": len(timed),
            "steps": steps}


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------


def ours_setup(args, setting: str):
    """-> (models, prompts, cfg, precision): our distill stage's run for `args` in `setting`."""
    from pipeline.config import DistillConfig, KeepLayersConfig, Recipe, StudentConfig
    from pipeline.data import load_rows, prompt_examples
    from pipeline.models import resolve_precision
    from pipeline.stages.distill import build_models

    torch.manual_seed(args.seed)
    mcfg = model_config(setting)
    precision = resolve_precision(mcfg)
    extra = best_onpolicy_kwargs(DistillConfig, sampler_logprobs=False) if setting == "best" else {}
    cfg = DistillConfig(
        teacher_from="base", student=StudentConfig(from_teacher=KeepLayersConfig(keep_layers_spec(args.keep_layers))),
        prompts=args.prompts, beta=0.0, divergence="reverse_kl", estimator="full", lora=None,
        iterations=args.steps, rollout_batch_size=args.batch, minibatch_size=args.batch, micro_batch_size=args.batch,
        epochs=1, lr=args.lr, max_new_tokens=args.max_new_tokens, temperature=1.0, max_grad_norm=1.0,
        log_samples_every=0, checkpoint_every=0, **extra)
    models = build_models(Recipe(model=mcfg), cfg, precision)
    # train_distill draws from PromptSampler(prompts, seed=args.seed): the prompts TRL gets, in this order.
    prompts = prompt_examples(load_rows(args.prompts), args.prompts)
    return models, prompts, cfg, precision


def side_ours(args, out: Path) -> dict:
    import pipeline.loop as loop
    from pipeline.onpolicy import unwrap_for_generation
    from pipeline.stages.distill import train_distill

    loop.Throughput = CPUThroughput  # the one loop makes one per iteration
    models, prompts, cfg, precision = ours_setup(args, args.setting)
    hist = train_distill(models, prompts, cfg, precision, out / "stage", seed=args.seed, progress=False, resume=False)
    steps = [{"generate_s": h["distill/time_generate_s"],
              "update_s": h.get("distill/time_label_s", 0.0) + h["distill/time_train_s"],
              "label_s": h.get("distill/time_label_s", 0.0), "train_s": h["distill/time_train_s"],
              "cpu_generate_s": t.cpu.get("generate", 0.0),
              "cpu_update_s": t.cpu.get("label", 0.0) + t.cpu.get("train", 0.0),
              "tokens": h["distill/response_length"] * args.batch, "loss": h["distill/loss"]}
             for h, t in zip(hist, CPUThroughput.made)]
    unwrap_for_generation(models.student).save_pretrained(out / "student")
    return {**summarise(steps), "peak_rss_mb": peak_rss_mb(), "kept_layers": models.kept_layers,
            "autocast_bf16": precision.autocast, "logits_chunk_size": cfg.logits_chunk_size,
            "logprobs_from": getattr(cfg, "logprobs_from", "-"),
            "frozen_dtype": str(next(models.teacher.parameters()).dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------


def side_trl(args, out: Path) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from pipeline.models import choose_layers, resolve_model_path, student_from_teacher

    torch.manual_seed(args.seed)
    model_dir = resolve_model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False).eval()
    kept = choose_layers(teacher, keep_layers_spec(args.keep_layers))
    student = student_from_teacher(teacher, kept)
    rows = ordered_prompts(args.prompts, args.steps * args.batch, args.seed)
    dataset = Dataset.from_dict({"prompt": [ex["prompt"] for ex in rows]})
    config = DistillationConfig(
        output_dir=str(out / "trl_out"), report_to="none", save_strategy="no", disable_tqdm=True, seed=args.seed,
        logging_steps=1, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-5, optim="adamw_torch_fused",
        max_grad_norm=1.0, beta=1.0, temperature=1.0, top_k=0, top_p=1.0,
        max_completion_length=args.max_new_tokens, gradient_checkpointing=False, bf16=trl_bf16(args.setting),
        fp16=False,
        shuffle_dataset=False, disable_dropout=True, dataloader_num_workers=0, use_cpu=True)

    steps: list[dict] = []
    current: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kw):
            current.clear()
            current["t0"], current["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kw):
            total, cpu = time.perf_counter() - current["t0"], time.process_time() - current["c0"]
            steps.append({"generate_s": current["generate_s"], "update_s": total - current["generate_s"],
                          "cpu_generate_s": current["cpu_generate_s"],
                          "cpu_update_s": cpu - current["cpu_generate_s"], "tokens": current["tokens"]})

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tok, callbacks=[StepTimer()])
    gen_single, gen_score = trainer._generate_single_turn, trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        result = gen_single(*a, **kw)
        current["generate_s"] = current.get("generate_s", 0.0) + time.perf_counter() - t
        current["cpu_generate_s"] = current.get("cpu_generate_s", 0.0) + time.process_time() - c
        return result

    def counted(*a, **kw):
        result = gen_score(*a, **kw)
        current["tokens"] = current.get("tokens", 0) + int(result["completion_mask"].sum())
        return result

    trainer._generate_single_turn = timed_generate
    trainer._generate_and_score_completions = counted
    import contextlib

    bf16 = trl_bf16(args.setting)
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for s, loss in zip(steps, losses):
        s["loss"] = loss
    trainer.model.save_pretrained(out / "student")
    return {**summarise(steps), "peak_rss_mb": peak_rss_mb(), "kept_layers": kept, "trl": trl.__version__,
            "bf16": bf16}


# --------------------------------------------------------------------------------------------
# Held-out reverse KL, the same function for every student
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_kl(student, teacher, tok, examples: list, max_new_tokens: int, batch: int) -> dict:
    """Greedy student answers -> exact reverse / forward KL per answer token (temperature 1)."""
    from pipeline.models import resolve_precision
    from pipeline.onpolicy import RolloutBatch, SamplingSettings, encode_prompts, sample_responses
    from pipeline.stages.distill import DistillModels, label_states

    precision = resolve_precision(model_config())
    models = DistillModels(student=student.eval(), teacher=teacher.eval(), tokenizer=tok, vocab_size=len(tok))
    rkl = fkl = n = 0.0
    for start in range(0, len(examples), batch):
        rows = examples[start:start + batch]
        q, qm = encode_prompts(tok, rows, precision.device)
        r, rm, e = sample_responses(student, tok, q, qm, SamplingSettings(max_new_tokens), precision.autocast_ctx(),
                                    greedy=True, vocab_size=models.vocab_size)
        rb = RolloutBatch(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm, logprobs=None, ended=e)
        labels = label_states(models, rb, 1.0, batch, precision)
        rkl += float(torch.where(rm, labels.reverse_kl, 0.0).sum())
        fkl += float(torch.where(rm, labels.forward_kl, 0.0).sum())
        n += float(rm.sum())
    return {"reverse_kl_per_token": rkl / max(n, 1.0), "forward_kl_per_token": fkl / max(n, 1.0),
            "answer_tokens": int(n)}


def evaluate(args, student_dirs: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from pipeline.data import load_rows, prompt_examples
    from pipeline.models import choose_layers, load_policy, resolve_precision, student_from_teacher

    teacher, tok = load_policy(MODEL, model_config(), resolve_precision(model_config()))
    teacher.requires_grad_(False).eval()
    examples = prompt_examples(load_rows(args.heldout_file, max_rows=args.heldout), args.heldout_file)
    out = {}
    initial = student_from_teacher(teacher, choose_layers(teacher, keep_layers_spec(args.keep_layers)))
    out["untrained"] = heldout_kl(initial, teacher, tok, examples, args.max_new_tokens, args.batch)
    del initial
    for name, d in student_dirs.items():
        student = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        out[name] = heldout_kl(student, teacher, tok, examples, args.max_new_tokens, args.batch)
        del student
    return out


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def run_side(side: str, args, tmp: Path, setting: str) -> dict:
    out = tmp / setting / side
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--side-out", str(out), "--setting", setting,
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
           "--lr", str(args.lr), "--keep-layers", args.keep_layers, "--prompts", args.prompts, "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_cpu_decoder:
        cmd += ["--no-cpu-decoder"]
    print(f"{side} ({setting}): running {args.steps} steps ...", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    fig = json.loads((out / "figures.json").read_text())
    print(f"{side} ({setting}): done in {time.time() - t:.0f}s wall", flush=True)
    return fig


def print_table(figs: dict, kl: dict, setting: str) -> None:
    ours, trl = figs.get("ours"), figs.get("trl")
    print(f"\n== setting: {setting} ==")
    if ours:
        print(f"ours: bf16 autocast {ours.get('autocast_bf16')}, logits_chunk_size {ours.get('logits_chunk_size')}, "
              f"logprobs_from {ours.get('logprobs_from')}, teacher stored in {ours.get('frozen_dtype', '-')}")
    if trl:
        print(f"trl: bf16 {trl.get('bf16')}")
    rows = [("seconds / step", "seconds_per_step", "{:.2f}"), ("  generate s", "generate_s", "{:.2f}"),
            ("  label + update s", "update_s", "{:.2f}"), ("CPU s / step", "cpu_seconds_per_step", "{:.2f}"),
            ("  generate CPU s", "cpu_generate_s", "{:.2f}"), ("  label + update CPU s", "cpu_update_s", "{:.2f}"),
            ("response tokens / step", "tokens_per_step", "{:.1f}"), ("tokens / s", "tokens_per_s", "{:.2f}"),
            ("tokens / CPU s", "tokens_per_cpu_s", "{:.2f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
            ("held-out reverse KL/token", "heldout_reverse_kl", "{:.4f}"),
            ("held-out forward KL/token", "heldout_forward_kl", "{:.4f}")]
    for name, f in figs.items():
        if name in kl:
            f["heldout_reverse_kl"] = kl[name]["reverse_kl_per_token"]
            f["heldout_forward_kl"] = kl[name]["forward_kl_per_token"]
    print_ratio_table(rows, ours, trl, "trl", 27)
    for name, f in figs.items():
        losses = [round(s["loss"], 4) for s in f["steps"] if "loss" in s]
        print(f"{name} loss per step: {losses}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5, help="recipes/distill.yaml's")
    ap.add_argument("--keep-layers", default="every_2nd", help="every_2nd, first_K, ... or a list like 0,2,4")
    ap.add_argument("--prompts", default="data/constraints/prompts.jsonl")
    ap.add_argument("--heldout-file", default="eval/constraints/heldout.jsonl")
    ap.add_argument("--heldout", type=int, default=32, help="held-out prompts (the file's first N); 0 skips")
    ap.add_argument("--seed", type=int, default=0, help="prompt order and sampling streams, both sides")
    ap.add_argument("--only", choices=["ours", "trl"])
    ap.add_argument("--threads", type=int, help="torch threads in every process (default torch's); 1 makes the "
                    "CPU seconds a steadier measure of work on a busy machine")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--no-cpu-decoder", action="store_true",
                    help="ours samples through transformers' generate, not pipeline/decode.py (model.cpu_decoder false)")
    add_settings_arg(ap)
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: one side, in a subprocess
    ap.add_argument("--setting", default="equal", choices=["equal", "best"], help=argparse.SUPPRESS)
    ap.add_argument("--side-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.side:
        if args.no_cpu_decoder:
            from pipeline.decode import set_cpu_decoder

            set_cpu_decoder(False)
        out = Path(args.side_out)
        fig = side_ours(args, out) if args.side == "ours" else side_trl(args, out)
        (out / "figures.json").write_text(json.dumps(fig, indent=2))
        return

    settings = settings_list(args.settings)
    print(f"teacher {MODEL}, student keep_layers {args.keep_layers}, {args.steps} steps, batch {args.batch}, "
          f"max_new_tokens {args.max_new_tokens}, lr {args.lr}, settings {', '.join(settings)} (CPU native bf16: "
          f"{best_bf16()}), torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min) at the start", flush=True)
    figs: dict = {s: {} for s in settings}
    with tempfile.TemporaryDirectory(prefix="distill_vs_trl-") as tmp:
        for setting in settings:
            for side in ("ours", "trl"):
                if args.only in (None, side):
                    figs[setting][side] = run_side(side, args, Path(tmp), setting)
        kl = {}
        if args.heldout:
            print(f"held-out: {args.heldout} prompts of {args.heldout_file}, greedy, max_new_tokens "
                  f"{args.max_new_tokens}, fp32 ...", flush=True)
            kl = evaluate(args, {f"{setting}/{side}": Path(tmp) / setting / side / "student"
                                 for setting in settings for side in figs[setting]})
    for setting in settings:
        print_table(figs[setting], {side: kl[f"{setting}/{side}"] for side in figs[setting]
                                    if f"{setting}/{side}" in kl}, setting)
    if "untrained" in kl:
        print(f"\nuntrained student: held-out reverse KL/token {kl['untrained']['reverse_kl_per_token']:.4f}, "
              f"forward {kl['untrained']['forward_kl_per_token']:.4f} "
              f"({kl['untrained']['answer_tokens']} answer tokens)")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figs, "heldout": kl}, indent=2))


if __name__ == "__main__":
    main()
