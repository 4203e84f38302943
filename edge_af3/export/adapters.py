"""Adapters into a bundle: a PEFT LoRA on the LLM as a llama.cpp GGUF LoRA adapter, and the
adapter's non-LoRA weights (AF3's `non_lora_trainables.bin`) as replacements for the encoder
graph's initializers (`adapter-NAME-encoder.npz`, numpy without pickle): the base encoder.onnx is
shared, not duplicated. Anything that cannot be applied the way transformers + PEFT apply it is
refused naming the tensor: another base's shapes, modules outside the LLM's linear layers, LLM
weights in the non-LoRA file, keys that match nothing, DoRA, `modules_to_save`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..constants import THINK_SUFFIX
from ..errors import CheckpointError

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(
    r"^base_model\.model\.(?:model\.)?language_model\.(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$"
)
NON_LORA_FILE = "non_lora_trainables.bin"


def _shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each LLM linear layer of the base checkpoint."""
    t = cfg["text_config"]
    h, heads = t["hidden_size"], t["num_attention_heads"]
    head_dim = t.get("head_dim") or h // heads
    kv = t.get("num_key_value_heads", heads) * head_dim
    i = t["intermediate_size"]
    return {
        "self_attn.q_proj": (heads * head_dim, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, heads * head_dim),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def _lora_tensors(folder: Path) -> dict:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.numpy import load_file

        try:
            return load_file(str(st))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{st}: not a readable safetensors file ({e})") from None
    binf = folder / "adapter_model.bin"
    if binf.is_file():
        import torch

        try:
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{binf}: not a plain tensor state dict ({type(e).__name__})") from None
        return {k: v.float().numpy() for k, v in state.items()}
    raise CheckpointError(f"{folder}: no adapter_model.safetensors (or .bin)")


ADAPTER_TYPES = ("f16", "f32", "q8_0")


def _tensor(w, name: str, value: np.ndarray, dtype: str) -> None:
    import gguf

    value = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "f32":
        w.add_tensor(name, value)
    elif dtype == "f16":
        w.add_tensor(name, value.astype(np.float16))
    elif value.shape[-1] % 32:  # q8_0 blocks of 32 along the row: a rank not divisible stays f16
        w.add_tensor(name, value.astype(np.float16))
    else:
        q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def read_lora(folder: Path, cfg: dict) -> tuple[int, float, dict[tuple[int, str], dict[str, np.ndarray]]]:
    """(r, alpha as llama.cpp scales it: alpha / r, {(layer, module): {"A": [r, in], "B": [out, r]}})
    of the PEFT LoRA in `folder`, checked against the base checkpoint's shapes."""
    conf_path = folder / "adapter_config.json"
    if not conf_path.is_file():
        raise CheckpointError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    conf = json.loads(conf_path.read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{conf_path}: peft_type {conf.get('peft_type')!r}; only LoRA adapters are supported")
    for field in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if conf.get(field):
            raise CheckpointError(
                f"{conf_path}: {field} is not supported (llama.cpp's adapters hold LoRA pairs of one rank and scale)"
            )
    r, alpha = int(conf["r"]), float(conf.get("lora_alpha", conf["r"]))
    if conf.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r
    shapes, n_layers = _shapes(cfg), cfg["text_config"]["num_hidden_layers"]
    tensors = _lora_tensors(folder)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m or m.group(2) not in GGUF_NAMES or int(m.group(1)) >= n_layers:
            raise CheckpointError(
                f"{folder}: tensor {key} does not target one of the LLM's linear layers "
                f"({', '.join(GGUF_NAMES)}; layers 0..{n_layers - 1})"
            )
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        out_dim, in_dim = shapes[module]
        want = (r, in_dim) if ab == "A" else (out_dim, r)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{folder}: tensor {key} has shape {tuple(value.shape)}, the base model needs {want} "
                "(an adapter for another model?)"
            )
        pairs.setdefault((layer, module), {})[ab] = value
    incomplete = [f"layer {li} {m}" for (li, m), ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete or not pairs:
        raise CheckpointError(f"{folder}: LoRA pairs missing their A or B: {', '.join(incomplete) or 'no tensors'}")
    return r, alpha, pairs


def write_lora_gguf(folder: Path, cfg: dict, out: Path, dtype: str = "f16") -> dict:
    """The PEFT LoRA in `folder` as a llama.cpp adapter GGUF at `out` (tensors in `dtype`);
    returns what it holds."""
    import gguf

    if dtype not in ADAPTER_TYPES:
        raise CheckpointError(f"unknown adapter type {dtype!r}; choose one of {', '.join(ADAPTER_TYPES)}")
    r, alpha, pairs = read_lora(folder, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for (layer, module), ab in sorted(pairs.items()):
        name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        _tensor(w, name + ".lora_a", ab["A"], dtype)
        _tensor(w, name + ".lora_b", ab["B"], dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"r": r, "alpha": alpha, "pairs": len(pairs), "targets": sorted({m for _, m in pairs}), "type": dtype}


def encoder_overrides(non_lora: Path, ckpt_state_shapes: dict[str, tuple], onnx_path: Path, out: Path) -> dict:
    """The non-LoRA file's encoder-side tensors as {ONNX initializer: array} in `out` (.npz)."""
    from ..engines.torch_encoder import initializer_names
    from ..reference.adapters import read_non_lora

    state = read_non_lora(non_lora)
    names = initializer_names(onnx_path)
    found, arrays = [], {}
    for key, value in state.items():
        if key.startswith("model.language_model.") or key.startswith("lm_head."):
            raise CheckpointError(
                f"{non_lora}: {key} is an LLM weight: a llama.cpp adapter holds LoRA pairs only, "
                "so it cannot be applied; export the merged model instead"
            )
        if key not in ckpt_state_shapes:
            raise CheckpointError(
                f"{non_lora}: key {key} matches nothing in the model (strict=False would skip it "
                "silently; refusing instead)"
            )
        if tuple(value.shape) != tuple(ckpt_state_shapes[key]):
            raise CheckpointError(
                f"{non_lora}: {key} has shape {tuple(value.shape)}, the model's is {tuple(ckpt_state_shapes[key])}"
            )
        enc = key.replace("model.multi_modal_projector.", "projector.").replace("model.audio_tower.", "tower.")
        if enc not in names:
            raise CheckpointError(
                f"{non_lora}: {key}: the bundle's encoder.onnx has no float initializer for it "
                "(an int8-quantized weight cannot take it: export with --encoder-precision fp32 or fp16)"
            )
        init, transposed, dtype = names[enc]
        arr = value.float().numpy()
        arrays[init] = np.ascontiguousarray(arr.T if transposed else arr).astype(dtype)
        found.append(key)
    if not arrays:
        return {}
    np.savez(out, **arrays)
    return {"file": out.name, "tensors": sorted(found)}


def export_adapters(ckpt: Path, extra: dict[str, Path], cfg: dict, tmp: Path, say, dtype: str = "f16") -> dict:
    """Every adapter of the checkpoint (its `think/`) and the extra `NAME=DIR` folders, into `tmp`;
    returns the manifest's `adapters` entry."""
    folders = dict(extra)
    if (ckpt / "think" / "adapter_config.json").is_file():
        folders.setdefault("think", ckpt / "think")
    out = {}
    state_shapes = None
    for name, folder in sorted(folders.items()):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
            raise CheckpointError(f"adapter name {name!r}: use letters, digits, - and _")
        folder = Path(folder).expanduser()
        say(f"exporting adapter {name} from {folder}")
        entry = {
            "lora": write_lora_gguf(folder, cfg, tmp / f"adapter-{name}.gguf", dtype) | {"file": f"adapter-{name}.gguf"}
        }
        if (folder / NON_LORA_FILE).is_file():
            if state_shapes is None:
                state_shapes = _checkpoint_shapes(ckpt)
            entry["encoder"] = (
                encoder_overrides(
                    folder / NON_LORA_FILE, state_shapes, tmp / "encoder.onnx", tmp / f"adapter-{name}-encoder.npz"
                )
                or None
            )
        entry["prompt_suffix"] = THINK_SUFFIX if name == "think" else ""
        out[name] = entry
    return out


def _checkpoint_shapes(ckpt: Path) -> dict[str, tuple]:
    """{state-dict name (as transformers' model names it): shape} from the checkpoint's safetensors."""
    from .tensors import iter_names

    return {
        (key if key.startswith(("model.", "lm_head")) else "model." + key): shard.shape(key)
        for key, shard in iter_names(ckpt)
    }
