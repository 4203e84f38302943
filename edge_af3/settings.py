"""One resolver for how a bundle runs here: encoder engine and precision, windows per run, overlap,
LLM layers on the GPU, flash attention, KV type and n_ctx.

`AF3(...)`, `ask/chat --dry-run` and `plan` all call `resolve`, so what the planner prints is what
loading would do. Exact mode is the configuration whose greedy tokens equal transformers': an f32
KV cache and flash attention off (llama.cpp's CPU flash-attention path rounds through f16).
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import DEFAULT_N_CTX, MIN_N_CTX
from .errors import OptionsError

KV_TYPES = ("f16", "bf16", "q8_0", "f32")
CPU_ENGINES = ("onnxruntime-cpu", "torch-cpu")


@dataclass(frozen=True)
class Settings:
    """How the model runs; every field decided, with `why` saying what decided the engine."""

    device: str  # what was asked: auto | cpu | cuda
    encoder_engine: str
    encoder_precision: str  # what the encoder computes in (a GPU engine builds fp16 from fp32)
    windows_per_run: int
    overlap: bool  # encode on a thread while llama.cpp prefills (pays only with a GPU encoder)
    n_gpu_layers: int
    flash_attn: bool | None  # on with GPU layers or a q8_0 KV cache, off on a CPU (None: llama.cpp decides)
    kv_type: str
    n_ctx: int
    n_batch: int = 512
    exact: bool = False
    gpu: str | None = None
    why: str = ""
    device_used: str = "cpu"  # where the chosen encoder engine runs ("cuda (NAME)" or "cpu")
    skipped: tuple = ()  # (engine, why not) for the faster engines passed over

    @property
    def encoder_on_gpu(self) -> bool:
        return self.encoder_engine not in CPU_ENGINES


def check_n_ctx(n_ctx: int) -> int:
    if not isinstance(n_ctx, int) or n_ctx < MIN_N_CTX:
        raise OptionsError(f"n_ctx must be a whole number >= {MIN_N_CTX} (llama.cpp's smallest context), got {n_ctx!r}")
    return n_ctx


def resolve(
    stored_precision: str = "fp32",
    *,
    device: str = "auto",
    encoder_engine: str | None = None,
    kv_type: str | None = None,
    flash_attn: bool | None = None,
    n_ctx: int | None = None,
    windows_per_run: int | None = None,
    overlap: bool | None = None,
    n_gpu_layers: int | None = None,
    exact: bool = False,
    choice=None,
    llm_gpu: bool | None = None,
    timed: bool = False,
) -> Settings:
    """Decide every setting. `choice` (an `EncoderChoice`) and `llm_gpu` may be passed in (tests,
    or after an engine failed to start and another took over); otherwise they are probed here.
    `timed`: the bundle's encoder graph takes its rows' times (Music Flamingo, AF-Next)."""
    from .engines.select import FP16_ONLY, choose_encoder, forced_encoder

    if device not in ("auto", "cpu", "cuda"):
        raise OptionsError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if kv_type is not None and kv_type not in KV_TYPES:
        raise OptionsError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
    if exact:
        if kv_type not in (None, "f32") or flash_attn:
            raise OptionsError(
                "exact mode runs an f32 KV cache with flash attention off; drop --kv / flash_attn or exact"
            )
        kv_type, flash_attn = "f32", False
        if stored_precision != "fp32":
            raise OptionsError(
                f"exact mode needs the encoder in fp32; this bundle's is {stored_precision} "
                "(re-export with --encoder-precision fp32)"
            )
    if windows_per_run is not None and windows_per_run < 1:
        raise OptionsError(f"windows_per_run must be >= 1, got {windows_per_run}")
    n_ctx = check_n_ctx(DEFAULT_N_CTX if n_ctx is None else n_ctx)
    if choice is None:
        choice = (
            choose_encoder(device, fp32=exact, timed=timed)
            if encoder_engine is None
            else forced_encoder(encoder_engine, device)
        )
    if exact and choice.engine in FP16_ONLY:  # a forced engine or target, or a fallback
        raise OptionsError(f"exact mode cannot run the {choice.engine} engine: {FP16_ONLY[choice.engine]}")
    if llm_gpu is None:  # device "cpu": the LLM stays on the CPU too
        llm_gpu = device != "cpu" and choice.gpu is not None and _llama_gpu()
    on_gpu_encoder = choice.engine not in CPU_ENGINES
    # a GPU encoder is fast per window and idle while llama.cpp prefills: several windows per run,
    # encoded on a thread while llama.cpp takes the text before the clip and the earlier windows;
    # on a CPU both compete for the same cores: one window per run, in line (measured: overlap
    # loses 4-8 % on 2 cores; 2 windows per run peak 380 MB higher for no gain)
    gpu_layers = (999 if llm_gpu else 0) if n_gpu_layers is None else n_gpu_layers
    return Settings(
        device=device,
        encoder_engine=choice.engine,
        # TensorRT and torch-cuda build fp16 from an fp32 graph; ONNX Runtime CUDA runs the graph as it is
        encoder_precision="fp16"
        if (choice.engine in FP16_ONLY and stored_precision == "fp32" and not exact)
        else stored_precision,
        windows_per_run=windows_per_run or (4 if on_gpu_encoder else 1),
        overlap=on_gpu_encoder if overlap is None else overlap,
        n_gpu_layers=gpu_layers,
        flash_attn=_flash_attn(flash_attn, gpu_layers > 0, kv_type),
        kv_type=kv_type or "f16",
        n_ctx=n_ctx,
        exact=exact,
        gpu=choice.gpu,
        why=choice.explain(),
        device_used=choice.device,
        skipped=choice.skipped,
    )


def _flash_attn(asked: bool | None, llm_gpu: bool, kv_type: str | None) -> bool:
    """With layers on a GPU, or for a quantized V cache (llama.cpp needs it there): on. On a CPU:
    off. llama.cpp would pick on for the CPU too, where its kernel makes short batches over a long
    cache slow: bench-small over 15 360 cached positions, a 15-token question 611 vs 2199 ms, a
    decode step 91 vs 263 ms, a 512-row prefill 16.4 vs 18.1 s (benchmarks/bench_attention.py).
    The price: the attention scores it materialises (n_ubatch x depth x heads x 4 bytes), +615 MB
    peak at that depth on bench-small, ~0.9 GB for AF3's 7B over a full 10-minute clip (docs/cpu.md)."""
    if asked is not None:
        return asked
    return bool(llm_gpu) or kv_type == "q8_0"


def _llama_gpu() -> bool:
    try:
        from .engines.llamacpp import supports_gpu_offload

        return supports_gpu_offload()
    except ImportError:
        return False
