#!/usr/bin/env bash
# Install edge-af3's runtime on a Jetson Orin (aarch64, JetPack 6, CUDA 12.x), on the device itself.
# llama-cpp-python is compiled for the Orin GPU (compute capability 8.7); nothing else is built.
#   scripts/build_jetson.sh [--no-doctor]
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
export PATH="/usr/local/cuda/bin:$PATH"
# GGML_CUDA_NO_VMM: Tegra's unified memory has no CUDA virtual memory management pools
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87 -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=ON}"
export MAKEFLAGS="-j$(nproc)"
python3 -m pip install --upgrade pip wheel
python3 -m pip install "llama-cpp-python==0.3.36" --no-binary llama-cpp-python
# cuda-python: the TensorRT engine's CUDA runtime calls (TensorRT's own bindings come from JetPack:
# apt install python3-libnvinfer); the 12.6 line matches JetPack 6.1/6.2's CUDA.
python3 -m pip install "cuda-python>=12.6,<12.7"
python3 -m pip install -e ".[mic,server,client]"
# ONNX Runtime with CUDA for JetPack 6 comes from NVIDIA's Jetson index (not PyPI). It goes in after
# edge-af3, whose plain `onnxruntime` dependency would otherwise overwrite the same package folder
# with the CPU build; without the index the encoder runs on the Orin's CPU through that plain wheel.
if python3 -m pip install onnxruntime-gpu --extra-index-url "${JETSON_INDEX:-https://pypi.jetson-ai-lab.dev/jp6/cu126}"; then
  python3 -m pip uninstall -y onnxruntime
  python3 -m pip install --force-reinstall --no-deps onnxruntime-gpu --extra-index-url "${JETSON_INDEX:-https://pypi.jetson-ai-lab.dev/jp6/cu126}"
fi
if [ "${1:-}" = "--no-doctor" ]; then
  # inside `docker build` the NVIDIA runtime (libcuda) is not mounted yet, so llama.cpp cannot be
  # imported: check that its CUDA library was built instead; the container's first start shows the engines
  python3 -c "import importlib.util, pathlib; d = pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent; assert any('cuda' in f.name for f in d.rglob('*.so*')), 'llama.cpp built without CUDA'"
else
  python3 -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'llama.cpp built without CUDA'"
  edge-af3 doctor
fi
