#!/usr/bin/env bash
# The main job: every stage, on the embedded default data set (Fashion-MNIST
# from Debian's dataset-fashion-mnist) or on your own images, on this CPU.
#   data -> fine-tune -> export (+ FP16/INT8, TensorRT skipped without a GPU)
#   -> local Triton server -> classify the test split through the ensemble
#   -> perf (perf_analyzer sweeps, in-process benchmark, parity) -> report
#
#   scripts/pipeline.sh                                  # Fashion-MNIST demo (56 px)
#   IMAGE_FOLDER=/path/to/tree scripts/pipeline.sh       # your ImageFolder tree (224 px)
#   IMAGE_FOLDER=... WEIGHTS=dinov2_vits14_pretrain.pth ARCH=vits14 scripts/pipeline.sh
#
# A stage whose inputs have not changed since its last successful run is
# skipped (data: the source's files and checksums + flags; train: the data
# manifest, flags and weights; export: the checkpoint and export options;
# each: the code of its package);
# FORCE=1 redoes every stage, FORCE=train,export only those. An interrupted
# run resumes at the stage that did not finish (training inside its epoch).
# Every knob is an environment variable (defaults sized for a 2-core machine):
#   IMAGE_FOLDER, PER_CLASS, TEST_PER_CLASS, IMG_SIZE, ARCH, MODE, EPOCHS,
#   LP_EPOCHS, LR, BATCH_SIZE, WEIGHTS, VARIANTS, PERF_PROTOCOLS,
#   PERF_CONCURRENCY, PERF_BATCH_SIZES, PERF_WINDOW_MS, SKIP_PERF=1, FORCE,
#   TRAIN_EXTRA / EXPORT_EXTRA (more flags for python -m dinov2_triton.train.finetune / export),
#   DATA, MODELS, REPO, LOGS, STATE (stage stamps, default runs/pipeline)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Embedded default: Fashion-MNIST images are 28x28, so 56 px (4x4 patches of
# 14 px) keeps the demo honest about its input and fits the time budget of a
# 2-core CPU. A user's own images: 224 px (DINOv2 fine-tunes at 224; 518 is
# its native size).
IMAGE_FOLDER=${IMAGE_FOLDER:-}
if [ -n "$IMAGE_FOLDER" ]; then
  [ -d "$IMAGE_FOLDER" ] || { echo "IMAGE_FOLDER=$IMAGE_FOLDER: no such folder" >&2; exit 2; }
  IMAGE_FOLDER=$(cd "$IMAGE_FOLDER" && pwd)
  IMG_SIZE=${IMG_SIZE:-224}
else
  PER_CLASS=${PER_CLASS:-300}
  TEST_PER_CLASS=${TEST_PER_CLASS:-100}
  IMG_SIZE=${IMG_SIZE:-56}
fi
ARCH=${ARCH:-vits14}
MODE=${MODE:-full}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-64}
VARIANTS=${VARIANTS:-torchscript,onnx,onnx_fp16,onnx_int8,trt_fp16,trt_int8}
DATA=${DATA:-$ROOT/data}
MODELS=${MODELS:-$ROOT/models}
REPO=${REPO:-$ROOT/model_repository}
LOGS=${LOGS:-$ROOT/logs}
STATE=${STATE:-$ROOT/runs/pipeline}
FORCE=${FORCE:-}
PERF_WINDOW_MS=${PERF_WINDOW_MS:-4000}
PERF_PROTOCOLS=${PERF_PROTOCOLS:-grpc}
PERF_CONCURRENCY=${PERF_CONCURRENCY:-1,4}
PERF_BATCH_SIZES=${PERF_BATCH_SIZES:-1,8}
mkdir -p "$LOGS" "$STATE"

stage() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
t_start=$(date +%s)
timings=()
t_stage=$t_start
stage_done() {  # record how long the stage that just ended took
  local now; now=$(date +%s)
  timings+=("$(printf '%-8s %4d s  %s' "$1" $((now - t_stage)) "$2")")
  t_stage=$now
}
forced() { [ "$FORCE" = 1 ] || [ "$FORCE" = all ] || [[ ",$FORCE," == *",$1,"* ]]; }

