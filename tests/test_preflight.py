"""Preflight: `pipeline validate` (and `pipeline run`, before any stage) refuses every bad input with exit
code 2 and one message naming the key or path and what would be right, never a traceback. No weights are
loaded: model directories here hold a config.json only."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from pipeline.cli import main, parse
from pipeline.config import Recipe
from pipeline.preflight import RANGES, Range, numeric_fields, range_of


def model_dir(path: Path, layers: int = 4) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A working directory with data files, a 4-layer model (config only) and a recipe writer."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 3)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n' * 3)
    model_dir(tmp_path / "m")

    sections = {
        "sft": "sft: {data: sft.jsonl}\n",
        "reward": "reward: {data: prefs.jsonl, init_from: base}\n",
        "ppo": "ppo: {policy_from: sft, prompts: prompts.jsonl}\n",
        "distill": "distill: {teacher_from: ppo, prompts: prompts.jsonl, student: {from_teacher: {keep_layers: every_2nd}}}\n",
        "eval": "eval: {models: [base, sft], prompts: [prompts.jsonl]}\n",
    }

    def write(stages="sft, reward, ppo, distill, eval", extra="", out="out", drop=(), text=None) -> str:
        if text is None:
            listed = [s.strip() for s in stages.split(",") if s.strip()]
            text = (f"run: {{name: t, output_dir: {out}}}\nmodel: {{name_or_path: m}}\nstages: [{stages}]\n"
                    + "".join(sections[s] for s in listed if s not in drop) + extra)
        (tmp_path / "r.yaml").write_text(text)
        return "r.yaml"

    return write


def validate(capsys, *args) -> tuple[int, str]:
    code = main(["validate", *args])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def refused(capsys, *args, expect: list[str]) -> str:
    code, out = validate(capsys, *args)
    assert code == 2, out
    assert out.startswith("error: ") and "Traceback" not in out, out
    for piece in expect:
        assert piece in out, (piece, out)
    return out


def test_the_fixture_recipe_passes(env, capsys):
    code, out = validate(capsys, env())
    assert code == 0, out
    assert "recipe OK" in out and "distill.teacher_from: ppo: 4 layers" in out


# --- ranges ---------------------------------------------------------------------------------


def _all_sections(cls=Recipe, seen=None) -> set:
    """Every dataclass reachable from Recipe through its fields' types (so a new section is found too)."""
    seen = set() if seen is None else seen
    for tp in typing.get_type_hints(cls).values():
        stack = [tp]
        while stack:
            t = stack.pop()
            if dataclasses.is_dataclass(t) and t not in seen:
                seen.add(t)
                _all_sections(t, seen)
            stack += list(typing.get_args(t))
    return seen


def test_every_numeric_field_of_every_section_has_a_range():
    sections = _all_sections()
    assert len(sections) >= 10  # run, model, lora, sft, reward, reward sources, ppo, student, keep_layers, distill, eval
    missing = [f"{cls.__name__}.{name}" for cls in sections for name in numeric_fields(cls) if range_of(cls, name) is None]
    assert not missing, f"numeric fields without a range in pipeline/preflight.py RANGES: {missing}"
    # and no range names a field that does not exist (a renamed field must take its range along)
    stale = [f"{cls.__name__}.{k}" for cls, keys in RANGES.items() for k in keys
             if k not in {f.name for f in dataclasses.fields(cls)}]
    assert not stale, stale


def test_range_bounds():
    assert 0.5 in Range(0, 1) and 0 in Range(0, 1) and 0 not in Range(0, lo_open=True)
    assert 1 not in Range(0, 1, hi_open=True) and float("nan") not in Range() and float("inf") not in Range()
    assert Range(0, 1, lo_open=True).describe() == "in (0, 1]" and Range(1).describe() == ">= 1"


@pytest.mark.parametrize("override,key,rule", [
    ("sft.lr=-1e-3", "sft.lr", "> 0"),
    ("ppo.lr=0", "ppo.lr", "> 0"),
    ("eval.max_prompts=-5", "eval.max_prompts", ">= 1"),
    ("ppo.temperature=0", "ppo.temperature", "> 0"),
    ("distill.top_p=0", "distill.top_p", "in (0, 1]"),
    ("ppo.gamma=1.5", "ppo.gamma", "in [0, 1]"),
    ("distill.beta=2", "distill.beta", "in [0, 1]"),
    ("sft.lora.dropout=1.0", "sft.lora.dropout", "in [0, 1)"),
    ("ppo.clip_coef=0", "ppo.clip_coef", "> 0"),
    ("reward.batch_size=0", "reward.batch_size", ">= 1"),
    ("ppo.rewards=[{kind: verifier, weight: .nan}]", "ppo.rewards[0].weight", "a finite number"),
])
def test_out_of_range_values_are_refused(env, capsys, override, key, rule):
    refused(capsys, env(), override, expect=[f"`{key}` must be {rule}"])


# --- rules across fields --------------------------------------------------------------------


