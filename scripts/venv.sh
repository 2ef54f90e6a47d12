#!/usr/bin/env bash
# Creates (or reuses) .venv and installs kproxy into it, with the test dependency group if asked:
#   scripts/venv.sh [test]      prints nothing but pip's own errors; the venv is .venv/
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = test ]; then
  .venv/bin/python -m pip install -q --group test -e .
else
  .venv/bin/python -m pip install -q .
fi
