#!/usr/bin/env bash
# GPU check for a CUDA host with PyTorch and ONNX (no Triton, no TensorRT needed):
# a few AMP fine-tuning steps, then eager FP32/FP16/BF16 and TorchScript
# latency, throughput and parity vs FP32, printed as one table (< 8 minutes).
# Uses .venv/bin/python when present, else the python on PATH (a GPU host's env).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "[gpu_check] nvidia-smi not found" >&2
exec timeout 480 "$PY" -m perf.gpu_check "$@"
