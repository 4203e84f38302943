"""The encoder on TensorRT: an fp16 engine built from the bundle's encoder.onnx on the device that
runs it, cached next to the bundle (engines/trt_cache.py), run with fixed I/O buffers and
`execute_async_v3` captured in one CUDA graph per shape bucket (engines/buckets.py).

    build     the ONNX (an fp32 bundle is first converted to fp16 with LayerNorm, Softmax and the
              mask arithmetic kept in fp32, as `export --encoder-precision fp16` does) parsed into
              a strongly typed network (TensorRT 10.12+ and 11 drop the FP16 builder flag); two
              optimisation profiles: full windows (1..max windows x 3000 frames) and one partial
              window (1 x 8..3000 frames)
    cache     keyed by (onnx sha256, TensorRT version, GPU + compute capability, precision,
              buckets); a stale or corrupt engine is rebuilt, and the reason is kept
    run       one execution context per bucket shape (a CUDA graph fixes shapes, addresses and the
              context), all sharing one device scratch area; inputs copied in, graph launched,
              rows copied out, on one non-default stream

Needs `tensorrt` and `cuda-python` (the `trt` and `gpu` extras, or JetPack's packages). Only the
cache logic (`cached_plan`) is exercised on CPU CI; the rest needs a GPU with TensorRT, which no
machine this project was tested on had (see docs/jetson.md and the README's GPU section).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import N_FRAMES, N_MELS, rows_for_frames
from ..errors import OptionsError
from ..quants import CPU_ENCODER_GRAPHS
from .buckets import FRAME_BUCKETS, run_bucketed, window_buckets
from .trt_cache import EngineKey, lookup, store

MIN_FRAMES = 8


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:  # cuda-python < 12.6
        from cuda import cudart
    return cudart


def _check(result):
    """cuda-python returns (error, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str


def current_device() -> Device:
    cudart = _cudart()
    dev = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(dev))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Device(name.strip("\x00 "), f"{props.major}.{props.minor}")


def cache_root(bundle) -> Path:
    """Where a bundle's engines live: in the bundle when it is writable, else in the user cache."""
    if os.access(bundle.path, os.W_OK):
        return Path(bundle.path)
    from ..paths import cache_dir

    return cache_dir() / "engines" / bundle.manifest["files"][bundle.encoder.name]["sha256"][:16]


def cached_plan(
    root: Path, key: EngineKey, build: Callable[[], bytes], check: Callable[[bytes], None] | None = None
) -> tuple[bytes, list[str]]:
    """The serialized engine for `key`: from the cache, or built, checked and stored when missing,
    stale or corrupt. Returns (plan, why it was built; [] when it came from the cache). A build
    whose check raises is not stored."""
    path, reasons = lookup(root, key)
    if path is not None:
        return path.read_bytes(), []
    data = build()
    if check is not None:
        check(data)
    store(root, key, data)
    return data, reasons


def engine_key(bundle, trt_version: str, device: Device, max_windows: int = 20) -> EngineKey:
    onnx_sha = bundle.manifest["files"][bundle.encoder.name]["sha256"]
    # the shapes the engine's profiles and graphs serve: window counts, then partial-window frames
    buckets = tuple(f"w{w}" for w in window_buckets(max_windows)) + tuple(
        f"f{f}" for f in (MIN_FRAMES,) + FRAME_BUCKETS
    )
    return EngineKey(onnx_sha, trt_version, device.name, device.compute_capability, "fp16", buckets)


def _fp16_onnx(bundle, work: Path) -> Path:
    """The bundle's encoder as fp16 ONNX (as is when it already is)."""
    if bundle.manifest["encoder"].get("precision") == "fp16":
        return bundle.encoder
    from ..onnx_tools import to_fp16

    out = work / "encoder-fp16.onnx"
    to_fp16(bundle.encoder, out, external=bundle.encoder.stat().st_size > 900_000_000)
    return out


