"""Engines: the encoder (ONNX Runtime; TensorRT / torch CUDA graph on GPUs) and the LLM (llama.cpp)."""
