#!/usr/bin/env bash
# The one-command device check (bench/device_check.py): bash bench/device_check.sh [--cpu-smoke] [device_check.py options]
# Writes "$OUT/device_check.json" when $OUT is set, else bench/out/device_check.json. Run from anywhere; it cds to the
# repo root. No network is needed: packages missing on the device machine travel as wheels in .whl/ (see bench/README.md).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" || echo "[device_check] wheel install failed" >&2
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" bench/device_check.py "$@"
