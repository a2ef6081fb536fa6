"""Recipes: one dataclass per section, parsed strictly.

A recipe is YAML with `run:`, `model:`, `stages:` and one section per stage. Parsing is strict at
every depth: an unknown key is an error naming the key, its path and the closest valid key; a wrong
type names the key and the expected type; YAML syntax errors give the line. Numbers written as
`1e-4` (which PyYAML reads as a string) are coerced for numeric fields.

Stages refer to each other by name (`policy_from: sft`), resolved by `Recipe.stage_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

STAGE_NAMES = ("sft", "reward", "ppo", "distill", "eval")


class RecipeError(ValueError):
    """A recipe problem a user can fix; the message names the file, key and what would be right."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow", "none"]


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    # An earlier run directory. A stage name this recipe does not run (e.g. `policy_from: sft` in a
    # PPO-only recipe) resolves to `<inputs_from>/<stage>/final` instead of this run's own directory,
    # so a recipe can build on another run without writing into it.
    inputs_from: Optional[str] = None
    # Experiment trackers every stage logs to besides `<stage>/metrics.jsonl`: tensorboard, wandb, trackio,
    # mlflow (each needs its package), or none. They read their own settings from their environment
    # variables (WANDB_MODE, WANDB_PROJECT, TRACKIO_DIR, MLFLOW_TRACKING_URI, ...); see pipeline/tracking.py.
    report_to: Union[Tracker, list[Tracker]] = field(default_factory=lambda: ["tensorboard"])
    # false: delete `<stage>/checkpoints/` once the stage's final/ and summary.json are written (a finished
    # stage is never resumed; checkpoints only serve an interrupted one).
    keep_checkpoints: bool = True


@dataclass
class ModelConfig:
    # Hub id, local directory, a .gguf file, or the builtin name `smollm2-135m-instruct`.
    name_or_path: str = "smollm2-135m-instruct"
    # auto: bf16 on a GPU that supports it, fp32 on CPU. Or float32 / bfloat16 / float16.
    dtype: str = "auto"
    # auto: cuda if present, else cpu. Or cpu / cuda / cuda:N / mps.
    device: str = "auto"
    # bf16 autocast on CPU: auto = on when the CPU has native bf16 (AMX / AVX512-BF16).
    cpu_autocast: Literal["auto", "on", "off"] = "auto"
    # Storage dtype of the frozen models (PPO's reference copy under full fine-tuning, reward models scoring PPO
    # rewards or eval answers, the distillation teacher). auto: bfloat16 when forwards run under bf16 autocast or
    # the parameters are bf16 already, else the parameter dtype. Trainable models keep `dtype`.
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # On a CPU, Llama-architecture models decode (rollouts, eval, IFEval) through pipeline/decode.py: the same
    # forward without generate's per-step work. false: transformers' generate everywhere.
    cpu_decoder: bool = True
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # The hub id of this model when `name_or_path` is a local directory or a .gguf file: adapters and model
    # cards name it as their base so they load elsewhere (known for the builtin; a hub id names itself).
    hub_id: Optional[str] = None
    # Chat template for a tokenizer without one (a base model), or to replace its own: a name from
    # `pipeline.data.CHAT_TEMPLATES` (`chatml`, `zephyr`), a `.jinja` file, or the template text.
    chat_template: Optional[str] = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class DataSource:
    """A data key (`sft.data`, `ppo.prompts`, ...) written as a mapping instead of a string, for what a
    string cannot say: `{path: org/ds, config: x, split: train, revision: abc}`. Read by
    `datasets.load_dataset(path, name=config, split=..., revision=..., data_files=..., streaming=...)`;
    `path` may also be a local file, a local dataset directory, or a builder (`json`) with `data_files`."""

    path: str = ""
    config: Optional[str] = None
    split: Optional[str] = None
    revision: Optional[str] = None
    data_files: Union[str, list[str], None] = None
    # Read rows as they come instead of downloading the whole split first (with `max_rows`: only those).
    streaming: bool = False


