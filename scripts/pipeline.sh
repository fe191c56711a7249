#!/usr/bin/env bash
# The main job: set up (idempotent), then every stage from a recipe, here.
#   scripts/pipeline.sh                                  # Fashion-MNIST demo (56 px)
#   scripts/pipeline.sh --images /path/to/tree           # your ImageFolder tree (224 px)
#   IMAGE_FOLDER=/path/to/tree scripts/pipeline.sh       # the same
#   scripts/pipeline.sh --recipe bench-224 | cpu-sweep | capacity | FILE.yaml
# Everything else: .venv/bin/dinov2-triton pipeline --help (recipe keys, --set, --force).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
args=()
if [ -n "${IMAGE_FOLDER:-}" ]; then args=(--images "$IMAGE_FOLDER"); fi
exec .venv/bin/dinov2-triton pipeline "${args[@]}" "$@"
