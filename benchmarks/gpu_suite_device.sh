#!/usr/bin/env bash
# The one prepared GPU run of benchmarks/gpu_suite.py (prepare once with benchmarks/gpu_suite_carry.sh).
# Device tool: command `bash benchmarks/gpu_suite_device.sh`, carry [".whl"], timeout_s 600.
# Writes gpu_suite_<gpu>.md/.json and gpu_suite.log to $OUT (or benchmarks/results/ elsewhere);
# copy the .md/.json into benchmarks/results/ and the table into README "GPU measurements".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
BUDGET_S=${BUDGET_S:-450}           # the suite's own stop; leaves ~2 minutes of the 10-minute call
export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
df -h /dev/shm /tmp 2>/dev/null | tail -n +2
"$PY" -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" \
    || { echo "gpu_suite_device: a package is missing; run benchmarks/gpu_suite_carry.sh here and carry .whl" >&2; exit 2; }
"$PY" benchmarks/gpu_suite.py --budget_s "$BUDGET_S" --out_dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_suite.log"
exit "${PIPESTATUS[0]}"
