"""Which encoder engine runs a bundle on this machine, and why the others were skipped.

    device="cpu"   -> onnxruntime-cpu
    device="cuda"  -> the first that works of: tensorrt, onnxruntime-cuda, torch-cuda (none: the
                      encoder falls back to onnxruntime-cpu, with the reasons; no GPU: an error)
    device="auto"  -> cuda when a CUDA GPU and one of its engines are usable, else cpu

Every probe imports lazily and never raises: a missing package or GPU is a reason, not an error.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OptionsError

CUDA_ENGINES = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
# the CUDA engines that compute in fp16 whatever the graph's precision: not for exact mode
FP16_ONLY = {
    "tensorrt": "exact mode computes the encoder in fp32; TensorRT builds fp16",
    "torch-cuda": "exact mode computes the encoder in fp32; torch-cuda runs fp16",
}
# the engines that feed a time-embedding graph (Music Flamingo, AF-Next) its rows' times
TIMED_ENGINES = ("onnxruntime-cpu", "onnxruntime-cuda")
NO_TIMES = "takes no rows' times (this model's time embedding runs on ONNX Runtime)"
# engines this version can run; the others are probed (so doctor can report them) but skipped
IMPLEMENTED = {"onnxruntime-cpu", "onnxruntime-cuda", "torch-cuda", "tensorrt"}
# every engine by name; "torch-cpu" only when asked for (tests, benchmarks): ONNX Runtime is the CPU engine
ENGINES = ("onnxruntime-cpu", "torch-cpu") + CUDA_ENGINES


@dataclass(frozen=True)
class EncoderChoice:
    engine: str
    device: str
    skipped: tuple[tuple[str, str], ...] = ()  # (engine, why not)
    gpu: str | None = None  # the CUDA GPU seen (also when the encoder stays on the CPU)

    def explain(self) -> str:
        why = "; ".join(f"{name}: {reason}" for name, reason in self.skipped)
        return f"encoder engine {self.engine} on {self.device}" + (f" (skipped {why})" if why else "")


def gpu_name() -> str | None:
    """The first CUDA GPU's name, or None (nvidia-smi; Jetson has no nvidia-smi: /proc/device-tree)."""
    if shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            )
            names = [n.strip() for n in res.stdout.splitlines() if n.strip()]
            if res.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/device-tree/model", "rb") as f:
            model = f.read().decode(errors="replace").strip("\x00 \n")
        if "jetson" in model.lower() or "orin" in model.lower():
            return model
    except OSError:
        pass
    return None


def _probe_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'edge-af3[trt]', or JetPack's python3-libnvinfer)"
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        try:
            from cuda import cudart  # noqa: F401
        except ImportError:
            return "cuda-python is not installed (pip install 'edge-af3[gpu]')"
    return None


def _probe_ort_cuda() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider (pip install 'edge-af3[gpu]' for onnxruntime-gpu)"
    return None


def _probe_torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        import onnx  # noqa: F401  (the weights are read from the bundle's encoder.onnx)
    except ImportError:
        return "onnx is not installed (pip install 'edge-af3[gpu]')"
    return None


PROBES: dict[str, Callable[[], str | None]] = {
    "tensorrt": _probe_tensorrt,
    "onnxruntime-cuda": _probe_ort_cuda,
    "torch-cuda": _probe_torch_cuda,
}


def choose_encoder(
    device: str = "auto",
    *,
    probes: dict[str, Callable[[], str | None]] | None = None,
    gpu: Callable[[], str | None] = gpu_name,
    implemented: set[str] = IMPLEMENTED,
    fp32: bool = False,
    timed: bool = False,
) -> EncoderChoice:
    """The engine for `device`; raises ValueError when device='cuda' and no CUDA GPU is visible.
    fp32: only engines that compute in fp32 (exact mode): ONNX Runtime on CUDA runs the fp32 graph
    as it is; TensorRT and torch-cuda build fp16 from it. timed: only engines that feed a
    time-embedding graph its rows' times (TIMED_ENGINES)."""
    if device not in ("auto", "cpu", "cuda"):
        raise OptionsError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cpu":
        return EncoderChoice("onnxruntime-cpu", "cpu")
    probes = probes or PROBES
    name = gpu()
    if name is None:
        if device == "cuda":
            raise OptionsError("device='cuda' but no CUDA GPU is visible (nvidia-smi finds none)")
        return EncoderChoice("onnxruntime-cpu", "cpu", (("cuda", "no CUDA GPU visible"),))
    skipped = []
    for engine in CUDA_ENGINES:
        reason = FP16_ONLY.get(engine) if fp32 else None
        reason = reason or (NO_TIMES if timed and engine not in TIMED_ENGINES else None)
        reason = reason or probes[engine]()
        if reason is None and engine not in implemented:
            reason = "usable here, but this edge-af3 version has no engine for it yet"
        if reason is None:
            return EncoderChoice(engine, f"cuda ({name})", tuple(skipped), gpu=name)
        skipped.append((engine, reason))
    # a GPU but no GPU encoder engine: the encoder runs on the CPU (the LLM still offloads), and says why
    return EncoderChoice("onnxruntime-cpu", "cpu", tuple(skipped), gpu=name)


