"""The GPU path's CPU-testable parts: engine selection, TensorRT engine cache keying and
staleness, the memory planner. (The GPU measurements themselves carry the `gpu` marker and run
through scripts/gpu_checks.sh on a CUDA machine.)"""

from __future__ import annotations

import json

import pytest

from edge_af3.engines.select import choose_encoder
from edge_af3.engines.trt_cache import EngineKey, lookup, store
from edge_af3.plan import llm_shape, plan

from .conftest import run_cli


def probes(**reasons):
    return {
        name: (lambda r=reasons.get(name.replace("-", "_")): r)
        for name in ("tensorrt", "onnxruntime-cuda", "torch-cuda")
    }


def test_engine_selection_order_and_reasons():
    no_gpu = choose_encoder("auto", gpu=lambda: None)
    assert no_gpu.engine == "onnxruntime-cpu" and "no CUDA GPU" in no_gpu.explain() and no_gpu.gpu is None
    with pytest.raises(ValueError, match="no CUDA GPU"):
        choose_encoder("cuda", gpu=lambda: None)
    every = {"onnxruntime-cpu", "tensorrt", "onnxruntime-cuda", "torch-cuda"}
    best = choose_encoder("cuda", gpu=lambda: "NVIDIA H100", probes=probes(), implemented=every)
    assert best.engine == "tensorrt" and best.device == "cuda (NVIDIA H100)" and best.skipped == ()
    c = choose_encoder(
        "auto", gpu=lambda: "Orin", probes=probes(tensorrt="tensorrt is not installed"), implemented=every
    )
    assert c.engine == "onnxruntime-cuda" and c.skipped == (("tensorrt", "tensorrt is not installed"),)
    c = choose_encoder(
        "auto", gpu=lambda: "Orin", probes=probes(tensorrt="no trt", onnxruntime_cuda="no ep"), implemented=every
    )
    assert c.engine == "torch-cuda" and [s[0] for s in c.skipped] == ["tensorrt", "onnxruntime-cuda"]
    # a usable engine this version cannot run yet is skipped with that reason, never picked
    c = choose_encoder(
        "auto",
        gpu=lambda: "Orin",
        probes=probes(onnxruntime_cuda="no ep", torch_cuda="no cuda"),
        implemented={"onnxruntime-cpu", "onnxruntime-cuda"},
    )
    assert c.engine == "onnxruntime-cpu" and "no engine for it yet" in dict(c.skipped)["tensorrt"]
    assert c.gpu == "Orin"  # the LLM still offloads when the encoder stays on the CPU
    c = choose_encoder("cuda", gpu=lambda: "Orin", probes=probes(tensorrt="a", onnxruntime_cuda="b", torch_cuda="c"))
    assert c.engine == "onnxruntime-cpu" and dict(c.skipped) == {
        "tensorrt": "a",
        "onnxruntime-cuda": "b",
        "torch-cuda": "c",
    }
    assert choose_encoder("cpu").engine == "onnxruntime-cpu"
    with pytest.raises(ValueError, match="unknown device"):
        choose_encoder("tpu")


def test_trt_engine_cache_keying_and_staleness(tmp_path):
    key = EngineKey("ab" * 32, "10.7.0", "Orin", "8.7", "fp16", (1, 2, 4, 8, 20))
    assert lookup(tmp_path, key) == (None, ["no engine built yet"])
    plan_path = store(tmp_path, key, b"engine-bytes")
    assert lookup(tmp_path, key) == (plan_path, [])
    assert EngineKey("ab" * 32, "10.7.0", "Orin", "8.7", "fp16", (1, 2, 4, 8, 20)).digest() == key.digest()
    for changed, field in [
        (dict(tensorrt="10.8.0"), "tensorrt"),
        (dict(gpu="RTX 4090", compute_capability="8.9"), "gpu"),
        (dict(precision="int8"), "precision"),
        (dict(onnx_sha256="cd" * 32), "onnx_sha256"),
        (dict(buckets=(1, 4, 20)), "buckets"),
    ]:
        other = EngineKey(**{**key.__dict__, **changed})
        assert other.digest() != key.digest()
        found, reasons = lookup(tmp_path, other)
        assert found is None and len(reasons) == 1 and "stale" in reasons[0] and field in reasons[0]
    # a corrupt plan (same size, other bytes) is refused
    plan_path.write_bytes(b"engine-bytez")
    found, reasons = lookup(tmp_path, key)
    assert found is None and "corrupt" in reasons[0]
    # storing a new engine replaces the stale ones
    newer = EngineKey(**{**key.__dict__, "tensorrt": "10.8.0"})
    store(tmp_path, newer, b"new")
    assert sorted(p.name for p in (tmp_path / ".engines").iterdir()) == sorted(
        [f"encoder-{newer.digest()}.plan", f"encoder-{newer.digest()}.json"]
    )


