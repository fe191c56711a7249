#!/usr/bin/env bash
# First run on a GPU host: one table of what works there, about 10 minutes.
#
#   scripts/gpu_acceptance.sh [--repository model_repository] [--model_path models/model_final.pth]
#                             [--data_path data] [--out DIR]
#
# Prints the GPU, driver, CUDA, TensorRT and torch versions against the pin
# (scripts/triton_version.sh), reads the pin's UNVERIFIED figures from the
# pinned containers (docker), runs the GPU check (AMP fine-tune steps, eager
# FP32/FP16/BF16, TorchScript, parity), builds FP16 and INT8 TensorRT plans
# from the CPU-built ONNX files of the repository and checks their parity
# (TensorRT), serves them in the pinned Triton container and runs a short
# perf sweep (docker; the sweep also needs --model_path and --data_path).
# What the host lacks is SKIPPED with the reason, so it also runs on a
# machine with only PyTorch + CUDA (no .venv, TensorRT, Triton or docker):
# it uses .venv/bin/python when present, else python3, and downloads nothing
# unless docker has to pull the pinned images.
# Exit code: 0 all OK or SKIPPED, 1 a step FAILED, 2 no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/triton_version.sh
source scripts/triton_version.sh

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_acceptance.sh: no $PY" >&2; exit 2; }
echo "gpu_acceptance.sh: $("$PY" --version 2>&1) ($PY); pin: Triton ${TRITON_CONTAINER_TAG}, CUDA ${TRITON_CUDA_VERSION}, TensorRT ${TRITON_TENSORRT_VERSION} (unverified: ${UNVERIFIED_KEYS:-none})" >&2
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader >&2 ||
    echo "gpu_acceptance.sh: nvidia-smi failed" >&2
fi
# The whole run is bounded: pulls of the pinned images are the slow part the
# first time (each step has its own timeout as well).
exec timeout "${ACCEPTANCE_TIMEOUT_S:-1500}" "$PY" -m dinov2_triton.qa.gpu_acceptance "$@"
