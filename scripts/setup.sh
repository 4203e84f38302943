#!/usr/bin/env bash
# One-stop set-up on a fresh Debian/Ubuntu machine: system packages (when root), a venv in .venv,
# the CPU build of torch (pinned: a bare `torch` pulls a multi-GB CUDA build), llama-cpp-python
# built from its sdist, and edge-af3 with its extras. Safe to run again: it skips what is there.
#   scripts/setup.sh            runtime + export + mic + server + client + voice extras
#   scripts/setup.sh --dev      ... + test tools, and vLLM's CPU build in .venv-vllm (setup_vllm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="export,mic,bench,server,client,voice"
[ "${1:-}" = "--dev" ] && EXTRAS="export,mic,bench,server,client,voice,train,dev"
TORCH_PIN="torch==2.13.0"
LLAMA_PIN="llama-cpp-python==0.3.36"
APT_PKGS="libsndfile1 libportaudio2 espeak-ng sox alsa-utils tmux pulseaudio pulseaudio-utils libasound2-plugins time"
# systemd (systemd-analyze): the tests check the deploy/ units; cmake + a C compiler: tests/test_amx.py
# builds ggml's CPU backend with AMX (edge_af3/llama_amx.py)
[ "${1:-}" = "--dev" ] && APT_PKGS="$APT_PKGS systemd cmake build-essential"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=$(for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "[setup] apt-get install $missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "[setup] not root or no apt-get: make sure these are installed: $APT_PKGS"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel
python -m pip install -q "$TORCH_PIN"

# llama-cpp-python ships only an sdist; keep it (the test checkpoints read llama.cpp's Qwen2
# vocabulary from it) and build it for this CPU's instruction sets, spelled out (GGML_NATIVE=OFF,
# AMX off: docs/cpu.md), into a wheel named by those sets. A machine with other instruction sets
# builds its own wheel, never reusing a neighbour's (pip's own cache is keyed by the sdist only).
SDIST_DIR=.cache/sdist
mkdir -p "$SDIST_DIR"
SDIST=$(ls "$SDIST_DIR"/llama_cpp_python-0.3.36.tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
  python -m pip download -q --no-deps --no-binary :all: "$LLAMA_PIN" -d "$SDIST_DIR"
  SDIST="$SDIST_DIR/llama_cpp_python-0.3.36.tar.gz"
fi
LLAMA_ARGS="$(python edge_af3/cpu_features.py --cmake-args) ${CMAKE_ARGS:-}"
LLAMA_TAG=$(python edge_af3/cpu_features.py --tag "${CMAKE_ARGS:-}")
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/edge-af3/wheels/llama-cpp-python-0.3.36-$LLAMA_TAG"
MARK=.venv/llama-cpp-build.txt
if [ "$(cat "$MARK" 2>/dev/null)" != "$LLAMA_TAG" ] || ! python -c "import llama_cpp" >/dev/null 2>&1; then
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "[setup] building llama-cpp-python for $LLAMA_TAG (about 8 minutes on 2 cores, once per CPU kind)"
    rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
    CMAKE_ARGS="$LLAMA_ARGS" python -m pip wheel -q --no-deps --no-cache-dir -w "$WHEELS.tmp" "$SDIST"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  fi
  python -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
  python -m pip install -q "$LLAMA_PIN"  # its Python dependencies
  echo "$LLAMA_TAG" > "$MARK"
fi
python -m pip install -q -e ".[$EXTRAS]"
if [ "${1:-}" = "--dev" ]; then scripts/setup_vllm.sh; fi  # the scale-out peer the tests run (tests/test_vllm.py)
echo "[setup] done: $(python -c 'import edge_af3, llama_cpp, onnxruntime, torch, transformers; print("edge-af3", edge_af3.__version__, "| llama-cpp-python", llama_cpp.__version__, "('"$LLAMA_TAG"')", "| onnxruntime", onnxruntime.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)')"
