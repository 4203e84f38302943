"""`export(src, out)`: an AF3 checkpoint -> a self-describing, verified bundle, written atomically.

    bundle/
      encoder.onnx            audio tower + pool + LayerNorm + projector ([N,128,3000] -> [N,750,H])
      llm-<quant>.gguf        the Qwen2 LLM (our converter + llama.cpp's quantizer)
      mmproj-<type>.gguf      with mmproj=True: llama.cpp's `musicflamingo` audio projector, so the
                              bundle also runs in stock llama.cpp (llama-mtmd-cli) and its AF3 path
      manifest.json           source hashes, versions, shapes, special ids, features, outputs, checks

Work happens in a hidden sibling folder that is renamed to OUT at the very end; any failure or
Ctrl-C removes it, so OUT is either the whole bundle or absent.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from .. import __version__
from ..bundle import FORMAT_FAMILY, FORMAT_VERSION, MANIFEST, describe, sha256_file, staged_folder
from ..constants import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_MELS,
    PAD_TOKEN_ID,
    ROWS_PER_WINDOW,
    SAMPLE_RATE,
    SOUND_TOKEN_ID,
)
from ..errors import OptionsError
from ..family import Family, row_times
from ..quants import (
    auto_quant,
    check_encoder_attention,
    check_quant,
    resolve_encoder_attention,
    resolve_encoder_precision,
)
from .adapters import export_adapters
from .gate import ParityError, gate  # noqa: F401 - ParityError: what export() raises
from .gguf_llm import quantize, require_lm_head, write_gguf
from .gguf_mmproj import MMPROJ_TYPES, write_mmproj
from .onnx_encoder import INPUTS, PRECISIONS, TIMES, export_checkpoint_encoder, load_encoder
from .tensors import give_back_freed, heap_for_big_tensors

Progress = Callable[[str], None]

PROBE_TEXT = "Describe the sound in one sentence. Ünïcödé, 数字 42, emoji 🦙 and code `x = f(y)`."


def _versions() -> dict[str, str]:
    out = {"edge-af3": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "gguf", "llama-cpp-python", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _source_files(ckpt: Path) -> dict[str, str]:
    return {
        str(p.relative_to(ckpt)): sha256_file(p)
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def verify_encoder(encoder_path: Path, ckpt: Path) -> dict:
    """ONNX Runtime vs PyTorch on a 45 s probe (two windows, the second half padded); the PyTorch
    modules are loaded, run and dropped before ONNX Runtime loads the graph."""
    import gc

    import onnxruntime as ort
    import torch

    from ..features import extract_features

    x = (0.1 * np.random.default_rng(1234).standard_normal(45 * SAMPLE_RATE)).astype(np.float32)
    feats = extract_features((x, SAMPLE_RATE))
    feed = {"input_features": feats.features, "input_features_mask": feats.mask}
    wrapper = load_encoder(ckpt)
    if wrapper.time_embedding is not None:  # the rows' seconds within the clip (windows 0 and 1)
        feed[TIMES] = row_times(0, feats.windows)
    with torch.inference_mode():
        want = wrapper(*(torch.from_numpy(v) for v in feed.values())).numpy()
    del wrapper
    gc.collect()
    got = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    valid = (
        [got[w, :n] for w, n in enumerate(feats.rows_per_window)],
        [want[w, :n] for w, n in enumerate(feats.rows_per_window)],
    )
    g, r = np.concatenate(valid[0]), np.concatenate(valid[1])
    return {"probe": "45 s noise, 2 windows", "max_abs_diff": float(np.abs(g - r).max()), "cosine": _cosine(g, r)}


def verify_mmproj(mmproj_path: Path, llm_path: Path, ckpt: Path) -> dict:
    """llama.cpp's mtmd on our mmproj vs PyTorch, on a full 30 s window (where mtmd's audio path agrees
    with the model: no padding, so neither its missing mask nor its global log-mel max matter). The
    PyTorch modules are dropped before llama.cpp loads; the LLM (mtmd only needs its sizes) is loaded
    without repacking, so its weights stay in the file's pages instead of a copy."""
    import gc

    import torch

    from ..engines.llamacpp import LlamaEngine
    from ..engines.mtmd import MtmdAudio
    from ..features import extract_features

    x = (0.1 * np.random.default_rng(4321).standard_normal(30 * SAMPLE_RATE)).astype(np.float32)
    feats = extract_features((x, SAMPLE_RATE))
    wrapper = load_encoder(ckpt)
    with torch.inference_mode():
        want = wrapper(torch.from_numpy(feats.features), torch.from_numpy(feats.mask)).numpy()[0]
    del wrapper
    gc.collect()
    with LlamaEngine(llm_path, n_ctx=512, n_batch=512, repack=False) as eng, MtmdAudio(mmproj_path, eng) as mt:
        got = mt.audio_rows(x)
        five = mt.audio_rows(x[: 5 * SAMPLE_RATE]).shape[0]
    return {
        "probe": "30 s noise, first window",
        "cosine": _cosine(got[:ROWS_PER_WINDOW], want),
        "max_abs_diff": float(np.abs(got[:ROWS_PER_WINDOW] - want).max()),
        "mtmd_audio_tokens_30s": int(got.shape[0]),
        "mtmd_audio_tokens_5s": int(five),
    }


