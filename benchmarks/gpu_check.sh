#!/usr/bin/env bash
# The GPU checks in one prepared run (docs/model_and_cost.md, "GPU check"): the `gpu` tests,
# then TNT-S against timm's TNT-S and DeiT-S at batch 256 in bf16, eager and compiled.
# Under 8 minutes on one GPU; prints one line per check. Usage: bash benchmarks/gpu_check.sh
# (or make gpu-check). The full pytest log goes to $LOG_DIR (default: $OUT if set, else /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-${OUT:-/tmp}}
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "gpu-check: no GPU"; exit 1; }

timeout 330 "$PY" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py -v -s --tb=line --timeout=300 \
    >"$LOG_DIR/gpu_check_pytest.log" 2>&1
tests=$?
grep -E "^tests/test_gpu.py::|images/s|^E |^/.*:[0-9]+: |[0-9]+ (passed|failed)" "$LOG_DIR/gpu_check_pytest.log"
echo "check pytest -m gpu: exit $tests after $((SECONDS - start)) s"

timeout 240 "$PY" benchmarks/model_speed.py --device cuda --batch-size 256 --precision bf16 --compile --deit \
    --repeats 7 --warmup 2 --modes inference
speed=$?
echo "check model_speed --device cuda: exit $speed after $((SECONDS - start)) s"
exit $(( tests != 0 || speed != 0 ))
