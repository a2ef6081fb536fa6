#!/usr/bin/env bash
# The main job: installs what is missing, then runs the quickstart recipe on the default model.
# Extra arguments are passed on, e.g. scripts/quickstart.sh sft.epochs=1
# `--ifeval` first: afterwards also score the four models on IFEval (recipes/quickstart_ifeval.yaml, ~18 min
# more on 2 CPU cores), e.g. scripts/quickstart.sh --ifeval
set -euo pipefail
cd "$(dirname "$0")/.."
ifeval=0
if [[ "${1:-}" == "--ifeval" ]]; then
  ifeval=1
  shift
fi
bash scripts/setup.sh
"${PYTHON:-python3}" -m pipeline run recipes/quickstart.yaml "$@"
if [[ "$ifeval" == 1 ]]; then
  out=runs/quickstart
  for a in "$@"; do [[ "$a" == run.output_dir=* ]] && out="${a#run.output_dir=}"; done
  exec "${PYTHON:-python3}" -m pipeline run recipes/quickstart_ifeval.yaml "run.inputs_from=$out" \
    "run.output_dir=${out}_ifeval"
fi
