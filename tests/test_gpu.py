"""On a CUDA machine only (`pytest -m gpu`, run by scripts/gpu_checks.sh; deselected on CPU CI)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import noise

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def f16_bundle(tiny_ckpt, tmp_path_factory):
    from edge_af3.export import export

    return export(
        tiny_ckpt, tmp_path_factory.mktemp("gpu") / "f16", quant="f16", encoder_precision="fp32", verify=False
    )


def test_gpu_greedy_tokens_match_cpu(f16_bundle):
    """The tiny model with an F16 GGUF: all layers offloaded to CUDA give the CPU runtime's tokens."""
    import llama_cpp

    from edge_af3 import AF3

    assert llama_cpp.llama_supports_gpu_offload(), "this llama-cpp-python build has no GPU offload"
    clip = (noise(10.0, seed=4), 16000)
    with AF3.load(f16_bundle, device="cpu", exact=True) as cpu:
        want = cpu.ask("Describe it.", clip, max_new_tokens=32).tokens
    # the LLM on CUDA, the same fp32 encoder rows as on the CPU: llama.cpp's CUDA path alone
    with AF3.load(f16_bundle, device="cuda", exact=True, encoder_engine="onnxruntime-cpu") as gpu:
        assert gpu.llm.n_gpu_layers > 0
        got = gpu.ask("Describe it.", clip, max_new_tokens=32).tokens
    assert got == want


def test_torch_cuda_encoder_rows_match_reference(tiny_bundle, reference):
    """fp16 + CUDA graphs against the fp32 reference; a second call replays the same graphs."""
    from edge_af3.engines.torch_encoder import TorchEncoder
    from edge_af3.features import extract_features

    feats = extract_features((noise(45.0, seed=8), 16000))
    want = reference.audio_rows(feats.features, feats.mask)
    enc = TorchEncoder(tiny_bundle / "encoder.onnx", device="cuda")
    assert enc.mode == "cuda" and enc.precision == "fp16"
    got = enc.encode(feats.features[:1], feats.mask[:1])
    a, b = got[0].ravel(), want[0].ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.999
    captures = enc.captures
    again = enc.encode(feats.features[:1], feats.mask[:1])
    assert enc.captures == captures and np.array_equal(again, got)


def test_cuda_engine_choice_and_answers(f16_bundle):
    from edge_af3 import AF3

    clip = (noise(40.0, seed=5), 16000)
    with AF3.load(f16_bundle, device="cpu", exact=True) as cpu:
        want = cpu.ask("Describe it.", clip, max_new_tokens=24).tokens
    with AF3.load(f16_bundle, device="cuda", exact=True) as gpu:
        assert gpu.encoder.name in ("tensorrt", "onnxruntime-cuda", "torch-cuda"), gpu.engine_choice.explain()
        assert gpu.overlap and gpu.windows_per_run == 4
        got = gpu.ask("Describe it.", clip, max_new_tokens=24).tokens
    assert got == want


def test_music_flamingo_rows_on_onnx_runtime_cuda(tmp_path):
    """A time-embedding bundle on a GPU: ONNX Runtime CUDA (bound buffers, CUDA graphs) is chosen
    and its rows for a 47 s clip match transformers' (cosine; TF32 may round the fp32 graph)."""
    from edge_af3 import AF3
    from edge_af3.export import export
    from edge_af3.reference.loader import load_reference
    from edge_af3.reference.tiny import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "mf", shape="tiny", seed=3, arch="musicflamingo")
    bundle = export(ckpt, tmp_path / "mfb", quant="f32", encoder_precision="fp32", verify=False)
    x = noise(47.0, seed=47)
    want = load_reference(ckpt).clip_rows(x)
    with AF3.load(bundle, device="cuda") as gpu:
        assert gpu.encoder.name == "onnxruntime-cuda", gpu.engine_choice.explain()
        got = gpu.audio_rows((x, 16000))
    a, b = got.ravel(), want.ravel()
    assert got.shape == want.shape and a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.9999
