"""The encoder engine on ONNX Runtime.

CPU: plain `run` with the clip's own shapes. CUDA (onnxruntime-gpu): I/O bound to device buffers
of fixed bucket shapes (engines/buckets.py), each bucket captured as its own CUDA graph
(`enable_cuda_graph`, one `gpu_graph_id` per shape) and replayed after its inputs are updated in
place. `io_binding=True` on the CPU runs the same bucketed path without graphs (tested on CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..constants import N_MELS, rows_for_frames
from .buckets import run_bucketed, window_buckets


class _Bound:
    """One bucket shape: device buffers bound once, updated in place before each run."""

    def __init__(
        self, ort, session, shape: tuple[int, int], hidden: int, device: str, graph_id: int | None, timed: bool
    ):
        wb, fb = shape
        self.features = ort.OrtValue.ortvalue_from_shape_and_type([wb, N_MELS, fb], np.float32, device, 0)
        self.mask = ort.OrtValue.ortvalue_from_shape_and_type([wb, fb], np.int64, device, 0)
        self.out = ort.OrtValue.ortvalue_from_shape_and_type([wb, rows_for_frames(fb), hidden], np.float32, device, 0)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input("input_features", self.features)
        self.binding.bind_ortvalue_input("input_features_mask", self.mask)
        self.times = None
        if timed:  # Music Flamingo's graphs: the rows' times, a buffer of the bucket's shape like the rest
            self.times = ort.OrtValue.ortvalue_from_shape_and_type([wb, rows_for_frames(fb)], np.float32, device, 0)
            self.binding.bind_ortvalue_input("audio_times", self.times)
        self.binding.bind_ortvalue_output(session.get_outputs()[0].name, self.out)
        self.options = ort.RunOptions()
        if graph_id is not None:  # ids > 0; ORT captures on the first run of each id, replays after
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))


class OnnxEncoder:
    """encode(features [W,128,F], mask [W,F]) -> rows [W,F/4,H] float32."""

    name = "onnxruntime-cpu"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
        io_binding: bool = False,
        cuda_graphs: bool | None = None,
        max_windows: int = 20,
        overrides: dict[str, np.ndarray] | None = None,
    ):
        import onnxruntime as ort

        self._ort = ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's workers spin after a run by default: on a 2-core box that steals a core from the
        # llama.cpp prefill that follows (measured: prefill ~2x slower). The memory arena stays on
        # (off: +50% on the first run and +10% after); the runtime bounds it by feeding at most
        # `windows_per_run` windows per run (default 1).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # an adapter's encoder weights: these initializers replace the graph's (the file is shared)
        self._overrides = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in (overrides or {}).items()
        }
        for name, value in self._overrides.items():
            opts.add_initializer(name, value)
        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        use = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.device = "cuda" if use[0] == "CUDAExecutionProvider" else "cpu"
        if self.device == "cpu":
            # MLAS pre-packs fp32 matmul weights into a second copy at load. Off, on bench-small
            # (cpu-levers-bench-small.md): fp32 session -72 MB, window peak -116 MB; mixed peak
            # -46 MB; for 4-14 % more time per window
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self.cuda_graphs = (self.device == "cuda" and io_binding) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device != "cuda":
            raise ValueError("cuda_graphs needs the CUDAExecutionProvider")
        self.note = ""  # why CUDA graphs are off although asked for
        session = None
        if self.cuda_graphs:
            graphed = [
                ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" else p
                for p in use
            ]
            try:  # CUDA graphs need every node on the GPU; ORT refuses the session otherwise
                session = ort.InferenceSession(str(Path(path)), sess_options=opts, providers=graphed)
            except Exception as e:  # noqa: BLE001 - run without graphs, and say why
                self.cuda_graphs, self.note = False, f"CUDA graphs off: {e}"
        self.session = session or ort.InferenceSession(str(Path(path)), sess_options=opts, providers=use)
        self.name = "onnxruntime-" + self.session.get_providers()[0].removesuffix("ExecutionProvider").lower()
        self.calls = 0  # counter read by tests: how often the encoder actually ran
        # bundles exported before edge-af3 0.1's dynamic-frame encoder take exactly 3000 frames
        self.dynamic_frames = not isinstance(self.session.get_inputs()[0].shape[2], int)
        self.timed = "audio_times" in {i.name for i in self.session.get_inputs()}  # Music Flamingo's graphs
        self.io_binding = io_binding
        self.window_buckets = window_buckets(max_windows)
        self._bound: dict[tuple[int, int], _Bound] = {}

    def close(self) -> None:
        """Release the session and its bound device buffers."""
        self._bound.clear()
        self.session = None

    def encode(self, features: np.ndarray, mask: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """features [W,128,F], mask [W,F] (+ times [W,F/4] for a time-embedding graph) -> rows
        [W,F/4,H] (F <= 3000)."""
        if self.session is None:
            raise RuntimeError(f"{self.name}: encode() after close()")
        if (times is not None) != self.timed:
            raise ValueError(f"{self.name}: this graph {'needs' if self.timed else 'takes no'} the rows' times")
        self.calls += 1
        if not self.io_binding:
            feed = {
                "input_features": np.ascontiguousarray(features, np.float32),
                "input_features_mask": np.ascontiguousarray(mask, np.int64),
            }
            if times is not None:
                feed["audio_times"] = np.ascontiguousarray(times, np.float32)
            return self.session.run(None, feed)[0]
        return run_bucketed(features, mask, self.window_buckets, self._run_bound, times)

    def _run_bound(self, run, feats: np.ndarray, mask: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        bound = self._bound.get(run.shape)
        if bound is None:
            hidden = self.session.get_outputs()[0].shape[2]
            graph_id = len(self._bound) + 1 if self.cuda_graphs else None
            bound = self._bound[run.shape] = _Bound(
                self._ort, self.session, run.shape, hidden, self.device, graph_id, self.timed
            )
        bound.features.update_inplace(feats)
        bound.mask.update_inplace(mask)
        if times is not None:
            bound.times.update_inplace(times)
        self.session.run_with_iobinding(bound.binding, bound.options)
        return bound.out.numpy()
