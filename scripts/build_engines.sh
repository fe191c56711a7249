#!/usr/bin/env bash
# Build the TensorRT engines with the TensorRT of the pinned release
# (scripts/triton_version.sh): a plan only loads in the TensorRT that built it.
#
#   scripts/build_engines.sh [--local] [--variants trt_fp16,trt_int8] -- EXPORT_FLAGS...
#       Runs `python -m export --variants ...` (their ONNX parents are rebuilt in
#       the same run): build, verify against eager FP32 on the GPU, gate, publish
#       with config.pbtxt. EXPORT_FLAGS are python -m export flags, e.g.
#       --model_path models/model_final.pth --data_path data --repository model_repository
#       (paths inside this project folder: it is mounted at the same path).
#       default  inside $TENSORRT_CONTAINER_IMAGE of the pin (docker + NVIDIA Container
#                Toolkit). The packages of requirements/lock-gpu.txt, except TensorRT
#                (the container's own is used), are installed once into the cache
#                folder below (network needed the first time; PIP_EXTRA_ARGS is
#                passed to pip, e.g. "--index-url https://mirror/simple").
#       --local  here, when `import tensorrt` works and a GPU is visible
#                (pip install -r requirements/lock-gpu.txt, or environment.yml).
#
#   scripts/build_engines.sh --plans-only [--local] -- TRT_BUILD_FLAGS...
#       Only `python -m dinov2_triton.export.trt_build_main` (TensorRT's Python bindings and the
#       standard library: nothing is installed), e.g. -- --onnx
#       model_repository/dinov2_onnx/1/model.onnx --plan engines/trt_fp16.plan
#       --precision fp16 --max-batch 8. The plan is neither verified nor published.
#
# Cache: DINOV2_TRITON_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/dinov2-triton) is
# mounted into the container at the same path, so the pip cache, the installed
# packages (one folder per lock-file hash) and the TensorRT timing caches
# survive `docker run --rm`.
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
[ -n "${TENSORRT_CONTAINER_IMAGE:-}" ] || die "TENSORRT_CONTAINER_IMAGE missing in scripts/triton_version.sh"
LOCK=requirements/lock-gpu.txt
[ -f "$LOCK" ] || die "$LOCK is missing (python -m tests.fixtures.gpu_stack lock)"
CACHE=${DINOV2_TRITON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dinov2-triton}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
export DINOV2_TRITON_CACHE=$CACHE

if ((PLANS_ONLY)); then
  CMD=(-m dinov2_triton.export.trt_build_main "$@")
else
  CMD=(-m export --variants "$VARIANTS" "$@")
fi

if ((LOCAL)); then
  PY=python3
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  "$PY" -c 'import tensorrt' 2>/dev/null ||
    die "--local: tensorrt is not importable by $PY (pip install -r $LOCK, or conda env create -f environment.yml; or drop --local to use $TENSORRT_CONTAINER_IMAGE)"
  nvidia-smi -L >/dev/null 2>&1 || die "--local: no NVIDIA GPU or driver (nvidia-smi failed)"
  echo "build_engines.sh: local TensorRT $("$PY" -c 'import tensorrt; print(tensorrt.__version__)'), pinned ${TRITON_TENSORRT_VERSION} (Triton ${TRITON_CONTAINER_TAG})" >&2
  exec "$PY" "${CMD[@]}"
fi

command -v docker >/dev/null 2>&1 ||
  die "docker not found: the default mode runs $TENSORRT_CONTAINER_IMAGE on a GPU host with docker and the NVIDIA Container Toolkit (or use --local where TensorRT ${TRITON_TENSORRT_VERSION} is installed)"
docker info >/dev/null 2>&1 || die "docker is installed but its daemon is not reachable"
nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU or driver found (nvidia-smi failed): TensorRT engines are built on the GPU they will run on"

# Inside the container, as the calling user (files written back stay theirs).
# The container's Python must be the lock's (TRITON_PYTHON_VERSION); the
# packages go into a folder of the cache named after the lock's hash, built
# beside it and renamed into place only when pip succeeded.
# shellcheck disable=SC2016  # expanded inside the container
INNER='set -euo pipefail
py=$(python3 -c "import sys; print(\"%d.%d\" % sys.version_info[:2])")
if [ "$PIN_PYTHON" != "$py" ]; then
  echo "build_engines.sh: $IMAGE has Python $py; requirements/lock-gpu.txt is for Python $PIN_PYTHON (TRITON_PYTHON_VERSION in scripts/triton_version.sh): correct the pin and regenerate the lock (python -m tests.fixtures.gpu_stack lock)" >&2
  exit 2
fi
if [ "$MODE" = export ]; then
  deps="$DINOV2_TRITON_CACHE/pydeps-py$py-$LOCK_ID"
  if [ ! -f "$deps/.complete" ]; then
    echo "build_engines.sh: installing requirements/lock-gpu.txt (without TensorRT) into $deps" >&2
    req="$DINOV2_TRITON_CACHE/lock-$LOCK_ID-without-tensorrt.txt"
    grep -vE "^(tensorrt|--extra-index-url)" requirements/lock-gpu.txt >"$req"
    rm -rf "$deps.partial"
    # shellcheck disable=SC2086
    python3 -m pip install --quiet --no-deps --disable-pip-version-check --target "$deps.partial" \
      --cache-dir "$DINOV2_TRITON_CACHE/pip" $PIP_EXTRA_ARGS -r "$req"
    touch "$deps.partial/.complete"
    rm -rf "$deps" && mv "$deps.partial" "$deps"
  fi
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 "$@"'
LOCK_ID=$(sha256sum "$LOCK" | cut -c1-12)
MODE="export"
if ((PLANS_ONLY)); then MODE="plans"; fi
printf -v ARGS '%q ' "${CMD[@]}"
echo "build_engines.sh: $TENSORRT_CONTAINER_IMAGE (TensorRT ${TRITON_TENSORRT_VERSION}, Python ${TRITON_PYTHON_VERSION}), cache $CACHE: python ${ARGS}" >&2
exec docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
  -v "$ROOT:$ROOT" -w "$ROOT" -v "$CACHE:$CACHE" \
  -e HOME=/tmp -e "DINOV2_TRITON_CACHE=$CACHE" -e "PIN_PYTHON=${TRITON_PYTHON_VERSION}" -e "MODE=$MODE" \
  -e "LOCK_ID=$LOCK_ID" -e "PIP_EXTRA_ARGS=${PIP_EXTRA_ARGS:-}" -e "IMAGE=$TENSORRT_CONTAINER_IMAGE" \
  "$TENSORRT_CONTAINER_IMAGE" bash -c "$INNER" build_engines.sh "${CMD[@]}"
