#!/usr/bin/env bash
# Run the test suite (sets up .venv and Debian packages first, idempotently).
# Lint runs first and fails fast: ruff (pinned in requirements/lock-cpu.txt,
# rules in pyproject.toml) on the Python tree and shellcheck on the shell
# scripts. LINT=0 skips it (e.g. while iterating on one test).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -k export
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh

if [ "${LINT:-1}" != 0 ]; then
  if ! .venv/bin/ruff check --quiet --output-format concise .; then
    echo "[test] ruff found problems (listed above): fix them (many with .venv/bin/ruff check --fix .), or run with LINT=0 to skip lint" >&2
    exit 1
  fi
  if ! shellcheck scripts/*.sh .ci/run; then
    echo "[test] shellcheck found problems in the shell scripts (listed above): fix them, or run with LINT=0 to skip lint" >&2
    exit 1
  fi
  echo "[test] lint clean (ruff, shellcheck)"
fi

# Two cores: keep BLAS/OMP threads bounded so the server and clients in the
# integration tests do not oversubscribe the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "$@"
