#!/usr/bin/env bash
# The main job: installs what is missing, then runs the quickstart recipe on the default model.
# Extra arguments are passed on, e.g. scripts/quickstart.sh sft.epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pipeline run recipes/quickstart.yaml "$@"
