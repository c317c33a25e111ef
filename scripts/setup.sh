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
    if ! (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); then
      # CI must never pass without the browser tests; on a laptop the rest of the suite still runs
      if [ "${CI:-}" = "true" ]; then echo "error: chromium could not be installed; the UI tests need it" >&2; exit 1; fi
      echo "warning: chromium not installed; UI tests will be skipped (they fail instead when CI=true)" >&2
    fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