# A data key: a path / `hub_id[:split]` string, or a DataSource mapping.
DataRef = Union[DataSource, str]


@dataclass
class ColumnMap:
    """A stage's `columns`: the dataset's own column name for each name the pipeline reads, e.g.
    `sft.columns: {prompt: instruction, completion: output}`. Unset names are read as they are."""

    prompt: Optional[str] = None
    completion: Optional[str] = None
    messages: Optional[str] = None
    conversations: Optional[str] = None
    text: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    margin: Optional[str] = None
    responses: Optional[str] = None
    ranks: Optional[str] = None


@dataclass
class SFTConfig:
    data: DataRef = ""
    eval_data: Optional[DataRef] = None
    # The data's column names for prompt / completion / messages / conversations / text (applies to
    # `data` and `eval_data`).
    columns: Optional[ColumnMap] = None
    # When no eval_data is given, hold out this share of `data` for the evaluation loss.
    eval_fraction: float = 0.05
    init_from: str = "base"
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    lr: float = 2.0e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    completion_only_loss: bool = True
    # Loss weight of the first `response_start_tokens` response tokens (1.0: plain SFT). Whether a response
    # is lowercase, quoted or a list is decided by its first token or two, a few percent of the tokens;
    # weighting them makes the demonstrations teach that decision (see `response_start_weights`).
    response_start_weight: float = 1.0
    response_start_tokens: int = 4
    # Batches of similar length (less padding: about a quarter fewer tokens on the built-in data).
    group_by_length: bool = True
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    logging_steps: int = 5
    eval_steps: int = 0  # 0: evaluate once per epoch
    checkpoint_every: int = 50  # optimizer steps between resumable Trainer checkpoints
    max_rows: Optional[int] = None
    # Upload `<stage>/final/` (model card included; a LoRA adapter in its `adapter/` folder) to the Hub repo
    # `hub_model_id` once the stage has finished. Needs a write token (`hf auth login` or HF_TOKEN).
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = True


@dataclass
class RewardConfig:
    data: DataRef = ""
    eval_data: Optional[DataRef] = None
    # Unrequested-format probe (pipeline/format_probe.py) on up to this many held-out pairs whose rows carry
    # `instruction_id_list`: how often the model prefers a chosen answer with a P.S./CAPS/title/quotes added
    # that its prompt did not ask for. 0 = off.
    format_probe_rows: int = 48
    # The data's column names for prompt / chosen / rejected / margin / responses / ranks.
    columns: Optional[ColumnMap] = None
    eval_fraction: float = 0.1
    init_from: str = "sft"
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    lr: float = 1.0e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 512
    # Batches of pairs of similar length (less padding).
    group_by_length: bool = True
    # Bradley-Terry: -log sigmoid(r_c - r_r - margin); use the per-pair `margin` column when present.
    use_margin: bool = True
    # Adds center_coef * (r_c + r_r)^2 to keep scores near zero (Eisenstein et al. 2023).
    center_coef: float = 0.01
    # Ranked lists: keep ties as pairs? Ties are skipped by default.
    keep_ties: bool = False
    logging_steps: int = 5
    # Prompts whose policy samples give the normalisation statistics saved with the model.
    norm_prompts: Optional[DataRef] = None
    # The policy sampled for those statistics. Default: the PPO stage's starting policy
    # (`ppo.policy_from`) when the recipe has PPO and that model exists by then, else `init_from`.
    norm_policy: Optional[str] = None
    norm_samples: int = 64
    max_new_tokens: int = 96
    checkpoint_every: int = 50  # optimizer steps between resumable Trainer checkpoints
    max_rows: Optional[int] = None
    # Upload `<stage>/final/` (model card included; a LoRA adapter in its `adapter/` folder) to the Hub repo
    # `hub_model_id` once the stage has finished. Needs a write token (`hf auth login` or HF_TOKEN).
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = True


