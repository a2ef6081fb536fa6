"""Recipe parsing: each error gives its specific message; overrides; every shipped recipe validates."""

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "run: {name: t, output_dir: out}\nmodel: {name_or_path: m}\nstages: [sft]\nsft: {data: d.jsonl}\n"


def test_minimal_recipe_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.stages == ["sft"] and r.sft.data == "d.jsonl" and r.sft.lora.r == 16
    assert r.resolve_model_ref("base") == "m"
    assert r.resolve_model_ref("sft") == str(Path("out") / "sft" / "final")


def test_unknown_top_level_key_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `stagse`.*Did you mean `stages`"):
        load_recipe(write(tmp_path, BASE + "stagse: [sft]\n"))


def test_unknown_nested_key_names_path_and_suggestion(tmp_path):
    text = BASE.replace("sft: {data: d.jsonl}", "sft: {data: d.jsonl, lora: {r: 8, alpah: 16}}")
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    msg = str(e.value)
    assert "`sft.lora.alpah`" in msg and "Did you mean `alpha`" in msg and str(tmp_path / "r.yaml") in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(RecipeError, match=r"`sft.batch_size` must be an integer, got 'eight'"):
        load_recipe(write(tmp_path, BASE.replace("data: d.jsonl", "data: d.jsonl, batch_size: eight")))
    with pytest.raises(RecipeError, match=r"`sft.completion_only_loss` must be true/false"):
        load_recipe(write(tmp_path, BASE.replace("data: d.jsonl", "data: d.jsonl, completion_only_loss: 3")))


def test_literal_choice_suggests(tmp_path):
    text = BASE.replace("stages: [sft]", "stages: [ppo]").replace("sft: {data: d.jsonl}", "ppo: {advantage: gea}")
    with pytest.raises(RecipeError, match=r"`ppo.advantage` must be one of .*Did you mean 'gae'"):
        load_recipe(write(tmp_path, text))


def test_yaml_syntax_error_gives_line(tmp_path):
    with pytest.raises(RecipeError, match=r"line 3.*YAML syntax error"):
        load_recipe(write(tmp_path, "run: {name: t}\nstages: [sft]\nsft: data: x.jsonl\nmodel: {}\n"))


def test_scientific_notation_is_a_number(tmp_path):
    # PyYAML reads 1e-4 (no dot) as the string "1e-4".
    r = load_recipe(write(tmp_path, BASE.replace("data: d.jsonl", "data: d.jsonl, lr: 1e-4")))
    assert r.sft.lr == pytest.approx(1e-4) and isinstance(r.sft.lr, float)


def test_unknown_stage_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"`stages\[1\]` is 'evl'.*Did you mean `eval`"):
        load_recipe(write(tmp_path, BASE.replace("stages: [sft]", "stages: [sft, evl]")))


def test_reference_to_later_stage_is_an_error(tmp_path):
    text = BASE.replace("stages: [sft]", "stages: [reward, sft]") + "reward: {data: p.jsonl, init_from: sft}\n"
    with pytest.raises(RecipeError, match=r"`reward.init_from: sft` names a stage that runs later"):
        load_recipe(write(tmp_path, text))


def test_dotted_overrides(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["sft.lr=3e-5", "sft.lora.r=4", "run.seed=7", "sft.lora=null"])
    assert r.sft.lr == pytest.approx(3e-5) and r.run.seed == 7 and r.sft.lora is None
    with pytest.raises(RecipeError, match=r"unknown key `sft.lrr`"):
        load_recipe(write(tmp_path, BASE), ["sft.lrr=1"])
    with pytest.raises(RecipeError, match=r"expected `section.key=value`"):
        load_recipe(write(tmp_path, BASE), ["sft.lr"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_error_is_one_line_without_traceback(tmp_path, capsys):
    p = write(tmp_path, BASE + "bogus: 1\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key `bogus`" in err and "Traceback" not in err


SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates(path, monkeypatch, capsys, tmp_path):
    import json

    import yaml

    monkeypatch.chdir(ROOT)
    # A fresh output folder; a recipe that builds on an earlier run gets one holding the stage outputs it
    # reads (config.json only: preflight loads no weights).
    overrides = [f"run.output_dir={tmp_path / 'out'}"]
    if (yaml.safe_load(path.read_text())["run"] or {}).get("inputs_from"):
        for stage in ("sft", "reward", "ppo", "distill"):
            (tmp_path / "earlier" / stage / "final").mkdir(parents=True)
            (tmp_path / "earlier" / stage / "final" / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
        overrides.append(f"run.inputs_from={tmp_path / 'earlier'}")
    assert main(["validate", str(path.relative_to(ROOT)), *overrides]) == 0, capsys.readouterr().err
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: pipeline run recipes/"), "a recipe opens with its run command"


def test_recipes_command_lists_shipped(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for p in SHIPPED:
        assert p.name in out


def test_cli_overrides_may_follow_options():
    from pipeline.cli import parse

    args = parse(["run", "r.yaml", "sft.lr=1e-4", "--stages", "sft", "run.seed=3", "--force"])
    assert args.overrides == ["sft.lr=1e-4", "run.seed=3"] and args.stages == ["sft"] and args.force
    with pytest.raises(SystemExit):
        parse(["run", "r.yaml", "--stages", "sft", "--bogus"])
    with pytest.raises(SystemExit):
        parse(["recipes", "sft.lr=1"])  # no overrides for this command


def test_cli_output_into_a_closed_pipe_is_not_an_error():
    """`pipeline validate X | head -1`: the reader leaves early; exit 0, no traceback."""
    import subprocess
    import sys

    # `true` exits at once, so the pipe is closed long before validate prints (it imports torch first)
    cmd = f"{sys.executable} -m pipeline validate recipes/quickstart.yaml | true"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode == 0


def test_inputs_from_resolves_stages_this_recipe_does_not_run(tmp_path):
    (tmp_path / "earlier" / "sft" / "final").mkdir(parents=True)
    r = load_recipe(write(tmp_path, BASE))
    assert r.resolve_model_ref("sft") == str(r.stage_dir("sft") / "final")  # default: the run's own dir
    r.run.inputs_from = str(tmp_path / "earlier")
    r.stages = ["ppo"]
    assert r.resolve_model_ref("sft") == str(tmp_path / "earlier" / "sft" / "final")
    assert r.resolve_model_ref("ppo") == str(r.stage_dir("ppo") / "final")  # a stage of this recipe: its own
    assert r.resolve_model_ref("base") == r.model.name_or_path
    with pytest.raises(RecipeError, match=r"`reward` is not a stage of this recipe.*reward/final does not exist"):
        r.resolve_model_ref("reward")
