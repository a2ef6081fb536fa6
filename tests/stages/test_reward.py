"""Reward stage on a tiny model: held-out accuracy rises on a separable toy preference set; the
output loads with plain transformers and carries its normalisation statistics."""

import json

from conftest import write_jsonl
from pipeline.config import parse_recipe
from pipeline.runner import run_recipe


def test_reward_stage_learns_toy_preferences(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    rows = []
    for i in range(48):
        rows.append({"prompt": f"write about topic {i}", "chosen": f"the dog sleeps {i} good yes",
                     "rejected": f"no bad the fox {i}"})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"hello {i}"} for i in range(8)])
    recipe = parse_recipe({
        "run": {"name": "t", "output_dir": str(tmp_path / "out"), "seed": 0},
        "model": {"name_or_path": str(tiny_model_dir), "cpu_autocast": "off"},
        "stages": ["reward"],
        "reward": {"data": str(data), "init_from": "base", "lora": None, "lr": 3e-3, "epochs": 4,
                   "batch_size": 8, "eval_fraction": 0.25, "norm_prompts": str(prompts), "norm_samples": 8,
                   "max_new_tokens": 8, "logging_steps": 2},
    })
    s = run_recipe(recipe)["reward"]
    assert s["rm/accuracy"] >= 0.9 and s["rm/accuracy"] > s["rm/accuracy_before"]
    assert s["eval_pairs"] == 12 and s["train_pairs"] == 36  # split by prompt: 25% of 48 prompts held out
    assert set(s["histogram"]) == {"edges", "chosen", "rejected"}
    final = tmp_path / "out" / "reward" / "final"
    norm = json.loads((final / "reward_norm.json").read_text())
    assert norm["n"] == 8 and norm["std"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(final)
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "reward_norm.json" in card
    assert model.config.num_labels == 1 and model.config.pad_token_id != model.config.eos_token_id
    metrics = [json.loads(x) for x in (tmp_path / "out" / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert any("rm/accuracy" in m for m in metrics) and any("rm/loss" in m for m in metrics)


def test_norm_samples_come_from_the_ppo_start_policy(tmp_path):
    """Normalisation statistics describe the policy PPO starts from (its SFT model), not the RM's init."""
    from pipeline.stages.reward import norm_policy_ref

    def recipe(stages, **reward):
        return parse_recipe({
            "run": {"name": "t", "output_dir": str(tmp_path), "seed": 0},
            "model": {"name_or_path": "base-model"},
            "stages": stages,
            "sft": {"data": "x.jsonl"}, "reward": {"data": "p.jsonl", "init_from": "base", **reward},
            "ppo": {"prompts": "q.jsonl", "policy_from": "sft"},
        })

    r = recipe(["sft", "reward", "ppo"])
    assert norm_policy_ref(r, r.reward, "base-model") == "base-model"  # sft/final not written yet
    (tmp_path / "sft" / "final").mkdir(parents=True)
    assert norm_policy_ref(r, r.reward, "base-model") == str(tmp_path / "sft" / "final")
    r = recipe(["sft", "reward"])  # no PPO in this run: the RM's own init
    assert norm_policy_ref(r, r.reward, "base-model") == "base-model"
    r = recipe(["sft", "reward"], norm_policy="sft")
    assert norm_policy_ref(r, r.reward, "base-model") == str(tmp_path / "sft" / "final")


def test_reward_stage_probes_unrequested_formats_on_held_out_pairs(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"write about topic {i}", "chosen": f"the dog sleeps {i} good yes",
             "rejected": f"no bad the fox {i}", "instruction_id_list": [], "kwargs": []} for i in range(16)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows[:12])
    held = write_jsonl(tmp_path / "held.jsonl", rows[12:])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"hello {i}"} for i in range(4)])
    recipe = parse_recipe({
        "run": {"name": "t", "output_dir": str(tmp_path / "out"), "seed": 0},
        "model": {"name_or_path": str(tiny_model_dir), "cpu_autocast": "off"},
        "stages": ["reward"],
        "reward": {"data": str(data), "eval_data": str(held), "init_from": "base", "lora": None, "epochs": 1,
                   "batch_size": 4, "norm_prompts": str(prompts), "norm_samples": 4, "max_new_tokens": 4,
                   "format_probe_rows": 3},
    })
    s = run_recipe(recipe)["reward"]
    shares = {k: v for k, v in s.items() if k.startswith("rm/format_bias/")}
    assert set(shares) == {"rm/format_bias/quotes", "rm/format_bias/upper", "rm/format_bias/title",
                           "rm/format_bias/postscript", "rm/format_bias/placeholders"}  # "lower": lower case already
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in shares.values())  # shares of the 3 probed rows
    assert s["rm/format_bias"] == sum(shares.values()) / 5 and 0 <= s["rm/format_bias_before"] <= 1
