"""Audio tower + pooling + final LayerNorm + projector -> encoder.onnx.

Inputs `input_features` [N,128,F] float32 and `input_features_mask` [N,F] int64, F <= 3000 frames;
output `audio_rows` [N,F/4,H] float32 (a full window gives 750 rows; the runtime keeps the valid
ones). Dynamic N and F: the runtime cuts a clip's last, partial window just past its valid frames
(a 5 s clip runs 1/6 of a window's work). Opset 17 (LayerNorm as one op so TensorRT can keep it in
fp32).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from pathlib import Path

import torch

from ..constants import N_FRAMES, N_MELS, ROWS_PER_WINDOW
from ..family import row_times
from ..onnx_tools import resave, to_fp16, write
from ..quants import CPU_ENCODER_GRAPHS, ENCODER_PRECISIONS

OPSET = 17
INPUTS = ("input_features", "input_features_mask")
TIMES = "audio_times"  # [N, F/4] float32: the rows' seconds from the clip's start (time-embedding graphs)
OUTPUT = "audio_rows"
EXTERNAL_BYTES = 1_800_000_000  # above this the weights go to `<file>.data` (protobuf's limit is 2 GB)


def load_encoder(ckpt: Path):
    """Audio tower (+ the time embedding of musicflamingo checkpoints) + projector of a checkpoint,
    alone (the LLM is never loaded), fp32, eval. The modules are made without storage (meta) and
    take the checkpoint's tensors as they are read, so the weights are held once."""
    from transformers import AutoConfig
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
        AudioFlamingo3Encoder,
        AudioFlamingo3MultiModalProjector,
    )

    from .tensors import iter_names

    cfg = AutoConfig.from_pretrained(str(ckpt))
    cfg.audio_config._attn_implementation = "eager"
    time_embedding = None
    if cfg.model_type == "musicflamingo":
        from transformers.models.musicflamingo.modeling_musicflamingo import MusicFlamingoRotaryEmbedding

        time_embedding = TimeEmbedding(MusicFlamingoRotaryEmbedding(cfg), cfg.audio_frame_step)
    with torch.device("meta"):
        tower, projector = AudioFlamingo3Encoder(cfg.audio_config), AudioFlamingo3MultiModalProjector(cfg)
    wrapper = _Wrapper(tower, projector, time_embedding)
    state = {}
    for name, shard in iter_names(ckpt):
        key = name.removeprefix("model.")
        for prefix, ours in (("audio_tower.", "tower."), ("multi_modal_projector.", "projector.")):
            if key.startswith(prefix):
                state[ours + key[len(prefix) :]] = shard.get(name).to(torch.float32)
    missing, unexpected = wrapper.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(wrapper.named_parameters()) + list(wrapper.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise ValueError(
            f"{ckpt}: encoder weights do not match the config (missing {(missing or left)[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return wrapper.float().eval()


def per_head_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention, one head at a time: the same arithmetic, but ONNX Runtime's
    planner then holds one head's [T, T] scores instead of all heads' (measured on bench-small:
    activation peak 257 -> 83 MB per window, and no slower). Used for the CPU graphs (int8,
    mixed) and for fp32 exported without a CUDA GPU (`quants.resolve_encoder_attention`); fp16,
    and fp32 for a GPU, keep the batched form that GPU builders fuse."""
    outs = []
    for h in range(query.shape[1]):
        w = torch.matmul(query[:, h : h + 1], key[:, h : h + 1].transpose(2, 3))
        if scaling not in (None, 1.0):
            w = w * scaling
        if attention_mask is not None:
            w = w + attention_mask
        outs.append(torch.matmul(torch.nn.functional.softmax(w, dim=-1), value[:, h : h + 1]))
    return torch.cat(outs, 1).transpose(1, 2).contiguous(), None


PER_HEAD = "edge_af3_per_head"


@contextlib.contextmanager
def _attention(wrapper, impl: str):
    """The encoder layers' attention implementation set to `impl` for the duration."""
    from transformers import AttentionInterface

    if impl == PER_HEAD:
        AttentionInterface.register(PER_HEAD, per_head_attention)
    configs = {id(layer.self_attn.config): layer.self_attn.config for layer in wrapper.tower.layers}
    before = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = impl
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


class TimeEmbedding(torch.nn.Module):
    """Music Flamingo's rotary time embedding on the encoder's pooled, normed rows, as transformers'
    `MusicFlamingoRotaryEmbedding` + `apply_rotary_time_emb` compute it, for rows given with their
    times: `times` [N, T] = seconds from the clip's start of each row (window w, row t: 30 w +
    0.04 t). The window axis is round(first time / 30 s); the time axis the row's index in its
    window. Rows of a window cut short (T < 750) are those of the padded window: a window always
    lasts 750 rows here, as the processor pads every window to 30 s."""

    def __init__(self, rotary, frame_step: float):
        super().__init__()
        self.inv_freq = rotary.inv_freq
        self.position_angles = rotary._compute_position_angles(rotary.inv_freq)
        self.max_positions = rotary.max_seq_len_cached
        self.window_seconds = frame_step * 4 * ROWS_PER_WINDOW
        self.row_seconds = frame_step * 4

    def forward(self, hidden, times):
        n, t = hidden.shape[0], hidden.shape[1]
        window = torch.round(times[:, 0] / self.window_seconds) / self.max_positions
        window_freqs = window[:, None] * self.inv_freq
        window_freqs = torch.stack((window_freqs, window_freqs), -1).reshape(n, 1, -1)  # repeat_interleave(2)
        time_freqs = self.position_angles[:t][None]
        freqs = torch.cat((window_freqs.expand(n, t, -1), time_freqs.expand(n, t, -1)), -1)
        freqs = freqs * (-times * 2 * math.pi)[..., None]
        cos, sin = freqs.cos(), freqs.sin()
        rot = cos.shape[-1]
        x = hidden[..., :rot]
        pairs = x.reshape(n, t, rot // 2, 2)
        half = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).reshape(n, t, rot)  # rotate_half, interleaved
        return torch.cat((x * cos + half * sin, hidden[..., rot:]), -1)


class _Wrapper(torch.nn.Module):
    def __init__(self, tower, projector, time_embedding=None):
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.time_embedding = time_embedding

    def forward(self, input_features, input_features_mask, audio_times=None):
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
        hidden = t.layer_norm(t.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1))
        if self.time_embedding is not None:
            hidden = self.time_embedding(hidden, audio_times)
        return self.projector(hidden)  # [N, seq_len // 2, H]


PRECISIONS = ENCODER_PRECISIONS
# mixed: int8 (ONNX Runtime's dynamic quantization, one scale per output channel) on the first
# matmul of every layer's feed-forward block (fc1), fp32 everywhere else. Measured on bench-small
# (benchmarks/bench_cpu.py): 1.2x fp32's speed per window at rows cosine 0.99993 vs fp32; all
# linear layers int8 is 1.6x at 0.9995, and every wider selection tried fell under 0.9999.
MIXED_NODES = re.compile(r"/fc1/MatMul$")


def export_encoder(wrapper, out: Path, *, precision: str = "fp32", per_head: bool | None = None) -> Path:
    """Write `out` from `load_encoder(...)`; weights above 2 GB go to one `<out>.data` file beside it.
    per_head: attention one head at a time (default: for the CPU graphs, int8 and mixed; `export()`
    decides it for fp32 too, by `quants.resolve_encoder_attention`)."""
    with _work(out) as work:
        raw, shape = trace_encoder(wrapper, work, precision=precision, per_head=per_head)
        return finish_encoder(raw, out, precision=precision, shape=shape)


def export_checkpoint_encoder(ckpt: Path, out: Path, *, precision: str, per_head: bool | None = None) -> Path:
    """`export_encoder(load_encoder(ckpt), out)`, the PyTorch modules dropped once traced: ONNX
    Runtime's quantizer and the re-save then run without the weights held a second time."""
    import gc

    with _work(out) as work:
        wrapper = load_encoder(ckpt)
        raw, shape = trace_encoder(wrapper, work, precision=precision, per_head=per_head)
        del wrapper
        gc.collect()
        return finish_encoder(raw, out, precision=precision, shape=shape)


@contextlib.contextmanager
def _work(out: Path):
    """A scratch folder beside `out` (torch writes one file per tensor when the graph is large),
    removed whatever happens."""
    import shutil

    work = out.parent / f".{out.name}.work"
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def trace_encoder(wrapper, work: Path, *, precision: str, per_head: bool | None = None) -> tuple[Path, tuple[int, int]]:
    """torch's ONNX export of `wrapper` into `work`; returns (graph, (parameters, encoder layers))."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown encoder precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    feats = torch.zeros(2, N_MELS, N_FRAMES)
    mask = torch.ones(2, N_FRAMES, dtype=torch.int64)
    mask[1, 1000:] = 0
    args, names = (feats, mask), list(INPUTS)
    axes = {INPUTS[0]: {0: "windows", 2: "frames"}, INPUTS[1]: {0: "windows", 1: "frames"}}
    if wrapper.time_embedding is not None:
        args, names = args + (torch.from_numpy(row_times(0, 2)),), names + [TIMES]
        axes[TIMES] = {0: "windows", 1: "rows"}
    n_params = sum(p.numel() for p in wrapper.parameters())
    raw = work / "encoder.onnx"
    impl = PER_HEAD if (precision in CPU_ENCODER_GRAPHS if per_head is None else per_head) else "eager"
    with torch.inference_mode(), _attention(wrapper, impl):
        torch.onnx.export(
            wrapper,
            args,
            str(raw),
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes=axes | {OUTPUT: {0: "windows", 1: "rows"}},
            opset_version=OPSET,
            dynamo=False,
            external_data=n_params * 4 > EXTERNAL_BYTES,
        )
    return raw, (n_params, len(wrapper.tower.layers))


def finish_encoder(raw: Path, out: Path, *, precision: str, shape: tuple[int, int]) -> Path:
    """The traced fp32 graph `raw` as `out` in `precision` (quantized or halved, weights re-saved
    inline or in one `<out>.data`)."""
    n_params, n_layers = shape
    large = n_params * 4 > EXTERNAL_BYTES
    work = raw.parent
    if precision == "fp32":
        resave(raw, out, large)
    elif precision == "fp16":
        to_fp16(raw, out, n_params * 2 > EXTERNAL_BYTES)
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = work / "encoder.int8.onnx"
        with _quiet_quantizer():
            quantize_dynamic(str(raw), str(q), weight_type=QuantType.QInt8, use_external_data_format=large)
        resave(q, out, n_params > EXTERNAL_BYTES)
    else:
        quantize_mixed(raw, out, n_layers=n_layers, external=n_params * 3 > EXTERNAL_BYTES)
    return out


def quantize_mixed(src: Path, dst: Path, *, n_layers: int, external: bool) -> Path:
    """`src` with int8 (per-channel weights, dynamic activations) on each layer's fc1 matmul only,
    written to `dst`. ONNX Runtime's dynamic quantizer runs on a model made of those matmuls alone
    (their weights are all it reads), and what it makes of each one takes that matmul's place in the
    whole graph: ONNX Runtime quantizing the whole graph held it three times (8.1 GB for AF3's
    encoder); this holds the graph's weights once, when `dst` is written. The same nodes and
    initializers as the whole-graph run (tests/test_export_memory.py checks it)."""
    import tempfile

    import onnx
    from onnx import external_data_helper, helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    targets = [n for n in graph.node if n.op_type == "MatMul" and MIXED_NODES.search(n.name)]
    inits = {t.name: t for t in graph.initializer}
    if len(targets) != n_layers or any(n.input[1] not in inits for n in targets):
        raise ValueError(
            f"{src}: found {len(targets)} fc1 matmuls for {n_layers} encoder layers (graph names changed?)"
        )
    weights = []
    for n in targets:
        w = onnx.TensorProto()
        w.CopyFrom(inits[n.input[1]])
        if external_data_helper.uses_external_data(w):
            external_data_helper.load_external_data_for_tensor(w, str(src.parent))
            w.data_location = onnx.TensorProto.DEFAULT
            del w.external_data[:]
        weights.append(w)
    float_info = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)  # noqa: E731
    mini = helper.make_model(
        helper.make_graph(
            list(targets),
            "fc1",
            [float_info(n.input[0]) for n in targets],
            [float_info(n.output[0]) for n in targets],
            initializer=weights,
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    del weights
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".mixed.") as tmp:
        plain, quantized = Path(tmp) / "fc1.onnx", Path(tmp) / "fc1.int8.onnx"
        onnx.save_model(mini, str(plain), save_as_external_data=True, location="fc1.onnx.data")
        del mini
        with _quiet_quantizer():
            quantize_dynamic(
                str(plain),
                str(quantized),
                weight_type=QuantType.QInt8,
                per_channel=True,
                nodes_to_quantize=[n.name for n in targets],
                use_external_data_format=True,
            )
        q = onnx.load(str(quantized))
    # each matmul's replacement nodes, found by the activation they start from
    owner = {n.input[0]: n.name for n in targets}
    made: dict[str, list] = {n.name: [] for n in targets}
    for node in q.graph.node:
        group = next((owner[i] for i in node.input if i in owner), None)
        if group is None:
            raise ValueError(f"{src}: the quantizer made {node.name} from no fc1 input")
        made[group].append(node)
        for o in node.output:
            owner[o] = group
    odd = [k for k, group in made.items() if [n.op_type for n in group].count("MatMulInteger") != 1]
    if odd or any(a.type == onnx.AttributeProto.GRAPH for n in graph.node for a in n.attribute):
        raise ValueError(
            f"{src}: the quantizer did not make one MatMulInteger of {odd[:3]} (or the graph has subgraphs)"
        )
    nodes = []
    for node in graph.node:
        nodes.extend(made[node.name] if node.name in made else [node])
    used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    clash = {t.name for t in kept} & {t.name for t in q.graph.initializer}
    if clash:
        raise ValueError(f"{src}: quantized initializers would replace the graph's own: {sorted(clash)[:3]}")
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + [t for t in q.graph.initializer if t.name in used])
    domains = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in q.opset_import if o.domain not in domains)
    external_data_helper.load_external_data_for_model(model, str(src.parent))
    write(model, dst, external)
    return dst


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer advises its pre-processing on the root logger (it would only change
    shape annotations here); keep that line out of the export's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