stage "setup (idempotent)"
scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
stage_done setup ""
# up_to_date STAGE ARGS...: 0 when the stage may be skipped (prints why)
up_to_date() {
  local name=$1; shift
  if forced "$name"; then echo "[pipeline] $name: runs (FORCE=$FORCE)"; return 1; fi
  "$PY" -m dinov2_triton.core.stage_stamp check --state "$STATE" --stage "$name" "$@"
}
stamp() { "$PY" -m dinov2_triton.core.stage_stamp "$1" --state "$STATE" --stage "$2" "${@:3}"; }

# Weights: whatever is available offline. Pretrained DINOv2 weights cannot be
# downloaded here; put an official checkpoint at weights/dinov2_${ARCH}_pretrain.pth
# (or set WEIGHTS=/path, a Hugging Face model folder, or WEIGHTS=hub on a connected machine).
if [ -z "${WEIGHTS:-}" ]; then
  if [ -f "weights/dinov2_${ARCH}_pretrain.pth" ]; then
    WEIGHTS="weights/dinov2_${ARCH}_pretrain.pth"
  else
    WEIGHTS=random
    cat <<'BANNER'
############################################################################
#  NO PRETRAINED DINOv2 WEIGHTS AVAILABLE (offline machine).               #
#  This run fine-tunes a RANDOMLY INITIALISED ViT: the pipeline, export,   #
#  serving and measurements are real, the accuracy is NOT what a DINOv2    #
#  fine-tune reaches. Put dinov2_vits14_pretrain.pth under weights/ or set #
#  WEIGHTS=/path/to/checkpoint.pth to use real weights.                    #
############################################################################
BANNER
  fi
fi
weights_stamp=(--param "weights=$WEIGHTS")
[ -e "$WEIGHTS" ] && weights_stamp+=(--input "$WEIGHTS")

# ---------------------------------------------------------------- 1. data
if [ -n "$IMAGE_FOLDER" ]; then
  DATA_ARGS=(--image_folder "$IMAGE_FOLDER")
  data_what="ImageFolder tree $IMAGE_FOLDER"
  data_stamp=(--input "$IMAGE_FOLDER")
else
  DATA_ARGS=(--dataset fashion-mnist --per-class "$PER_CLASS" --test-per-class "$TEST_PER_CLASS")
  data_what="Fashion-MNIST, ${PER_CLASS}/class (train+val) + ${TEST_PER_CLASS}/class test"
  data_stamp=(--input /usr/share/datasets/fashion-mnist)
fi
# The stage's code counts as an input too: a checkout with other code reruns it.
data_stamp+=(--input "$ROOT/train" --param "args=${DATA_ARGS[*]}" --output "$DATA/manifest.csv" --output "$DATA/summary.json")
stage "data: $data_what"
if ! up_to_date data "${data_stamp[@]}"; then
  "$PY" -m dinov2_triton.data.load --data_path "$DATA" "${DATA_ARGS[@]}" --force
  stamp finish data "${data_stamp[@]}"
  stage_done data "ran"
else
  stage_done data "skipped (unchanged)"
fi

