#!/usr/bin/env bash
# Every GPU check of edge-af3 in one run, on a CUDA machine with no network. Writes to ${OUT:-gpu-out};
# each stage logs to its own file and the run goes on when one fails (stages.txt says which did).
#
# Carry (ignored folder .gpu/wheels): a CUDA build of llama-cpp-python and wheels of the pure
# Python dependencies the machine lacks, e.g.
#   pip download -d .gpu/wheels --only-binary=:all: --python-version 3.12 soundfile soxr typer rich \
#       huggingface-hub jinja2 gguf transformers safetensors tokenizers
# Then:  SHAPE=full scripts/gpu_checks.sh
# Stages: env -> pytest -m gpu (tiny: GPU parity) -> encoder engines at SHAPE (ms/window at 1 and
# 20 windows vs transformers bf16 eager and its CUDA graph; rows vs the fp32 reference) -> suite at
# SHAPE on CUDA (TTFT 5/30 s, decode tok/s, GPU memory; edge-af3 vs transformers bf16 vs raw
# llama.cpp) -> memory at 8k context (planned vs measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
SHAPE="${SHAPE:-full}"
WORK="${WORK:-/tmp/edge-af3-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
: > "$OUT/stages.txt"
stage() {  # stage NAME CMD...: run, log, time, record the exit status
  local name="$1"; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  tail -25 "$OUT/$name.log"
}
if [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .gpu/wheels llama-cpp-python soundfile soxr typer rich \
    huggingface-hub jinja2 gguf transformers safetensors 2>&1 | tail -3
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv > "$OUT/gpu.txt" || true
stage doctor "$PY" -m edge_af3 doctor --json
cp "$OUT/doctor.log" "$OUT/doctor.json" 2>/dev/null || true
stage pytest-gpu "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
stage encoder "$PY" -m benchmarks.bench_encoder --shape "$SHAPE" --device cuda --windows 1 20 --repeats 10 \
  --no-verify --work "$WORK" --out "$OUT"
stage suite "$PY" -m benchmarks --device cuda --shape "$SHAPE" --clips 5 30 --repeats 3 --new-tokens 128 \
  --peers ${PEERS:-edge-af3 reference raw} --no-verify --work "$WORK" --out "$OUT"
stage memory "$PY" -m benchmarks.bench_memory --bundle "$WORK/$SHAPE-seed0-q4_k_m-bundle" --n-ctx 8192 --device cuda \
  --out "$OUT"
cat "$OUT/stages.txt"
