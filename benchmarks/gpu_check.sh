#!/usr/bin/env bash
# The GPU path, measured (issue #20 req. 6): bash benchmarks/gpu_check.sh [--dry-run]
# Real run: <= 8 min on one GPU (each section has its own cap). --dry-run: tiny sizes on the CPU.
# Writes benchmarks/results/gpu_check.json (gpu_check-dry-run.json); see benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
PYTHON=${PYTHON:-python}
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
exec timeout 470 "$PYTHON" benchmarks/gpu_check.py "$@"
