#!/usr/bin/env bash
# Create .venv (if needed) and install zroact with the CPU runtime and the test/demo tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[cpu,testing,flower]" \
    >.venv/install.log 2>&1; then
  cat .venv/install.log >&2
  exit 1
fi
