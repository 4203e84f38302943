#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) to carry to a bare CUDA machine with no network:
#   .gpu/llama/*.tar.xz              a CUDA build of llama-cpp-python (installed-package tarball)
#   .gpu/wheels/                     the pure-Python and small binary wheels that machine lacks
#   .gpu/cache/vocab/                the Qwen2 vocabulary the tiny test checkpoints use
# Usage: scripts/gpu_carry.sh LLAMA_TARBALL [PYTHON_VERSION]   (e.g. 3.12; default: this python's)
# The total must stay under the carry limit (64 MiB): it prints the size.
set -euo pipefail
cd "$(dirname "$0")/.."
TARBALL="${1:?path to the llama-cpp-python CUDA tarball}"
PYVER="${2:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
PIP="${PIP:-.venv/bin/python -m pip}"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/llama
cp "$TARBALL" .gpu/llama/
# what the GPU box (torch, cuda-python, onnx, numpy, onnxruntime present) lacks for the runtime,
# the tests and the benchmarks; binary wheels for its Python version, no dependencies it already has
$PIP download -q -d .gpu/wheels --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
  transformers safetensors tokenizers huggingface-hub gguf soundfile soxr typer rich jinja2 diskcache \
  regex pyyaml tqdm pytest pytest-timeout
# the real Qwen2 vocabulary for the test checkpoints (fetched from PyPI here; that machine has no network)
.venv/bin/python -c "from edge_af3.reference.vocab import qwen2_vocab_path; qwen2_vocab_path()" 2>/dev/null || true
mkdir -p .gpu/cache && cp -r "${EDGE_AF3_CACHE:-$HOME/.cache/edge-af3}/vocab" .gpu/cache/
# a CUDA torch machine has these already (torch needs numpy; the rest are torch/jinja2's own deps)
rm -f .gpu/wheels/numpy-* .gpu/wheels/filelock-* .gpu/wheels/fsspec-* .gpu/wheels/typing_extensions-* \
  .gpu/wheels/markupsafe-* .gpu/wheels/jinja2-*
du -sh .gpu .gpu/wheels
echo "over 64 MiB: carry it in two calls on one warm machine: run 1 carries .gpu/llama only"
echo "(scripts/gpu_checks.sh --setup-only), run 2 carries .gpu/wheels and .gpu/cache and runs the checks; .gpu/site stays there."