# ---------------------------------------------------------------- 2. train
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
# shellcheck disable=SC2206  # TRAIN_EXTRA / EXPORT_EXTRA are word-split on purpose
TRAIN_ARGS=(--arch "$ARCH" --weights "$WEIGHTS" --img-size "$IMG_SIZE" --mode "$MODE"
            --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" "${RECIPE[@]}" ${TRAIN_EXTRA:-})
train_stamp=(--input "$ROOT/train" --input "$DATA/manifest.csv" --input "$DATA/labels.txt" "${weights_stamp[@]}"
             --param "args=${TRAIN_ARGS[*]}" --output "$MODELS/model_final.pth")
stage "train: $ARCH, mode=$MODE, ${EPOCHS} epochs, ${IMG_SIZE}px, weights=$WEIGHTS, recipe: ${RECIPE[*]}"
if ! up_to_date train "${train_stamp[@]}"; then
  # Same inputs as an unfinished run: continue from its checkpoint_last.pth
  # (exact resume); otherwise start over.
  if ! forced train && stamp resume train "${train_stamp[@]}" && [ -f "$MODELS/checkpoint_last.pth" ]; then
    echo "[pipeline] train: resuming the unfinished run from $MODELS/checkpoint_last.pth"
    resume=(--resume)
  else
    resume=(--no-resume)
  fi
  stamp start train "${train_stamp[@]}"
  "$PY" -m dinov2_triton.train.finetune --data_path "$DATA" --output_path "$MODELS" "${resume[@]}" "${TRAIN_ARGS[@]}"
  stamp finish train "${train_stamp[@]}"
  stage_done train "ran"
else
  stage_done train "skipped (unchanged)"
fi

# ---------------------------------------------------------------- 3. export
# shellcheck disable=SC2206
EXPORT_ARGS=(--variants "$VARIANTS" --max-batch-size 8 ${EXPORT_EXTRA:-})
export_stamp=(--input "$ROOT/train" --input "$ROOT/export" --input "$MODELS/model_final.pth" --input "$DATA/manifest.csv"
              --param "args=${EXPORT_ARGS[*]}" --output "$REPO/export_manifest.json")
stage "export: $VARIANTS"
if ! up_to_date export "${export_stamp[@]}"; then
  set +e
  "$PY" -m export --model_path "$MODELS/model_final.pth" --repository "$REPO" \
    --data_path "$DATA" "${EXPORT_ARGS[@]}"
  export_rc=$?
  set -e
  if [ "$export_rc" -eq 2 ]; then echo "export failed (bad input), stopping" >&2; exit 2; fi
  if [ "$export_rc" -eq 0 ]; then
    stamp finish export "${export_stamp[@]}"
  else
    echo "WARNING: some variants failed their gates or their build (see $REPO/export_manifest.json); continuing with the published ones (the export stage reruns next time)" >&2
  fi
  stage_done export "ran (exit $export_rc)"
else
  stage_done export "skipped (unchanged)"
fi

stage "serve: local Triton server (CPU)"
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" -c 'from dinov2_triton.serve.local_server import find_free_ports; print(*find_free_ports(3))')
export HTTP_PORT GRPC_PORT METRICS_PORT
PIDFILE="$LOGS/triton.pid"
stop_server() { "$PY" -m serve stop --pid-file "$PIDFILE" >/dev/null 2>&1 || true; }
trap stop_server EXIT
"$PY" -m serve start --repository "$REPO" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" --log-file "$LOGS/triton.log" --pid-file "$PIDFILE"
stage_done serve "local server ready"

stage "classify the test split through the ensemble (gRPC and HTTP)"
"$PY" -m dinov2_triton.client.cli --url "localhost:$GRPC_PORT" --protocol grpc --model dinov2 \
  --data_path "$DATA" --split test --quiet
"$PY" -m dinov2_triton.client.cli --url "localhost:$HTTP_PORT" --protocol http --model dinov2 \
  --data_path "$DATA" --split test --quiet
stage_done classify "test split via gRPC and HTTP"

if [ "${SKIP_PERF:-0}" != 1 ]; then
  stage "perf: in-process benchmark, perf_analyzer sweeps, parity through the live server, report"
  # --keep-going: an unstable point is recorded in the report, the sweep goes on.
  "$PY" -m dinov2_triton.pipeline.bench_stage --url "localhost:$GRPC_PORT" --http-url "localhost:$HTTP_PORT" \
    --metrics-url "localhost:$METRICS_PORT" --api-key-file "$LOGS/triton.api_key" \
    --server-pid "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$PIDFILE")" \
    --repository "$REPO" \
    --model_path "$MODELS/model_final.pth" --data_path "$DATA" \
    --protocols "$PERF_PROTOCOLS" --concurrency "$PERF_CONCURRENCY" --batch-sizes "$PERF_BATCH_SIZES" \
    --window-ms "$PERF_WINDOW_MS" --keep-going --out "$ROOT/perf/reports"
fi

stage_done perf "$([ "${SKIP_PERF:-0}" = 1 ] && echo skipped || echo ran)"
stage "stage times"
printf '  %s\n' "${timings[@]}" | tee "$LOGS/pipeline_times.txt"
stage "done in $(( ($(date +%s) - t_start) / 60 )) min $(( ($(date +%s) - t_start) % 60 )) s"
