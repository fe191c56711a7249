#!/usr/bin/env bash
# Run the test suite (sets up .venv and Debian packages first, idempotently).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -k export
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
# Two cores: keep BLAS/OMP threads bounded so the server and clients in the
# integration tests do not oversubscribe the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "$@"
