"""Encoder engines against the transformers reference: the torch engine (weights read back from
encoder.onnx; CPU here, fp16 + CUDA graphs on a GPU), the bucketed paths that CUDA graphs and
ONNX Runtime's IOBinding use, and the fallback when a GPU engine cannot start."""

from __future__ import annotations

import numpy as np
import pytest

from edge_af3 import AF3
from edge_af3.bundle import open_bundle
from edge_af3.engines.buckets import FRAME_BUCKETS, plan, window_buckets
from edge_af3.engines.onnx import OnnxEncoder
from edge_af3.engines.select import EncoderChoice, forced_encoder, make_encoder
from edge_af3.engines.torch_encoder import EncoderWeightsError, TorchEncoder, onnx_weights
from edge_af3.features import extract_features

from .conftest import noise


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def valid_rows(out, feats):
    return np.concatenate([out[w, :n] for w, n in enumerate(feats.rows_per_window)])


@pytest.fixture(scope="module")
def feats45():
    return extract_features((noise(45.0, seed=81), 16000))  # a full window and a partial one


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", None), ("fp16", None)])
def test_torch_encoder_matches_reference(tiny_bundle, reference, feats45, precision, tol):
    want = valid_rows(reference.audio_rows(feats45.features, feats45.mask), feats45)
    enc = TorchEncoder(tiny_bundle / "encoder.onnx", device="cpu", precision=precision)
    got = valid_rows(enc.encode(feats45.features, feats45.mask), feats45)
    assert got.shape == want.shape == (1125, 64)
    if tol:
        assert np.abs(got - want).max() <= tol
    assert cosine(got, want) >= 0.999


def test_torch_encoder_reads_an_fp16_onnx(tiny_ckpt, tmp_path, reference, feats45):
    from edge_af3.export import export

    b = export(tiny_ckpt, tmp_path / "fp16", quant="q8_0", encoder_precision="fp16", verify=False)
    w = onnx_weights(b / "encoder.onnx")
    assert w["tower.layers.0.fc1.weight"].dtype == np.float16 and w["tower.layers.0.fc1.weight"].shape == (256, 128)
    got = valid_rows(TorchEncoder(b / "encoder.onnx", device="cpu").encode(feats45.features, feats45.mask), feats45)
    assert cosine(got, valid_rows(reference.audio_rows(feats45.features, feats45.mask), feats45)) >= 0.999


def test_torch_encoder_runs_an_int8_onnx_with_int8_weights(tiny_ckpt, tmp_path, reference, feats45):
    """`--encoder-precision int8` bundles: the linear weights stay int8 on the device (dequantized
    per matmul), the int8 convolutions become float; rows close to the reference."""
    import torch

    from edge_af3.export import export

    b = export(tiny_ckpt, tmp_path / "int8", quant="q8_0", encoder_precision="int8", verify=False)
    enc = TorchEncoder(b / "encoder.onnx", device="cpu")
    assert enc.precision == "int8" and enc.compute == "fp32"
    assert len(enc.net.int8) == 4 * 6 + 2 and all(q.dtype == torch.int8 for q, _, _ in enc.net.int8.values())
    got = valid_rows(enc.encode(feats45.features, feats45.mask), feats45)
    want = valid_rows(reference.audio_rows(feats45.features, feats45.mask), feats45)
    assert cosine(got, want) >= 0.999


def test_torch_encoder_refuses_foreign_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g), str(tmp_path / "relu.onnx"))
    with pytest.raises(EncoderWeightsError, match="lacks weights"):
        TorchEncoder(tmp_path / "relu.onnx", device="cpu")


def test_bucket_plan():
    b = window_buckets(20)
    assert b == (1, 2, 4, 8, 20)
    assert [(r.start, r.windows, r.shape, r.rows) for r in plan(3, 3000, b)] == [(0, 3, (4, 3000), 750)]
    assert [(r.start, r.windows, r.shape) for r in plan(23, 3000, b)] == [(0, 20, (20, 3000)), (20, 3, (4, 3000))]
    assert [(r.shape, r.rows) for r in plan(1, 504, b)] == [((1, 1000), 126)]
    assert [r.shape for r in plan(1, 3000, b)] == [(1, 3000)]
    assert window_buckets(4) == (1, 2, 4)
    with pytest.raises(ValueError):
        list(plan(1, 3001, b))