@dataclass
class RewardSourceConfig:
    # `rm` (a reward model: `from` a stage name or path), `verifier` (the task checkers).
    kind: Literal["rm", "verifier"] = "rm"
    source: str = "reward"
    weight: float = 1.0
    # verifier only: the share of the prompt's instructions passed (dense) instead of 1 when all pass.
    partial: bool = False


@dataclass
class OnPolicyConfig:
    """Settings PPO and distillation share, under the same names: both run the one on-policy loop
    (`pipeline/onpolicy.py`). Counts: `rollout_batch_size` prompts per iteration, each sampled
    `samples_per_prompt` times, so an iteration holds rollout_batch_size * samples_per_prompt sequences;
    `minibatch_size` sequences per optimizer step and `micro_batch_size` sequences per forward pass."""

    prompts: DataRef = ""
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    iterations: int = 20
    rollout_batch_size: int = 16
    samples_per_prompt: int = 1
    minibatch_size: int = 8
    micro_batch_size: int = 8
    epochs: int = 2
    lr: float = 5.0e-5
    max_grad_norm: float = 1.0
    # Stop an iteration's epochs once a minibatch's approx KL(old || new) passes this (null: never).
    target_approx_kl: Optional[float] = None
    # PPO clip range of the ratio pi / pi_behaviour (PPO; distillation's sampled estimator).
    clip_coef: float = 0.2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Rows per generate call (null: a process's whole batch at once). When set, each call samples under
    # a seed from (run seed, iteration, its first row in the global batch), so the rollouts do not depend
    # on the number of processes when each process's share of the rows is a multiple of it.
    generation_batch_size: Optional[int] = None
    # hf: transformers generate; vllm: vLLM (optional extra, CUDA only); auto: vllm when importable on CUDA.
    rollout_engine: Literal["auto", "hf", "vllm"] = "hf"
    log_samples_every: int = 5
    checkpoint_every: int = 10
    max_nonfinite_steps: int = 3
    # Per-token log-probs, entropies and divergences from the final hidden states through the output layer in
    # chunks of this many positions, so the (batch, tokens, vocabulary) logits never exist at once (the same
    # values and gradients; one extra output-layer matmul per chunk in backward). 0: off.
    logits_chunk_size: int = 0
    # Behaviour log-probs: `recompute` (a training forward after sampling) or `sampler` (the sampler's own, one
    # forward less; needs top_k 0, top_p 1.0 and the hf engine; PPO only). docs/implementation_details.md.
    logprobs_from: Literal["recompute", "sampler"] = "recompute"
    # Log the sampler-minus-recompute log-prob gap (`<stage>/logprobs_gap/*`) at the first and every Nth iteration; 0: never.
    logprobs_gap_every: int = 5
    # Rows (per process) of each iteration's batch that the gap is measured on.
    logprobs_gap_rows: int = 4
    # Upload `<stage>/final/` (model card included; a LoRA adapter in its `adapter/` folder) to the Hub repo
    # `hub_model_id` once the stage has finished. Needs a write token (`hf auth login` or HF_TOKEN).
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = True

    def __post_init__(self) -> None:
        problem = self.logprobs_from_problem()
        if problem:
            raise RecipeError(problem)

    def logprobs_from_problem(self, section: Optional[str] = None) -> Optional[str]:
        """Why `logprobs_from: sampler` cannot hold with the other settings (None: it can, or it is `recompute`).
        The sampler records softmax(logits / temperature) over the whole vocabulary, the trainer's distribution;
        top-k / top-p sample from a truncated one, so its log-probs would not be the behaviour policy's."""
        if self.logprobs_from != "sampler":
            return None
        section = section or type(self).__name__.removesuffix("Config").lower()
        key = f"`{section}.logprobs_from: sampler`"
        if section == "distill":
            return (f"{key} is not used by distillation (its behaviour log-probs come from the student's labelling "
                    "forward, which it needs anyway); drop it or set `recompute`.")
        truncated = []
        if self.top_k > 0:
            truncated.append(f"`{section}.top_k: {self.top_k}`")
        if self.top_p < 1.0:
            truncated.append(f"`{section}.top_p: {self.top_p}`")
        if truncated:
            return (f"{key} keeps the sampler's log-probs as the behaviour log-probs, but {' and '.join(truncated)} "
                    "samples from a truncated distribution, not the temperature-scaled softmax the trainer computes. "
                    f"Set `{section}.top_k: 0` and `{section}.top_p: 1.0`, or `{section}.logprobs_from: recompute`.")
        if self.rollout_engine == "vllm":
            return (f"{key}: the vLLM rollout engine does not return log-probs yet; set `{section}.rollout_engine: "
                    f"hf` or `{section}.logprobs_from: recompute`.")
        return None


@dataclass
class PPOConfig(OnPolicyConfig):
    policy_from: str = "sft"
    # The prompt file's column names for prompt / messages / conversations.
    columns: Optional[ColumnMap] = None
    reward_from: str = "reward"
    # Several reward sources summed with weights; when set, replaces reward_from.
    rewards: Optional[list[RewardSourceConfig]] = None
    # The critic's backbone: the reward model's, a copy of the policy's, or `shared`: a value head on the policy's
    # own hidden states (no second model; docs/implementation_details.md).
    critic_from: Literal["reward", "policy", "shared"] = "reward"
    advantage: Literal["gae", "reinforce", "rloo"] = "gae"
    critic_lr: float = 1.0e-3  # LoRA critic: 1e-4 left its explained variance below 0 (docs/results.md)
    # The critic's own gradient clip (null: max_grad_norm). `shared`: one optimizer and one clip over policy
    # and critic, as before separate updates (kept for the ablation in docs/results.md).
    critic_max_grad_norm: Optional[float] = None
    critic_optimizer: Literal["separate", "shared"] = "separate"
    # Iterations before the policy moves that train only the critic on fresh rollouts (verl's critic_warmup).
    critic_warmup: int = 0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_coef_v: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["reward", "loss"] = "reward"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    normalize_reward: bool = True
    missing_eos_penalty: Optional[float] = None


@dataclass
class KeepLayersConfig:
    # `every_2nd`, `every_3rd`, `first_K` (e.g. first_10), or an explicit list of layer indices.
    keep_layers: Union[str, list[int]] = "every_3rd"
    # The kept layers next to a removed block (the cut's seams) train at lr * this; the others at lr. 1.0: off.
    neighbour_lr_scale: float = 1.0


@dataclass
class StudentConfig:
    name_or_path: Optional[str] = None
    from_teacher: Optional[KeepLayersConfig] = None


@dataclass
class DistillConfig(OnPolicyConfig):
    teacher_from: str = "ppo"
    # Column names for prompt / messages / conversations (and completion, for warmup_data); applies to
    # prompts, heldout_prompts and warmup_data.
    columns: Optional[ColumnMap] = None
    student: StudentConfig = field(default_factory=lambda: StudentConfig(from_teacher=KeepLayersConfig()))
    lora: Optional[LoraConfig] = None
    iterations: int = 30
    epochs: int = 1
    lr: float = 1.0e-4
    log_samples_every: int = 10
    # Mixture pi_i = beta_i * teacher + (1 - beta_i) * student; beta = 0 is fully on-policy.
    beta: float = 0.0
    beta_schedule: Literal["constant", "linear", "exponential"] = "constant"
    beta_end: float = 0.0
    beta_decay: float = 0.9
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    jsd_beta: float = 0.5
    estimator: Literal["full", "sampled"] = "full"
    # Adds coef * KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest of the
    # mass (`rl.losses.topk_forward_kl`) to the divergence; full estimator only. 0: off.
    topk_forward_kl_coef: float = 0.0
    topk_forward_kl_k: int = 32  # k of that term: the teacher's most likely tokens at each state
    # Each state's loss (divergence and top-k term) weighs 1 + (eos_weight - 1) * p_teacher(EOS | state), so the
    # few states where the teacher would stop are not drowned by the rest (`rl.eos_state_weights`); full estimator
    # only, not the cross-entropy warm-up. 1: off.
    eos_weight: float = 1.0
    # Sampling temperature of the student's own rollouts (None: `temperature`, which the teacher's rollouts and the
    # loss keep). Low (e.g. 0.1, near greedy): the student is trained on the states it visits when evaluated
    # greedily, repetition loops included (DAgger's "the learner's own test-time states"). Full estimator only.
    student_temperature: Optional[float] = None
    # Optional warm-up before the mixture iterations: `warmup_iterations` batches of fixed demonstrations
    # (prompt + completion rows, e.g. the SFT data) whose states the teacher labels; no sampling, so a
    # batch costs a fraction of a sampled one (GKD's supervised part). Divergence: `warmup_divergence`,
    # default `divergence`. Full estimator only. A warm-up batch holds rollout_batch_size demonstrations.
    # `warmup_divergence: cross_entropy`: SFT on the demonstrations' tokens (hard labels, no teacher forward).
    warmup_data: Optional[DataRef] = None
    warmup_iterations: int = 0
    warmup_divergence: Optional[Literal["reverse_kl", "forward_kl", "jsd", "cross_entropy"]] = None
    # More prompt files mixed into `prompts` (one pool, sampled alike), e.g. general prompts whose rows have no
    # (or an empty) instruction_id_list; the pass rate counts the rows with instructions only.
    extra_prompts: list[DataRef] = field(default_factory=list)
    heldout_prompts: Optional[DataRef] = None
    # The stage's own held-out comparison of student and teacher (pass rates, KL by position; heldout.json).
    # false: skip it, e.g. when a later eval stage scores the student on the same prompts anyway.
    heldout_eval: bool = True
    # Prompts per generate call in the held-out evaluation (default: rollout_batch_size). Larger batches
    # mean fewer sequential decode steps; greedy answers do not depend on it.
    heldout_batch_size: Optional[int] = None


@dataclass
class EvalConfig:
    # Model names: `base`, any stage name (`sft`, `ppo`, `distill`), a local path or a hub id.
    models: list[str] = field(default_factory=lambda: ["base"])
    # Held-out prompt files, each a prompt set named by its stem; IFEval-style records are checked.
    prompts: list[DataRef] = field(default_factory=list)
    # Reward model (stage name or path) for RM scores and win rates; none: those metrics are skipped.
    reward_from: Optional[str] = None
    # KL of every model is measured to this model (default: base).
    reference: Optional[str] = None
    # Win rates are against this model's responses (default: the reference); needs reward_from.
    baseline: Optional[str] = None
    max_new_tokens: int = 128
    batch_size: int = 16
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0  # only with do_sample
    max_prompts: Optional[int] = None  # per prompt file
    num_samples_in_report: int = 3  # prompts each step gained (and lost) shown side by side in the report
    # IFEval by lm-evaluation-harness (pipeline/ifeval.py): every listed model on eval/ifeval/input_data.jsonl,
    # greedy with the chat template; the set `ifeval_harness` in results.json and the report.
    ifeval: bool = False
    ifeval_max_gen_toks: Optional[int] = None  # None: the harness task's own (1280)
    ifeval_limit: Optional[int] = None  # the first N prompts only (not comparable with published IFEval)


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[str] = field(default_factory=list)
    sft: Optional[SFTConfig] = None
    reward: Optional[RewardConfig] = None
    ppo: Optional[PPOConfig] = None
    distill: Optional[DistillConfig] = None
    eval: Optional[EvalConfig] = None
    # Where the recipe came from (not a YAML key); relative data paths resolve against the cwd.
    source: Optional[str] = field(default=None, metadata={"internal": True})

    # -- hand-offs between stages ----------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def resolve_model_ref(self, ref: str) -> str:
        """`base` -> the recipe's model; a stage name -> that stage's `final/` (in `run.inputs_from` when
        this recipe does not run the stage and that is set); else a path or hub id."""
        if ref == "base":
            return self.model.name_or_path
        if ref in STAGE_NAMES:
            if self.run.inputs_from and ref not in self.stages:
                final = Path(self.run.inputs_from) / ref / "final"
                if not final.exists():
                    raise RecipeError(
                        f"{self.source or '<recipe>'}: `{ref}` is not a stage of this recipe, so it is read from "
                        f"`run.inputs_from` ({self.run.inputs_from}), but {final} does not exist. Run the recipe that "
                        f"makes it first, or point `run.inputs_from` at a run directory that has `{ref}/final`."
                    )
                return str(final)
            return str(self.stage_dir(ref) / "final")
        return ref

    def to_dict(self) -> dict:
        # Data keys hold `pipeline.data.DataSpec` strings; `recipe_value()` is what the YAML said.
        d = dataclasses.asdict(self, dict_factory=lambda kv: {k: _recipe_value(v) for k, v in kv})
        d.pop("source", None)
        return {k: v for k, v in d.items() if v is not None}


def _recipe_value(v: Any) -> Any:
    if hasattr(v, "recipe_value"):
        return v.recipe_value()
    return [_recipe_value(x) for x in v] if isinstance(v, list) else v


# --------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"a list of {_type_name(arg)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _fail_type(value: Any, tp: Any, path: str, where: str) -> RecipeError:
    return RecipeError(f"{where}: `{path}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, where)
            except RecipeError as e:
                # A mapping for a dataclass, or a list for a list type, failed inside: report the inner
                # error (e.g. `ppo.rewards[1].wieght`), not "must be a list or null".
                shaped = (isinstance(value, dict) and dataclasses.is_dataclass(arg)) or (
                    isinstance(value, list) and typing.get_origin(arg) is list)
                errors.append((shaped, e))
        inner = [e for shaped, e in errors if shaped]
        if inner:
            raise inner[0]
        raise _fail_type(value, tp, path, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise RecipeError(
            f"{where}: `{path}` must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}.{extra}"
        )
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _fail_type(value, tp, path, where)
        return [_coerce(v, arg, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail_type(value, tp, path, where)
        return parse_section(tp, value, path, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail_type(value, tp, path, where)
    if tp is int:
        if isinstance(value, bool):
            raise _fail_type(value, tp, path, where)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise _fail_type(value, tp, path, where) from None
            if f.is_integer():
                return int(f)
        raise _fail_type(value, tp, path, where)
    if tp is float:
        if isinstance(value, bool):
            raise _fail_type(value, tp, path, where)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string: accept numeric strings for numeric fields.
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail_type(value, tp, path, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail_type(value, tp, path, where)
    return value


# Old key -> its name now (a recipe written for an older version gets told, not "unknown key").
RENAMED_KEYS = {"ppo_epochs": "epochs"}


def parse_section(cls: type, data: dict, path: str, where: str) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields and key in RENAMED_KEYS and RENAMED_KEYS[key] in fields:
            raise RecipeError(f"{where}: `{key_path}` was renamed to `{RENAMED_KEYS[key]}` (PPO and distillation "
                              f"share one vocabulary); write `{path}.{RENAMED_KEYS[key]}`.")
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            extra = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(
                f"{where}: unknown key `{key_path}`.{extra} Valid keys under `{path or 'the top level'}`: "
                f"{', '.join(fields)}."
            )
        kwargs[key] = _coerce(value, hints[key], key_path, where)
    try:
        return cls(**kwargs)
    except RecipeError as e:  # a section's own cross-field check (`__post_init__`): name the file too
        if str(e).startswith(f"{where}:"):
            raise
        raise RecipeError(f"{where}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with `<<:` may be overridden; a key written twice may not
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: let the base class report it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first + 1}); YAML keeps only the last "
                        "one, so remove or merge one of them", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str, where: str) -> dict:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}:{loc}: YAML syntax error: {problem}.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping with `run:`, `model:` and `stages:`.")
    return data


def _parse_override_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to the raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected `section.key=value`, e.g. `sft.lr=1e-4`.")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise RecipeError(f"override {item!r}: `{k}` is not a section.")
            node = node[k]
        node[keys[-1]] = _parse_override_value(raw)
    return data


def parse_recipe(data: dict, where: str = "<recipe>") -> Recipe:
    data = dict(data)
    stages = data.get("stages", [])
    recipe = parse_section(Recipe, data, "", where)
    for i, s in enumerate(recipe.stages):
        if s not in STAGE_NAMES:
            hint = difflib.get_close_matches(s, STAGE_NAMES, n=1)
            extra = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(f"{where}: `stages[{i}]` is {s!r}, not a stage.{extra} Stages: {', '.join(STAGE_NAMES)}.")
    if len(set(stages)) != len(stages):
        raise RecipeError(f"{where}: `stages` lists a stage twice: {stages}.")
    # A listed stage gets its defaults when its section is absent; sections need their data.
    for s in recipe.stages:
        if getattr(recipe, s) is None:
            setattr(recipe, s, parse_section(SECTION_TYPES[s], {}, s, where))
    _check_references(recipe, where)
    if recipe.sft is not None and (recipe.sft.response_start_weight < 0 or recipe.sft.response_start_tokens < 0):
        raise RecipeError(
            f"{where}: `sft.response_start_weight` ({recipe.sft.response_start_weight}) and "
            f"`sft.response_start_tokens` ({recipe.sft.response_start_tokens}) must be >= 0 (weight 1.0: plain SFT)."
        )
    from .data import prepare_recipe_data

    prepare_recipe_data(recipe, where)  # data keys -> DataSpec (hub options, columns); model.chat_template
    recipe.source = where
    return recipe


SECTION_TYPES = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig, "distill": DistillConfig, "eval": EvalConfig}

# Keys that name another stage's output, and which stage they may name.
_REFERENCES = {
    "sft": ["init_from"],
    "reward": ["init_from"],
    "ppo": ["policy_from", "reward_from"],
    "distill": ["teacher_from"],
}


def _check_references(recipe: Recipe, where: str) -> None:
    order = {s: i for i, s in enumerate(recipe.stages)}
    for stage in recipe.stages:
        section = getattr(recipe, stage)
        for key in _REFERENCES.get(stage, []):
            ref = getattr(section, key)
            if key == "reward_from" and section.rewards:
                continue
            if ref in STAGE_NAMES and ref != "eval":
                if ref == stage:
                    raise RecipeError(f"{where}: `{stage}.{key}` names the stage itself.")
                if ref in order and order[ref] > order[stage]:
                    raise RecipeError(
                        f"{where}: `{stage}.{key}: {ref}` names a stage that runs later; put `{ref}` before "
                        f"`{stage}` in `stages`."
                    )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise RecipeError(f"{where}: recipe file not found.")
    if path.is_dir():
        raise RecipeError(f"{where}: is a folder, not a recipe; give a recipe YAML file (e.g. recipes/quickstart.yaml"
                          " or one of `pipeline recipes`).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{where}: not UTF-8 text (byte {e.start}); a recipe is a YAML file saved as UTF-8.") from None
    data = _yaml_load(text, where)
    data = apply_overrides(data, overrides or [], where)
    return parse_recipe(data, where)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