def forced_encoder(engine: str, device: str = "auto", *, gpu: Callable[[], str | None] = gpu_name) -> EncoderChoice:
    """The choice when the caller names the engine (`AF3.load(..., encoder_engine=...)`); the GPU
    it reports (for the LLM's offload) follows `device`, whatever the encoder runs on."""
    if engine not in ENGINES:
        raise OptionsError(f"unknown encoder engine {engine!r}; choose one of {', '.join(ENGINES)}")
    name = gpu() if device != "cpu" else None
    if engine in CUDA_ENGINES:
        if name is None:
            raise OptionsError(f"encoder engine {engine} needs a CUDA GPU and none is visible")
        return EncoderChoice(engine, f"cuda ({name})", gpu=name)
    if device == "cuda" and name is None:
        raise OptionsError("device='cuda' but no CUDA GPU is visible (nvidia-smi finds none)")
    return EncoderChoice(engine, "cpu", gpu=name)


def _onnxruntime(engine: str, bundle, threads: int | None, overrides: dict | None = None):
    """ONNX Runtime on the CPU or CUDA; `overrides` replace graph initializers (an adapter's encoder weights)."""
    from .onnx import OnnxEncoder

    cuda = engine == "onnxruntime-cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
    enc = OnnxEncoder(bundle.encoder, threads=threads, providers=providers, io_binding=cuda, overrides=overrides)
    if cuda and enc.device != "cuda":
        raise RuntimeError("ONNX Runtime did not start its CUDA provider")
    return enc


def _torch(engine: str, bundle, threads: int | None):  # noqa: ARG001
    from .torch_encoder import TorchEncoder

    heads = bundle.manifest.get("model", {}).get("encoder_heads")
    enc = TorchEncoder(bundle.encoder, device="cuda" if engine == "torch-cuda" else "cpu", heads=heads)
    enc.prepare()  # capture the one-window graphs now, not during the first question
    return enc


def _tensorrt(engine: str, bundle, threads: int | None):  # noqa: ARG001
    from .tensorrt import TensorRTEncoder

    return TensorRTEncoder.for_bundle(bundle)


# engine name -> the function that starts it (each returns an `engines.base.Encoder`)
BUILDERS: dict[str, Callable] = {
    "onnxruntime-cpu": _onnxruntime,
    "onnxruntime-cuda": _onnxruntime,
    "torch-cpu": _torch,
    "torch-cuda": _torch,
    "tensorrt": _tensorrt,
}
assert set(BUILDERS) == set(ENGINES)


def onnx_encoder(engine: str, bundle, threads: int | None, overrides: dict | None = None):
    """The ONNX Runtime engine (`engine` "onnxruntime-cuda" or anything else: the CPU one), with
    initializer overrides."""
    return _onnxruntime(
        "onnxruntime-cuda" if engine == "onnxruntime-cuda" else "onnxruntime-cpu", bundle, threads, overrides
    )


def _build(engine: str, bundle, threads: int | None):
    if engine not in BUILDERS:
        raise OptionsError(f"unknown encoder engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return BUILDERS[engine](engine, bundle, threads)


def make_encoder(
    bundle,
    choice: EncoderChoice,
    *,
    threads: int | None = None,
    fallback: bool = True,
    probes: dict[str, Callable[[], str | None]] | None = None,
    fp32: bool = False,
    timed: bool = False,
):
    """(encoder, choice) for `choice`. A GPU engine that fails to start (e.g. TensorRT with an
    int8 bundle) hands over to the next usable GPU engine when `fallback` (with `fp32`, exact
    mode, never to one that computes in fp16; with `timed`, only to one that takes the rows'
    times), and finally to ONNX Runtime on the CPU; the returned choice says what was skipped and why."""
    order = [choice.engine]
    if fallback and choice.engine in CUDA_ENGINES:
        probes = probes or PROBES
        rest = CUDA_ENGINES[CUDA_ENGINES.index(choice.engine) + 1 :]
        order += [
            e
            for e in rest
            if e in IMPLEMENTED
            and not (fp32 and e in FP16_ONLY)
            and not (timed and e not in TIMED_ENGINES)
            and probes[e]() is None
        ]
    skipped = list(choice.skipped)
    for engine in order:
        try:
            enc = _build(engine, bundle, threads)
        except Exception as e:  # noqa: BLE001  (any failure of an optional GPU engine is a reason)
            if engine == "onnxruntime-cpu":
                raise
            skipped.append((engine, f"failed to start: {type(e).__name__}: {e}"))
            continue
        if engine == choice.engine:
            return enc, choice
        return enc, EncoderChoice(engine, choice.device, tuple(skipped), gpu=choice.gpu)
    return _build("onnxruntime-cpu", bundle, threads), EncoderChoice(
        "onnxruntime-cpu", "cpu", tuple(skipped), gpu=choice.gpu
    )
