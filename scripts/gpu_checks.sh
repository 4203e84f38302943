#!/usr/bin/env bash
# Every GPU check of edge-af3 in one run, on a CUDA machine with no network. Writes to ${OUT:-gpu-out}.
#
# Carry (ignored folder .gpu/wheels): a CUDA build of llama-cpp-python and wheels of the pure
# Python dependencies the machine lacks (`pip download -d .gpu/wheels soundfile soxr typer rich
# huggingface-hub jinja2 gguf transformers safetensors`). Then:
#   scripts/gpu_checks.sh            # pytest -m gpu, then the suite on the full shape with --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .gpu/wheels llama-cpp-python soundfile soxr typer rich \
    huggingface-hub jinja2 gguf transformers safetensors 2>&1 | tail -3
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv > "$OUT/gpu.txt" || true
"$PY" -m edge_af3 doctor --json > "$OUT/doctor.json" || true
"$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -5
"$PY" -m benchmarks --device cuda --shape "${SHAPE:-full}" --clips 5 30 --repeats 3 --out "$OUT" \
  --work "${WORK:-/tmp/edge-af3-gpu}" 2>&1 | tee "$OUT/suite.txt" | tail -40
