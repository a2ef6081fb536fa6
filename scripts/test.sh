#!/usr/bin/env bash
# The test command: installs what is missing, then runs the default (fast) suite.
# Slow tests that use the real default model: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
