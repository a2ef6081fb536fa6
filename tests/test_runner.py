"""The run directory remembers its data: a changed data file is refused like a changed recipe."""

import json

import pytest

from pipeline.config import RecipeError, load_recipe
from pipeline.runner import prepare_output_dir, run_recipe, stage_input_files, write_run_info


def _recipe(tmp_path, out="out"):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    text = (
        f"run: {{name: t, output_dir: {tmp_path / out}}}\n"
        "model: {name_or_path: tiny}\n"
        "stages: [sft, ppo]\n"
        f"sft: {{data: {tmp_path / 'sft.jsonl'}}}\n"
        f"ppo: {{policy_from: sft, prompts: {tmp_path / 'prompts.jsonl'}}}\n"
    )
    (tmp_path / "r.yaml").write_text(text)
    return load_recipe(tmp_path / "r.yaml")


def test_fingerprints_name_each_stages_local_files(tmp_path):
    recipe = _recipe(tmp_path)
    files = stage_input_files(recipe)
    assert list(files["sft"]) == [str(tmp_path / "sft.jsonl")]
    assert list(files["ppo"]) == [str(tmp_path / "prompts.jsonl")]  # `policy_from: sft` is not a file
    assert all(len(h) == 64 for f in files.values() for h in f.values())


def test_changed_data_is_refused_then_rerun_with_force(tmp_path):
    recipe = _recipe(tmp_path)
    write_run_info(recipe)
    assert prepare_output_dir(recipe) == []  # same recipe, same files
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "other"}\n')
    with pytest.raises(RecipeError) as e:
        prepare_output_dir(recipe)
    msg = str(e.value)
    assert "other data" in msg and f"ppo: {tmp_path / 'prompts.jsonl'} changed" in msg and "--force" in msg
    assert "sft.jsonl" not in msg
    assert prepare_output_dir(recipe, force=True) == ["ppo"]  # sft's data did not change
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    assert prepare_output_dir(recipe, force=True) == ["sft", "ppo"]


def test_force_drops_the_checkpoints_made_from_the_old_data(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    write_run_info(recipe)
    ckpt = recipe.output_dir / "sft" / "checkpoints" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (recipe.output_dir / "sft" / "summary.json").write_text("{}")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    ran = []
    monkeypatch.setattr("pipeline.runner.stage_module",
                        lambda s: type("M", (), {"run": staticmethod(lambda r, d: ran.append(s) or {})}))
    with pytest.raises(RecipeError):
        run_recipe(recipe)
    assert ckpt.exists() and ran == []  # nothing touched without --force
    run_recipe(recipe, force=True)
    assert not ckpt.exists() and ran == ["sft", "ppo"]
    saved = json.loads((recipe.output_dir / "inputs.json").read_text())
    assert saved == stage_input_files(recipe)  # the new files are now the run's
    assert prepare_output_dir(recipe) == []