@pytest.mark.parametrize("overrides,expect", [
    (["ppo.advantage=rloo"], ["`ppo.advantage: rloo`", "`ppo.samples_per_prompt` >= 2 (got 1)"]),
    (["ppo.rollout_batch_size=6", "ppo.minibatch_size=4"], ["`ppo.minibatch_size` (4) must divide", "= 6", "minibatch_size: 3"]),
    (["distill.micro_batch_size=16"], ["`distill.micro_batch_size` (16)", "must be <= minibatch_size"]),
    (["distill.estimator=sampled", "distill.divergence=forward_kl"], ["`distill.estimator: sampled`", "estimator: full"]),
    (["distill.estimator=sampled", "distill.topk_forward_kl_coef=0.5"], ["`distill.topk_forward_kl_coef: 0.5`", "estimator: full"]),
    (["distill.estimator=sampled", "distill.eos_weight=5"], ["`distill.eos_weight: 5", "estimator: full"]),
    (["distill.estimator=sampled", "distill.student_temperature=0.1"], ["`distill.student_temperature: 0.1`", "estimator: full"]),
    (["ppo.logprobs_from=sampler", "ppo.top_p=0.9"], ["`ppo.logprobs_from: sampler`", "`ppo.top_p: 0.9`"]),
    (["distill.student.name_or_path=m"], ["`distill.student` needs exactly one of"]),
    (["distill.warmup_iterations=3"], ["needs `distill.warmup_data`"]),
    (["distill.student.from_teacher.keep_layers=every_0th"], ["keeps no layer"]),
    (["distill.student.from_teacher.keep_layers=evry_2nd"], ["is not one of", "Did you mean `every_2nd`"]),
    (["eval.baseline=sft"], ["`eval.baseline: sft`", "set `eval.reward_from`"]),
    (["model.dtype=bf61"], ["`model.dtype`", "bfloat16"]),
    (["sft.lr_scheduler=cosin"], ["`sft.lr_scheduler`", "Did you mean `cosine`"]),
    (["eval.prompts=[]"], ["`eval.prompts` is empty"]),
    (["ppo.critic_warmup=2", "ppo.advantage=reinforce"], ["`ppo.critic_warmup: 2`", "has no critic"]),
])
def test_rules_across_fields(env, capsys, overrides, expect):
    refused(capsys, env(), *overrides, expect=expect)


def test_keep_layers_must_fit_the_teachers_depth(env, capsys, tmp_path):
    # teacher_from: ppo -> ppo.policy_from: sft -> sft.init_from: base -> m (4 layers): nothing has run yet
    refused(capsys, env(), "distill.student.from_teacher.keep_layers=first_6",
            expect=["keeps 6 layers", "has 4", "first_4", "ppo (from sft (from m))"])
    refused(capsys, env(), "distill.student.from_teacher.keep_layers=[0, 2, 4]", expect=["names layer 4", "0..3"])
    refused(capsys, env(), "distill.student.from_teacher.keep_layers=influence_5", expect=["keeps 5 layers"])
    # an existing stage output's config.json is read instead
    model_dir(tmp_path / "earlier" / "ppo" / "final", layers=8)
    code, out = validate(capsys, env(stages="distill"), "distill.student.from_teacher.keep_layers=first_6",
                         "run.inputs_from=earlier")
    assert code == 0, out
    assert "8 layers" in out


# --- model references -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides,expect", [
    (["model.name_or_path=smollm2-135m-instrct"], ["`model.name_or_path`", "Did you mean `smollm2-135m-instruct`"]),
    (["reward.init_from=sfft"], ["`reward.init_from`", "Did you mean `sft`"]),
    (["ppo.policy_from=./nomodel"], ["`ppo.policy_from`", "./nomodel does not exist"]),
    (["eval.models=[base, ppo, m/sub/x]"], ["`eval.models[2]`", "m/sub/x does not exist"]),
    (["eval.reward_from=sft"], ["`eval.reward_from: sft`", "not a reward model"]),
    (["ppo.rewards=[{kind: rm, source: ppo}]"], ["`ppo.rewards[0].source: ppo`", "not a reward model"]),
    (["distill.teacher_from=reward"], ["`distill.teacher_from: reward`", "cannot generate"]),
    (["reward.norm_policy=distill"], ["`reward.norm_policy: distill` names a stage that runs later"]),
    (["eval.reference=eval"], ["`eval.reference: eval`", "makes no model"]),
    (["ppo.policy_from=ppo"], ["`ppo.policy_from` names the stage itself"]),
])
def test_model_references_resolve(env, capsys, overrides, expect):
    refused(capsys, env(), *overrides, expect=expect)


def test_a_stage_name_needs_the_stage_or_its_output(env, capsys, tmp_path):
    refused(capsys, env(stages="ppo", drop=()), expect=["`ppo.policy_from: sft`", "is not a stage of this recipe",
                                                          "run.inputs_from"])
    refused(capsys, env(stages="ppo"), "run.inputs_from=earlier",
            expect=["`ppo.policy_from: sft`", "`run.inputs_from` (earlier)", str(Path("earlier/sft/final"))])
    model_dir(tmp_path / "earlier" / "sft" / "final")
    code, out = validate(capsys, env(stages="ppo"), "run.inputs_from=earlier", "ppo.reward_from=Org/hub-rm")
    assert code == 0, out  # a hub id `org/name` is accepted without a network check
    # --stages that skips a stage whose output a later one needs
    refused(capsys, env(), "--stages", "ppo", expect=["this run skips `sft`", "add it to --stages"])


