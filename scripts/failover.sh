#!/usr/bin/env bash
# Failover and scale-out through the local load balancer, measured:
# 2 Triton replicas behind HAProxy, steady load, SIGKILL one replica, restart
# it; then 1 replica x all CPUs vs 2 replicas x 1 CPU through the balancer.
#
#   scripts/failover.sh [flags of python -m dinov2_triton.qa.failover]
#
# Repository: MODEL_REPOSITORY (default ./model_repository, written by
# scripts/pipeline.sh) or --repository; model: --model (default dinov2_onnx).
# Writes perf/reports/failover-<run id>/failover.{json,md} (or --out) and
# prints the table. Run it on a quiet machine: the replicas, the balancer and
# the load share the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
MODEL_REPOSITORY=${MODEL_REPOSITORY:-model_repository}
exec .venv/bin/python -m dinov2_triton.qa.failover --repository "$MODEL_REPOSITORY" "$@"
