"""Reward sources behind one interface: `score(prompts, responses) -> (B,) float32 tensor`.

- `RewardModelScorer`: a sequence-classification reward model (the `reward` stage's output), scored
  at the last real token of the response (its EOS), formatted exactly as in training
  (`data.prompt_token_ids` + `data.completion_token_ids`), in batches; the score does not depend on
  batch position or padding side. `normalized()` applies the mean/std saved in `reward_norm.json`.
- `VerifierReward`: IFEval's verifiers from lm-evaluation-harness (1.0 when every instruction passes; or
  the share passed), with a training-only guard against JSON-string answers.
- `WeightedSum`: sum_i w_i * source_i, each normalised when it has statistics.

`prompts` items may be a string, a list of chat messages, or an example dict from
`data.prompt_examples` (`prompt` messages, optional `instruction_id_list` / `kwargs`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ModelConfig, RewardSourceConfig
from .data import completion_token_ids, prompt_token_ids

NORM_FILE = "reward_norm.json"


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), mean over pairs, + center_coef * mean((r_c + r_r)^2).

    The centering term (Eisenstein et al. 2023) keeps scores near zero without changing preferences.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def _messages(p: Any) -> list[dict] | str:
    if isinstance(p, dict):
        return p["prompt"]
    return p


class RewardModelScorer:
    def __init__(self, path_or_model, model_cfg: Optional[ModelConfig] = None, precision=None, batch_size: int = 16,
                 tokenizer=None):
        from transformers import AutoModelForSequenceClassification

        from .models import frozen_dtype, load_tokenizer, resolve_model_path, resolve_precision

        model_cfg = model_cfg or ModelConfig()
        self.precision = precision or resolve_precision(model_cfg)
        self.batch_size = batch_size
        self.stats: Optional[dict] = None
        if isinstance(path_or_model, (str, Path)):
            path = resolve_model_path(str(path_or_model))
            self.tokenizer = tokenizer or load_tokenizer(path, model_cfg)
            # A model loaded here is frozen (PPO rewards, eval scores): stored in `model.frozen_dtype` (bf16 under
            # bf16 autocast); a model passed in (the reward stage's own, in training) keeps its dtype.
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=frozen_dtype(self.precision, model_cfg),
                trust_remote_code=model_cfg.trust_remote_code)
            self.model.requires_grad_(False)
            self.model.to(self.precision.device)
            norm = Path(path) / NORM_FILE
            if norm.exists():
                self.stats = json.loads(norm.read_text())
        else:
            self.model, self.tokenizer = path_or_model, tokenizer
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()

    def encode(self, prompt, response: str) -> list[int]:
        m = _messages(prompt)
        return prompt_token_ids(self.tokenizer, m) + completion_token_ids(self.tokenizer, m, response)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], padding_side: str = "right") -> torch.Tensor:
        """Scores of token sequences that end at the response's EOS. Padded with the pad token
        (distinct from EOS) so the model's last-non-pad pooling reads the EOS position; position ids
        follow the attention mask, so the padding side does not change a score."""
        out = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, s in enumerate(chunk):
                sl = slice(0, len(s)) if padding_side == "right" else slice(T - len(s), T)
                ids[i, sl] = torch.tensor(s)
                mask[i, sl] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            ids, mask, position_ids = (t.to(self.precision.device) for t in (ids, mask, position_ids))
            with self.precision.autocast_ctx():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.stats:
            return scores
        return (scores - self.stats["mean"]) / max(self.stats["std"], 1e-6)


class VerifierReward:
    """IFEval's verifiers as a reward: 1.0 when every instruction passes, or (`partial`) the share of the
    prompt's instructions that pass. The verdicts are lm-evaluation-harness's strict ones
    (`pipeline.checkers.check_record`).

    `json_guard` (default on, training only): the harness's `detectable_format:json_format` passes any
    text that parses as JSON, so an answer wrapped in double quotes (a JSON string) or a bare number passes
    it. With the guard the reward also requires the JSON to be an object or an array. This is the reward's
    own rule, applied after the harness's verdict; evaluation always reports the harness's verdict.

    `echo_guard` (default on, training only): an answer that copies `ECHO_WORDS` consecutive words of its
    prompt, when the prompt does not ask for it to be repeated (`combination:repeat_prompt`), gets no credit.
    Echoing the prompt passes checks by copying them: the keywords to include, the phrase to end with, the
    language. The session-11 quickstart's PPO policy echoed 27 of 117 held-out prompts that did not ask
    (SFT 17, base 1); there the guard never fired in training (docs/results.md), so it is a safeguard, not
    that run's fix."""

    def __init__(self, partial: bool = False, json_guard: bool = True, echo_guard: bool = True):
        self.partial = partial
        self.json_guard = json_guard
        self.echo_guard = echo_guard

    def verdicts(self, prompt: Any, response: str) -> list[bool]:
        """Per instruction: the harness's strict verdict, then the reward's JSON guard."""
        from .checkers import check_record
        from .ifeval import prompt_text

        if not isinstance(prompt, dict) or not prompt.get("instruction_id_list"):
            raise ValueError("the verifier reward needs prompt records with `instruction_id_list` and `kwargs` "
                             "(IFEval style); this prompt has none. Use a reward model for plain prompts.")
        ids = prompt["instruction_id_list"]
        if not response.strip():
            return [False] * len(ids)
        if self.echo_guard and REPEAT_PROMPT not in ids and echoes_prompt(prompt_text(prompt["prompt"]), response):
            return [False] * len(ids)
        ok = check_record(response, ids, prompt["kwargs"])
        if self.json_guard:
            ok = [passed and (i != JSON_FORMAT or json_container(response)) for i, passed in zip(ids, ok)]
        return ok

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        out = []
        for p, r in zip(prompts, responses):
            ok = self.verdicts(p, r)
            out.append(sum(ok) / len(ok) if self.partial else float(all(ok)))
        return torch.tensor(out, dtype=torch.float32)