@pytest.mark.parametrize("windows, frames", [(1, 3000), (3, 3000), (23, 3000), (1, 504), (1, 2996), (1, 12)])
def test_bucketed_paths_give_the_plain_rows(tiny_bundle, windows, frames):
    """CUDA-graph buffers (torch, replayed eagerly here) and IOBinding buffers (ORT) padded to their
    buckets give the rows of a plain run with the input's own shape."""
    rng = np.random.default_rng(windows * 10_000 + frames)
    f = rng.standard_normal((windows, 128, frames)).astype(np.float32)
    m = np.ones((windows, frames), np.int64)
    if frames > 8:
        m[-1, frames - 4 - rng.integers(0, 3) :] = 0  # the runtime cuts a partial window 4-6 frames past its end
    plain = OnnxEncoder(tiny_bundle / "encoder.onnx")
    want = plain.encode(f, m)
    valid = int(m[-1].sum())
    keep = min(want.shape[1], (valid + 1) // 4)  # rows of valid frames (the padded tail may differ)
    graphs = TorchEncoder(tiny_bundle / "encoder.onnx", device="cpu", graphs="eager")
    bound = OnnxEncoder(tiny_bundle / "encoder.onnx", io_binding=True)
    for enc in (graphs, bound):
        got = enc.encode(f, m)
        assert got.shape == want.shape
        assert np.abs(got[:-1] - want[:-1]).max(initial=0) <= 1e-4
        assert np.abs(got[-1, :keep] - want[-1, :keep]).max() <= 1e-4
    assert graphs.captures == len({r.shape for r in plan(windows, frames, graphs.window_buckets)})
    graphs.encode(f, m)
    assert graphs.captures == len(
        {r.shape for r in plan(windows, frames, graphs.window_buckets)}
    )  # replayed, not re-captured
    assert set(FRAME_BUCKETS) >= {s[1] for s in graphs._static if s[0] == 1 and s[1] != 3000}


def test_torch_engine_answers_like_onnxruntime(tiny_bundle):
    clip = (noise(40.0, seed=83), 16000)
    with AF3.load(tiny_bundle, n_ctx=4096, exact=True) as ort_model:
        want = ort_model.ask("What do you hear?", clip, max_new_tokens=16).tokens
    with AF3.load(tiny_bundle, n_ctx=4096, exact=True, encoder_engine="torch-cpu") as m:
        assert m.encoder.name == "torch-cpu" and m.engine_choice.engine == "torch-cpu"
        assert m.ask("What do you hear?", clip, max_new_tokens=16).tokens == want


def test_gpu_engine_that_cannot_start_falls_back_with_the_reason(tiny_bundle):
    bundle = open_bundle(tiny_bundle)
    choice = EncoderChoice(
        "torch-cuda", "cuda (Test GPU)", (("tensorrt", "tensorrt is not installed"),), gpu="Test GPU"
    )
    enc, got = make_encoder(bundle, choice)
    assert enc.name == "onnxruntime-cpu" and got.engine == "onnxruntime-cpu" and got.gpu == "Test GPU"
    reasons = dict(got.skipped)
    assert reasons["tensorrt"] == "tensorrt is not installed" and "failed to start" in reasons["torch-cuda"]
    assert "torch-cuda: failed to start" in got.explain()
    assert forced_encoder("torch-cpu").engine == "torch-cpu"
    with pytest.raises(ValueError, match="unknown encoder engine"):
        forced_encoder("coreml")


def test_forced_engine_keeps_the_llm_offload_choice():
    gpu = lambda: "Test GPU"  # noqa: E731
    assert forced_encoder("onnxruntime-cpu", "auto", gpu=gpu).gpu == "Test GPU"  # the LLM still offloads
    assert forced_encoder("onnxruntime-cpu", "cpu", gpu=gpu).gpu is None
    assert forced_encoder("torch-cuda", "auto", gpu=gpu).device == "cuda (Test GPU)"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        forced_encoder("tensorrt", "auto", gpu=lambda: None)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        forced_encoder("torch-cpu", "cuda", gpu=lambda: None)


def test_failed_gpu_engines_hand_over_in_order(tiny_bundle):
    """TensorRT fails (not installed here), ONNX Runtime's CUDA provider does not start, torch sees
    no GPU: each is tried in turn, each reason kept, and ONNX Runtime on the CPU runs the encoder."""
    bundle = open_bundle(tiny_bundle)
    usable = {name: (lambda: None) for name in ("tensorrt", "onnxruntime-cuda", "torch-cuda")}
    enc, got = make_encoder(bundle, EncoderChoice("tensorrt", "cuda (Test GPU)", gpu="Test GPU"), probes=usable)
    assert enc.name == "onnxruntime-cpu" and [s[0] for s in got.skipped] == [
        "tensorrt",
        "onnxruntime-cuda",
        "torch-cuda",
    ]
    assert (
        "CUDA provider" in dict(got.skipped)["onnxruntime-cuda"] and "no CUDA device" in dict(got.skipped)["torch-cuda"]
    )
    # a forced engine does not hand over to the other GPU engines
    enc, got = make_encoder(
        bundle, EncoderChoice("tensorrt", "cuda (Test GPU)", gpu="Test GPU"), probes=usable, fallback=False
    )
    assert [s[0] for s in got.skipped] == ["tensorrt"]


def test_bucketed_results_do_not_alias_the_engine_buffers(tiny_bundle):
    """Engines reuse their bound output buffers: what encode returned must survive the next call
    (the runtime keeps earlier chunks of a clip while later ones are encoded)."""
    rng = np.random.default_rng(9)
    inputs = [(rng.standard_normal((1, 128, 3000)).astype(np.float32), np.ones((1, 3000), np.int64)) for _ in range(2)]
    for enc in (
        OnnxEncoder(tiny_bundle / "encoder.onnx", io_binding=True),
        TorchEncoder(tiny_bundle / "encoder.onnx", device="cpu", graphs="eager"),
    ):
        first = enc.encode(*inputs[0])
        kept = first.copy()
        second = enc.encode(*inputs[1])
        assert np.array_equal(first, kept) and not np.shares_memory(first, second)
