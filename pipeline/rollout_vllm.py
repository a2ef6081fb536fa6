"""Rollout engines: transformers `generate` (`hf`, always available) or vLLM (`vllm`, an optional extra).

    ppo.rollout_engine / distill.rollout_engine: hf | vllm | auto

`auto` picks vLLM when `import vllm` works and the run is on a CUDA device, else `hf`. Only the sampled
token ids come back from the vLLM engine (the `hf` engine can also return their log-probs, for
`logprobs_from: sampler`): the log-probs of every sampled token are recomputed by our
own training forward (`onpolicy.recompute_logprobs`, `distill.label_states`), so the engine's numerics
(kernels, bf16, its own temperature handling) never enter the losses; a mismatch between the engine's and
the trainer's distributions only makes the rollouts slightly off-policy, which the PPO ratio sees.

The vLLM engine keeps one `vllm.LLM` per model, built once from the model's weights written to a
temporary directory, and before sampling from a trainable model whose weights changed since the last
call loads the current weights into it (LoRA merged first), the way TRL's colocated vLLM does. Each row samples with its own seed, derived from
the chunk seed when `generation_batch_size` is set. NOT exercised in this repository's tests (vLLM is not
installed there): the resolution of the engine and its error messages are; the sampling path is not.
"""

from __future__ import annotations

import re
import tempfile
from typing import Callable, Iterable, Optional

import torch

from .onpolicy import SamplingSettings, hf_sample, pad_responses, unwrap_for_generation

Tensor = torch.Tensor
GPU_MEMORY_UTILIZATION = 0.3  # share of the GPU one vLLM engine may take (the trainer needs the rest)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine_name(choice: str, device, key: str, available: Optional[bool] = None) -> str:
    """`hf` | `vllm` | `auto` -> the engine to use on `device`; `key` names the recipe key in errors."""
    from .config import RecipeError

    if choice == "hf":
        return "hf"
    cuda = torch.device(device).type == "cuda"
    have = vllm_available() if available is None else available
    if choice == "auto":
        return "vllm" if cuda and have else "hf"
    if choice != "vllm":
        raise RecipeError(f"`{key}`: {choice!r} is not one of auto, hf, vllm.")
    if not have:
        raise RecipeError(f"`{key}: vllm` needs the vLLM package, which is not installed: "
                          f"`pip install 'rlhf-pipeline[vllm]'` (or `pip install vllm`), or set `{key}: hf` "
                          "(transformers generate) or `auto`.")
    if not cuda:
        raise RecipeError(f"`{key}: vllm` needs a CUDA GPU; this run is on {torch.device(device)}. "
                          f"Set `{key}: hf` or `auto`.")
    return "vllm"


def rollout_engine(choice: str, device, key: str) -> Callable:
    """The sampling callable for `onpolicy.Generation.engine`."""
    return VLLMEngine() if resolve_engine_name(choice, device, key) == "vllm" else hf_sample


def vllm_weight_items(state: dict[str, Tensor]) -> Iterable[tuple[str, Tensor]]:
    """A (merged) model's state dict as the plain transformers names vLLM's `load_weights` expects: peft's
    `base_model.model.` prefix and `.base_layer` infix removed, LoRA factors and adapter-only keys dropped."""
    for name, tensor in state.items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = re.sub(r"^base_model\.model\.", "", name).replace(".base_layer", "")
        yield name, tensor


