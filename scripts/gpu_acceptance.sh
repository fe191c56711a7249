#!/usr/bin/env bash
# First run on a GPU host: one table of what works there, about 10 minutes
# (`dinov2-triton qa gpu-acceptance --help` lists the flags). Uses the
# checkout's .venv when present, else the python3 on PATH with this checkout
# importable (a host with only PyTorch + CUDA: what it lacks is SKIPPED).
# Writes ./reports/gpu-acceptance-<time>/. Exit: 0 OK/SKIPPED, 1 FAILED, 2 no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/dinov2-triton ]; then
  exec .venv/bin/dinov2-triton qa gpu-acceptance "$@"
fi
command -v python3 >/dev/null 2>&1 || { echo "gpu_acceptance.sh: no .venv and no python3" >&2; exit 2; }
exec python3 -m dinov2_triton.cli qa gpu-acceptance "$@"
