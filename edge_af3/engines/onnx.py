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
        # ORT's workers spin after a run by default: on a 2-core box that steals a core from the
        # llama.cpp prefill that follows (measured: prefill ~2x slower). The memory arena stays on
        # (off: +50% on the first run and +10% after); the runtime bounds it by feeding at most
        # `windows_per_run` windows per run (default 1).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        use = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(Path(path)), sess_options=opts, providers=use)
        self.name = "onnxruntime-" + use[0].removesuffix("ExecutionProvider").lower()
        self.calls = 0  # counter read by tests: how often the encoder actually ran
        # bundles exported before edge-af3 0.1's dynamic-frame encoder take exactly 3000 frames
        self.dynamic_frames = not isinstance(self.session.get_inputs()[0].shape[2], int)

    def encode(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """features [W,128,F], mask [W,F] -> rows [W,F/4,H] (F <= 3000)."""
        self.calls += 1
        feed = {"input_features": np.ascontiguousarray(features, np.float32),
                "input_features_mask": np.ascontiguousarray(mask, np.int64)}  # fmt: skip
        return self.session.run(None, feed)[0]
