#!/usr/bin/env bash
# Serve the model repository with NVIDIA Triton.
#
#   scripts/serve.sh local [flags]   this machine, CPU: the real tritonserver from
#                                    nvidia-pytriton + CPU stand-in backends; waits
#                                    until ready, then returns (server keeps running)
#   scripts/serve.sh status          is the local server running / ready, models
#   scripts/serve.sh stop            stop the local server (and the container, if any)
#   scripts/serve.sh container [--models a,b] [--repository DIR] [--exit-timeout-secs N]
#                                    GPU host: the NVIDIA Triton container pinned in
#                                    scripts/triton_version.sh (foreground, Ctrl-C stops)
#
# Ports: HTTP_PORT / GRPC_PORT / METRICS_PORT (default 8000 / 8001 / 8002), or
# --http-port / --grpc-port / --metrics-port. Repository: MODEL_REPOSITORY
# (default ./model_repository) or --repository. `local` takes every flag of
# `python -m serve start` (see --help), e.g. --models dinov2_onnx,dinov2_torchscript.
# Both modes restrict the model-repository API (load/unload/index) to requests
# with the header "triton-api-key: <key>"; the key file is printed at start.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/triton_version.sh
source scripts/triton_version.sh

HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
MODEL_REPOSITORY=${MODEL_REPOSITORY:-model_repository}
CONTAINER_NAME=${CONTAINER_NAME:-dinov2-triton}
BIND_ADDRESS=${BIND_ADDRESS:-127.0.0.1}  # container ports; 0.0.0.0 to serve other hosts
# On SIGTERM Triton refuses new requests and answers the ones it holds for up
# to this long (tritonserver --exit-timeout-secs; dinov2_triton.serve.local_server.DEFAULT_EXIT_TIMEOUT_S).
# docker stop waits 10 s longer before SIGKILL (docker's own default is 10 s).
EXIT_TIMEOUT_SECS=${EXIT_TIMEOUT_SECS:-30}
PY=.venv/bin/python

