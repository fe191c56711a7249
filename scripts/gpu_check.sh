#!/usr/bin/env bash
# GPU check for a CUDA host with PyTorch (no Triton, no TensorRT needed):
# matmul peak FP32/TF32/FP16/BF16, a few AMP fine-tuning steps, then eager
# FP32/FP16/BF16 and TorchScript latency, throughput and parity vs FP32,
# printed as one table (< 8 minutes). Rows that cannot run here (BF16 on a
# GPU without it in hardware, the DINOv2 rows without timm) say SKIPPED and why.
# Uses .venv/bin/python when present, else the python3 on PATH (a GPU host's env).
# Exit code: 0 every row OK or SKIPPED, 1 a row FAILED, 2 no CUDA GPU / no torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "[gpu_check] nvidia-smi not found" >&2
exec timeout 480 "$PY" -m dinov2_triton.qa.gpu_check "$@"