def build_plan(onnx_path: Path, max_windows: int = 20, workspace_gb: float = 4.0) -> bytes:
    """Build a strongly typed engine with the two optimisation profiles."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weights from beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    full = builder.create_optimization_profile()
    full.set_shape("input_features", (1, N_MELS, N_FRAMES), (4, N_MELS, N_FRAMES), (max_windows, N_MELS, N_FRAMES))
    full.set_shape("input_features_mask", (1, N_FRAMES), (4, N_FRAMES), (max_windows, N_FRAMES))
    config.add_optimization_profile(full)
    part = builder.create_optimization_profile()
    part.set_shape("input_features", (1, N_MELS, MIN_FRAMES), (1, N_MELS, 1000), (1, N_MELS, N_FRAMES))
    part.set_shape("input_features_mask", (1, MIN_FRAMES), (1, 1000), (1, N_FRAMES))
    config.add_optimization_profile(part)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    return bytes(serialized)


class _Graph:
    """One bucket shape: its own execution context, device buffers and instantiated CUDA graph."""

    def __init__(self, engine, shape: tuple[int, int], profile: int, hidden: int, stream, scratch):
        import tensorrt as trt

        cudart = _cudart()
        self.shape = shape
        wb, fb = shape
        self.rows = rows_for_frames(fb)
        self.out_host = np.empty((wb, self.rows, hidden), np.float32)
        sizes = {
            "input_features": wb * N_MELS * fb * 4,
            "input_features_mask": wb * fb * 8,
            "out": self.out_host.nbytes,
        }
        self.ptr = {k: _check(cudart.cudaMalloc(v)) for k, v in sizes.items()}
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if scratch is not None and strategy is not None:
            self.context = engine.create_execution_context(strategy.USER_MANAGED)
            self.context.set_device_memory(*scratch)
        else:
            self.context = engine.create_execution_context()
        ctx = self.context
        ctx.set_optimization_profile_async(profile, int(stream))
        ctx.set_input_shape("input_features", (wb, N_MELS, fb))
        ctx.set_input_shape("input_features_mask", (wb, fb))
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            ctx.set_tensor_address(
                name, int(self.ptr["out" if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT else name])
            )
        # one plain run first (it flushes deferred shape work), then capture it on the stream
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError(f"TensorRT could not run the encoder at shape {shape}")
        _check(cudart.cudaStreamSynchronize(stream))
        _check(cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ctx.execute_async_v3(int(stream))
        self.graph = _check(cudart.cudaStreamEndCapture(stream))
        self.exec = _check(cudart.cudaGraphInstantiate(self.graph, 0))

    def run(self, stream, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        cudart = _cudart()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self.ptr["input_features"], features.ctypes.data, features.nbytes, h2d, stream))
        _check(cudart.cudaMemcpyAsync(self.ptr["input_features_mask"], mask.ctypes.data, mask.nbytes, h2d, stream))
        _check(cudart.cudaGraphLaunch(self.exec, stream))
        _check(cudart.cudaMemcpyAsync(self.out_host.ctypes.data, self.ptr["out"], self.out_host.nbytes, d2h, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        return self.out_host

    def close(self) -> None:
        cudart = _cudart()
        cudart.cudaGraphExecDestroy(self.exec)
        cudart.cudaGraphDestroy(self.graph)
        for p in self.ptr.values():
            cudart.cudaFree(p)


class TensorRTEncoder:
    """encode(features [W,128,F], mask [W,F]) -> rows [W,F/4,H] float32, like OnnxEncoder."""

    name = "tensorrt"
    dynamic_frames = True

    def __init__(self, plan_bytes: bytes, hidden: int, *, max_windows: int = 20):
        import tensorrt as trt

        cudart = _cudart()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan_bytes)
        if self.engine is None:
            raise RuntimeError("TensorRT could not load the cached engine")
        self.hidden = hidden
        self.window_buckets = window_buckets(max_windows)
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        size = getattr(self.engine, "device_memory_size_v2", None) or getattr(self.engine, "device_memory_size", 0)
        self._scratch = (int(_check(cudart.cudaMalloc(size))), size) if size else None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.calls = 0
        self.rebuilt: list[str] = []  # why the engine was built at load ([] when it came from the cache)

    @classmethod
    def for_bundle(
        cls, bundle, *, max_windows: int = 20, progress: Callable[[str], None] | None = None
    ) -> TensorRTEncoder:
        import tensorrt as trt

        precision = bundle.manifest["encoder"].get("precision")
        if precision in CPU_ENCODER_GRAPHS:
            raise RuntimeError(
                f"TensorRT takes fp32/fp16 encoders; this bundle's is {precision} (ONNX Runtime dynamic "
                "quantization: MatMulInteger), which ONNX Runtime runs"
            )
        key = engine_key(bundle, trt.__version__, current_device(), max_windows)
        root = cache_root(bundle)

        def build() -> bytes:
            if progress:
                progress("building the TensorRT encoder engine (once per GPU and TensorRT version)")
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root, prefix=".trt-build-") as work:
                return build_plan(_fp16_onnx(bundle, Path(work)), max_windows)

        def check(data: bytes) -> None:
            """A new engine must give ONNX Runtime's rows (cosine >= 0.999) before it is cached."""
            from .onnx import OnnxEncoder

            rng = np.random.default_rng(0)
            feats = rng.standard_normal((1, N_MELS, 1000)).astype(np.float32)
            mask = np.ones((1, 1000), np.int64)
            trt_enc = cls(data, bundle.hidden_size, max_windows=max_windows)
            got = trt_enc.encode(feats, mask).ravel()
            want = OnnxEncoder(bundle.encoder).encode(feats, mask).ravel()
            cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
            if not cos >= 0.999:
                trt_enc.close()
                raise RuntimeError(
                    f"the new TensorRT engine disagrees with ONNX Runtime (cosine {cos:.5f}); not cached"
                )
            checked.append(trt_enc)  # the engine just built and checked is the one returned

        checked: list[TensorRTEncoder] = []
        data, reasons = cached_plan(root, key, build, check)
        enc = checked[0] if checked else cls(data, bundle.hidden_size, max_windows=max_windows)
        enc.rebuilt = reasons
        enc.prepare()
        return enc

    def _graph(self, shape: tuple[int, int]) -> _Graph:
        g = self._graphs.get(shape)
        if g is None:
            profile = 0 if shape[1] == N_FRAMES else 1
            g = self._graphs[shape] = _Graph(self.engine, shape, profile, self.hidden, self.stream, self._scratch)
        return g

    def prepare(self, windows: tuple[int, ...] = (1,), frames: tuple[int, ...] = FRAME_BUCKETS) -> None:
        for w in windows:
            self._graph((w, N_FRAMES))
        for f in frames:
            if f != N_FRAMES:
                self._graph((1, f))

    def encode(self, features: np.ndarray, mask: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        if times is not None:
            raise OptionsError(f"{self.name}: its engines take no rows' times (Music Flamingo runs on ONNX Runtime)")
        self.calls += 1
        return run_bucketed(
            features, mask, self.window_buckets, lambda run, feats, m: self._graph(run.shape).run(self.stream, feats, m)
        )

    def close(self) -> None:
        cudart = _cudart()
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
        if self._scratch:
            cudart.cudaFree(self._scratch[0])
            self._scratch = None
