"""Memory planner: what a bundle needs on a target (weights, encoder, KV cache at n_ctx, buffers).

    edge-af3 plan ./af3 --target orin-nano-8gb --n-ctx 8192

Sizes come from the bundle's files and the GGUF's own metadata (read by llama.cpp without
loading the weights); buffers are estimates, stated as such. Jetson memory is shared between
CPU and GPU, so its budget is what is left after the OS and desktop-less L4T.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from .constants import DEFAULT_N_CTX, ROWS_PER_WINDOW
from .errors import OptionsError
from .family import Family
from .quants import CPU_ENCODER_GRAPHS, resolve_encoder_attention, stored_attention

GIB = 1 << 30

# name -> (memory for edge-af3 in bytes, note)
TARGETS = {
    "orin-nano-8gb": (int(6.3 * GIB), "Jetson Orin Nano 8 GB, shared CPU/GPU memory, ~1.7 GB kept by L4T (headless)"),
    "orin-nx-16gb": (int(13.5 * GIB), "Jetson Orin NX 16 GB, shared memory, headless L4T"),
    "agx-orin-64gb": (int(60 * GIB), "Jetson AGX Orin 64 GB, shared memory"),
    "rtx-4060-laptop": (int(7.5 * GIB), "RTX 4060 Laptop GPU, 8 GB VRAM (display and CUDA context take the rest)"),
    "rtx-4090": (int(23 * GIB), "RTX 4090, 24 GB VRAM"),
    "h100": (int(78 * GIB), "H100 80 GB"),
}
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
ENCODER_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "mixed": 3}  # mixed: fc1 (a third of the weights) int8


@dataclass(frozen=True)
class LlmShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ff: int


# The published AF3 (AF-Whisper with Whisper large-v3's shape + a 2-layer projector, and Qwen2.5-7B
# with AF3's 151 672-token vocabulary), counted from its config: what `plan` uses when that model is
# neither a local folder nor in the cache, so planning needs no download.
_AF3_SHAPES = {
    "llm": LlmShape(n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_vocab=151672, n_ff=18944),
    # 2 x 151672 x 3584 (embeddings, output) + 28 x (2 x 3584^2 + 2 x 3584 x 512 + 3 x 3584 x 18944)
    "llm_params": 7.61e9,
    # 32 x (4 x 1280^2 + 2 x 1280 x 5120) + convolutions + positions, + 1280 x 3584 + 3584^2
    "encoder_params": 0.654e9,
    "encoder_hidden": 1280,
}
# the published checkpoints: Music Flamingo and AF-Next have AF3's shapes and read 40 / 60 windows
KNOWN_MODELS = {
    "nvidia/audio-flamingo-3-hf": _AF3_SHAPES | {"max_windows": 20},
    "nvidia/music-flamingo-2601-hf": _AF3_SHAPES | {"max_windows": 40},
    "nvidia/audio-flamingo-next-hf": _AF3_SHAPES | {"max_windows": 60},
    "nvidia/audio-flamingo-next-think-hf": _AF3_SHAPES | {"max_windows": 60},
}
# bits per weight of a 7B Qwen2 GGUF as llama.cpp writes it (the output and embedding tensors
# of the 4-bit types are kept at higher precision: Qwen2.5-7B Q4_K_M is 4.68 GB)
GGUF_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_k_m": 4.92, "q4_0": 4.6, "iq4_nl": 4.6}


def llm_shape(gguf: Path) -> LlmShape:
    """The LLM's shape from its GGUF header (llama.cpp, vocab only: no weights are read)."""
    import llama_cpp

    from .engines.llamacpp import init_backend

    init_backend(False)
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not read {gguf}")
    try:
        buf = ctypes.create_string_buffer(64)

        def meta(key: str) -> int:
            n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, 64)
            if n < 0:
                raise KeyError(key)
            return int(buf.value.decode())

        vocab = llama_cpp.llama_model_get_vocab(model)
        return LlmShape(
            n_layer=meta("qwen2.block_count"),
            n_embd=meta("qwen2.embedding_length"),
            n_head=meta("qwen2.attention.head_count"),
            n_head_kv=meta("qwen2.attention.head_count_kv"),
            n_vocab=llama_cpp.llama_vocab_n_tokens(vocab),
            n_ff=meta("qwen2.feed_forward_length"),
        )
    finally:
        llama_cpp.llama_model_free(model)


