"""The models of the on-policy stages: who is trained and who is frozen.

PPO: a policy (LoRA on the SFT model, or all of it), a reference (the same model with the adapter disabled,
or a frozen copy) and, for GAE, a critic: a scalar value head on its own backbone, from the reward model or
the policy, or (`critic_from: shared`) a scalar head on the policy's own final hidden states. Distillation: a
frozen teacher and a student (any causal LM with the teacher's tokenizer, or the teacher cut to some of its
layers: `models.student_from_teacher`). Dropout is off in every model during RL
(eval mode; gradients still flow): docs/implementation_details.md.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import DistillConfig, PPOConfig, Recipe
from .models import (
    Precision, check_same_tokenizer, choose_layers, dtype_name, frozen_dtype, load_causal_lm, load_policy,
    load_tokenizer, peft_lora_config, resolve_model_path, student_from_teacher,
)
from .onpolicy import (
    RolloutBatch, encode_prompts, in_micro_batches, model_inputs, response_hidden, unwrap_for_generation,
)
from .utils import log

Tensor = torch.Tensor
CALIBRATION_PROMPTS = 32  # prompts whose tokens score the teacher's layers for keep_layers: influence_K


# --------------------------------------------------------------------------------------------
# The critic
# --------------------------------------------------------------------------------------------


class ValueModel(torch.nn.Module):
    """V(s) at every position from a sequence-classification model used as a critic: its scalar
    head applied to the hidden state at every position, not only the last. A module of its own so
    DDP sees the forward (gradient all-reduce hooks are armed in the wrapper's forward)."""

    def __init__(self, seq_cls_model):
        super().__init__()
        self.model = seq_cls_model

    def forward(self, input_ids, attention_mask, position_ids):
        core = unwrap(self.model)
        backbone = getattr(core, core.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return value_head(core)(hidden).squeeze(-1).float()


class SharedValueHead(torch.nn.Module):
    """V(s) from the policy's own final hidden states (`critic_from: shared`): one scalar linear head, zero at
    the start, on the backbone the actor already runs, as TRL's `AutoModelForCausalLMWithValueHead` and the
    shared actor-critic network of PPO's Atari setting (Huang et al. 2022, "The 37 implementation details of
    PPO"). No second backbone: no second forward, backward or AdamW state for 135M parameters; the value
    loss's gradient flows into the policy's backbone (clipped with the policy's, `vf_coef` weighs it). Only
    the head's parameters belong to this module (the policy is passed at call time), so the critic's optimizer,
    checkpoint and DDP wrapper hold the head alone."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, H) final hidden states -> (B, T) values in float32."""
        return self.head(hidden).squeeze(-1).float()


def is_shared(critic) -> bool:
    return isinstance(unwrap(critic), SharedValueHead)


def critic_values(critic, batch: RolloutBatch, policy=None, backbone_grad: bool = True) -> Tensor:
    """V(s_t) for every response position: the state before response token t. (B, T). A shared head
    (`SharedValueHead`) reads `policy`'s final hidden states (one policy forward; the output layer runs on one
    position only), with `backbone_grad=False` without gradient into the policy (the head alone learns)."""
    if is_shared(critic):
        if policy is None:
            raise ValueError("a shared value head needs the policy whose hidden states it reads")
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            hidden = response_hidden(policy, batch)[0]
        return critic(hidden)
    input_ids, attention_mask, position_ids = model_inputs(
        batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    P, T = batch.query_ids.shape[1], batch.response_ids.shape[1]
    return critic(input_ids, attention_mask, position_ids)[:, P - 1:P + T - 1]


def value_head(seq_cls_model):
    for name in ("score", "classifier", "v_head"):
        head = getattr(seq_cls_model, name, None)
        if head is not None:
            # peft wraps trainable heads in ModulesToSaveWrapper, which is callable like the head.
            return head
    raise ValueError(f"{type(seq_cls_model).__name__} has no scalar head (`score`) to use as a critic.")


def unwrap(model):
    """The model under DDP / accelerate / peft wrappers, as far as forward semantics allow."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def recompute_values(critic, batch: RolloutBatch, micro_batch_size: int, autocast=None, policy=None) -> Tensor:
    """V(s_t) at every response position under `critic` (a shared head: over `policy`'s hidden states), in
    micro-batches, without gradients. (B, T)."""
    return in_micro_batches(critic, batch, micro_batch_size, autocast, lambda mb: critic_values(critic, mb, policy))


# --------------------------------------------------------------------------------------------
# PPO: policy, reference, critic
# --------------------------------------------------------------------------------------------


@dataclass
class PPOModels:
    policy: Any  # trainable (a PeftModel with LoRA)
    tokenizer: Any
    reference: Optional[Any]  # None with LoRA: the policy with its adapter disabled
    critic: Optional[Any]  # ValueModel over a sequence-classification model, or SharedValueHead; None without GAE

    @property
    def shared_critic(self) -> bool:
        return self.critic is not None and is_shared(self.critic)

    def reference_ctx(self):
        """Context in which `self.ref_model` computes reference log-probs."""
        if self.reference is None:
            return unwrap_for_generation(self.policy).disable_adapter()
        return contextlib.nullcontext()

    @property
    def ref_model(self):
        return self.policy if self.reference is None else self.reference


def load_critic(path: str, recipe: Recipe, precision: Precision, tokenizer, lora) -> Any:
    """A scalar head on its own backbone: from the reward model (its head already scores responses)
    or from the policy (a fresh head initialised to zero)."""
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(path), num_labels=1, dtype=precision.dtype,
        trust_remote_code=recipe.model.trust_remote_code)
    critic.config.pad_token_id = tokenizer.pad_token_id
    head = getattr(critic, "score", None)
    if head is not None and not (Path(resolve_model_path(path)) / "reward_norm.json").exists() \
            and critic.config.architectures and "ForCausalLM" in critic.config.architectures[0]:
        torch.nn.init.zeros_(head.weight)
    if lora is not None:
        from peft import get_peft_model

        critic = get_peft_model(critic, peft_lora_config(lora, task_type="SEQ_CLS"))
    return ValueModel(critic.to(precision.device))


def critic_source(cfg: PPOConfig) -> str:
    """The model the critic starts from: the reward model (`critic_from: reward`) or the policy."""
    if cfg.critic_from != "reward":
        return cfg.policy_from
    if not cfg.rewards:
        return cfg.reward_from
    rm = [r for r in cfg.rewards if r.kind == "rm"]
    if not rm:
        log(f"ppo: critic_from: reward, but no reward model among `ppo.rewards`; the critic starts from the "
            f"policy ({cfg.policy_from}) with a zero value head")
    return rm[0].source if rm else cfg.policy_from


def build_ppo_models(recipe: Recipe, cfg: PPOConfig, precision: Precision) -> PPOModels:
    policy, tok = load_policy(recipe.resolve_model_ref(cfg.policy_from), recipe.model, precision)
    reference = None
    if cfg.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_lora_config(cfg.lora))
    else:
        # Frozen: stored in `model.frozen_dtype` (bf16 under bf16 autocast; its forwards still run under autocast).
        reference = copy.deepcopy(policy).requires_grad_(False).to(frozen_dtype(precision, recipe.model))
    critic = None
    if cfg.advantage == "gae" and cfg.critic_from == "shared":
        critic = SharedValueHead(unwrap_for_generation(policy).config.hidden_size).to(precision.device)
    elif cfg.advantage == "gae":
        critic = load_critic(recipe.resolve_model_ref(critic_source(cfg)), recipe, precision, tok, cfg.lora)
    # Dropout off everywhere during RL (docs/implementation_details.md): eval mode, gradients still flow.
    for m in (policy, reference, critic):
        if m is not None:
            m.eval()
    log_frozen_dtype(recipe, cfg, precision, reference is not None)
    return PPOModels(policy=policy, tokenizer=tok, reference=reference, critic=critic)


def log_frozen_dtype(recipe: Recipe, cfg: PPOConfig, precision: Precision, reference_copy: bool) -> None:
    """One line naming the frozen models of a PPO run and their storage dtype (`model.frozen_dtype`); the reward
    models are loaded by `rewards.build_reward` with the same dtype."""
    frozen = []
    if reference_copy:
        frozen.append("the reference copy")
    if not cfg.rewards or any(r.kind == "rm" for r in cfg.rewards):
        frozen.append("the reward model")
    setting = recipe.model.frozen_dtype
    lora = "" if reference_copy else "; the reference is the policy with its LoRA adapter disabled"
    if frozen:
        log(f"ppo: frozen models ({', '.join(frozen)}) stored in {dtype_name(frozen_dtype(precision, recipe.model))} "
            f"(model.frozen_dtype: {setting}); trainable models in {dtype_name(precision.dtype)}{lora}")
    else:
        log(f"ppo: no separate frozen model (verifier reward{lora}); model.frozen_dtype: {setting} unused")


# --------------------------------------------------------------------------------------------
# Distillation: teacher and student
# --------------------------------------------------------------------------------------------


@dataclass
class DistillModels:
    student: Any  # trainable (a PeftModel with LoRA)
    teacher: Any  # frozen, eval mode
    tokenizer: Any  # shared by both (checked)
    vocab_size: int  # len(tokenizer): both models' logits are sliced to it
    kept_layers: Optional[list[int]] = None  # the teacher layers a student built from the teacher keeps


def build_distill_models(recipe: Recipe, cfg: DistillConfig, precision: Precision) -> DistillModels:
    teacher_path = resolve_model_path(recipe.resolve_model_ref(cfg.teacher_from))
    tok = load_tokenizer(teacher_path, recipe.model)
    student_path, kept_layers = None, None
    if cfg.student.name_or_path:
        student_path = resolve_model_path(recipe.resolve_model_ref(cfg.student.name_or_path))
        student_tok = load_tokenizer(student_path, recipe.model)
        check_same_tokenizer(tok, student_tok, teacher_path, student_path)  # before any model is loaded
        tok = student_tok
    t_dtype = frozen_dtype(precision, recipe.model)
    if student_path is not None:
        # The teacher is frozen and shares no weights with the student: loaded in `model.frozen_dtype` directly.
        teacher = load_causal_lm(teacher_path, recipe.model, precision, tok, dtype=t_dtype).requires_grad_(False)
        student = load_causal_lm(student_path, recipe.model, precision, tok)
    else:
        # Loaded in the trainable dtype: the student is cut from these weights (exact copies), and influence_K
        # scores the layers on them; the teacher is cast to `model.frozen_dtype` only after that.
        teacher = load_causal_lm(teacher_path, recipe.model, precision, tok).requires_grad_(False)
        keep = cfg.student.from_teacher.keep_layers
        calibration = None
        if str(keep).startswith("influence_"):  # Block Influence measured on the first distillation prompts
            from .data import load_rows, prompt_examples

            rows = prompt_examples(load_rows(cfg.prompts, max_rows=CALIBRATION_PROMPTS), cfg.prompts)
            calibration = encode_prompts(tok, rows, precision.device)
        kept_layers = choose_layers(teacher, keep, calibration)
        student = student_from_teacher(teacher, kept_layers)
        teacher.to(t_dtype)
    if cfg.lora is not None:
        from peft import get_peft_model

        student = get_peft_model(student, peft_lora_config(cfg.lora))
    # Dropout off in both models (docs/implementation_details.md); gradients still flow through the student.
    teacher.eval()
    student.eval()
    n_t = teacher.config.get_text_config().num_hidden_layers
    n_s = unwrap_for_generation(student).config.get_text_config().num_hidden_layers
    log(f"distill: teacher {teacher_path} ({n_t} layers) -> student "
        f"{student_path or f'from the teacher, keep_layers={cfg.student.from_teacher.keep_layers}'} ({n_s} layers)")
    log(f"distill: frozen teacher stored in {dtype_name(t_dtype)} (model.frozen_dtype: "
        f"{recipe.model.frozen_dtype}); trainable student in {dtype_name(precision.dtype)}")
    return DistillModels(student=student, teacher=teacher, tokenizer=tok, vocab_size=len(tok),
                         kept_layers=kept_layers)
