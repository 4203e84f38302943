"""On a CUDA machine only (`pytest -m gpu`, run by scripts/gpu_checks.sh; deselected on CPU CI)."""

from __future__ import annotations

import pytest

from .conftest import noise

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def f16_bundle(tiny_ckpt, tmp_path_factory):
    from edge_af3.export import export

    return export(tiny_ckpt, tmp_path_factory.mktemp("gpu") / "f16", quant="f16", verify=False)


def test_gpu_greedy_tokens_match_cpu(f16_bundle):
    """The tiny model with an F16 GGUF: all layers offloaded to CUDA give the CPU runtime's tokens."""
    import llama_cpp

    from edge_af3 import AF3

    assert llama_cpp.llama_supports_gpu_offload(), "this llama-cpp-python build has no GPU offload"
    clip = (noise(10.0, seed=4), 16000)
    with AF3.load(f16_bundle, device="cpu", kv_type="f32", flash_attn=False) as cpu:
        want = cpu.ask(clip, "Describe it.", max_new_tokens=32).tokens
    with AF3.load(f16_bundle, device="cuda", kv_type="f32", flash_attn=False) as gpu:
        assert gpu.llm.n_gpu_layers > 0
        got = gpu.ask(clip, "Describe it.", max_new_tokens=32).tokens
    assert got == want
