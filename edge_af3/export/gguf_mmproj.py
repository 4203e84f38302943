"""AF3 audio tower + projector -> a llama.cpp mmproj GGUF (projector type `musicflamingo`).

This is the file stock llama.cpp (`llama-mtmd-cli -m llm.gguf --mmproj mmproj.gguf`) needs to run
AF3 itself; edge-af3's own runtime uses `encoder.onnx` instead, because llama.cpp's audio path
differs from the model (see docs/architecture.md: global log-mel max, no padding mask, an extra
window at exactly 30 s). It is written so that benchmarks can run llama.cpp's AF3 path on the same
weights and so that a bundle also works with llama.cpp's own tools.

Tensor names and metadata follow llama.cpp's converter for `AudioFlamingo3ForConditionalGeneration`
(a Whisper encoder: `a.*` tensors, `mm.a.mlp.{1,2}` projector, conv weights kept in F32, conv
biases as [C, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .gguf_llm import list_tensors, stream_tensors

MMPROJ_TYPES = ("f16", "f32")

_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "self_attn_layer_norm": "ln1",
    "final_layer_norm": "ln2",
    "fc1": "ffn_up",
    "fc2": "ffn_down",
}


def mmproj_name(hf_name: str) -> str | None:
    """On-disk HF name of an audio tensor -> llama.cpp's mmproj name (None: not an audio tensor)."""
    for prefix in ("model.audio_tower.", "audio_tower."):
        if hf_name.startswith(prefix):
            rest = hf_name[len(prefix) :]
            break
    else:
        for prefix in ("model.multi_modal_projector.", "multi_modal_projector."):
            if hf_name.startswith(prefix):
                module, kind = hf_name[len(prefix) :].rsplit(".", 1)
                if module in ("linear_1", "linear_2"):
                    return f"mm.a.mlp.{module[-1]}.{kind}"
                raise ValueError(f"unexpected projector tensor {hf_name!r}")
        return None
    module, kind = rest.rsplit(".", 1)
    if module in ("conv1", "conv2"):
        return f"a.conv1d.{module[-1]}.{kind}"
    if module == "embed_positions":
        return "a.position_embd.weight"
    if module == "layer_norm":
        return f"a.post_ln.{kind}"
    if module.startswith("layers."):
        _, idx, sub = module.split(".", 2)
        if sub in _LAYER:
            return f"a.blk.{idx}.{_LAYER[sub]}.{kind}"
    raise ValueError(f"unexpected audio tensor {hf_name!r}")


def write_mmproj(ckpt: Path, out: Path, *, ftype: str = "f16", progress: Callable[[str], None] | None = None) -> Path:
    """Write the audio tower + projector of `ckpt` as a llama.cpp `musicflamingo` mmproj GGUF."""
    import gguf

    from ..checkpoint import read_config

    if ftype not in MMPROJ_TYPES:
        raise ValueError(f"unknown mmproj type {ftype!r}; choose one of {', '.join(MMPROJ_TYPES)}")
    cfg = read_config(ckpt)
    audio, text = cfg["audio_config"], cfg["text_config"]
    n_layers = int(audio["num_hidden_layers"])
    if n_layers < 3:  # llama.cpp's loader and converter assume a real Whisper depth
        raise ValueError(f"{ckpt}: llama.cpp's mmproj needs >= 3 encoder layers, this one has {n_layers}")
    entries = list_tensors(ckpt, mmproj_name)
    names = {e[0] for e in entries}
    for need in ("a.conv1d.1.weight", "a.position_embd.weight", "a.post_ln.weight", "mm.a.mlp.2.weight"):
        if need not in names:
            raise ValueError(f"{ckpt}: no {need} among the audio tensors")

    w = gguf.GGUFWriter(str(out), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(f"{cfg.get('_name_or_path') or ckpt.name} audio encoder")
    w.add_file_type(1 if ftype == "f16" else 0)
    w.add_clip_has_audio_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.MUSIC_FLAMINGO)
    w.add_audio_projection_dim(int(text["hidden_size"]))
    w.add_audio_embedding_length(int(audio["hidden_size"]))
    w.add_audio_feed_forward_length(int(audio["intermediate_size"]))
    w.add_audio_block_count(n_layers)
    w.add_audio_head_count(int(audio["num_attention_heads"]))
    w.add_audio_attention_layernorm_eps(float(audio.get("layer_norm_eps", 1e-5)))
    w.add_audio_num_mel_bins(int(audio.get("num_mel_bins", 128)))

    def reshape(g: str, shape: tuple) -> tuple:
        return (shape[0], 1) if g.startswith("a.conv1d.") and g.endswith(".bias") else shape

    def out_dtype(g: str, shape: tuple) -> type:
        if ftype == "f16" and len(shape) == 2 and not g.startswith(("a.conv1d.", "a.position_embd")):
            return np.float16
        # norms, biases, the position table (added to f32 activations) and the convolutions
        # (trained in bf16; f16 may overflow) stay f32, as llama.cpp's converter keeps them
        return np.float32

    stream_tensors(w, entries, out_dtype, reshape=reshape, progress=progress)
    return out