def _probe(ckpt: Path, gguf_path: Path, adapter: tuple[Path, Path] | None = None):
    """(probe figures, llama.cpp logits, reference logits) on the probe prompt: llama.cpp's exact
    path (f32 KV, no flash attention) against transformers' float32 LLM run one layer at a time
    (`reference/streamed.py`: the whole model's logits with one layer's weights in memory), with
    `adapter` = (PEFT folder, GGUF) applied on both sides."""
    from transformers import AutoProcessor

    from ..engines.llamacpp import LlamaEngine
    from ..reference.loader import Reference
    from ..reference.streamed import StreamedLLM

    conv = [{"role": "user", "content": [{"type": "text", "text": PROBE_TEXT}]}]
    ids = Reference(None, AutoProcessor.from_pretrained(str(ckpt)), ckpt).inputs(conv)["input_ids"][0].tolist()
    want = StreamedLLM(ckpt, adapter=adapter[0] if adapter else None).logits(ids)
    give_back_freed()  # the reference's last part (the LM head) before llama.cpp loads
    with LlamaEngine(gguf_path, n_ctx=max(256, len(ids) + 8), n_batch=256, kv_type="f32", flash_attn=False) as eng:
        if adapter:
            eng.load_adapter("probe", adapter[1])
            eng.activate("probe")
        got = eng.decode_tokens(ids, logits="all")
        same_tokens = eng.tokenize(_decode_ids(ckpt, ids)) == ids
    p = _softmax(want)
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(_softmax(got) + 1e-30)), axis=-1)))
    return (
        {
            "probe_tokens": len(ids),
            "tokenization_identical": bool(same_tokens),
            "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
            "kl_divergence": kl,
            "reference": "transformers float32, layer by layer",
        },
        got,
        want,
    )


def verify_llm(gguf_path: Path, ckpt: Path, quant: str) -> dict:
    """GGUF logits (llama.cpp, f32 KV, no flash attention) vs transformers' float32 LLM on a probe
    prompt; the reference holds one layer at a time, so the 7B's check fits beside nothing else big."""
    out, got, want = _probe(ckpt, gguf_path)
    if quant in ("f32", "f16"):
        out["max_abs_diff"] = float(np.abs(got - want).max())
    return out


def verify_adapter(gguf_path: Path, ckpt: Path, folder: Path, adapter_gguf: Path) -> dict:
    """The LLM with its GGUF adapter vs transformers with the PEFT LoRA merged (what PEFT's
    merge_and_unload gives) on the probe."""
    out, _, _ = _probe(ckpt, gguf_path, (folder, adapter_gguf))
    return out | {"reference": "transformers float32 + the PEFT LoRA merged, layer by layer"}


def _decode_ids(ckpt: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt)).decode(ids)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def auto_encoder_precision() -> str:
    """What `--encoder-precision auto` picks on this machine (`quants.resolve_encoder_precision`)."""
    return resolve_encoder_precision("auto")


