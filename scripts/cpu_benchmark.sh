#!/usr/bin/env bash
# The side-by-side CPU benchmark (README "The fastest CPU deployment"): every
# CPU variant (python -m export --variants cpu-auto: TorchScript, ONNX FP32,
# FP16, ModelOpt Q/DQ INT8, ORT dynamic INT8, OpenVINO FP32 and NNCF INT8)
# at 56 px and 224 px, in process and through the local Triton server, at
# batch 1 and 8 (concurrency 1), with top-1 agreement through the live
# server; then the thread-settings study and one table.
#
#   scripts/cpu_benchmark.sh                 # both sizes, about an hour on 2 busy cores
#   SIZES=56 scripts/cpu_benchmark.sh        # one size
#
# 56 px: the pipeline's Fashion-MNIST demo model (full fine-tune, random
# init). 224 px: scripts/benchmark.sh's recipe (random ViT-S/14 + a linear
# head, one epoch): speed is real, agreement on random features is a
# pessimistic case for INT8. Variants that miss their gate are published
# anyway (--allow-failed-gates) so that they are measured; they are never
# recommended. Everything lands under runs/cpu-benchmark/<px>/; the table is
# runs/cpu-benchmark/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZES=${SIZES:-56 224}
OUT=${OUT:-$ROOT/runs/cpu-benchmark}
PY="$ROOT/.venv/bin/python"
WINDOW_MS=${WINDOW_MS:-4000}
SECONDS_PER_CELL=${SECONDS_PER_CELL:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
scripts/setup_env.sh
mkdir -p "$OUT"
echo "[cpu-benchmark] $(lscpu | grep -m1 'Model name' | sed 's/  */ /g'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
# No queue policy in the benchmark's repositories: export writes none by
# default, because Triton 2.51 stalls ~500 ms on some requests with one
# (export/triton_config.py, docs/field-notes.md #13).
results=()
for px in $SIZES; do
  dir=$OUT/$px
  mkdir -p "$dir"
  if [ "$px" -le 112 ]; then
    recipe=(PER_CLASS="${PER_CLASS_SMALL:-150}" TEST_PER_CLASS="${TEST_PER_CLASS_SMALL:-30}" MODE=full EPOCHS=5
            BATCH_SIZE=64 TRAIN_EXTRA=)
  else
    recipe=(PER_CLASS="${PER_CLASS_LARGE:-24}" TEST_PER_CLASS="${TEST_PER_CLASS_LARGE:-16}" MODE=linear EPOCHS=1
            BATCH_SIZE=16 TRAIN_EXTRA=--cache-features)
  fi
  echo "[cpu-benchmark] $px px: data, train, export --variants cpu-auto (pipeline.sh, perf skipped)"
  env "${recipe[@]}" IMG_SIZE="$px" VARIANTS=cpu-auto SKIP_PERF=1 \
    EXPORT_EXTRA="--calib-size ${CALIB_SIZE:-256} --eval-size ${EVAL_SIZE:-256} --allow-failed-gates" \
    DATA="$dir/data" MODELS="$dir/models" REPO="$dir/model_repository" LOGS="$dir/logs" STATE="$dir/state" \
    scripts/pipeline.sh

  echo "[cpu-benchmark] $px px: local Triton server, dinov2_triton.pipeline.bench_stage (in process + perf_analyzer + live parity)"
  read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" -c 'from dinov2_triton.serve.local_server import find_free_ports; print(*find_free_ports(3))')
  pidfile="$dir/logs/triton-bench.pid"
  stop_server() { "$PY" -m serve stop --pid-file "$pidfile" >/dev/null 2>&1 || true; }
  trap stop_server EXIT
  "$PY" -m serve start --repository "$dir/model_repository" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
    --metrics-port "$METRICS_PORT" --log-file "$dir/logs/triton-bench.log" --pid-file "$pidfile"
  rm -rf "$dir/reports/cpu-$px"   # a rerun replaces the previous report of this size
  set +e
  "$PY" -m dinov2_triton.pipeline.bench_stage --url "localhost:$GRPC_PORT" --http-url "localhost:$HTTP_PORT" \
    --metrics-url "localhost:$METRICS_PORT" --api-key-file "$dir/logs/triton-bench.api_key" \
    --repository "$dir/model_repository" --model_path "$dir/models/model_final.pth" --data_path "$dir/data" \
    --protocols grpc --concurrency 1 --batch-sizes 1,8 --window-ms "$WINDOW_MS" --keep-going \
    --threads 1 --seconds "$SECONDS_PER_CELL" --op-batch-size 8 --op-concurrency 1 \
    --out "$dir/reports" --run-id "cpu-$px"
  rc=$?
  set -e
  stop_server
  trap - EXIT
  [ "$rc" -le 1 ] || { echo "[cpu-benchmark] dinov2_triton.pipeline.bench_stage failed (exit $rc)" >&2; exit "$rc"; }
  results+=("$dir/reports/cpu-$px/results.json")

  echo "[cpu-benchmark] $px px: thread settings (1 instance x all cores vs instances x 1 thread)"
  "$PY" -m dinov2_triton.bench.cpu_threads --repository "$dir/model_repository" --variants "${THREAD_VARIANTS:-onnx_int8_dynamic,openvino_int8}" \
    --batch-size 8 --seconds "$SECONDS_PER_CELL" --out "$dir/threads.json" | tee "$dir/threads.md"
done
"$PY" -m dinov2_triton.report.cpu_compare "${results[@]}" --out "$OUT/table.md"
for px in $SIZES; do cat "$OUT/$px/threads.md"; echo; done >> "$OUT/table.md"
echo "[cpu-benchmark] table: $OUT/table.md; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
