#!/usr/bin/env bash
# Capacity at a latency SLO, and the configuration search, on a repository
# the pipeline exported (issue 12's measurement, one command):
#
#   1. a local Triton server on free loopback ports serves REPO;
#   2. dinov2_triton.tune.search over SEARCH_VARIANTS within SEARCH_MIN minutes, each winner
#      re-measured against the exported default configuration in the same run,
#      then --apply (the winner becomes REPO/<model>/config.pbtxt);
#   3. the server is stopped and started again from REPO, and what it serves
#      is compared with the applied configuration (exit 1 if they differ);
#   4. dinov2_triton.pipeline.bench_stage --capacity: open-loop (Poisson) capacity at p99 <= SLO_P99_MS
#      of CAP_MODELS as served now, each measured twice in turns (A, B, A, B).
#
#   scripts/capacity.sh                                   # ./model_repository, ./data
#   REPO=/tmp/run/model_repository DATA=/tmp/run/data SLO_P99_MS=100 scripts/capacity.sh
#   APPLY=0 scripts/capacity.sh                           # measure only, leave REPO as it is
#   SEARCH=0 scripts/capacity.sh                          # step 4 only: the capacity of what REPO serves
#
# Knobs: SLO_P99_MS (100), CAP_MODELS (dinov2_onnx,dinov2_onnx_int8),
# SEARCH_VARIANTS (onnx_int8; the search applies its one winner), SEARCH_MIN (10), SEARCH_EXTRA (more dinov2_triton.tune.search
# flags, e.g. "--queue-policies on,off"), OUT (perf/reports), RUN_ID.
# Numbers are this machine's: the first line names its CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=$ROOT/.venv/bin/python
REPO=${REPO:-$ROOT/model_repository}
DATA=${DATA:-$ROOT/data}
SLO=${SLO_P99_MS:-100}
CAP_MODELS=${CAP_MODELS:-dinov2_onnx,dinov2_onnx_int8}
SEARCH_VARIANTS=${SEARCH_VARIANTS:-onnx_int8}
SEARCH_MIN=${SEARCH_MIN:-10}
OUT=${OUT:-$ROOT/perf/reports}
RUN_ID=${RUN_ID:-capacity-$(date -u +%Y%m%dT%H%M%SZ)}
LOGS=$OUT/$RUN_ID/server
# the perf_analyzer client and the server share the cores: one thread each for torch-free tools
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

scripts/setup_env.sh
[ -f "$REPO/export_manifest.json" ] || { echo "error: $REPO/export_manifest.json not found (run scripts/pipeline.sh first)" >&2; exit 2; }
[ -d "$DATA" ] || { echo "error: data folder $DATA not found (the test split is the load's input)" >&2; exit 2; }
mkdir -p "$LOGS"
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_vnni|avx_vnni|amx_tile|amx_int8' | tr '\n' ' ' || true)
echo "[capacity] CPU: $(lscpu | grep -m1 'Model name' | sed 's/.*: *//'), $(nproc --all) cores, flags: ${flags:-none of avx2/avx512/vnni/amx}; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "[capacity] repository $REPO, SLO p99 <= $SLO ms, run $OUT/$RUN_ID"

start() {
  read -r HTTP GRPC METRICS < <("$PY" -c 'from dinov2_triton.serve.local_server import find_free_ports; print(*find_free_ports(3))')
  "$PY" -m serve start --repository "$REPO" --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" \
    --log-file "$LOGS/triton.log" --pid-file "$LOGS/triton.pid" --api-key-file "$LOGS/triton.api_key"
  URL=127.0.0.1:$GRPC
}
stop() { "$PY" -m serve stop --pid-file "$LOGS/triton.pid" >/dev/null 2>&1 || true; }
trap stop EXIT

start
if [ "${SEARCH:-1}" != 0 ]; then
t0=$SECONDS
apply=(--apply); [ "${APPLY:-1}" = 0 ] && apply=()
echo "[capacity] $(date +%T) search over $SEARCH_VARIANTS within $SEARCH_MIN min"
# shellcheck disable=SC2086  # SEARCH_EXTRA is a list of flags
"$PY" -m dinov2_triton.tune.search --url "$URL" --repository "$REPO" --data_path "$DATA" --api-key-file "$LOGS/triton.api_key" \
  --variants "$SEARCH_VARIANTS" --slo-p99-ms "$SLO" --budget-min "$SEARCH_MIN" --strategy coordinate \
  --instances 1,2 --threads 1,2 --queue-delays-us 0,2000 --preferred "none;4,8" --max-batch-sizes 8,16 \
  --capacity-budget-s "${SEARCH_POINT_BUDGET_S:-75}" --rate-precision 0.1 --start-rate 40 "${apply[@]}" ${SEARCH_EXTRA:-} \
  --out "$OUT/$RUN_ID" --run-id search
echo "[capacity] search part (with the same-run comparison): $((SECONDS - t0)) s"

if [ "${APPLY:-1}" != 0 ]; then
echo "[capacity] $(date +%T) restart the server from $REPO and compare what it serves with the applied config"
stop
start
"$PY" - "$URL" "$REPO" "$LOGS/triton.api_key" "$OUT/$RUN_ID/search/results.json" <<'PYEOF'
import sys
from pathlib import Path
from dinov2_triton.bench.results import read_results
from dinov2_triton.tune.session import served_mismatch
from dinov2_triton.tune.space import knobs_of
from dinov2_triton.export.triton_config import parse_config
from dinov2_triton.serve.triton_access import connect, read_api_key

url, repo, key_file, results = sys.argv[1:5]
applied = read_results(results).search.applied
if applied is None:
    sys.exit("the search applied nothing (no feasible winner): see its report")
cfg = parse_config(Path(applied.path).read_text())
with connect(url, "grpc", api_key=read_api_key(file=key_file)) as conn:
    served = conn.model_config(applied.model)
diff = served_mismatch(served, knobs_of(cfg), cfg)
run = (served.get("parameters") or {}).get("search_run_id", {}).get("string_value")
print(f"[capacity] after the restart {applied.model} serves {applied.key} (search_run_id {run}): "
      + ("matches the applied config" if not diff else "DIFFERS: " + "; ".join(diff)))
sys.exit(1 if diff else 0)
PYEOF
fi
fi  # SEARCH

t0=$SECONDS
echo "[capacity] $(date +%T) capacity of $CAP_MODELS, 2 measurements each"
"$PY" -m dinov2_triton.pipeline.bench_stage --url "$URL" --repository "$REPO" --data_path "$DATA" --models "$CAP_MODELS" \
  --api-key-file "$LOGS/triton.api_key" --no-in-process --no-parity \
  --concurrency 4 --batch-sizes 1 --window-ms 3000 --keep-going \
  --capacity --slo-p99-ms "$SLO" --capacity-repeats 2 --capacity-budget-s "${CAPACITY_BUDGET_S:-240}" \
  --out "$OUT/$RUN_ID" --run-id capacity
echo "[capacity] capacity part: $((SECONDS - t0)) s"