def _vllm_model(llm):
    """The torch module inside a single-GPU `vllm.LLM` (V0 and V1 layouts)."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    for path in (("model_runner", "model"), ("worker", "model_runner", "model")):
        obj = worker
        try:
            for attr in path:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise RuntimeError("rollout_engine vllm: cannot find the model inside this vLLM version's engine "
                       "(tried driver_worker.model_runner.model and driver_worker.worker.model_runner.model); "
                       "set VLLM_ENABLE_V1_MULTIPROCESSING=0, or use rollout_engine: hf.")


class VLLMEngine:
    """Samples with vLLM; one `vllm.LLM` per model object, weights synced before each rollout of a model
    that has trainable parameters. Same call and return shapes as `onpolicy.hf_sample`, without the sampled
    tokens' log-probs (`returns_logprobs` False: `logprobs_from: sampler` is refused with this engine and
    the log-prob gap is not logged; vLLM's `SamplingParams(logprobs=0)` would give them, from raw logits
    unless the engine runs with processed log-probs, so that path needs a GPU test first)."""

    returns_logprobs = False

    def __init__(self):
        self._llms: dict[int, object] = {}
        self._synced: dict[int, tuple] = {}  # model id -> parameter versions last loaded into its engine

    def _llm(self, model):
        import vllm

        key = id(model)
        if key not in self._llms:
            core = unwrap_for_generation(model)
            with tempfile.TemporaryDirectory() as tmp:
                _merged_copy_save(core, tmp)
                self._llms[key] = vllm.LLM(model=tmp, dtype=str(next(core.parameters()).dtype).split(".")[-1],
                                           gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                                           enable_prefix_caching=False, **_launcher_kwargs())
        return self._llms[key]

    def sync_weights(self, model) -> None:
        """Load the model's current (LoRA-merged) weights into its vLLM engine."""
        core = unwrap_for_generation(model)
        merge = hasattr(core, "merge_adapter")
        if merge:
            core.merge_adapter()
        try:
            with torch.no_grad():
                _vllm_model(self._llm(model)).load_weights(vllm_weight_items(core.state_dict()))
        finally:
            if merge:
                core.unmerge_adapter()

    def __call__(self, model, tokenizer, query_ids: Tensor, query_mask: Tensor, settings: SamplingSettings,
                 autocast=None, vocab_size: Optional[int] = None, seed: Optional[int] = None,
                 with_logprobs: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        if with_logprobs:
            raise NotImplementedError("rollout_engine vllm does not return the sampled tokens' log-probs yet "
                                      "(`logprobs_from: sampler`); use rollout_engine: hf or logprobs_from: recompute.")
        from vllm import SamplingParams

        from .onpolicy import chunk_seed

        llm = self._llm(model)
        # In-place updates (optimizer.step) bump a tensor's version counter: sync only after a change.
        versions = tuple(p._version for p in model.parameters() if p.requires_grad)
        if versions and self._synced.get(id(model)) != versions:
            self.sync_weights(model)
            self._synced[id(model)] = versions
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(query_ids, query_mask)]
        eos = tokenizer.eos_token_id
        params = [SamplingParams(
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k if settings.top_k > 0 else -1,
            max_tokens=settings.max_new_tokens, stop_token_ids=[eos], ignore_eos=True,
            seed=None if seed is None else chunk_seed(seed, i),
            allowed_token_ids=list(range(vocab_size)) if vocab_size is not None else None)
            for i in range(len(prompts))]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return pad_responses([sampled_ids(o.outputs[0], eos) for o in outs], eos, tokenizer.pad_token_id,
                             query_ids.device)


def sampled_ids(completion, eos_id: int) -> list[int]:
    """A vLLM completion's token ids, ending with EOS when it stopped on it."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
    return ids


def _launcher_kwargs() -> dict:
    """Under `accelerate launch` with several processes each process runs its own engine on its own GPU
    inside the existing process group (vLLM's `external_launcher`, as TRL's colocate mode)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return {"distributed_executor_backend": "external_launcher", "seed": dist.get_rank()}
    return {"seed": 0}


def _merged_copy_save(core, path: str) -> None:
    """Write the model (LoRA merged into a copy, the trained model untouched) as a plain HF directory."""
    if hasattr(core, "merge_and_unload"):
        import copy

        core = copy.deepcopy(core).merge_and_unload()
    core.save_pretrained(path)
