"""Model cards (`README.md`) for the models a run writes, and adapters that name a base that loads.

Each `<stage>/final/` gets a card, and so does its LoRA adapter (`final/adapter/`, replacing PEFT's empty
template): YAML front matter the Hub reads (`base_model`, `library_name`, `pipeline_tag`, `tags`; Hub docs,
"Model Cards"), the base model and how the stage started, how to load it with transformers and peft, the
stage's summary numbers, the held-out evaluation (added by `refresh_eval_cards` once the eval stage has
run), the recipe sections that made it, the sha256 of its data files (from `inputs.json`) and the package
versions.

The adapter's `base_model_name_or_path` (what `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`
loads; `PeftModel.from_pretrained(base, adapter_dir)` ignores it) is chosen by `adapter_base`:
- the stage started from the recipe's model: that model's hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`
  for the builtin, `model.hub_id` for a local directory or GGUF file), so the adapter loads anywhere;
- it started from another stage's merged output (PPO on `sft/final`): that stage's `hub_model_id` when the
  recipe pushes it; otherwise the path to that `final/` relative to the adapter directory. The original
  hub id would load without an error and silently give the wrong model (the adapter was trained on the
  SFT weights, not the original ones), and an absolute path breaks when the run directory moves. The
  relative path moves with the run directory; peft resolves it from the current directory, so the card
  tells to pass the base explicitly (`PeftModel.from_pretrained`);
- a student cut from its teacher's layers: the cut model is not saved on its own, so no path loads it; the
  field says so (peft then fails with that text) and the card points to the merged weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import STAGE_NAMES, Recipe, RecipeError
from .models import BUILTIN_MODELS, hub_id_of, set_adapter_base
from .utils import atomic_write_text, log, package_versions

MODEL_STAGES = ("sft", "reward", "ppo", "distill")
CUT_STUDENT_BASE = "NOT-SAVED:student-cut-from-teacher-layers(see README.md)"

_TITLES = {
    "sft": ("SFT policy (supervised fine-tuning on demonstrations)", "sft"),
    "reward": ("reward model (Bradley-Terry loss on preference pairs)", "reward-model"),
    "ppo": ("PPO policy (RLHF with a KL penalty to its starting policy)", "ppo"),
    "distill": ("student distilled on-policy from its teacher", "distillation"),
}
_START_KEYS = {"sft": "init_from", "reward": "init_from", "ppo": "policy_from", "distill": "teacher_from"}


@dataclass
class Lineage:
    """Where a stage's model started."""

    stage: str
    key: str  # the recipe key naming the start, e.g. `ppo.policy_from`
    ref: str  # its value as written: base / a stage name / a path / a hub id
    path: str  # what it resolved to
    parent_stage: Optional[str]  # the stage whose final/ it started from
    start_hub_id: Optional[str]  # a hub id holding exactly the starting weights, if any
    root_hub_id: Optional[str]  # the hub id of the recipe's model
    root_note: Optional[str]  # e.g. the builtin's dequantised-GGUF note
    cut_layers: Any = None  # distill: the keep_layers spec of a student cut from the teacher


def lineage(recipe: Recipe, stage: str) -> Lineage:
    cfg = getattr(recipe, stage)
    model = recipe.model
    root = hub_id_of(model.name_or_path, model.hub_id)
    note = BUILTIN_MODELS.get(model.name_or_path, {}).get("note")
    cut = None
    key = _START_KEYS[stage]
    ref = getattr(cfg, key)
    if stage == "distill":
        if cfg.student.name_or_path:
            key, ref = "student.name_or_path", cfg.student.name_or_path
        elif cfg.student.from_teacher is not None:
            cut = cfg.student.from_teacher.keep_layers
    try:
        path = recipe.resolve_model_ref(ref)
    except RecipeError:
        path = str(recipe.stage_dir(ref) / "final") if ref in STAGE_NAMES else ref
    parent = ref if ref in STAGE_NAMES else None
    if ref == "base":
        start = root
    elif parent:
        pcfg = getattr(recipe, parent, None)
        start = pcfg.hub_model_id if pcfg is not None and getattr(pcfg, "push_to_hub", False) else None
    else:
        start = hub_id_of(ref)
    return Lineage(stage, f"{stage}.{key}", ref, path, parent, start, root, note, cut)


def adapter_base(lin: Lineage, adapter_dir: Path) -> tuple[str, str]:
    """(`base_model_name_or_path` for the adapter, how it resolves: hub / relative / local / cut)."""
    if lin.cut_layers is not None:
        return CUT_STUDENT_BASE, "cut"
    if lin.start_hub_id:
        return lin.start_hub_id, "hub"
    if lin.parent_stage:
        return os.path.relpath(Path(lin.path).resolve(), Path(adapter_dir).resolve()), "relative"
    return str(Path(lin.path).resolve()), "local"


