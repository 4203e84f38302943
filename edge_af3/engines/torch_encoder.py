"""The encoder on PyTorch, for machines with torch but no TensorRT (e.g. JetPack's PyTorch wheels).

The weights come from the bundle's own `encoder.onnx` (no checkpoint, no transformers): named
initializers (convs, norms, biases, positions) are taken as they are, and each MatMul's weight is
found through its node name (`/tower/layers.3/fc1/MatMul` -> `tower.layers.3.fc1`). The forward is
the one exported to ONNX (`export/onnx_encoder._Wrapper`), written against plain tensors.

An int8 bundle (`--encoder-precision int8`) keeps its linear weights int8 on the device and
dequantizes each right before its matmul (half the memory of fp16; its two int8 convolutions are
made float at load).

On CUDA it runs in fp16 and is captured in CUDA graphs, one per shape bucket (engines/buckets.py:
full windows padded up to a window-count bucket; a clip's partial last window in a frame bucket).
Inputs are copied into the graph's static buffers; all graphs share one memory pool.
`graphs="eager"` replays the same buffers without CUDA, so the bucketing is tested on CPU CI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..constants import N_FRAMES, N_MELS
from ..errors import OptionsError
from .buckets import FRAME_BUCKETS, bucket, run_bucketed, window_buckets

HEAD_DIM = 64  # every Whisper encoder (tiny .. large-v3, AF-Whisper) uses 64-wide heads


class EncoderWeightsError(ValueError):
    """The ONNX encoder's weights cannot be mapped onto the torch encoder."""


# MatMul node names of the legacy exporter: "/tower/layers.3/fc1/MatMul" when the tower's own forward
# ran, "/layers.3/fc1/MatMul" for _Wrapper's forward (layers called directly), "/projector/linear_1/MatMul"
_MATMUL = re.compile(r"^(?:/tower)?/(layers\.\d+/.+|projector/linear_\d)/MatMul$")


@dataclass(frozen=True)
class Int8Weight:
    """A linear weight as ONNX Runtime's dynamic quantization stored it: int8 [out, in], one scale
    and zero point for the tensor. The torch engine keeps it int8 on the device (half the memory
    of fp16) and dequantizes it right before its matmul."""

    q: np.ndarray
    scale: float
    zero_point: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


_MATMUL_INT8 = re.compile(r"^(?:/tower)?/(layers\.\d+/.+|projector/linear_\d)/MatMul_quant$")


def _module(match: re.Match) -> str:
    module = match.group(1).replace("/", ".")
    return module if module.startswith("projector.") else "tower." + module


def onnx_weights(path: str | os.PathLike) -> dict[str, np.ndarray | Int8Weight]:
    """{state-dict name: array} from an exported encoder.onnx (fp32, fp16, or int8 from
    `--encoder-precision int8`, whose linear weights come back as `Int8Weight`). Linear weights
    come back as [out, in] like torch's."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, np.ndarray | Int8Weight] = {
        name: numpy_helper.to_array(t) for name, t in inits.items() if name.startswith(("tower.", "projector."))
    }
    for node in graph.node:
        m = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and m and len(node.input) == 2 and node.input[1] in inits:
            out[_module(m) + ".weight"] = np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T)
            continue
        m = _MATMUL_INT8.match(node.name)
        if node.op_type == "MatMulInteger" and m and len(node.input) == 4 and node.input[1] in inits:
            base = node.input[1].removesuffix("_quantized")
            scale, zero = inits.get(base + "_scale"), inits.get(node.input[3])
            if scale is None or zero is None:
                raise EncoderWeightsError(f"{path}: {node.name} has no weight scale / zero point")
            q = numpy_helper.to_array(inits[node.input[1]])
            if q.dtype != np.int8 or numpy_helper.to_array(scale).size != 1:
                raise EncoderWeightsError(f"{path}: {node.name}: only per-tensor int8 weights are supported")
            out[_module(m) + ".weight"] = Int8Weight(
                np.ascontiguousarray(q.T), float(numpy_helper.to_array(scale)), int(numpy_helper.to_array(zero))
            )
    for name in inits:  # the int8 export also quantizes the two convolutions (ConvInteger): small, made float here
        base = name.removesuffix("_quantized")
        if name.endswith("_quantized") and base.startswith(("tower.", "projector.")) and base not in out:
            q = numpy_helper.to_array(inits[name]).astype(np.float32)
            zero = numpy_helper.to_array(inits[base + "_zero_point"]).astype(np.float32)
            out[base] = (q - zero) * numpy_helper.to_array(inits[base + "_scale"]).astype(np.float32)
    return out


def initializer_names(path: str | os.PathLike) -> dict[str, tuple[str, bool, str]]:
    """{state-dict name: (ONNX initializer, stored transposed, its dtype)} of an fp32/fp16
    encoder.onnx: where each weight of the tower and projector lives in the graph (an adapter's
    encoder-side weights replace those initializers). Int8 weights are not listed."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dtype = lambda t: str(helper.tensor_dtype_to_np_dtype(t.data_type))  # noqa: E731
    out = {name: (name, False, dtype(t)) for name, t in inits.items() if name.startswith(("tower.", "projector."))}
    for node in model.graph.node:
        m = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and m and len(node.input) == 2 and node.input[1] in inits:
            out[_module(m) + ".weight"] = (node.input[1], True, dtype(inits[node.input[1]]))
    return out


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    hidden: int
    heads: int

    @classmethod
    def of(cls, weights: dict[str, np.ndarray], heads: int | None = None) -> EncoderShape:
        need = [
            "tower.conv1.weight",
            "tower.conv2.weight",
            "tower.embed_positions.weight",
            "tower.layer_norm.weight",
            "projector.linear_1.weight",
            "projector.linear_2.weight",
        ]
        missing = [n for n in need if n not in weights]
        layers = sum(1 for n in weights if re.fullmatch(r"tower\.layers\.\d+\.fc1\.weight", n))
        for i in range(layers):
            for part in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "fc1",
                "fc2",
            ):
                if f"tower.layers.{i}.{part}.weight" not in weights:
                    missing.append(f"tower.layers.{i}.{part}.weight")
        if missing or layers == 0:
            raise EncoderWeightsError(
                f"the ONNX encoder lacks weights the torch engine needs: {(missing or ['layers'])[:5]}"
            )
        hidden = weights["tower.conv1.weight"].shape[0]
        if weights["tower.conv1.weight"].shape[1] != N_MELS:
            raise EncoderWeightsError(f"conv1 takes {weights['tower.conv1.weight'].shape[1]} mel bins, not {N_MELS}")
        heads = heads or hidden // HEAD_DIM
        if hidden % heads:
            raise EncoderWeightsError(f"{hidden} is not divisible into {heads} heads")
        return cls(layers, hidden, heads)


