"""Qwen2 LLM of an AF3 checkpoint -> GGUF (our own converter), then llama.cpp's quantizer.

Tensors are streamed one at a time from the safetensors shards into the file (header and
tensor infos first, then the data), so the 7B model is never held in RAM as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..constants import EOS_TOKEN_ID
from ..errors import OptionsError
from ..quants import QUANTS
from .tensors import Shard, iter_names

_LAYER_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llm_name(hf_name: str) -> str | None:
    """On-disk HF name of an AF3 tensor -> its name inside the Qwen2 LLM (`layers.0.mlp.up_proj.weight`,
    `embed_tokens.weight`, `norm.weight`, `lm_head.weight`); None: not an LLM tensor."""
    for prefix in ("language_model.model.", "model.language_model.", "language_model."):
        if hf_name.startswith(prefix):
            return hf_name[len(prefix) :]
    return hf_name if hf_name.startswith("lm_head.") else None


def gguf_name(hf_name: str) -> str | None:
    """On-disk HF name of an LLM tensor -> llama.cpp's qwen2 tensor name (None: not an LLM tensor)."""
    rest = llm_name(hf_name)
    if rest is None:
        return None
    if rest.startswith("lm_head."):
        return "output." + rest.split(".", 1)[1]
    if rest == "embed_tokens.weight":
        return "token_embd.weight"
    if rest.startswith("norm."):
        return "output_norm." + rest.split(".", 1)[1]
    if rest.startswith("layers."):
        _, idx, tail = rest.split(".", 2)
        module, kind = tail.rsplit(".", 1)
        if module in _LAYER_MAP:
            return f"blk.{idx}.{_LAYER_MAP[module]}.{kind}"
    raise ValueError(f"unexpected LLM tensor {hf_name!r}")


def read_tokenizer(ckpt: Path, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) from tokenizer.json, padded with unused entries to n_rows."""
    doc = json.loads((ckpt / "tokenizer.json").read_text("utf-8"))
    model = doc["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{ckpt}: expected a byte-level BPE tokenizer, got {model.get('type')}")
    by_id: dict[int, tuple[str, int]] = {i: (t, 1) for t, i in model["vocab"].items()}  # 1 = NORMAL
    for added in doc.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], 3 if added.get("special") else 4)  # CONTROL / USER_DEFINED
    if max(by_id) >= n_rows:
        raise ValueError(f"{ckpt}: tokenizer has id {max(by_id)} but the embedding has {n_rows} rows")
    tokens, types = [], []
    for i in range(n_rows):
        tok, kind = by_id.get(i, (f"[PAD{i}]", 5))  # 5 = UNUSED
        tokens.append(tok)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def write_gguf(ckpt: Path, out: Path, *, ftype: str = "f32", progress: Callable[[str], None] | None = None) -> Path:
    """Write the LLM of `ckpt` as an F32 or F16 GGUF at `out`."""
    import gguf

    from ..checkpoint import read_config

    if ftype not in ("f32", "f16"):
        raise ValueError("write_gguf writes f32 or f16; quantize() makes the others")
    cfg = read_config(ckpt)
    text = cfg["text_config"]
    rope = text.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0)))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"unsupported rope type {rope.get('rope_type')!r}")
    template_path = ckpt / "chat_template.jinja"
    template = template_path.read_text("utf-8") if template_path.exists() else None

    entries = list_tensors(ckpt, gguf_name)
    require_lm_head(ckpt, {e[0] for e in entries}, cfg)
    n_rows = next(e[3][0] for e in entries if e[0] == "token_embd.weight")
    tokens, types, merges = read_tokenizer(ckpt, n_rows)

    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_name(cfg.get("_name_or_path") or ckpt.name)
    w.add_context_length(int(text.get("max_position_embeddings", 32768)))
    w.add_embedding_length(int(text["hidden_size"]))
    w.add_block_count(int(text["num_hidden_layers"]))
    w.add_feed_forward_length(int(text["intermediate_size"]))
    w.add_head_count(int(text["num_attention_heads"]))
    w.add_head_count_kv(int(text.get("num_key_value_heads", text["num_attention_heads"])))
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(text.get("rms_norm_eps", 1e-6)))
    w.add_file_type(QUANTS[ftype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(EOS_TOKEN_ID)
    w.add_bos_token_id(151643)
    w.add_pad_token_id(151643)
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)

    def out_dtype(g: str, shape: tuple) -> type:
        return np.float16 if (ftype == "f16" and len(shape) == 2) else np.float32

    stream_tensors(w, entries, out_dtype, progress=progress)
    return out


def require_lm_head(ckpt: Path, names: set[str] | None = None, cfg: dict | None = None) -> None:
    """CheckpointError unless the checkpoint holds the LM head (`lm_head.weight`). `names`: its
    tensors' llama.cpp names (read from the shards' headers when not given). A head left out because
    the config says `tie_word_embeddings` is refused too: transformers' AudioFlamingo3 and
    MusicFlamingo models have a head of their own and do not tie it (loading such a checkpoint,
    transformers reports `lm_head.weight | MISSING` and initializes it at random), so there is no
    reference output to be faithful to."""
    from ..errors import CheckpointError

    if names is None:
        names = {e[0] for e in list_tensors(ckpt, gguf_name)}
    if "output.weight" in names:
        return
    tied = bool(((cfg or {}).get("text_config") or {}).get("tie_word_embeddings"))
    raise CheckpointError(
        f"{ckpt}: no LM head weight (lm_head.weight)"
        + (
            "; its config ties it to the embedding (tie_word_embeddings), which transformers' Audio Flamingo "
            "models do not do (they would start it at random), so this checkpoint has no defined output layer: "
            "save it with its lm_head"
            if tied
            else ""
        )
    )


def list_tensors(ckpt: Path, mapper: Callable[[str], str | None]) -> list[tuple[str, str, Shard, tuple]]:
    """(gguf name, HF name, shard, shape) of every tensor `mapper` names, sorted by gguf name."""
    entries = []
    for name, shard in iter_names(ckpt):
        g = mapper(name)
        if g is not None:
            entries.append((g, name, shard, shard.shape(name)))
    entries.sort(key=lambda e: e[0])
    return entries


def stream_tensors(
    w,
    entries,
    out_dtype: Callable[[str, tuple], type],
    *,
    reshape: Callable[[str, tuple], tuple] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write the header, then each tensor read from its shard one at a time (plain reads: the
    process holds one tensor, never a mapping of the shards), then close `w`."""
    import torch

    shapes = {g: (reshape(g, shape) if reshape else shape) for g, _, _, shape in entries}
    for g, _, _, _ in entries:
        dt = np.dtype(out_dtype(g, shapes[g]))
        w.add_tensor_info(g, shapes[g], dt, int(np.prod(shapes[g])) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for g, hf, shard, _ in entries:
            # straight to the written type (bf16 -> f16 rounds as through f32: bf16 -> f32 is exact),
            # so the largest tensor (the 7B's embedding) is held twice at most, not four times
            dt = torch.float16 if np.dtype(out_dtype(g, shapes[g])) == np.float16 else torch.float32
            t = shard.get(hf).to(dt).numpy().reshape(shapes[g])
            w.write_tensor_data(t)
            del t
            if progress:
                progress(g)
    finally:
        w.close()


def quantize(src: Path, dst: Path, quant: str, *, threads: int = 0) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python) from an F16/F32 GGUF."""
    import llama_cpp

    from ..engines.llamacpp import init_backend

    init_backend(False)  # llama.cpp's quantizer logs every tensor otherwise
    if quant not in QUANTS:
        raise OptionsError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
    return dst
