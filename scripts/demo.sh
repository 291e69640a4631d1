#!/usr/bin/env bash
# The main job on the embedded default: set up, make a sample video and a small placeholder
# model, start the vLLM stand-in, then `zroact run` (throwaway Redis + local workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="${1:-demo-out}"
.venv/bin/python -m zroact_tasks.testing.sample_media "$out" >/dev/null
log="$out/vllm-standin.log"
.venv/bin/python -m zroact_tasks.testing.vllm_standin --port 0 >"$log" 2>&1 &
standin=$!
trap 'kill $standin 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$log" | head -1)
.venv/bin/zroact run "$out/sample.mp4" --model "$out/model.onnx" --labels "$out/labels.txt" \
  --vlm-url "$url" --json "$out/report.json"
