"""The TensorRT engine's own code (buffers, one context + CUDA graph per shape bucket, copies in and
out, the build -> check -> cache flow) run on CPU against stand-ins for `tensorrt` and cuda-python's
runtime: "device memory" is host memory at real addresses, a "graph" replays what was enqueued
while capturing, and the "engine" runs the bundle's encoder.onnx on ONNX Runtime for the shapes
and addresses the context was given. TensorRT itself never runs here (see docs/jetson.md)."""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

from edge_af3.engines.onnx import OnnxEncoder


class FakeCudart(types.SimpleNamespace):
    def __init__(self):
        super().__init__()
        self.buffers, self.capturing, self.recorded = {}, False, None
        self.cudaStreamNonBlocking = 1
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.launches = 0

    def cudaMalloc(self, size):
        buf = np.zeros(max(1, size), np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, ptr):
        self.buffers.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing, self.recorded = True, []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        return 0, list(self.recorded)

    def cudaGraphInstantiate(self, graph, flags):
        return 0, graph

    def cudaGraphLaunch(self, graph, stream):
        self.launches += 1
        for fn in graph:
            fn()
        return (0,)

    def cudaGraphExecDestroy(self, g):
        return (0,)

    def cudaGraphDestroy(self, g):
        return (0,)


def fake_tensorrt(cudart, onnx_path):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=0: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT=0, OUTPUT=1)
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED=2)
    names = ["input_features", "input_features_mask", "audio_rows"]
    ort_encoder = OnnxEncoder(onnx_path)

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.profile, self.memory = {}, {}, None, None

        def set_device_memory(self, ptr, size):
            self.memory = (ptr, size)

        def set_optimization_profile_async(self, index, stream):
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def _run(self):
            w, mels, f = self.shapes["input_features"]
            assert self.profile == (0 if f == 3000 else 1) and self.memory is not None
            feats = np.ctypeslib.as_array(
                ctypes.cast(self.addr["input_features"], ctypes.POINTER(ctypes.c_float)), (w, mels, f)
            )
            mask = np.ctypeslib.as_array(
                ctypes.cast(self.addr["input_features_mask"], ctypes.POINTER(ctypes.c_int64)), (w, f)
            )
            rows = ort_encoder.encode(feats.copy(), mask.copy())
            out = np.ctypeslib.as_array(
                ctypes.cast(self.addr["audio_rows"], ctypes.POINTER(ctypes.c_float)), rows.shape
            )
            out[...] = rows

        def execute_async_v3(self, stream):
            if cudart.capturing:
                cudart.recorded.append(self._run)
            else:
                self._run()
            return True

    class Engine:
        num_io_tensors = 3
        device_memory_size_v2 = 4096

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.OUTPUT if name == "audio_rows" else trt.TensorIOMode.INPUT

        def create_execution_context(self, strategy=None):
            assert strategy == 2
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"engine for " + str(onnx_path).encode()
            return Engine()

    trt.Runtime = Runtime
    return trt


@pytest.fixture()
def fakes(tiny_bundle, monkeypatch):
    from edge_af3.engines import tensorrt as module

    cudart = FakeCudart()
    trt = fake_tensorrt(cudart, tiny_bundle / "encoder.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(module, "_cudart", lambda: cudart)
    return module, cudart


def test_tensorrt_runner_buffers_graphs_and_copies(tiny_bundle, fakes):
    module, cudart = fakes
    enc = module.TensorRTEncoder(b"engine for " + str(tiny_bundle / "encoder.onnx").encode(), hidden=64)
    enc.prepare(windows=(1,), frames=(500,))
    assert set(enc._graphs) == {(1, 3000), (1, 500)}
    plain = OnnxEncoder(tiny_bundle / "encoder.onnx")
    rng = np.random.default_rng(3)
    for windows, frames in [(1, 3000), (3, 3000), (23, 3000), (1, 504), (1, 12)]:
        f = rng.standard_normal((windows, 128, frames)).astype(np.float32)
        m = np.ones((windows, frames), np.int64)
        m[-1, max(1, frames - 5) :] = 0
        want, got = plain.encode(f, m), enc.encode(f, m)
        keep = min(want.shape[1], (int(m[-1].sum()) + 1) // 4)
        assert got.shape == want.shape
        assert (
            np.abs(got[:-1] - want[:-1]).max(initial=0) <= 1e-4
            and np.abs(got[-1, :keep] - want[-1, :keep]).max() <= 1e-4
        )
    assert set(enc._graphs) == {(1, 3000), (1, 500), (4, 3000), (20, 3000), (1, 1000)}
    launches = cudart.launches
    enc.encode(f, m)
    assert cudart.launches == launches + 1  # replayed, not re-captured
    enc.close()
    assert not enc._graphs


def test_tensorrt_for_bundle_builds_checks_caches(tiny_bundle, tmp_path, fakes, monkeypatch):
    import shutil

    from edge_af3.bundle import open_bundle

    module, _ = fakes
    b = open_bundle(shutil.copytree(tiny_bundle, tmp_path / "b"))
    builds = []

    def build_plan(onnx_path, max_windows=20):
        builds.append(onnx_path)
        return b"engine for " + str(tiny_bundle / "encoder.onnx").encode()

    monkeypatch.setattr(module, "build_plan", build_plan)
    monkeypatch.setattr(module, "current_device", lambda: module.Device("Fake GPU", "8.7"))
    monkeypatch.setattr(module, "_fp16_onnx", lambda bundle, work: bundle.encoder)
    enc = module.TensorRTEncoder.for_bundle(b)
    assert len(builds) == 1 and enc.rebuilt == ["no engine built yet"] and (1, 3000) in enc._graphs
    enc.close()
    again = module.TensorRTEncoder.for_bundle(b)
    assert len(builds) == 1 and again.rebuilt == []  # from the cache
    again.close()
    # an engine that disagrees with ONNX Runtime is refused and not cached
    monkeypatch.setattr(
        module.TensorRTEncoder, "encode", lambda self, f, m: np.zeros((f.shape[0], f.shape[2] // 4, 64), np.float32) + 1
    )
    monkeypatch.setattr(module, "current_device", lambda: module.Device("Other GPU", "9.0"))
    with pytest.raises(RuntimeError, match="disagrees with ONNX Runtime"):
        module.TensorRTEncoder.for_bundle(b)
    assert len(list((b.path / ".engines").glob("*.plan"))) == 1


def test_tensorrt_refuses_an_int8_bundle(tiny_bundle, fakes):
    from edge_af3.bundle import open_bundle

    module, _ = fakes
    b = open_bundle(tiny_bundle)
    b.manifest["encoder"]["precision"] = "int8"
    with pytest.raises(RuntimeError, match="int8"):
        module.TensorRTEncoder.for_bundle(b)
