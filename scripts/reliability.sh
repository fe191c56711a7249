#!/usr/bin/env bash
# The reliability table: overload, decompression bombs, rollout and shutdown
# under load, bad requests, measured against the real local Triton server on
# a temporary copy of the repository (the repository itself is not touched).
#
#   scripts/reliability.sh                                   # ./model_repository
#   scripts/reliability.sh --repository DIR --seconds 10 --out runs/reliability.json
#
# Every flag goes to `python -m dinov2_triton.qa.reliability` (see --help). Needs free
# loopback ports only: it starts and stops its own servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python -m dinov2_triton.qa.reliability "$@"
