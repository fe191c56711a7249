#!/usr/bin/env bash
# Idempotent set-up of this checkout on Debian 12 / Python 3.11; the only step that downloads.
# - Debian packages: dataset-fashion-mnist (embedded data set), libb64-0d (perf_analyzer),
#   libpython3.11 (Triton's Python backend stub), shellcheck (lint), haproxy (serve --replicas N).
# - .venv/ with the exact versions of requirements/lock-cpu.txt, then this package, editable
#   (pip install --no-deps --no-build-isolation -e .; again whenever pyproject.toml changes).
# - .venv/reference/: what the tests compare with, so that they need no network: the official DINOv2
#   code (requirements/reference.txt, --no-deps, outside site-packages) and the tritonclient wheels of
#   both Triton releases of the pin (their model-config protobuf). A second run only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }
sha() { cat "$@" | sha256sum | cut -d' ' -f1; }
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }

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
if [ -x .venv/bin/python ] && [ "$(cat .venv/.lock-sha256 2>/dev/null)" = "$(sha "$lock")" ]; then
  log ".venv is up to date ($lock)"
else
  [ -x .venv/bin/python ] || { log "creating .venv with $($PY --version)"; "$PY" -m venv .venv; }
  log "installing pinned packages from $lock (first run: about 2 minutes)"
  pip install --upgrade pip
  pip install -r "$lock"
  sha "$lock" > .venv/.lock-sha256
fi

if [ -x .venv/bin/dinov2-triton ] && [ "$(cat .venv/.package-sha256 2>/dev/null)" = "$(sha pyproject.toml "$lock")" ]; then
  log "dinov2-triton is installed (editable)"
else
  log "installing this package, editable, without dependencies (the lock has them)"
  pip install --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check
  sha pyproject.toml "$lock" > .venv/.package-sha256
fi

ref=requirements/reference.txt
# the Triton releases of the pin (its one reader): the local server's and the container's
releases=$(.venv/bin/python -c "from dinov2_triton.core.release_pin import load_pin as l; p = l()
print(p.local_triton_server, p.triton_server)")
want="$(sha "$ref") $releases"
if [ "$(cat .venv/reference/.stamp 2>/dev/null)" = "$want" ]; then
  log "test references are in .venv/reference ($ref; tritonclient $releases)"
else
  log "installing the official DINOv2 code into .venv/reference ($ref, --no-deps)"
  rm -rf .venv/reference
  pip install --no-deps --target .venv/reference -r "$ref"
  # the model-config protobuf of both releases (tests/test_gpu_stack.py parses every generated
  # config.pbtxt with each): their tritonclient wheels, not installed
  for v in $releases; do
    pip download --no-deps --only-binary=:all: -d .venv/reference/wheels "tritonclient==$v"
  done
  echo "$want" > .venv/reference/.stamp
fi
