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
    (recipe.output_dir / "sft").mkdir()
    (recipe.output_dir / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')  # a stage has written: protected
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


# --- a run that failed before any stage wrote a file does not lock its directory ---------------


def _cli_recipe(tmp_path, lr="1.0e-4"):
    """A recipe `pipeline run` accepts without weights: the model is a folder with a config.json."""
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "r.yaml").write_text(
        f"run: {{name: t, output_dir: {tmp_path / 'out'}}}\nmodel: {{name_or_path: {tmp_path / 'm'}}}\n"
        f"stages: [sft]\nsft: {{data: {tmp_path / 'sft.jsonl'}, lr: {lr}}}\n")
    return str(tmp_path / "r.yaml")


def _fake_stage(monkeypatch, fail_with=None, write=False):
    from pipeline.models import ModelError

    ran = []

    def run(recipe, stage_dir):
        ran.append(recipe.sft.lr)
        if write:
            (stage_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        if fail_with:
            raise ModelError(fail_with)
        return {}

    monkeypatch.setattr("pipeline.runner.stage_module", lambda s: type("M", (), {"run": staticmethod(run)}))
    monkeypatch.setattr("pipeline.runner.write_report", lambda out: None, raising=False)
    return ran


def test_a_run_that_failed_before_writing_anything_can_be_rerun_with_a_fixed_recipe(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    _fake_stage(monkeypatch, fail_with="model: cannot load")
    assert main(["run", _cli_recipe(tmp_path)]) == 2
    assert (tmp_path / "out" / "recipe.resolved.yaml").exists()
    capsys.readouterr()
    ran = _fake_stage(monkeypatch)
    assert main(["run", _cli_recipe(tmp_path, lr="5.0e-4")]) == 0, capsys.readouterr().err  # no --force needed
    assert ran == [5e-4]
    assert "lr: 0.0005" in (tmp_path / "out" / "recipe.resolved.yaml").read_text()


def test_a_run_whose_stage_wrote_files_is_still_protected(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    _fake_stage(monkeypatch, fail_with="died mid-stage", write=True)
    assert main(["run", _cli_recipe(tmp_path)]) == 2
    capsys.readouterr()
    ran = _fake_stage(monkeypatch)
    assert main(["run", _cli_recipe(tmp_path, lr="5.0e-4")]) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different recipe" in err and "--force" in err and ran == []
    assert main(["run", _cli_recipe(tmp_path, lr="5.0e-4"), "--force"]) == 0 and ran == [5e-4]


def test_resume_insists_on_a_run_to_resume(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    ran = _fake_stage(monkeypatch, fail_with="died", write=True)
    assert main(["run", _cli_recipe(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "holds no run to resume" in err and ran == []  # nothing started
    assert main(["run", _cli_recipe(tmp_path)]) == 2  # a run that stopped mid-stage
    ran = _fake_stage(monkeypatch)
    assert main(["run", _cli_recipe(tmp_path), "--resume"]) == 0 and ran == [1e-4]


def test_a_run_written_before_a_new_key_existed_is_the_same_recipe(tmp_path):
    """An upgrade that adds a setting (here `ppo.logits_chunk_size`) at its default does not turn an existing run
    into "a different recipe"; a changed value still does."""
    recipe = _recipe(tmp_path)
    write_run_info(recipe)
    (recipe.output_dir / "sft").mkdir()
    (recipe.output_dir / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    resolved = recipe.output_dir / "recipe.resolved.yaml"
    text = resolved.read_text()
    assert "  logits_chunk_size: 0\n" in text
    resolved.write_text(text.replace("  logits_chunk_size: 0\n", ""))  # as an older version wrote it
    assert prepare_output_dir(recipe) == []
    resolved.write_text(text.replace("  logits_chunk_size: 0\n", "  logits_chunk_size: 64\n"))
    with pytest.raises(RecipeError, match="different recipe"):
        prepare_output_dir(recipe)


def test_peak_rss_gb_sees_a_large_allocation():
    import sys

    import pytest

    from pipeline.runner import peak_rss_gb

    if sys.platform.startswith("win"):
        pytest.skip("no resource module")
    before = peak_rss_gb()
    block = bytearray(400 * 1024 * 1024)  # zero-filled pages are touched by the allocation
    for i in range(0, len(block), 4096):
        block[i] = 1
    after = peak_rss_gb()
    del block
    assert after >= before and after >= 0.4


def test_release_memory_returns_a_fragmented_heap_to_the_os():
    """Many small freed allocations stay resident under glibc until malloc_trim; the runner calls
    `release_memory` after each stage so the next stage's peak does not sit on the last one's heap."""
    import sys

    from pipeline.utils import release_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc and glibc's malloc_trim are Linux's")

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 1e6

    if not release_memory():  # also imports what it imports before the measurement
        pytest.skip("no malloc_trim in this libc")
    blocks = [bytearray(2000) for _ in range(150_000)]  # ~300 MB of small heap blocks (below the mmap threshold)
    keep = blocks[::64]  # one block in 64 stays: the freed heap is holes between live blocks, not a free top
    del blocks
    freed = rss_mb()
    release_memory()
    trimmed = rss_mb()
    assert freed - trimmed > 150, (freed, trimmed)
    del keep