def export(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quant: str = "auto",
    encoder_precision: str = "auto",
    encoder_attention: str = "auto",
    force: bool = False,
    verify: bool = True,
    revision: str | None = None,
    mmproj: bool = False,
    mmproj_type: str = "f16",
    progress: Progress | None = None,
    adapters: dict | None = None,
    adapter_type: str = "f16",
    accept: bool = False,
) -> Path:
    """Export checkpoint `src` (folder or Hub id) into the bundle folder `out`; returns its path.
    A checkpoint's `think/` adapter is exported with it; `adapters` adds {name: PEFT folder}.
    quant="auto": the type `quants.auto_quant` picks for this checkpoint's widths;
    encoder_precision="auto": `auto_encoder_precision()`; encoder_attention="auto": per-head
    attention for a graph ONNX Runtime runs on a CPU, batched where a CUDA GPU's engines build from
    it (`quants.resolve_encoder_attention`). With `verify`, figures below their
    type's floor (export/gate.py) refuse the export (ParityError, nothing written) unless `accept`."""
    from ..checkpoint import read_config, read_generation_config, resolve_checkpoint, weight_files

    say = progress or (lambda _msg: None)
    check_quant(quant)  # user mistakes: one line (OptionsError), before anything is read
    if encoder_precision not in ("auto",) + PRECISIONS:
        raise OptionsError(
            f"unknown encoder precision {encoder_precision!r}; choose auto or one of {', '.join(PRECISIONS)}"
        )
    check_encoder_attention(encoder_attention)
    if mmproj_type not in MMPROJ_TYPES:
        raise OptionsError(f"unknown mmproj type {mmproj_type!r}; choose one of {', '.join(MMPROJ_TYPES)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    try:  # the exporter reports its own steps: transformers' per-file bars would only interleave with them
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    say(f"resolving {src}")
    ckpt = resolve_checkpoint(src, revision=revision)
    cfg = read_config(ckpt)
    weight_files(ckpt)
    require_lm_head(ckpt, cfg=cfg)  # headers only: refused before minutes of work
    asked = quant
    quant, quant_why = auto_quant(cfg["text_config"]) if quant == "auto" else (quant, "asked for")
    if asked == "auto":
        say(f"--quant auto: {quant} ({quant_why})")
    enc_asked = encoder_precision
    if encoder_precision == "auto":
        encoder_precision = auto_encoder_precision()
        say(f"--encoder-precision auto: {encoder_precision}")
    attention = resolve_encoder_attention(encoder_attention, encoder_precision)
    if encoder_attention == "auto":
        say(f"--encoder-attention auto: {attention}")
    if mmproj and cfg["audio_config"]["num_hidden_layers"] < 3:
        raise ValueError(f"{ckpt}: llama.cpp's mmproj needs >= 3 encoder layers")
    family = Family.from_checkpoint(ckpt, cfg)
    if mmproj and family.time_embedding:
        raise OptionsError(
            f"{ckpt}: a {family.name} checkpoint has no faithful llama.cpp mmproj (its musicflamingo projector "
            "has no time embedding); export without --mmproj"
        )
    if family.time_embedding and encoder_precision == "fp16":
        raise OptionsError(
            f"{family.name}'s time embedding needs fp32 angles (rows' times up to {family.max_seconds} s); "
            "export with --encoder-precision fp32, mixed or int8"
        )
    say(f"model: {family.name} ({family.max_windows} windows per clip)")
    t_start = time.perf_counter()
    with heap_for_big_tensors(), staged_folder(out, force=force) as tmp:
        say("exporting the audio encoder to ONNX")
        enc_path = export_checkpoint_encoder(
            ckpt, tmp / "encoder.onnx", precision=encoder_precision, per_head=attention == "per-head"
        )
        give_back_freed()
        checks = {}
        if verify:
            say("verifying the ONNX encoder against PyTorch")
            checks["encoder"] = verify_encoder(enc_path, ckpt)
            give_back_freed()

        text = cfg["text_config"]
        n_params = text["vocab_size"] * text["hidden_size"] * 2 + text["num_hidden_layers"] * (
            4 * text["hidden_size"] ** 2 + 3 * text["hidden_size"] * text["intermediate_size"]
        )
        big = n_params >= 2_000_000_000  # the 7B: an F16 intermediate (F32 would be 30 GB)
        base = "f32" if (quant == "f32" or not big) else "f16"
        base_path = tmp / f"llm-{base}.gguf"
        say(f"writing the LLM as {base.upper()} GGUF")
        write_gguf(ckpt, base_path, ftype=base)
        give_back_freed()
        llm_path = tmp / f"llm-{quant}.gguf"
        if quant != base:
            say(f"quantizing to {quant.upper()} with llama.cpp")
            quantize(base_path, llm_path, quant)
            base_path.unlink()
            give_back_freed()
        mm_path = None
        if mmproj:
            say(f"writing llama.cpp's mmproj ({mmproj_type.upper()})")
            mm_path = write_mmproj(ckpt, tmp / f"mmproj-{mmproj_type}.gguf", ftype=mmproj_type)
            if verify:
                say("verifying the mmproj with llama.cpp's mtmd against PyTorch")
                checks["mmproj"] = verify_mmproj(mm_path, llm_path, ckpt)
                give_back_freed()
        if verify:
            say("verifying GGUF logits against transformers")
            checks["llm"] = verify_llm(llm_path, ckpt, quant)

        adapter_entries = export_adapters(
            ckpt, {k: Path(v) for k, v in (adapters or {}).items()}, cfg, tmp, say, adapter_type
        )
        if verify:
            for name in adapter_entries:
                folder = Path((adapters or {}).get(name) or ckpt / name).expanduser()
                say(f"verifying adapter {name} against transformers + PEFT")
                checks[f"adapter:{name}"] = verify_adapter(llm_path, ckpt, folder, tmp / f"adapter-{name}.gguf")
        parity = gate(checks, quant, encoder_precision, verified=verify, accept=accept)
        files = {p.name: describe(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        audio = cfg["audio_config"]
        manifest = {
            "format_version": FORMAT_FAMILY if family.time_embedding else FORMAT_VERSION,
            "created_unix": int(time.time()),
            "source": {"id": str(src), "path": str(ckpt), "revision": revision, "files": _source_files(ckpt)},
            "exporter": _versions(),
            "model": {
                "model_type": cfg["model_type"],
                "name": family.name,
                "encoder_layers": audio["num_hidden_layers"],
                "encoder_hidden": audio["hidden_size"],
                "encoder_heads": audio["num_attention_heads"],
                "llm_layers": text["num_hidden_layers"],
                "llm_hidden": text["hidden_size"],
                "llm_kv_dim": text["num_key_value_heads"] * text["hidden_size"] // text["num_attention_heads"],
                "vocab_size": text["vocab_size"],
            },
            "family": family.to_manifest(),
            "special_ids": {
                "sound": cfg.get("audio_token_id", SOUND_TOKEN_ID),
                "eos": EOS_TOKEN_ID,
            }
            | (
                {"sound_bos": family.sound_bos, "sound_eos": family.sound_eos}
                if family.around
                else {"bos": BOS_TOKEN_ID, "pad": PAD_TOKEN_ID}
            ),
            "features": {
                "sample_rate": SAMPLE_RATE,
                "n_fft": N_FFT,
                "hop_length": HOP_LENGTH,
                "n_mels": N_MELS,
                "frames_per_window": N_FRAMES,
                "rows_per_window": ROWS_PER_WINDOW,
                "max_windows": family.max_windows,
            },
            "encoder": {
                "file": "encoder.onnx",
                "precision": encoder_precision,
                "precision_asked": enc_asked,
                "attention": attention,
                "opset": 17,
                "inputs": list(INPUTS) + ([TIMES] if family.time_embedding else []),
                "output": "audio_rows",
            },
            "llm": {
                "file": llm_path.name,
                "quant": quant,
                "arch": "qwen2",
                "quant_asked": asked,
                "quant_why": quant_why,
            },
            "adapters": adapter_entries,
            "mmproj": {"file": mm_path.name, "type": mmproj_type, "projector": "musicflamingo"} if mm_path else None,
            "chat_template": (ckpt / "chat_template.jinja").read_text("utf-8")
            if (ckpt / "chat_template.jinja").exists()
            else None,
            # the checkpoint's generation_config.json: the runtime's defaults (explicit options win)
            "generation": read_generation_config(ckpt),
            "verification": checks,
            "parity_gate": parity,
            "export_seconds": round(time.perf_counter() - t_start, 1),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    say(f"bundle ready: {out}")
    return out
