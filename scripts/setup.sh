#!/usr/bin/env bash
# Set up .venv for Cascade Reader on a fresh machine. `setup.sh test` adds test tools (Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this resolves to the CPU build; a bare "torch" may pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1; then
    # Playwright drives Debian's Chromium; it must not download a browser of its own
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: chromium not installed; UI tests will be skipped" >&2
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
