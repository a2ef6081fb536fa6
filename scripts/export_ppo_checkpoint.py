"""Save a resumable PPO checkpoint (`ppo/checkpoints/iter-NNNNNN/`) as a plain model, to evaluate the policy of an
earlier iteration without running PPO again (how pass rates move with the iterations).

    python scripts/export_ppo_checkpoint.py RECIPE CHECKPOINT_DIR OUT_DIR [key.sub=value ...]

RECIPE and the overrides must be the run's (its `recipe.resolved.yaml` works): the policy is built as the PPO stage
builds it (`ppo.policy_from`, `ppo.lora`), the checkpoint's trainable weights are loaded into it, and it is saved as
the stage saves its `final/` (LoRA merged, HF format). Then, e.g.:

    pipeline run recipes/quickstart_ifeval.yaml run.inputs_from=RUN 'eval.models=[OUT_DIR]' run.output_dir=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from safetensors.torch import load_file

    from pipeline.checkpoint import load_trainable_state
    from pipeline.config import load_recipe
    from pipeline.models import resolve_precision, save_final
    from pipeline.onpolicy import unwrap_for_generation
    from pipeline.rlmodels import build_ppo_models

    weights = args.checkpoint / "policy.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{args.checkpoint}: no policy.safetensors; expected a PPO checkpoint directory "
                         "(ppo/checkpoints/iter-NNNNNN)")
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.ppo is None:
        raise SystemExit(f"{args.recipe}: the recipe has no `ppo` section")
    if recipe.ppo.advantage == "gae":
        recipe.ppo.advantage = "rloo"  # build the policy only: a GAE run's critic is not part of the exported model
    models = build_ppo_models(recipe, recipe.ppo, resolve_precision(recipe.model))
    state = load_file(str(weights))
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise SystemExit(f"{weights}: its {len(state)} tensors are not the {len(trainable)} trainable parameters of "
                         f"the policy {args.recipe} builds (e.g. {sorted(set(state) ^ trainable)[:2]}); pass the run's "
                         "own recipe (its recipe.resolved.yaml) so `ppo.lora` and `ppo.policy_from` match")
    load_trainable_state(models.policy, state)
    out = save_final(unwrap_for_generation(models.policy), models.tokenizer, args.out)
    print(f"saved {args.checkpoint.name} as {out}")


if __name__ == "__main__":
    main()
