"""Audio tower + pooling + final LayerNorm + projector -> encoder.onnx.

Inputs `input_features` [N,128,F] float32 and `input_features_mask` [N,F] int64, F <= 3000 frames;
output `audio_rows` [N,F/4,H] float32 (a full window gives 750 rows; the runtime keeps the valid
ones). Dynamic N and F: the runtime cuts a clip's last, partial window just past its valid frames
(a 5 s clip runs 1/6 of a window's work). Opset 17 (LayerNorm as one op so TensorRT can keep it in
fp32).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..constants import N_FRAMES, N_MELS
from ..onnx_tools import resave, to_fp16

OPSET = 17
INPUTS = ("input_features", "input_features_mask")
OUTPUT = "audio_rows"
EXTERNAL_BYTES = 1_800_000_000  # above this the weights go to `<file>.data` (protobuf's limit is 2 GB)


def load_encoder(ckpt: Path):
    """Audio tower + projector of a checkpoint, alone (the LLM is never loaded), fp32, eval."""
    from safetensors import safe_open
    from transformers import AudioFlamingo3Config
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
        AudioFlamingo3Encoder,
        AudioFlamingo3MultiModalProjector,
    )

    from ..checkpoint import weight_files

    cfg = AudioFlamingo3Config.from_pretrained(str(ckpt))
    cfg.audio_config._attn_implementation = "eager"
    wrapper = _Wrapper(AudioFlamingo3Encoder(cfg.audio_config), AudioFlamingo3MultiModalProjector(cfg))
    state = {}
    for f in weight_files(ckpt):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                key = name.removeprefix("model.")
                if key.startswith("audio_tower."):
                    state["tower." + key[len("audio_tower.") :]] = sf.get_tensor(name).to(torch.float32)
                elif key.startswith("multi_modal_projector."):
                    state["projector." + key[len("multi_modal_projector.") :]] = sf.get_tensor(name).to(torch.float32)
    missing, unexpected = wrapper.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: encoder weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return wrapper.float().eval()


class _Wrapper(torch.nn.Module):
    def __init__(self, tower, projector):
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, input_features, input_features_mask):
        """The tower's own forward, but for any frame count F <= 3000 (not only 3000): positions are
        sliced to the conv output length, so a short clip's window can be cut just past its valid
        frames. Rows of valid frames are the same as with the full padded window: padded frames
        are masked keys, and the convolutions only reach 2 frames past the last valid one."""
        t = self.tower
        seq_len = (input_features.shape[-1] - 1) // 2 + 1  # after conv2's stride 2
        lengths = (input_features_mask.sum(-1) - 1) // 2 + 1
        keys = torch.arange(seq_len, device=input_features.device)[None, :] < lengths[:, None]
        hidden = torch.nn.functional.gelu(t.conv1(input_features))
        hidden = torch.nn.functional.gelu(t.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + t.embed_positions.weight[:seq_len]
        mask = (~keys)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min  # additive, keys only
        for layer in t.layers:
            hidden = layer(hidden, mask)
        hidden = t.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
        return self.projector(t.layer_norm(hidden))  # [N, seq_len // 2, H]


PRECISIONS = ("fp32", "fp16", "int8")


def export_encoder(wrapper, out: Path, *, precision: str = "fp32") -> Path:
    """Write `out` from `load_encoder(...)`; weights above 2 GB go to one `<out>.data` file beside it."""
    import shutil

    if precision not in PRECISIONS:
        raise ValueError(f"unknown encoder precision {precision!r}; choose fp32, fp16 or int8")
    feats = torch.zeros(2, N_MELS, N_FRAMES)
    mask = torch.ones(2, N_FRAMES, dtype=torch.int64)
    mask[1, 1000:] = 0
    n_params = sum(p.numel() for p in wrapper.parameters())
    large = n_params * 4 > EXTERNAL_BYTES
    work = out.parent / f".{out.name}.work"  # torch writes one file per tensor when large
    work.mkdir()
    try:
        raw = work / "encoder.onnx"
        with torch.inference_mode():
            torch.onnx.export(
                wrapper,
                (feats, mask),
                str(raw),
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                dynamic_axes={INPUTS[0]: {0: "windows", 2: "frames"}, INPUTS[1]: {0: "windows", 1: "frames"},
                              OUTPUT: {0: "windows", 1: "rows"}},
                opset_version=OPSET,
                dynamo=False,
                external_data=large,
            )
        if precision == "fp32":
            resave(raw, out, large)
        elif precision == "fp16":
            to_fp16(raw, out, n_params * 2 > EXTERNAL_BYTES)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q = work / "encoder.int8.onnx"
            quantize_dynamic(str(raw), str(q), weight_type=QuantType.QInt8, use_external_data_format=large)
            resave(q, out, n_params > EXTERNAL_BYTES)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
