"""Portable outputs: adapters that name a base that loads elsewhere, model cards, Hub upload (never over
the network here: the uploader is replaced), and dropping a finished stage's checkpoints."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl
from pipeline.config import RecipeError, parse_recipe
from pipeline.hub import HubError, after_stage, check_outputs, only_outputs_changed
from pipeline.modelcard import CUT_STUDENT_BASE, adapter_base, lineage, write_stage_cards
from pipeline.runner import prepare_output_dir, run_recipe, write_run_info
from pipeline.utils import atomic_write_json

X = torch.tensor([[1, 5, 9, 12, 2, 7]])


def _recipe(tmp_path, model, out="run", stages=("sft", "ppo"), **sections):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(8)])
    raw = {
        "run": {"name": "t", "output_dir": str(tmp_path / out)},
        "model": model if isinstance(model, dict) else {"name_or_path": str(model)},
        "stages": list(stages),
        "sft": {"data": str(data), "lr": 3e-4},
        "ppo": {"policy_from": "sft", "prompts": str(prompts), "rewards": [{"kind": "verifier"}]},
        "eval": {"models": ["base", "sft", "ppo"], "prompts": [str(prompts)]},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return parse_recipe({k: v for k, v in raw.items() if k in ("run", "model", "stages") or k in stages})


def _lora_final(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA model with non-zero adapter weights on `base_dir`, saved the way every stage saves (save_final)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import save_final

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return save_final(model, tok, out)


def _logits(model):
    with torch.no_grad():
        return model.eval()(X).logits


def _front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def sft_ppo_run(tmp_path, tiny_model_dir):
    """A run directory with sft/final (LoRA on the base) and ppo/final (LoRA on the merged SFT model)."""
    recipe = _recipe(tmp_path, {"name_or_path": str(tiny_model_dir), "hub_id": "tiny-org/tiny-chat"})
    write_run_info(recipe)
    _lora_final(tiny_model_dir, recipe.stage_dir("sft") / "final", seed=1)
    _lora_final(recipe.stage_dir("sft") / "final", recipe.stage_dir("ppo") / "final", seed=2)
    for s in ("sft", "ppo"):
        write_stage_cards(recipe, s, {"stage": s, "train_loss": 1.25, "steps": 7})
    return recipe


def test_adapter_of_a_stage_on_the_base_names_the_hub_id_and_loads_after_a_move(sft_ppo_run, tmp_path,
                                                                                 tiny_model_dir, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    recipe = sft_ppo_run
    adapter = recipe.stage_dir("sft") / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-chat"
    # The hub id resolves from a hub cache (laid out as huggingface_hub does; offline, no network).
    snap = tmp_path / "hub" / "models--tiny-org--tiny-chat" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (tmp_path / "hub" / "models--tiny-org--tiny-chat" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-chat" / "refs" / "main").write_text("0" * 40)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(recipe.output_dir), moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(moved / "sft" / "final" / "adapter"),
                                                      cache_dir=str(tmp_path / "hub"))
    merged = AutoModelForCausalLM.from_pretrained(moved / "sft" / "final")
    torch.testing.assert_close(_logits(loaded), _logits(merged), atol=1e-4, rtol=1e-4)


def test_adapter_on_another_stage_output_is_relative_and_never_the_wrong_base(sft_ppo_run, tmp_path, monkeypatch):
    """PPO's adapter was trained on the merged SFT weights. It names sft/final relative to itself: plain peft
    with that base gives the merged PPO model after the run directory moved; AutoPeft from another directory
    fails loudly instead of silently loading the original model as the base."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    recipe = sft_ppo_run
    cfg = json.loads((recipe.stage_dir("ppo") / "final" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "../../../sft/final"
    moved = tmp_path / "moved"
    shutil.move(str(recipe.output_dir), moved)
    monkeypatch.chdir(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(moved / "ppo" / "final")
    base = AutoModelForCausalLM.from_pretrained(moved / "sft" / "final")
    loaded = PeftModel.from_pretrained(base, moved / "ppo" / "final" / "adapter")
    torch.testing.assert_close(_logits(loaded), _logits(merged), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception):
        AutoPeftModelForCausalLM.from_pretrained(str(moved / "ppo" / "final" / "adapter"))
    monkeypatch.chdir(moved / "ppo" / "final" / "adapter")  # where the relative path resolves
    again = AutoPeftModelForCausalLM.from_pretrained(".")
    torch.testing.assert_close(_logits(again), _logits(merged), atol=1e-4, rtol=1e-4)
    card = (moved / "ppo" / "final" / "adapter" / "README.md").read_text()
    assert "PeftModel.from_pretrained(base" in card and "sft/final" in card
    assert "base_model" not in _front_matter(moved / "ppo" / "final" / "adapter" / "README.md")


def test_base_names_for_the_builtin_a_pushed_parent_and_a_cut_student(tmp_path):
    recipe = _recipe(tmp_path, {"name_or_path": "smollm2-135m-instruct"}, stages=("sft", "ppo", "distill"),
                     distill={"teacher_from": "ppo", "prompts": str(tmp_path / "prompts.jsonl"), "lora": {"r": 4}})
    ad = tmp_path / "run" / "x" / "final" / "adapter"
    assert adapter_base(lineage(recipe, "sft"), ad) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub")
    assert adapter_base(lineage(recipe, "ppo"), ad)[1] == "relative"
    assert adapter_base(lineage(recipe, "distill"), ad) == (CUT_STUDENT_BASE, "cut")
    pushed = _recipe(tmp_path, {"name_or_path": "smollm2-135m-instruct"},
                     sft={"push_to_hub": True, "hub_model_id": "me/t-sft"})
    assert adapter_base(lineage(pushed, "ppo"), ad) == ("me/t-sft", "hub")
    local = _recipe(tmp_path, {"name_or_path": str(tmp_path)})  # a local model nobody named: its absolute path
    assert adapter_base(lineage(local, "sft"), ad) == (str(tmp_path.resolve()), "local")


def test_cards_hold_base_recipe_data_hashes_versions_and_replace_peft_template(sft_ppo_run):
    import transformers

    recipe = sft_ppo_run
    final = recipe.stage_dir("sft") / "final"
    fm = _front_matter(final / "README.md")
    assert fm["base_model"] == "tiny-org/tiny-chat" and fm["library_name"] == "transformers"
    assert {"rlhf-pipeline", "sft", "lora"} <= set(fm["tags"]) and fm["pipeline_tag"] == "text-generation"
    afm = _front_matter(final / "adapter" / "README.md")
    assert afm["library_name"] == "peft" and afm["base_model"] == "tiny-org/tiny-chat"
    card, acard = (final / "README.md").read_text(), (final / "adapter" / "README.md").read_text()
    assert "Model Card for Model ID" not in acard  # PEFT's empty template is gone
    data = recipe.output_dir.parent / "sft.jsonl"
    assert f"`{hashlib.sha256(data.read_bytes()).hexdigest()}`" in card
    sections = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert sections["sft"]["lr"] == 3e-4 and set(sections) == {"run", "model", "sft"}
    assert f"| transformers | {transformers.__version__} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "| train_loss | 1.250 |" in card
    assert "## Evaluation" not in card
    ppo_sections = yaml.safe_load((recipe.stage_dir("ppo") / "final" / "README.md").read_text()
                                  .split("```yaml\n")[1].split("```")[0])
    assert set(ppo_sections) == {"run", "model", "sft", "ppo"}  # the stage it started from, too


def test_eval_hook_adds_the_evaluated_models_rows(sft_ppo_run, tiny_model_dir):
    recipe = sft_ppo_run
    m = lambda p: {"pass_rate": p, "instruction_pass_rate": p + 0.1, "kl": 0.02, "response_length": 30.0}  # noqa: E731
    atomic_write_json(recipe.stage_dir("eval") / "results.json", {
        "generation": {"decoding": "greedy", "max_new_tokens": 64},
        "models": {"base": str(tiny_model_dir), "sft": str(recipe.stage_dir("sft") / "final")},
        "reference": {"name": "base", "path": str(tiny_model_dir)},
        "sets": {"heldout": {"n_prompts": 16, "models": {"base": m(0.25), "sft": m(0.625)},
                             "paired": [{"model": "sft", "against": "base", "gained": 7, "lost": 1,
                                         "difference": 0.375, "p_value": 0.07}]}},
    })
    after_stage(recipe, "eval", {})
    card = (recipe.stage_dir("sft") / "final" / "README.md").read_text()
    ev = card.split("## Evaluation")[1].split("## Recipe")[0]
    assert "**sft** (this model) | 0.625 | 0.725" in ev and "base (reference) | 0.250" in ev
    assert "7 prompts gained, 1 lost" in ev
    assert "## Evaluation" in (recipe.stage_dir("sft") / "final" / "adapter" / "README.md").read_text()
    assert "## Evaluation" not in (recipe.stage_dir("ppo") / "final" / "README.md").read_text()  # not evaluated


class FakeHub:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        if self.fail:
            raise ConnectionError("could not reach huggingface.co")
        self.calls.append(("upload_folder", kw))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/t-sft/commit/abc"})()

    def upload_file(self, **kw):
        self.calls.append(("upload_file", kw))


def _pushing(tmp_path, tiny_model_dir, monkeypatch, hub, token="hf_test"):
    monkeypatch.setattr("pipeline.hub.hub_api", lambda: hub)
    monkeypatch.setattr("pipeline.hub.hub_token", lambda: token)
    monkeypatch.setattr("pipeline.hub._hub_offline", lambda: False)
    recipe = _recipe(tmp_path, tiny_model_dir, stages=("sft",), sft={"push_to_hub": True, "hub_model_id": "me/t-sft"})
    _lora_final(tiny_model_dir, recipe.stage_dir("sft") / "final", seed=1)
    atomic_write_json(recipe.stage_dir("sft") / "summary.json", {"stage": "sft"})
    return recipe


def test_push_uploads_final_once_and_records_it(tmp_path, tiny_model_dir, monkeypatch):
    hub = FakeHub()
    recipe = _pushing(tmp_path, tiny_model_dir, monkeypatch, hub)
    check_outputs(recipe)
    summary = after_stage(recipe, "sft", {"stage": "sft"})
    final = recipe.stage_dir("sft") / "final"
    assert hub.calls == [
        ("create_repo", {"repo_id": "me/t-sft", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/t-sft", "repo_type": "model", "folder_path": str(final),
                           "commit_message": "t: sft stage (rlhf-pipeline)"}),
    ]
    saved = json.loads((recipe.stage_dir("sft") / "summary.json").read_text())
    assert saved["hub"]["repo_id"] == "me/t-sft" and summary["hub"] == saved["hub"]
    after_stage(recipe, "sft", saved)  # a finished, pushed stage is not uploaded again
    assert len(hub.calls) == 2


def test_eval_updates_the_pushed_cards_once(tmp_path, tiny_model_dir, monkeypatch):
    hub = FakeHub()
    recipe = _pushing(tmp_path, tiny_model_dir, monkeypatch, hub)
    after_stage(recipe, "sft", {"stage": "sft"})
    final = recipe.stage_dir("sft") / "final"
    atomic_write_json(recipe.stage_dir("eval") / "results.json", {
        "models": {"sft": str(final)}, "reference": {"name": "sft"},
        "sets": {"heldout": {"n_prompts": 4, "models": {"sft": {"pass_rate": 0.5}}}}})
    after_stage(recipe, "eval", {})
    uploads = [c[1] for c in hub.calls if c[0] == "upload_file"]
    assert sorted(u["path_in_repo"] for u in uploads) == ["README.md", "adapter/README.md"]
    assert all(u["repo_id"] == "me/t-sft" for u in uploads) and "## Evaluation" in (final / "README.md").read_text()
    after_stage(recipe, "eval", {})  # a rerun that skips the finished eval: cards unchanged, nothing uploaded
    assert len([c for c in hub.calls if c[0] == "upload_file"]) == 2


def test_failed_upload_says_the_stage_is_saved_and_is_retried(tmp_path, tiny_model_dir, monkeypatch):
    recipe = _pushing(tmp_path, tiny_model_dir, monkeypatch, FakeHub(fail=True))
    with pytest.raises(HubError, match=r"(?s)me/t-sft failed: ConnectionError.*finished and saved.*run the same"):
        after_stage(recipe, "sft", {"stage": "sft"})
    assert "hub" not in json.loads((recipe.stage_dir("sft") / "summary.json").read_text())
    hub = FakeHub()
    monkeypatch.setattr("pipeline.hub.hub_api", lambda: hub)
    after_stage(recipe, "sft", {"stage": "sft"})  # what the runner does for a finished stage on the next run
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]


def test_push_preflight_errors(tmp_path, tiny_model_dir, monkeypatch):
    recipe = _pushing(tmp_path, tiny_model_dir, monkeypatch, FakeHub(), token=None)
    with pytest.raises(HubError, match=r"no Hugging Face token.*hf auth login.*HF_TOKEN.*sft.push_to_hub: false"):
        check_outputs(recipe)
    monkeypatch.setattr("pipeline.hub._hub_offline", lambda: True)
    monkeypatch.setattr("pipeline.hub.hub_token", lambda: "hf_test")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        check_outputs(recipe)
    recipe.sft.hub_model_id = None
    with pytest.raises(RecipeError, match=r"`sft.hub_model_id` is not set"):
        check_outputs(recipe)
    recipe.sft.hub_model_id = "me/bad name"
    with pytest.raises(RecipeError, match="is not a Hub repo id"):
        check_outputs(recipe)


def _fake_stage(write_final: bool, tiny_model_dir, fail: bool = False):
    def run(recipe, stage_dir):
        (stage_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (stage_dir / "checkpoints" / "checkpoint-2" / "weights.bin").write_bytes(b"0" * 1000)
        if fail:
            raise RuntimeError("stage failed")
        if write_final:
            _lora_final(tiny_model_dir, stage_dir / "final", seed=3)
        return {"steps": 2}
    return type("M", (), {"run": staticmethod(run)})


@pytest.mark.parametrize("keep", [True, False])
def test_checkpoints_are_dropped_only_after_final_and_summary(tmp_path, tiny_model_dir, monkeypatch, keep):
    recipe = _recipe(tmp_path, tiny_model_dir, stages=("sft",), run={"keep_checkpoints": keep})
    monkeypatch.setattr("pipeline.runner.stage_module", lambda s: _fake_stage(True, tiny_model_dir))
    run_recipe(recipe)
    d = recipe.stage_dir("sft")
    assert (d / "summary.json").exists() and (d / "final" / "README.md").exists()
    assert (d / "checkpoints").exists() == keep


def test_checkpoints_stay_when_the_stage_failed_or_wrote_no_model(tmp_path, tiny_model_dir, monkeypatch):
    recipe = _recipe(tmp_path, tiny_model_dir, stages=("sft",), run={"keep_checkpoints": False})
    monkeypatch.setattr("pipeline.runner.stage_module", lambda s: _fake_stage(True, tiny_model_dir, fail=True))
    with pytest.raises(RuntimeError, match="stage failed"):
        run_recipe(recipe)
    assert (recipe.stage_dir("sft") / "checkpoints" / "checkpoint-2").exists()
    shutil.rmtree(recipe.stage_dir("sft") / "checkpoints")
    monkeypatch.setattr("pipeline.runner.stage_module", lambda s: _fake_stage(False, tiny_model_dir))
    run_recipe(recipe)
    assert (recipe.stage_dir("sft") / "summary.json").exists()
    assert (recipe.stage_dir("sft") / "checkpoints" / "checkpoint-2").exists()  # no final/: nothing replaces them


def test_changing_only_output_settings_needs_no_force(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir)
    write_run_info(recipe)
    (recipe.stage_dir("sft")).mkdir(parents=True)
    (recipe.stage_dir("sft") / "summary.json").write_text("{}")
    old = (recipe.output_dir / "recipe.resolved.yaml").read_text()
    changed = _recipe(tmp_path, tiny_model_dir, run={"report_to": "none", "keep_checkpoints": False},
                      sft={"push_to_hub": True, "hub_model_id": "me/x"})
    assert only_outputs_changed(old, changed) and prepare_output_dir(changed) == []
    retrained = _recipe(tmp_path, tiny_model_dir, sft={"lr": 1e-3})
    assert not only_outputs_changed(old, retrained)
    with pytest.raises(RecipeError, match="different recipe"):
        prepare_output_dir(retrained)
