#!/usr/bin/env bash
# Build the TensorRT engines with the TensorRT of the pinned Triton release
# (scripts/triton_version.sh): a plan only loads in the TensorRT that built it.
#
#   scripts/build_engines.sh [--local] [--variants trt_fp16,trt_int8] -- EXPORT_FLAGS...
#       Runs `python -m export --variants ...` (their ONNX parents are rebuilt in
#       the same run): build, verify against eager FP32 on the GPU, gate, publish
#       with config.pbtxt. EXPORT_FLAGS are python -m export flags, e.g.
#       --model_path models/model_final.pth --data_path data --repository model_repository
#       (paths inside this project folder: it is mounted at the same path).
#       default  inside nvcr.io/nvidia/tensorrt:<TRITON_CONTAINER_TAG>-py3 (docker +
#                NVIDIA Container Toolkit); installs the project's Python packages
#                into a venv in the container first (needs network; PIP_EXTRA_ARGS).
#       --local  here, when `import tensorrt` works and a GPU is visible
#                (the environment.yml env pins the matching tensorrt).
#
#   scripts/build_engines.sh --plans-only [--local] -- TRT_BUILD_FLAGS...
#       Only `python -m export.trt_build_main` (TensorRT's Python bindings, nothing
#       else), e.g. -- --onnx model_repository/dinov2_onnx/1/model.onnx
#       --plan engines/trt_fp16.plan --precision fp16 --max-batch 8
#       The plan is neither verified nor published: use the first form for that.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=scripts/triton_version.sh
source scripts/triton_version.sh

die() { printf 'build_engines.sh: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

LOCAL=0 PLANS_ONLY=0 VARIANTS=trt_fp16,trt_int8
while (($#)); do
  case "$1" in
    --local) LOCAL=1; shift ;;
    --plans-only) PLANS_ONLY=1; shift ;;
    --variants) VARIANTS=${2:?--variants needs a value}; shift 2 ;;
    --variants=*) VARIANTS=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown flag $1 (flags for python -m export go after --; see --help)" ;;
  esac
done
[ -n "${TRITON_CONTAINER_TAG:-}" ] || die "TRITON_CONTAINER_TAG missing in scripts/triton_version.sh"
IMAGE="nvcr.io/nvidia/tensorrt:${TRITON_CONTAINER_TAG}-py3"

if ((PLANS_ONLY)); then
  CMD=(-m export.trt_build_main "$@")
else
  CMD=(-m export --variants "$VARIANTS" "$@")
fi

if ((LOCAL)); then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  "$PY" -c 'import tensorrt' 2>/dev/null ||
    die "--local: tensorrt is not importable by $PY (install tensorrt==${TRITON_TENSORRT_VERSION%.*} from environment.yml, or drop --local to use $IMAGE)"
  nvidia-smi -L >/dev/null 2>&1 || die "--local: no NVIDIA GPU or driver (nvidia-smi failed)"
  echo "build_engines.sh: local TensorRT $("$PY" -c 'import tensorrt; print(tensorrt.__version__)'), pinned ${TRITON_TENSORRT_VERSION} (Triton ${TRITON_CONTAINER_TAG})" >&2
  exec "$PY" "${CMD[@]}"
fi

command -v docker >/dev/null 2>&1 ||
  die "docker not found: the default mode runs $IMAGE on a GPU host with docker and the NVIDIA Container Toolkit (or use --local where tensorrt==${TRITON_TENSORRT_VERSION%.*} is installed)"
docker info >/dev/null 2>&1 || die "docker is installed but its daemon is not reachable"
nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU or driver found (nvidia-smi failed): TensorRT engines are built on the GPU they will run on"

# Inside the container, as the calling user (files written back stay theirs):
# the project's packages in a venv that still sees the container's TensorRT.
if ((PLANS_ONLY)); then
  SETUP="PY=python3"
else
  SETUP="python3 -m venv --system-site-packages /tmp/venv && PY=/tmp/venv/bin/python && \
\$PY -m pip install -q ${PIP_EXTRA_ARGS:-} -e '.[dev]' torch==2.14.1 torchvision==0.29.1 onnxruntime-gpu==1.22.0 cuda-python"
fi
printf -v ARGS '%q ' "${CMD[@]}"
echo "build_engines.sh: $IMAGE (TensorRT ${TRITON_TENSORRT_VERSION}): python ${ARGS}" >&2
exec docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -v "$ROOT:$ROOT" -w "$ROOT" \
  -e HOME=/tmp "$IMAGE" bash -c "set -e; $SETUP; exec \$PY $ARGS"
