"""The encoder engine on ONNX Runtime: all windows of a clip in one batched run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class OnnxEncoder:
    """encode(features [W,128,3000], mask [W,3000]) -> rows [W,750,H] float32."""

    name = "onnxruntime-cpu"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        use = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(Path(path)), sess_options=opts, providers=use)
        self.name = "onnxruntime-" + use[0].removesuffix("ExecutionProvider").lower()
        self.calls = 0  # counter read by tests: how often the encoder actually ran

    def encode(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.calls += 1
        feed = {"input_features": np.ascontiguousarray(features, np.float32),
                "input_features_mask": np.ascontiguousarray(mask, np.int64)}  # fmt: skip
        return self.session.run(None, feed)[0]
