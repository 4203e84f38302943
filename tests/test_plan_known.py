"""`plan` for the published AF3 without downloading it: its known shapes against an independent
count from the reference's `full` shape, and the real command offline with an empty Hub cache."""

from __future__ import annotations

import json

import pytest

from edge_af3.plan import KNOWN_MODELS, plan_known

from .conftest import run_cli

AF3_ID = "nvidia/audio-flamingo-3-hf"


def test_known_shapes_agree_with_the_reference_shape():
    from edge_af3.constants import VOCAB_SIZE
    from edge_af3.reference.tiny import SHAPES

    full, known = SHAPES["full"], KNOWN_MODELS[AF3_ID]
    h, ffn, kv = full.llm_hidden, full.llm_ffn, full.llm_hidden // full.llm_heads * full.llm_kv_heads
    llm = 2 * VOCAB_SIZE * h + full.llm_layers * (2 * h * h + 2 * h * kv + 3 * h * ffn)
    e = full.enc_hidden
    enc = full.enc_layers * (4 * e * e + 2 * e * full.enc_ffn) + 128 * e * 3 + e * e * 3 + 1500 * e
    enc += e * h + h * h  # the projector
    assert known["llm_params"] == pytest.approx(llm, rel=0.01)
    assert known["encoder_params"] == pytest.approx(enc, rel=0.01)
    s = known["llm"]
    assert (s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff) == (
        full.llm_layers,
        h,
        full.llm_heads,
        full.llm_kv_heads,
        ffn,
    )
    p = plan_known(AF3_ID, "q4_k_m", n_ctx=16384, kv_type="f16")
    assert p["items"]["KV cache"] == 2 * 28 * 16384 * 4 * 128 * 2  # 0.875 GiB
    assert 4.5e9 < p["items"]["llm weights"] < 4.9e9  # Qwen2.5-7B Q4_K_M is 4.68 GB


def test_plan_the_real_af3_offline_without_a_model(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "EDGE_AF3_MODEL": ""}
    res = run_cli("plan", "--target", "orin-nano-8gb", "--json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    p = json.loads(res.stdout)
    assert p["bundle"].startswith(AF3_ID) and "nothing downloaded" in p["bundle"]
    assert p["llm"]["n_layer"] == 28 and p["target"]["name"] == "orin-nano-8gb"
    text = run_cli("plan", "--n-ctx", "8192", "--kv", "q8_0", env=env)
    assert text.returncode == 0 and "q4_k_m GGUF (estimated)" in text.stdout, text.stderr[-2000:]
    assert "this machine" in text.stdout and not list((tmp_path / "hf").rglob("*.safetensors"))


@pytest.mark.parametrize(
    ("model_id", "n_ctx", "rows"),
    [("nvidia/music-flamingo-2601-hf", 31744, 30000), ("nvidia/audio-flamingo-next-hf", 47104, 45000)],
)
def test_plan_the_longer_models_offline(tmp_path, model_id, n_ctx, rows):
    """Music Flamingo and AF-Next: the context holds their longest clip (40 / 60 windows) by
    default, the KV cache and the audio rows counted at that length; without flash attention
    (the CPU default) the attention scores of one ubatch over it are counted too."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = run_cli("plan", model_id, "--device", "cpu", "--json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    p = json.loads(res.stdout)
    assert p["n_ctx"] == n_ctx and p["items"]["KV cache"] == 2 * 28 * n_ctx * 4 * 128 * 2
    assert p["items"]["audio rows"] == rows * 3584 * 4
    assert p["items"]["attention scores (no flash attention)"] == 512 * n_ctx * 28 * 4
    gpu = json.loads(run_cli("plan", model_id, "--target", "agx-orin-64gb", "--json", env=env).stdout)
    assert "attention scores (no flash attention)" not in gpu["items"]