def machine_budget(settings) -> tuple[int, str]:
    """(bytes, what) this machine has for a set-up: the GPU's memory when anything runs on it, else
    the RAM available now."""
    if settings.encoder_on_gpu or settings.n_gpu_layers > 0:
        import subprocess

        try:
            res = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return int(res.stdout.split()[0]) << 20, f"GPU memory ({settings.gpu})"
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass  # Jetson (no nvidia-smi): its memory is the shared RAM below
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemTotal", 0)), "available RAM"


def plan(bundle, **settings) -> dict:
    """Bytes per item for running `bundle` (a Bundle or a folder). settings: n_ctx, kv_type,
    encoder_precision (what the encoder computes in), windows_per_run, n_ubatch, and target (fits /
    headroom on a named set-up) or machine (the resolved `Settings`: on this machine)."""
    from .bundle import Bundle, encoder_files, open_bundle

    b = bundle if isinstance(bundle, Bundle) else open_bundle(Path(bundle), check_hashes=False)
    m = b.manifest
    # encoder.onnx (+ .data), or encoder-<precision>/encoder.onnx pulled from a Hub repo
    onnx_bytes = sum(m["files"][n]["bytes"] for n in encoder_files(m))
    llm = (b.llm.name, b.llm.stat().st_size, llm_shape(b.llm))
    stored = m["encoder"]["precision"]
    per_head = stored_attention(m["encoder"]) == "per-head"
    encoder = (onnx_bytes, stored, int(m["model"]["encoder_hidden"]), per_head)
    return _plan(str(b.path), llm, encoder, max_windows=Family.from_manifest(m).max_windows, **settings)


def plan_known(model_id: str, quant: str, **settings) -> dict:
    """`plan` for a published model from its known shapes (KNOWN_MODELS): nothing is downloaded."""
    known = KNOWN_MODELS[model_id]
    if quant not in GGUF_BITS:
        raise OptionsError(f"no size known for a {quant} GGUF; choose one of {', '.join(GGUF_BITS)}")
    llm = (f"{quant} GGUF (estimated)", int(known["llm_params"] * GGUF_BITS[quant] / 8), known["llm"])
    # the bundle's onnx: fp32, its attention as an export would lay it out (decided by the run's precision)
    encoder = (int(known["encoder_params"] * 4), "fp32", known["encoder_hidden"], None)
    label = f"{model_id} (its published shapes; nothing downloaded)"
    return _plan(label, llm, encoder, max_windows=known["max_windows"], **settings)


