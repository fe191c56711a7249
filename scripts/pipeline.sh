#!/usr/bin/env bash
# The main job: every stage on the embedded default data set (Fashion-MNIST
# from Debian's dataset-fashion-mnist), on this machine's CPU.
#   data -> fine-tune -> export (+ FP16/INT8, TensorRT skipped without a GPU)
#   -> local Triton server -> classify the test split through the ensemble
#   -> perf (perf_analyzer sweeps, in-process benchmark, parity) -> report
# Every knob is an environment variable (defaults sized for a 2-core machine):
#   PER_CLASS, TEST_PER_CLASS, IMG_SIZE, ARCH, MODE, EPOCHS, LP_EPOCHS, LR,
#   BATCH_SIZE, WEIGHTS, VARIANTS, PERF_PROTOCOLS, PERF_CONCURRENCY, PERF_BATCH_SIZES,
#   HTTP_PORT, GRPC_PORT, METRICS_PORT, PERF_WINDOW_MS, SKIP_PERF=1
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Embedded default: Fashion-MNIST images are 28x28, so 56 px (4x4 patches of
# 14 px) keeps the demo honest about its input and fits the time budget of a
# 2-core CPU. Real data: IMG_SIZE=224 (or 518, DINOv2's native size).
PER_CLASS=${PER_CLASS:-300}
TEST_PER_CLASS=${TEST_PER_CLASS:-100}
IMG_SIZE=${IMG_SIZE:-56}
ARCH=${ARCH:-vits14}
MODE=${MODE:-full}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-64}
VARIANTS=${VARIANTS:-torchscript,onnx,onnx_fp16,onnx_int8,trt_fp16,trt_int8}
DATA=${DATA:-$ROOT/data}
MODELS=${MODELS:-$ROOT/models}
REPO=${REPO:-$ROOT/model_repository}
LOGS=${LOGS:-$ROOT/logs}
PERF_WINDOW_MS=${PERF_WINDOW_MS:-4000}
PERF_PROTOCOLS=${PERF_PROTOCOLS:-grpc}
PERF_CONCURRENCY=${PERF_CONCURRENCY:-1,4}
PERF_BATCH_SIZES=${PERF_BATCH_SIZES:-1,8}
mkdir -p "$LOGS"

stage() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$(date +%H:%M:%S)" "$*"; }
t_start=$(date +%s)

stage "setup (idempotent)"
scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Weights: whatever is available offline. Pretrained DINOv2 weights cannot be
# downloaded here; put an official checkpoint at weights/dinov2_${ARCH}_pretrain.pth
# (or set WEIGHTS=/path or WEIGHTS=hub on a connected machine).
if [ -z "${WEIGHTS:-}" ]; then
  if [ -f "weights/dinov2_${ARCH}_pretrain.pth" ]; then
    WEIGHTS="weights/dinov2_${ARCH}_pretrain.pth"
  else
    WEIGHTS=random
    cat <<'BANNER'
############################################################################
#  NO PRETRAINED DINOv2 WEIGHTS AVAILABLE (offline machine).               #
#  This demo fine-tunes a RANDOMLY INITIALISED ViT: the pipeline, export,  #
#  serving and measurements are real, the accuracy is NOT what a DINOv2    #
#  fine-tune reaches. Put dinov2_vits14_pretrain.pth under weights/ or set #
#  WEIGHTS=/path/to/checkpoint.pth to use real weights.                    #
############################################################################
BANNER
  fi
fi

stage "data: Fashion-MNIST, ${PER_CLASS}/class (train+val) + ${TEST_PER_CLASS}/class test"
"$PY" -m train.load_data --data_path "$DATA" --dataset fashion-mnist \
  --per-class "$PER_CLASS" --test-per-class "$TEST_PER_CLASS" --force

# Two recipes (measured: see README). A randomly initialised ViT learns from
# scratch: high lr, no layer-wise decay (it only protects pretrained features),
# no augmentation (5 epochs are too few to profit from it). Pretrained DINOv2
# weights: the fine-tuning recipe (small lr, layer decay 0.75, a linear-probe
# warm start so the random head does not wreck the features).
if [ "$WEIGHTS" = random ]; then
  RECIPE=(--lr "${LR:-1e-3}" --layer-decay 1.0 --warmup-epochs 0.5 --no-augment --lp-epochs "${LP_EPOCHS:-0}")
else
  RECIPE=(--lr "${LR:-1e-4}" --layer-decay 0.75 --warmup-epochs 1 --lp-epochs "${LP_EPOCHS:-1}")
fi
stage "train: $ARCH, mode=$MODE, ${EPOCHS} epochs, ${IMG_SIZE}px, weights=$WEIGHTS, recipe: ${RECIPE[*]}"
"$PY" -m train.finetune --data_path "$DATA" --output_path "$MODELS" --no-resume \
  --arch "$ARCH" --weights "$WEIGHTS" --img-size "$IMG_SIZE" --mode "$MODE" \
  --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" "${RECIPE[@]}"

stage "export: $VARIANTS"
set +e
"$PY" -m export --model_path "$MODELS/model_final.pth" --repository "$REPO" \
  --data_path "$DATA" --variants "$VARIANTS" --max-batch-size 8
export_rc=$?
set -e
if [ "$export_rc" -eq 2 ]; then echo "export failed (bad input), stopping" >&2; exit 2; fi
[ "$export_rc" -eq 0 ] || echo "WARNING: some variants failed their gates or their build (see $REPO/export_manifest.json); continuing with the published ones" >&2

stage "serve: local Triton server (CPU)"
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" -c 'from serve.local_server import find_free_ports; print(*find_free_ports(3))')
export HTTP_PORT GRPC_PORT METRICS_PORT
PIDFILE="$LOGS/triton.pid"
stop_server() { "$PY" -m serve stop --pid-file "$PIDFILE" >/dev/null 2>&1 || true; }
trap stop_server EXIT
"$PY" -m serve start --repository "$REPO" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" --log-file "$LOGS/triton.log" --pid-file "$PIDFILE"

stage "classify the test split through the ensemble (gRPC and HTTP)"
"$PY" -m perf.client --url "localhost:$GRPC_PORT" --protocol grpc --model dinov2 \
  --data_path "$DATA" --split test --quiet
"$PY" -m perf.client --url "localhost:$HTTP_PORT" --protocol http --model dinov2 \
  --data_path "$DATA" --split test --quiet

if [ "${SKIP_PERF:-0}" != 1 ]; then
  stage "perf: in-process benchmark, perf_analyzer sweeps, parity through the live server, report"
  # --keep-going: an unstable point is recorded in the report, the sweep goes on.
  "$PY" -m perf.run --url "localhost:$GRPC_PORT" --http-url "localhost:$HTTP_PORT" \
    --metrics-url "localhost:$METRICS_PORT" --api-key-file "$LOGS/triton.api_key" \
    --server-pid "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$PIDFILE")" \
    --repository "$REPO" \
    --model_path "$MODELS/model_final.pth" --data_path "$DATA" \
    --protocols "$PERF_PROTOCOLS" --concurrency "$PERF_CONCURRENCY" --batch-sizes "$PERF_BATCH_SIZES" \
    --window-ms "$PERF_WINDOW_MS" --keep-going --out "$ROOT/perf/reports"
fi

stage "done in $(( ($(date +%s) - t_start) / 60 )) min $(( ($(date +%s) - t_start) % 60 )) s"