def _llama_reported_mib(gguf, n_ctx: int, kv_type: str) -> dict:
    """The buffer sizes llama.cpp itself logs when it creates a context (a fresh process, verbose)."""
    import re
    import subprocess
    import sys

    code = (
        "import sys; from edge_af3.engines.llamacpp import LlamaEngine; "
        "LlamaEngine(sys.argv[1], n_ctx=int(sys.argv[2]), kv_type=sys.argv[3], verbose=True).close()"
    )
    err = subprocess.run(
        [sys.executable, "-c", code, str(gguf), str(n_ctx), kv_type], capture_output=True, text=True, check=True
    ).stderr
    got = {}
    for key, pattern in (
        ("kv", r"KV buffer size =\s+([\d.]+) MiB"),
        ("compute", r"compute buffer size =\s+([\d.]+) MiB"),
        ("weights", r"model buffer size =\s+([\d.]+) MiB"),
    ):
        m = re.search(pattern, err)
        assert m, f"llama.cpp did not report its {key} buffer: {err[-1500:]}"
        got[key] = float(m.group(1)) * 2**20
    return got


def test_memory_planner(tiny_bundle):
    """The plan against what llama.cpp itself reports allocating for the same context."""
    shape = llm_shape(tiny_bundle / "llm-f32.gguf")
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv, shape.n_vocab) == (2, 64, 2, 1, 151672)
    for kv in ("f16", "q8_0"):
        p = plan(tiny_bundle, n_ctx=8192, kv_type=kv, target="orin-nano-8gb")
        real = _llama_reported_mib(tiny_bundle / "llm-f32.gguf", 8192, kv)
        assert abs(p["items"]["KV cache"] - real["kv"]) <= 0.01 * real["kv"], (kv, p["items"]["KV cache"], real)
        assert 0.8 * real["compute"] <= p["items"]["LLM compute buffer (est.)"] <= 1.3 * real["compute"], real
        # the planner counts the whole GGUF file: the weights llama.cpp maps plus the tokenizer's metadata
        assert real["weights"] <= p["items"]["llm weights"] <= 1.1 * real["weights"]
    onnx = (tiny_bundle / "encoder.onnx").stat().st_size
    assert p["encoder_precision"] == "fp16" and p["items"]["encoder weights"] == onnx // 2
    assert p["total"] == sum(p["items"].values()) and p["target"]["fits"]
    with pytest.raises(ValueError, match="unknown target"):
        plan(tiny_bundle, target="pdp-11")
    res = run_cli("plan", str(tiny_bundle), "--target", "rtx-4090", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["target"]["fits"] is True


def test_tensorrt_engine_cache_builds_checks_and_reuses(tiny_bundle, tmp_path, monkeypatch):
    """The TensorRT engine's cache flow without TensorRT: built once, reused, rebuilt when the
    TensorRT version changes (with the reason), never stored when its self-check fails; a
    read-only bundle keeps its engines in the user cache."""
    import os
    import shutil

    from edge_af3.bundle import open_bundle
    from edge_af3.engines.tensorrt import Device, cache_root, cached_plan, engine_key

    b = open_bundle(shutil.copytree(tiny_bundle, tmp_path / "b"))
    dev = Device("NVIDIA H100 80GB HBM3", "9.0")
    key = engine_key(b, "10.13.0", dev)
    assert key.onnx_sha256 == b.manifest["files"]["encoder.onnx"]["sha256"] and key.compute_capability == "9.0"
    assert key.buckets[:5] == ("w1", "w2", "w4", "w8", "w20") and "f500" in key.buckets
    builds = []

    def build():
        builds.append(1)
        return b"plan-%d" % len(builds)

    root = cache_root(b)
    assert root == b.path
    assert cached_plan(root, key, build) == (b"plan-1", ["no engine built yet"])
    assert cached_plan(root, key, build) == (b"plan-1", []) and len(builds) == 1
    newer = engine_key(b, "10.14.1", dev)
    data, reasons = cached_plan(root, newer, build)
    assert data == b"plan-2" and "tensorrt 10.13.0 -> 10.14.1" in reasons[0]

    def bad_check(_):
        raise RuntimeError("the new TensorRT engine disagrees")

    other = engine_key(b, "11.0.0", dev)
    with pytest.raises(RuntimeError, match="disagrees"):
        cached_plan(root, other, build, bad_check)
    assert cached_plan(root, newer, build) == (b"plan-2", [])  # the failed build replaced nothing

    monkeypatch.setenv("EDGE_AF3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only bundle (root may write anywhere)
    assert cache_root(b) == tmp_path / "cache" / "engines" / key.onnx_sha256[:16]


def test_ask_and_chat_dry_run_print_the_plan(tiny_bundle):
    """--dry-run: the memory budget for the settings given, for the engine this machine would use
    (here ONNX Runtime on the CPU: stored precision, one window per run); nothing is loaded."""
    res = run_cli("ask", "--dry-run", "--json", "-m", str(tiny_bundle), "--n-ctx", "4096", "--kv", "q8_0")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)
    assert (p["n_ctx"], p["kv_type"], p["encoder_precision"], p["windows_per_run"]) == (4096, "q8_0", "fp32", 1)
    assert p["total"] == sum(p["items"].values())
    res = run_cli("chat", "--dry-run", "-m", str(tiny_bundle))
    assert res.returncode == 0 and "KV cache" in res.stdout and "total" in res.stdout
    res = run_cli("ask", "--dry-run", "-m", str(tiny_bundle), "--device", "cuda")
    assert res.returncode == 1 and "no CUDA GPU" in res.stderr