die() { printf 'serve.sh: %s\n' "$*" >&2; exit 1; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

run_container() {
  local models="" repo="$MODEL_REPOSITORY"
  while (($#)); do
    case "$1" in
      --models) models=${2:?--models needs a value}; shift 2 ;;
      --models=*) models=${1#*=}; shift ;;
      --repository) repo=${2:?--repository needs a value}; shift 2 ;;
      --repository=*) repo=${1#*=}; shift ;;
      --http-port) HTTP_PORT=$2; shift 2 ;;
      --grpc-port) GRPC_PORT=$2; shift 2 ;;
      --metrics-port) METRICS_PORT=$2; shift 2 ;;
      --exit-timeout-secs) EXIT_TIMEOUT_SECS=$2; shift 2 ;;
      --exit-timeout-secs=*) EXIT_TIMEOUT_SECS=${1#*=}; shift ;;
      *) die "unknown flag for container: $1" ;;
    esac
  done
  command -v docker >/dev/null 2>&1 ||
    die "docker not found. 'container' runs ${TRITON_CONTAINER_IMAGE} on a GPU host with docker and the NVIDIA Container Toolkit; on this machine use: scripts/serve.sh local"
  docker info >/dev/null 2>&1 || die "docker is installed but its daemon is not reachable (is it running? are you in the docker group?)"
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    die "no NVIDIA GPU or driver found (nvidia-smi failed); TensorRT plans and the GPU backends need one. On CPU use: scripts/serve.sh local"
  fi
  [ -d "$repo" ] || die "model repository $repo does not exist (run the export stage first)"

  # Version-compatible TensorRT plans (exported with --set trt_version_compatible=true,
  # stamped `version_compatible: "true"` in their config.pbtxt) load only when the
  # TensorRT backend may run the lean runtime they carry: trusted plans only.
  local backend_cfg=() cfg vc_models=()
  for cfg in "$repo"/*/config.pbtxt; do
    [ -f "$cfg" ] || continue
    if grep -A2 'key: "version_compatible"' "$cfg" | grep -q 'string_value: "true"'; then
      vc_models+=("$(basename "$(dirname "$cfg")")")
    fi
  done
  if ((${#vc_models[@]})); then
    backend_cfg=("--backend-config=tensorrt,version-compatible=true")
    echo "serve.sh: version-compatible TensorRT plans (${vc_models[*]}): --backend-config=tensorrt,version-compatible=true"
  fi
  # The same Pillow as everywhere else (requirements/lock-gpu.txt) for the preprocessing model.
  local pillow
  pillow=$(grep -ioE '^pillow==[^ ]+' requirements/lock-gpu.txt) ||
    die "requirements/lock-gpu.txt pins no pillow (regenerate it: python -m tests.fixtures.gpu_stack lock)"

  local load=() m
  if [ -n "$models" ]; then
    IFS=, read -ra names <<<"$models"
    for m in "${names[@]}"; do load+=("--load-model=$m"); done
  else
    load=("--load-model=*")
  fi
  # Derived image: the pinned Triton image + Pillow for the preprocessing model.
  local image="dinov2-triton-serve:${TRITON_CONTAINER_TAG}"
  docker build -q -t "$image" --build-arg "TRITON_IMAGE=${TRITON_CONTAINER_IMAGE}" \
    --build-arg "PILLOW_REQUIREMENT=${pillow}" -f serve/Dockerfile serve >/dev/null ||
    die "could not build $image from ${TRITON_CONTAINER_IMAGE} (serve/Dockerfile)"
  mkdir -p logs
  local key_file=logs/triton-container.api_key key
  key=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  (umask 077 && printf '%s\n' "$key" >"$key_file")
  echo "serve.sh: ${TRITON_CONTAINER_IMAGE} (Triton ${TRITON_SERVER_VERSION}, TensorRT ${TRITON_TENSORRT_VERSION}, CUDA ${TRITON_CUDA_VERSION})"
  echo "serve.sh: http ${BIND_ADDRESS}:${HTTP_PORT} grpc ${BIND_ADDRESS}:${GRPC_PORT} metrics ${BIND_ADDRESS}:${METRICS_PORT}; api key in ${key_file}"
  [[ $EXIT_TIMEOUT_SECS =~ ^[0-9]+$ ]] || die "--exit-timeout-secs / EXIT_TIMEOUT_SECS: '$EXIT_TIMEOUT_SECS' is not a number of seconds"
  exec docker run --rm --name "$CONTAINER_NAME" --gpus all --shm-size=1g \
    --stop-timeout "$((EXIT_TIMEOUT_SECS + 10))" \
    --ulimit memlock=-1 --ulimit stack=67108864 \
    -p "${BIND_ADDRESS}:${HTTP_PORT}:8000" -p "${BIND_ADDRESS}:${GRPC_PORT}:8001" \
    -p "${BIND_ADDRESS}:${METRICS_PORT}:8002" \
    -v "$(cd "$repo" && pwd)":/models:ro \
    "$image" \
    tritonserver --model-repository=/models --model-control-mode=explicit "${load[@]}" \
    "${backend_cfg[@]}" --exit-on-error=false "--exit-timeout-secs=${EXIT_TIMEOUT_SECS}" \
    "--http-restricted-api=model-repository:triton-api-key=${key}" \
    "--grpc-restricted-protocol=model-repository:triton-api-key=${key}"
}

cmd=${1:-}
(($#)) && shift
case "$cmd" in
  local)
    scripts/setup_env.sh
    exec "$PY" -m serve start --repository "$MODEL_REPOSITORY" --http-port "$HTTP_PORT" \
      --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" "$@"
    ;;
  status) exec "$PY" -m serve status "$@" ;;
  stop)
    if command -v docker >/dev/null 2>&1 && docker ps -q --filter "name=^${CONTAINER_NAME}$" 2>/dev/null | grep -q .; then
      docker stop -t "$((EXIT_TIMEOUT_SECS + 10))" "$CONTAINER_NAME" >/dev/null && echo "stopped container $CONTAINER_NAME"
    fi
    exec "$PY" -m serve stop "$@"
    ;;
  container) run_container "$@" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