JSON_FORMAT = "detectable_format:json_format"
REPEAT_PROMPT = "combination:repeat_prompt"
ECHO_WORDS = 8


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def echoes_prompt(prompt: str, response: str, n: int = ECHO_WORDS) -> bool:
    """Whether `response` contains `n` consecutive words of `prompt` (lower case, punctuation ignored)."""
    p, r = _words(prompt), _words(response)
    if len(p) < n or len(r) < n:
        return False
    grams = {tuple(p[i:i + n]) for i in range(len(p) - n + 1)}
    return any(tuple(r[i:i + n]) in grams for i in range(len(r) - n + 1))


def json_container(response: str) -> bool:
    """Whether the response, unwrapped like the harness's JsonFormat check (``` / ```json fences removed),
    parses as a JSON object or array (not a bare string, number, boolean or null)."""
    value = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        return isinstance(json.loads(value), (dict, list))
    except ValueError:
        return False


class WeightedSum:
    """sum_i w_i * source_i. After each `score`, `last_components` holds every source's own raw score by name
    (`rm`, `verifier`, `rm_2`, ...), so a run can log them apart: a rising RM score with a flat verifier score
    is over-optimisation of the reward model."""

    def __init__(self, sources: list[tuple[float, Any]], normalize: bool = True):
        self.sources = sources
        self.normalize = normalize
        self.last_components: dict[str, torch.Tensor] = {}

    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        total, self.last_components = None, {}
        for w, src in self.sources:
            s = src.score(prompts, responses)
            kind = "verifier" if isinstance(src, VerifierReward) else "rm"
            name = kind if kind not in self.last_components else f"{kind}_{len(self.last_components) + 1}"
            self.last_components[name] = s.detach().clone()
            if self.normalize and hasattr(src, "normalized"):
                s = src.normalized(s)
            total = w * s if total is None else total + w * s
        return total


def build_reward(sources: Optional[list[RewardSourceConfig]], reward_from: str, recipe) -> Any:
    """One reward object from the recipe: `rewards:` (a weighted list) or `reward_from` (an RM)."""
    from .models import resolve_precision

    precision = resolve_precision(recipe.model)
    if not sources:
        return RewardModelScorer(recipe.resolve_model_ref(reward_from), recipe.model, precision)
    built = []
    for s in sources:
        if s.kind == "verifier":
            built.append((s.weight, VerifierReward(partial=s.partial)))
        else:
            built.append((s.weight, RewardModelScorer(recipe.resolve_model_ref(s.source), recipe.model, precision)))
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return WeightedSum(built)