def test_error_inside_a_list_names_the_element_and_key(env, capsys):
    refused(capsys, env(), "ppo.rewards=[{kind: verifier}, {kind: rm, wieght: 2}]",
            expect=["unknown key `ppo.rewards[1].wieght`", "Did you mean `weight`"])
    refused(capsys, env(), "ppo.rewards=[{kind: verifier}, {kind: verifer}]",
            expect=["`ppo.rewards[1].kind` must be one of", "Did you mean 'verifier'"])


# --- refused up front -----------------------------------------------------------------------


def test_duplicate_yaml_key_at_any_depth(env, capsys):
    text = ("run: {name: t, output_dir: out}\nmodel: {name_or_path: m}\nstages: [sft]\n"
            "sft:\n  data: sft.jsonl\n  lr: 1.0e-4\n  lora: {r: 8, r: 16}\n  lr: 1.0e-3\n")
    refused(capsys, env(text=text), expect=["line 8", "duplicate key 'lr'", "first on line 6"])
    refused(capsys, env(text=text.replace("  lr: 1.0e-3\n", "")), expect=["line 7", "duplicate key 'r'"])


def test_recipe_that_is_not_utf8_or_is_a_folder(env, capsys, tmp_path):
    (tmp_path / "latin.yaml").write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    refused(capsys, "latin.yaml", expect=["latin.yaml: not UTF-8 text"])
    (tmp_path / "adir.yaml").mkdir()
    refused(capsys, "adir.yaml", expect=["adir.yaml: is a folder, not a recipe"])


@pytest.mark.parametrize("key", ["sft.data", "sft.eval_data", "reward.data", "reward.eval_data", "reward.norm_prompts",
                                 "ppo.prompts", "distill.prompts", "distill.heldout_prompts", "eval.prompts[0]"])
def test_data_path_that_is_a_folder_or_missing(env, capsys, tmp_path, key):
    (tmp_path / "adir").mkdir()
    value = "[adir]" if key == "eval.prompts[0]" else "adir"
    override = "eval.prompts" if key == "eval.prompts[0]" else key
    refused(capsys, env(), f"{override}={value}", expect=[f"`{key}`: adir is a folder with no data files"])
    value = value.replace("adir", "nope.jsonl")
    refused(capsys, env(), f"{override}={value}", expect=[f"`{key}`: data file nope.jsonl not found"])


def test_warmup_data_folder(env, capsys, tmp_path):
    (tmp_path / "adir").mkdir()
    refused(capsys, env(), "distill.warmup_data=adir", "distill.warmup_iterations=2",
            expect=["`distill.warmup_data`: adir is a folder with no data files"])


def test_bad_rows_are_found_without_a_model(env, capsys, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    refused(capsys, env(), expect=["prompts.jsonl: row 2"])


def test_empty_stages(env, capsys):
    refused(capsys, env(stages=""), expect=["`stages` is empty", "stages: [sft, reward, ppo, eval]"])


def test_output_dir_that_is_a_file_or_a_foreign_folder(env, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(capsys, env(out="afile"), expect=["`run.output_dir` afile is a file"])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    refused(capsys, env(out="docs"), expect=["`run.output_dir` docs is a folder with other files (notes.txt)",
                                             "--force"])
    code, out = validate(capsys, env(out="docs"), "--force")
    assert code == 0, out
    (tmp_path / "empty").mkdir()
    code, out = validate(capsys, env(out="empty"))
    assert code == 0, out


def test_os_errors_are_messages_and_debug_shows_the_traceback(env, capsys, monkeypatch):
    def unreadable(*a, **k):
        raise PermissionError(13, "Permission denied", "r.yaml")

    monkeypatch.setattr("pipeline.config.load_recipe", unreadable)
    refused(capsys, env(), expect=["error: r.yaml: Permission denied."])
    with pytest.raises(PermissionError):
        main(["validate", "r.yaml", "--debug"])


# --- CLI ------------------------------------------------------------------------------------


def test_stages_take_spaces_or_commas_and_run_in_recipe_order(env, capsys):
    args = parse(["run", "r.yaml", "--stages", "sft", "reward", "sft.lr=1e-4", "--force"])
    assert args.stages == ["sft", "reward"] and args.overrides == ["sft.lr=1e-4"] and args.force
    assert parse(["run", "r.yaml", "--stages", "sft,reward"]).stages == ["sft,reward"]
    code, out = validate(capsys, env(), "--stages", "reward", "sft")
    assert code == 0 and "stages: sft, reward)" in out, out
    code, out = validate(capsys, env(), "--stages", "sft,reward")
    assert code == 0 and "stages: sft, reward)" in out, out
    refused(capsys, env(stages="sft"), "--stages", "sft", "eval", expect=["--stages eval: not among"])
    refused(capsys, env(), "--stages", "sft", "evl", expect=["'evl' is not a stage", "Did you mean `eval`"])
