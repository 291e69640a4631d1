#!/usr/bin/env bash
# The test command: set up, then run the suite (real redis-server, real workers). Extra
# arguments go to pytest, e.g. scripts/test.sh -k pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
