#!/usr/bin/env bash
# Idempotent environment setup for this repository on Debian 12 / Python 3.11.
# - Debian packages: dataset-fashion-mnist (embedded default data set),
#   libb64-0d (perf_analyzer), libpython3.11 (Triton's Python backend stub),
#   the linter that scripts/test.sh runs on the shell scripts (shellcheck),
#   and haproxy (the load balancer of `python -m serve start --replicas N`).
# - A virtual environment at .venv/ with the exact versions of
#   requirements/lock-cpu.txt. A second run only checks and returns.
# Nothing is downloaded at run time by the pipeline itself.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

need_apt=()
for pkg in dataset-fashion-mnist libb64-0d libpython3.11 shellcheck haproxy; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${need_apt[*]}; run as root or: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
  log "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
lock=requirements/lock-cpu.txt
stamp=.venv/.lock-sha256
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log ".venv is up to date ($lock)"
else
  [ -x .venv/bin/python ] || { log "creating .venv with $($PY --version)"; "$PY" -m venv .venv; }
  log "installing pinned packages from $lock (first run: about 2 minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$lock"
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
  log ".venv ready"
fi