class TorchAF3Encoder:
    """AF-Whisper tower + pooling + LayerNorm + projector as plain tensor code (mirrors _Wrapper)."""

    def __init__(self, weights: dict[str, np.ndarray], *, device: str = "cpu", dtype=None, heads: int | None = None):
        import torch

        self.shape = EncoderShape.of(weights, heads)
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.w, self.int8 = {}, {}
        for k, v in weights.items():
            if isinstance(v, Int8Weight):  # stays int8 on the device; see `_lin`
                self.int8[k] = (torch.from_numpy(np.array(v.q, copy=True)).to(self.device), v.scale, v.zero_point)
            else:
                self.w[k] = torch.from_numpy(np.array(v, copy=True)).to(self.device, self.dtype)

    def _b(self, name: str):
        return self.w.get(name)  # biases may be absent (k_proj; a projector without bias)

    def _lin(self, name: str):
        """A linear weight in the compute dtype (an int8 one dequantized for this matmul only)."""
        if name in self.w:
            return self.w[name]
        q, scale, zero = self.int8[name]
        x = q.to(self.dtype)
        return (x - zero) * scale if zero else x * scale

    def __call__(self, features, mask):
        """features [W,128,F] (any float dtype), mask [W,F] -> rows [W, rows_for_frames(F), H] in self.dtype."""
        import torch
        import torch.nn.functional as F

        w, b = self.w, self._b
        s = self.shape
        n, _, frames = features.shape
        seq = (frames - 1) // 2 + 1
        lengths = (mask.sum(-1) - 1) // 2 + 1
        keys = torch.arange(seq, device=features.device)[None, :] < lengths[:, None]  # [W, seq]
        attend = keys[:, None, None, :]  # boolean mask for SDPA: True = attend (padded keys off)
        x = F.gelu(F.conv1d(features.to(self.dtype), w["tower.conv1.weight"], b("tower.conv1.bias"), padding=1))
        x = F.gelu(F.conv1d(x, w["tower.conv2.weight"], b("tower.conv2.bias"), stride=2, padding=1)).transpose(1, 2)
        x = x + w["tower.embed_positions.weight"][:seq]
        scale = s.hidden // s.heads
        clamp = torch.finfo(self.dtype).max - 1000 if self.dtype == torch.float16 else None
        for i in range(s.layers):
            p = f"tower.layers.{i}."
            h = F.layer_norm(x, (s.hidden,), w[p + "self_attn_layer_norm.weight"], b(p + "self_attn_layer_norm.bias"))
            q = F.linear(h, self._lin(p + "self_attn.q_proj.weight"), b(p + "self_attn.q_proj.bias")) * scale**-0.5
            k = F.linear(h, self._lin(p + "self_attn.k_proj.weight"), b(p + "self_attn.k_proj.bias"))
            v = F.linear(h, self._lin(p + "self_attn.v_proj.weight"), b(p + "self_attn.v_proj.bias"))
            q, k, v = (t.view(n, seq, s.heads, scale).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=1.0)
            a = a.transpose(1, 2).reshape(n, seq, s.hidden)
            x = x + F.linear(a, self._lin(p + "self_attn.out_proj.weight"), b(p + "self_attn.out_proj.bias"))
            h = F.layer_norm(x, (s.hidden,), w[p + "final_layer_norm.weight"], b(p + "final_layer_norm.bias"))
            h = F.gelu(F.linear(h, self._lin(p + "fc1.weight"), b(p + "fc1.bias")))
            x = x + F.linear(h, self._lin(p + "fc2.weight"), b(p + "fc2.bias"))
            if clamp is not None:
                x = x.clamp(-clamp, clamp)
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
        x = F.layer_norm(x, (s.hidden,), w["tower.layer_norm.weight"], b("tower.layer_norm.bias"))
        x = F.gelu(F.linear(x, self._lin("projector.linear_1.weight"), b("projector.linear_1.bias")))
        return F.linear(x, self._lin("projector.linear_2.weight"), b("projector.linear_2.bias"))