def _plan(
    label: str,
    llm: tuple[str, int, LlmShape],
    encoder: tuple[int, str, int, bool | None],
    *,
    n_ctx: int = DEFAULT_N_CTX,
    kv_type: str = "f16",
    encoder_precision: str | None = None,
    windows_per_run: int = 4,
    n_ubatch: int = 512,
    target: str | None = None,
    machine=None,
    max_windows: int = 20,
) -> dict:
    """llm: (file name, bytes, shape); encoder: (onnx bytes, stored precision, hidden width,
    attention one head at a time; None: as an export for this run would lay it out);
    max_windows: the model's longest clip (AF3 20, Music Flamingo 40, AF-Next 60)."""
    llm_file, llm_bytes, shape = llm
    onnx_bytes, stored, enc_hidden, per_head = encoder
    if kv_type not in KV_BYTES:
        raise OptionsError(f"unknown KV type {kv_type!r}; choose one of {', '.join(KV_BYTES)}")
    if target is not None and target not in TARGETS:
        raise OptionsError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    run_as = encoder_precision or ("fp16" if stored == "fp32" else stored)  # GPUs build fp16 engines
    if run_as not in ENCODER_BYTES:
        raise OptionsError(f"unknown encoder precision {run_as!r}; choose one of {', '.join(ENCODER_BYTES)}")
    enc_weights = int(onnx_bytes * ENCODER_BYTES[run_as] / ENCODER_BYTES[stored])
    if per_head is None:  # a model not exported yet: a CPU graph, or fp32 exported here without a GPU
        per_head = run_as in CPU_ENCODER_GRAPHS or (
            target is None and run_as == "fp32" and resolve_encoder_attention("auto", "fp32") == "per-head"
        )
    head_dim = shape.n_embd // shape.n_head
    act = {"int8": 2, "mixed": 4}.get(run_as, ENCODER_BYTES[run_as])
    items = {
        "llm weights": llm_bytes,
        "encoder weights": enc_weights,
        "KV cache": int(2 * shape.n_layer * n_ctx * shape.n_head_kv * head_dim * KV_BYTES[kv_type]),
        # llama.cpp's compute buffer: the widest activations of one ubatch plus its logits (estimate)
        "LLM compute buffer (est.)": int(n_ubatch * (shape.n_vocab + 4 * shape.n_embd + 2 * shape.n_ff) * 4),
        # encoder: one layer's attention scores (a per-head graph holds one head's at a time: measured
        # ~80 MB a window on bench-small) + hidden states for the windows of one run
        "encoder activations (est.)": int(
            windows_per_run
            * ((3 * 1500 * 1500 * 4 if per_head else 20 * 1500 * 1500 * act / 2) + 8 * 1500 * enc_hidden * act)
        ),
        # the projected rows of the longest clip the context holds (AF3: 10 min = 15000 rows), float32 on the host
        "audio rows": int(min(max_windows * ROWS_PER_WINDOW, n_ctx) * shape.n_embd * 4),
    }
    if machine is not None and not target and machine.flash_attn is False and machine.n_gpu_layers == 0:
        # without flash attention llama.cpp materialises one ubatch's scores over the whole cache
        items["attention scores (no flash attention)"] = int(n_ubatch * n_ctx * shape.n_head * 4)
    total = sum(items.values())
    out = {
        "bundle": label,
        "llm": {"file": llm_file, **shape.__dict__},
        "n_ctx": n_ctx,
        "kv_type": kv_type,
        "encoder_precision": run_as,
        "windows_per_run": windows_per_run,
        "items": items,
        "total": total,
    }
    if machine is not None and not target:
        budget, note = machine_budget(machine)
        out["settings"] = {k: v for k, v in machine.__dict__.items() if k != "why"}
        out["engine"] = machine.why
        out["target"] = {
            "name": "this machine",
            "note": note,
            "budget": budget,
            "fits": total <= budget,
            "headroom": budget - total,
        }
    if target:
        budget, note = TARGETS[target]
        out["target"] = {
            "name": target,
            "note": note,
            "budget": budget,
            "fits": total <= budget,
            "headroom": budget - total,
        }
    return out


def render(p: dict, out) -> None:
    def gb(n: int) -> str:
        return f"{n / GIB:6.2f} GiB"

    out.print(
        f"{p['bundle']}: {p['llm']['file']} ({p['llm']['n_layer']} layers, {p['llm']['n_head_kv']} KV heads), "
        f"n_ctx {p['n_ctx']}, KV {p['kv_type']}, encoder {p['encoder_precision']} x{p['windows_per_run']} windows"
    )
    for name, n in p["items"].items():
        out.print(f"  {name:28s} {gb(n)}")
    out.print(f"  {'total':28s} {gb(p['total'])}")
    t = p.get("target")
    if t:
        verdict = "[green]fits[/]" if t["fits"] else "[red]does not fit[/]"
        out.print(
            f"{t['name']} ({t['note']}): budget {gb(t['budget']).strip()}, {verdict}, "
            f"headroom {gb(t['headroom']).strip()}"
        )