# --------------------------------------------------------------------------------------------
# Pieces of the card
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    from .report import fmt

    return fmt(v)


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def summary_rows(summary: dict) -> list[list[str]]:
    """The summary's numbers (one level of nesting flattened; lists such as histograms left out)."""
    rows = []
    for k, v in (summary or {}).items():
        if isinstance(v, dict):
            rows += [[f"{k}.{k2}", _fmt(v2)] for k2, v2 in v.items() if isinstance(v2, (int, float, str, bool))]
        elif isinstance(v, (int, float, str, bool)) and k != "stage":
            rows.append([k, _fmt(v)])
    return rows


EVAL_COLUMNS = [("pass_rate", "pass rate"), ("instruction_pass_rate", "instruction pass rate"),
                ("rm_score_mean", "RM score"), ("win_rate", "win rate"), ("kl", "KL/token to ref"),
                ("response_length", "length"), ("eos_share", "ends with EOS")]


def _same_dir(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def eval_section(results: dict, final: Path) -> Optional[str]:
    """The rows of eval/results.json for the model in `final` (and the reference, for comparison);
    None when that model was not evaluated."""
    names = [n for n, p in (results.get("models") or {}).items() if _same_dir(p, final)]
    if not names:
        return None
    name = names[0]
    ref = (results.get("reference") or {}).get("name")
    rows, paired = [], []
    for set_name, s in (results.get("sets") or {}).items():
        for model in [name] + ([ref] if ref and ref != name else []):
            m = (s.get("models") or {}).get(model)
            if m is not None:
                label = f"**{model}** (this model)" if model == name else f"{model} (reference)"
                rows.append([set_name, s.get("n_prompts", "")] + [label] + [_fmt(m.get(k)) for k, _ in EVAL_COLUMNS])
        for p in s.get("paired", []):
            if p.get("model") == name:
                paired.append(f"- {set_name}: against `{p['against']}`, {p['gained']} prompts gained, {p['lost']} lost "
                              f"(McNemar exact p = {p['p_value']:.2g}).")
    gen = results.get("generation") or {}
    text = (f"Held-out evaluation by the run's eval stage (`eval/results.json`; {gen.get('decoding', '?')} decoding, "
            f"at most {gen.get('max_new_tokens', '?')} new tokens; instruction checks with IFEval semantics). "
            f"Evaluated as `{name}`.\n\n")
    text += _md_table(["prompt set", "prompts", "model"] + [h for _, h in EVAL_COLUMNS], rows)
    if paired:
        text += "\n\nPrompt-level pass rate, paired on the same prompts:\n" + "\n".join(paired)
    return text


def _load_snippets(recipe: Recipe, stage: str, lin: Lineage, adapter: bool, where: str, how: str, base_value: str,
                   repo: Optional[str]) -> str:
    seq_cls = stage == "reward"
    auto = "AutoModelForSequenceClassification" if seq_cls else "AutoModelForCausalLM"
    if not adapter:
        src = f'"{repo}"' if repo else f'"{where}"  # this folder'
        code = (f"from transformers import {auto}, AutoTokenizer\n\n"
                f"path = {src}\n"
                f"model = {auto}.from_pretrained(path{', num_labels=1' if seq_cls else ''})\n"
                "tokenizer = AutoTokenizer.from_pretrained(path)  # with the chat template used in training\n")
        if seq_cls:
            code += ("# score = model(**tokenizer.apply_chat_template(messages, return_dict=True, return_tensors='pt'))"
                     ".logits[0, 0]\n# reward_norm.json holds the mean/std of the scores of policy samples\n")
        else:
            code += ('messages = [{"role": "user", "content": "Write a haiku about the sea."}]\n'
                     "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
                     "return_tensors='pt')\n"
                     "out = model.generate(**inputs, max_new_tokens=64)\n"
                     "print(tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))\n")
        return f"```python\n{code}```"
    auto_peft = "AutoPeftModelForSequenceClassification" if seq_cls else "AutoPeftModelForCausalLM"
    kw = ", num_labels=1" if seq_cls else ""
    adapter_src = f'"{repo}", subfolder="adapter"' if repo else f'"{where}"'
    if how == "cut":
        return ("The adapter was trained on a student cut from the teacher's layers (`keep_layers: "
                f"{lin.cut_layers}`); that cut model is not saved on its own, so the adapter has no base to load. "
                "Use the merged weights in the folder above (`AutoModelForCausalLM.from_pretrained`).")
    if how == "hub":
        code = (f"from peft import {auto_peft}, PeftModel\nfrom transformers import {auto}\n\n"
                f"model = {auto_peft}.from_pretrained({adapter_src}{kw})  # loads {base_value} as the base\n"
                "# or, with the base given explicitly:\n"
                f'base = {auto}.from_pretrained("{base_value}"{kw})\n'
                f"model = PeftModel.from_pretrained(base, {adapter_src})\n")
        text = f"```python\n{code}```"
        if lin.root_note and lin.ref == "base":
            text += ("\n\nThe adapter was trained on the pipeline's builtin weights (`smollm2-135m-instruct`): "
                     + lin.root_note + " For the exact training base, load "
                     "`pipeline.models.resolve_model_path('smollm2-135m-instruct')` instead of the hub id.")
        return text
    parent_final = f"{recipe.run.output_dir}/{lin.parent_stage}/final" if lin.parent_stage else lin.path
    code = (f"from peft import PeftModel\nfrom transformers import {auto}\n\n"
            f'base = {auto}.from_pretrained("{parent_final}"{kw})  # the merged `{lin.ref}` model\n'
            f"model = PeftModel.from_pretrained(base, {adapter_src})\n")
    if how == "relative":
        why = (f"The adapter was trained on top of the merged `{lin.ref}` model (`{lin.key}: {lin.ref}`), not on "
               f"the original base: load `{lin.parent_stage}/final` of this run as the base. Its "
               f"`base_model_name_or_path` is `{base_value}`, relative to this adapter folder, so it moves with the "
               f"run directory; `{auto_peft}.from_pretrained` resolves it from the current directory only, so pass "
               "the base explicitly:")
    else:
        why = (f"The adapter's base is the local model `{lin.path}` (`{lin.key}`), named by its absolute path; "
               "set `model.hub_id` in the recipe to name a hub id instead.")
    return f"{why}\n\n```python\n{code}```"


def render_card(recipe: Recipe, stage: str, summary: Optional[dict], adapter: bool = False,
                eval_text: Optional[str] = None, adapter_base_value: Optional[tuple[str, str]] = None) -> str:
    """The README.md of `<stage>/final/` (adapter=False) or of `<stage>/final/adapter/`."""
    lin = lineage(recipe, stage)
    cfg = getattr(recipe, stage)
    title, tag = _TITLES[stage]
    repo = cfg.hub_model_id if getattr(cfg, "push_to_hub", False) and cfg.hub_model_id else None
    final_dir = f"{recipe.run.output_dir}/{stage}/final"
    where = final_dir + ("/adapter" if adapter else "")
    base_value, how = adapter_base_value or (None, None)
    lora = getattr(cfg, "lora", None) is not None

    meta: dict[str, Any] = {}
    if adapter:
        hub_base = base_value if how == "hub" else None
    else:
        hub_base = lin.start_hub_id or lin.root_hub_id
    if hub_base:
        meta["base_model"] = hub_base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-classification" if stage == "reward" else "text-generation"
    meta["tags"] = ["rlhf-pipeline", tag, "trl"] + (["lora"] if lora else [])

    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    what = "The LoRA adapter of the " if adapter else ("The merged weights of the " if lora else "The ")
    out.append(f"# {recipe.run.name} / {stage}" + (" (LoRA adapter)" if adapter else ""))
    out.append("")
    weights = recipe.stage_dir(stage) / "final" / "config.json"
    when = time.localtime(weights.stat().st_mtime) if weights.exists() else time.localtime()
    lead = (f"{what}{title}, written by the `{stage}` stage of rlhf-pipeline"
            f" (`pipeline run {recipe.source or 'RECIPE'}`) on {time.strftime('%Y-%m-%d', when)}.")
    if adapter:
        lead += " The merged model, which plain transformers loads, is in the folder above."
    elif lora:
        lead += " The LoRA adapter it was merged from is in `adapter/`."
    out += [lead, "", "## Base model", ""]
    start = f"- Started from `{lin.ref}` (`{lin.key}`)"
    if lin.parent_stage:
        start += f": the merged output of this run's `{lin.parent_stage}` stage"
        if lin.start_hub_id:
            start += f", pushed as [{lin.start_hub_id}](https://huggingface.co/{lin.start_hub_id})"
    elif lin.cut_layers is not None:
        start += f", a student cut from the teacher's layers (`keep_layers: {lin.cut_layers}`)"
    out.append(start + ".")
    if lin.root_hub_id:
        out.append(f"- The run's model: [{lin.root_hub_id}](https://huggingface.co/{lin.root_hub_id})"
                   + (f" (`model.name_or_path: {recipe.model.name_or_path}`)"
                      if recipe.model.name_or_path != lin.root_hub_id else "") + ".")
    else:
        out.append(f"- The run's model: `{recipe.model.name_or_path}` (a local model; no hub id known: set "
                   "`model.hub_id` to name one).")
    if lin.root_note:
        out.append(f"- Note: {lin.root_note}")
    if adapter and base_value:
        out.append(f"- `adapter_config.json` names the base as `{base_value}`.")
    out += ["", "## How to load", "", _load_snippets(recipe, stage, lin, adapter, where, how, base_value or "", repo)]
    if stage == "reward" and not adapter:
        out += ["", "`reward_norm.json` beside the weights holds the mean and std of the model's scores on policy "
                "samples; the pipeline's PPO stage normalises scores with them."]
    rows = summary_rows(summary or {})
    if rows:
        out += ["", "## Training", "", f"From `{stage}/summary.json`:", "", _md_table(["", "value"], rows)]
    if eval_text:
        out += ["", "## Evaluation", "", eval_text]
    out += ["", "## Recipe", "", "The recipe sections that made this model (`recipe.resolved.yaml` holds all of it):",
            "", "```yaml", yaml.safe_dump(_recipe_sections(recipe, stage), sort_keys=False).strip(), "```"]
    data = _data_hashes(recipe, stage)
    if data:
        out += ["", "## Data", "", _md_table(["file", "sha256"], [[f"`{f}`", f"`{h}`"] for f, h in data.items()])]
    out += ["", "## Software", "", _md_table(["package", "version"], [[k, v] for k, v in package_versions().items()])]
    return "\n".join(out) + "\n"


def _recipe_sections(recipe: Recipe, stage: str) -> dict:
    from .config import dump_recipe

    d = yaml.safe_load(dump_recipe(recipe))  # as recipe.resolved.yaml shows it
    keep = ["run", "model"]
    lin = lineage(recipe, stage)
    chain, seen = [stage], {stage}
    while lin.parent_stage and lin.parent_stage in recipe.stages and lin.parent_stage not in seen:
        chain.append(lin.parent_stage)
        seen.add(lin.parent_stage)
        lin = lineage(recipe, lin.parent_stage) if lin.parent_stage in MODEL_STAGES else lin
    return {k: d[k] for k in keep + list(reversed(chain)) if k in d}


def _data_hashes(recipe: Recipe, stage: str) -> dict[str, str]:
    path = recipe.output_dir / "inputs.json"
    try:
        return dict((json.loads(path.read_text(encoding="utf-8")) or {}).get(stage) or {})
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _read_results(recipe: Recipe) -> Optional[dict]:
    path = recipe.stage_dir("eval") / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_stage_cards(recipe: Recipe, stage: str, summary: Optional[dict] = None, with_eval: bool = False) -> list[Path]:
    """Point a LoRA adapter of `<stage>/final/` at a portable base and (re)write the cards of final/ and
    final/adapter/. `with_eval`: add this model's rows of eval/results.json. Returns the cards whose text
    changed; none when the stage wrote no final/."""
    if stage not in MODEL_STAGES:
        return []
    final = recipe.stage_dir(stage) / "final"
    if not (final / "config.json").exists():
        return []
    if summary is None:
        try:
            summary = json.loads((recipe.stage_dir(stage) / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = {}
    results = _read_results(recipe) if with_eval else None
    eval_text = eval_section(results, final) if results else None
    written = []
    adapter = final / "adapter"
    if (adapter / "adapter_config.json").exists():
        lin = lineage(recipe, stage)
        base = adapter_base(lin, adapter)
        set_adapter_base(adapter, base[0], recipe.model.revision if base[1] == "hub" and lin.ref == "base" else None)
        cards = [(adapter / "README.md", render_card(recipe, stage, summary, True, eval_text, base))]
    else:
        cards = []
    cards.append((final / "README.md", render_card(recipe, stage, summary, False, eval_text)))
    for path, text in cards:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
            written.append(path)
    return written


def refresh_eval_cards(recipe: Recipe) -> list[Path]:
    """After the eval stage: rewrite the cards of this run's evaluated models with their evaluation
    rows. Models outside this run's directory (`run.inputs_from`, other paths) are not touched."""
    results = _read_results(recipe)
    if not results:
        return []
    written = []
    for stage in MODEL_STAGES:
        final = recipe.stage_dir(stage) / "final"
        if getattr(recipe, stage, None) is None or not final.exists():
            continue
        if any(_same_dir(p, final) for p in (results.get("models") or {}).values()):
            written += write_stage_cards(recipe, stage, with_eval=True)
    if written:
        log(f"eval: model cards updated with the evaluation: {', '.join(str(p) for p in written)}")
    return written
