"""The weight types a bundle is exported in: the LLM's GGUF types (and which one `--quant auto`
picks for a checkpoint) and the encoder graph's precisions.

Torch-free: the runtime resolves `auto` before it looks a checkpoint's bundle up in the cache.

Why `auto` is shape-driven (measured on a 2-core AVX-512 VNNI x86 box, llama.cpp CPU backend;
benchmarks/bench_cpu.py): llama.cpp's CPU backend repacks Q4_0, IQ4_NL and Q4_K into
interleaved layouts at load and prefills them with its tiled int8 GEMM; Q5_0, Q5_1, Q8_0 and
Q6_K it does not repack. K-quants work on 256-wide blocks: a matrix whose input width is not a
multiple of 256 is quantized to a fallback type instead (Q5_0 / Q5_1 / Q8_0), tensor by tensor.
- The real AF3 (Qwen2.5-7B: widths 3584 and 18944, both multiples of 256): Q4_K_M keeps its
  K-quants, prefills at ~0.9x IQ4_NL's speed and keeps more quality: `auto` = q4_k_m.
- A model with other widths (the 0.5B-shaped bench-small: 896, 4864): Q4_K_M turns mostly into
  unrepacked Q5_0 and prefills at half IQ4_NL's speed, decodes 1.3x slower: `auto` = iq4_nl
  (32-wide blocks, non-linear levels: closer to Q4_K than Q4_0 at Q4_0's size and speed).
"""

from __future__ import annotations

from .errors import OptionsError

QUANTS = {  # name -> llama_ftype
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q8_0": 7,
    "q4_k_m": 15,
    "iq4_nl": 25,
}
CHOICES = ("auto",) + tuple(QUANTS)
ENCODER_PRECISIONS = ("fp32", "fp16", "int8", "mixed")
# quantized encoder graphs (ONNX Runtime's MatMulInteger): only ONNX Runtime runs them, TensorRT
# refuses them, exact mode cannot use them; exported with attention one head at a time
CPU_ENCODER_GRAPHS = ("int8", "mixed")
# how the encoder graph's attention is laid out: per-head (one head's [T, T] scores at a time: what
# ONNX Runtime on a CPU runs fastest and in least memory) or batched (all heads in one MatMul: the
# form GPU builders fuse)
ENCODER_ATTENTIONS = ("per-head", "batched")
K_BLOCK = 256  # the K-quants' super-block width


def widths(text_config: dict) -> dict[str, int]:
    """The input width of each kind of LLM matrix (what a quantization block runs along)."""
    return {
        "hidden (q/k/v/o, gate/up, output)": int(text_config["hidden_size"]),
        "intermediate (down)": int(text_config["intermediate_size"]),
    }


def auto_quant(text_config: dict) -> tuple[str, str]:
    """(quant, why) for a checkpoint's text config."""
    bad = {k: v for k, v in widths(text_config).items() if v % K_BLOCK}
    if not bad:
        return "q4_k_m", f"every matrix width is a multiple of {K_BLOCK}: Q4_K_M keeps its K-quants"
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    return "iq4_nl", (
        f"{what} not a multiple of {K_BLOCK}: Q4_K_M would fall back to unrepacked Q5_0/Q8_0 "
        "tensors (half the CPU prefill speed); IQ4_NL instead"
    )


def check_quant(quant: str) -> str:
    """A known LLM type (or auto), else OptionsError naming the choices."""
    if quant not in CHOICES:
        raise OptionsError(f"unknown quant {quant!r}; choose one of {', '.join(CHOICES)}")
    return quant


def resolve_quant(quant: str, text_config: dict | None) -> str:
    """`quant` itself, or what `auto` picks (q4_k_m when the config is not known)."""
    if check_quant(quant) != "auto":
        return quant
    return auto_quant(text_config)[0] if text_config else "q4_k_m"


def exact_quant(quant: str, exact: bool) -> str:
    """The LLM type a checkpoint is exported in: `auto` in exact mode is F32 (the configuration
    whose greedy tokens equal transformers'; quantized weights cannot)."""
    return "f32" if exact and quant == "auto" else quant


def check_encoder_attention(attention: str) -> str:
    """A known attention layout (or auto), else OptionsError naming the choices."""
    if attention not in ("auto",) + ENCODER_ATTENTIONS:
        raise OptionsError(
            f"unknown encoder attention {attention!r}; choose auto or one of {', '.join(ENCODER_ATTENTIONS)}"
        )
    return attention


def stored_attention(encoder: dict) -> str:
    """The attention layout of a bundle's encoder (its manifest's `encoder` entry); a manifest from
    before the layout was recorded: per-head exactly for the CPU graphs, as exports were then."""
    return encoder.get("attention") or ("per-head" if encoder["precision"] in CPU_ENCODER_GRAPHS else "batched")


def resolve_encoder_attention(attention: str = "auto", precision: str = "fp32") -> str:
    """`attention` itself, or what `auto` picks for a graph of `precision`: per-head for the CPU
    graphs (int8, mixed) and for fp32 exported on a machine without a CUDA GPU; batched for fp16
    and for fp32 where a CUDA GPU's engines will build from it. Per-head fp32 computes the same
    rows (cosine 1.000000 against batched) and ONNX Runtime runs it faster and in less memory:
    per window 2929 against 3709 ms on an AVX2 AMD EPYC Zen 3, 1022 against 1087 ms on a Zen 4,
    activation peak ~540 against ~920 MB on both (bench-small; docs/cpu.md)."""
    if check_encoder_attention(attention) != "auto":
        return attention
    if precision in CPU_ENCODER_GRAPHS:
        return "per-head"
    if precision != "fp32":
        return "batched"
    from .engines.select import gpu_name

    return "batched" if gpu_name() else "per-head"


def checked_encoder_precision(precision: str = "auto", *, exact: bool = False) -> str:
    """`precision` checked (and fp32 for exact mode), `auto` left for the export to resolve: what
    a load passes down without probing the GPU when its source turns out to be a bundle."""
    if precision == "auto" and not exact:
        return precision
    return resolve_encoder_precision(precision, exact=exact)


def resolve_encoder_precision(precision: str = "auto", *, exact: bool = False) -> str:
    """`precision` itself, or what `auto` picks: fp32 for exact mode or on a machine with a CUDA
    GPU (its engines build fp16 from fp32 and take no int8 graph); on a CPU with an int8 dot
    product (VNNI), mixed (the fastest CPU graph whose rows keep cosine >= 0.9999); on one without
    (AVX2 only), fp32: there mixed was 5 % faster at rows cosine 0.99988 (bench-small, AMD EPYC
    Zen 3; docs/cpu.md). Exact mode
    refuses anything but fp32. Errors are OptionsError (a ValueError)."""
    if precision not in ("auto",) + ENCODER_PRECISIONS:
        raise OptionsError(
            f"unknown encoder precision {precision!r}; choose auto or one of {', '.join(ENCODER_PRECISIONS)}"
        )
    if exact and precision not in ("auto", "fp32"):
        raise OptionsError(f"exact mode computes the encoder in fp32; --encoder-precision {precision} cannot be exact")
    if precision != "auto":
        return precision
    if exact:
        return "fp32"
    from .cpu_features import read_cpu
    from .engines.select import gpu_name

    return "fp32" if gpu_name() or not read_cpu().has_int8_dot else "mixed"