class _Static:
    """One captured shape: static input/output buffers and a replay callable."""

    def __init__(self, net: TorchAF3Encoder, windows: int, frames: int, mode: str, pool=None):
        import torch

        dev = net.device
        self.windows, self.frames = windows, frames
        self.features = torch.zeros(windows, N_MELS, frames, dtype=torch.float32, device=dev)
        self.mask = torch.ones(windows, frames, dtype=torch.int64, device=dev)
        if mode == "cuda":
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up outside the capture (cuBLAS handles, SDPA kernel choice)
                    net(self.features, self.mask)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
                self.out = net(self.features, self.mask)
            self.replay: Callable[[], None] = self.graph.replay
        else:  # the same buffers and copies, run eagerly: the bucketing logic without a GPU

            def replay():
                with torch.inference_mode():
                    self.out = net(self.features, self.mask)

            self.out = None
            self.replay = replay


class TorchEncoder:
    """encode(features [W,128,F], mask [W,F]) -> rows [W,F/4,H] float32, like OnnxEncoder."""

    dynamic_frames = True

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        device: str = "cuda",
        precision: str | None = None,
        graphs: bool | str = True,
        heads: int | None = None,
        max_windows: int = 20,
    ):
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        precision = precision or ("fp16" if device.startswith("cuda") else "fp32")
        dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        self.net = TorchAF3Encoder(onnx_weights(onnx_path), device=device, dtype=dtype, heads=heads)
        # what the weights take in memory (int8 ones are computed in `precision`'s dtype)
        self.precision = "int8" if self.net.int8 else precision
        self.compute = precision
        cuda = device.startswith("cuda")
        self.mode = "eager-graph" if graphs == "eager" else ("cuda" if (graphs and cuda) else "eager")
        self.name = f"torch-{'cuda' if device.startswith('cuda') else 'cpu'}"
        self.window_buckets = window_buckets(max_windows)
        self._static: dict[tuple[int, int], _Static] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.mode == "cuda" else None
        self.calls = 0
        self.captures = 0

    def prepare(self, windows: tuple[int, ...] = (1,), frames: tuple[int, ...] = FRAME_BUCKETS) -> None:
        """Capture the graphs a clip will need before the first question (full windows in the given
        window buckets; the partial-window frame buckets)."""
        if self.mode == "eager":
            return
        for w in windows:
            self._entry(bucket(w, self.window_buckets), N_FRAMES)
        for f in frames:
            self._entry(1, bucket(f, FRAME_BUCKETS))

    def _entry(self, windows: int, frames: int) -> _Static:
        key = (windows, frames)
        if key not in self._static:
            self._static[key] = _Static(
                self.net, windows, frames, "cuda" if self.mode == "cuda" else "eager", self._pool
            )
            self.captures += 1
        return self._static[key]

    def encode(self, features: np.ndarray, mask: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        import torch

        if times is not None:
            raise OptionsError(f"{self.name}: no time embedding (Music Flamingo's rows need the ONNX graph)")
        self.calls += 1
        if self.mode == "eager":
            with torch.inference_mode():
                out = self.net(
                    torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(self.net.device),
                    torch.from_numpy(np.ascontiguousarray(mask, np.int64)).to(self.net.device),
                )
            return out.float().cpu().numpy()
        return run_bucketed(features, mask, self.window_buckets, self._replay)

    def close(self) -> None:
        """Drop the captured graphs, their buffers and the weights (device memory back to torch's pool)."""
        self._static.clear()
        self._pool = None
        self.net = None

    def _replay(self, run, feats: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        st = self._entry(*run.shape)
        with torch.inference_mode():
            st.features.copy_(torch.from_numpy(feats))
            st.mask.copy_(torch.from_numpy(mask))
            st.replay()
            return st.out[: run.windows, : run.rows].float().cpu().numpy()
