"""Benchmarks run inside the test suite as smoke runs on `tiny`: the suite (every peer, two clips,
one repeat) and the encoder-engine comparison. They check outputs, audio token counts and
parity, never a timing."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_af3.cpu_features import read_cpu
from edge_af3.quants import resolve_encoder_precision


def test_suite_smoke_on_tiny(tiny_ckpt, tmp_path):
    from benchmarks.suite import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_ckpt, work / "tiny-seed0")  # the suite reuses a checkpoint it finds
    report = main(
        [
            "--shape",
            "tiny",
            "--clips",
            "5",
            "30",
            "--repeats",
            "1",
            "--new-tokens",
            "4",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    peers = report["peers"]
    assert set(peers) == {"edge-af3", "reference", "mtmd", "raw"}
    tokens = {
        p: {s: c["audio_tokens"]["median"] for s, c in peers[p]["clips"].items()}
        for p in ("edge-af3", "reference", "mtmd")
    }
    assert tokens["edge-af3"] == tokens["reference"] == {"5": 125, "30": 750}
    assert tokens["mtmd"] == {"5": 750, "30": 1500}  # llama.cpp's own AF3 path: no padding mask, extra window
    for p in peers.values():  # measured (no sign or size of a timing is asserted)
        assert p["decode_tok_s"]["n"] >= 1 and p["peak_rss_mb"] is not None
    stem = tmp_path / "out" / "suite-tiny-cpu"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert {g["goal"] for g in saved["goals"]} >= {
        "TTFT 30 s vs reference (>= 2x)",
        "peak RSS through 30 s vs mtmd's (<= 1x)",
        "decode vs raw llama.cpp (>= 0.95x)",
    }
    assert saved["quant"] == "iq4_nl" and saved["encoder"] == resolve_encoder_precision("auto")  # this machine's auto
    for p in ("edge-af3", "reference", "mtmd"):  # a peak was read after each clip
        assert all(peers[p]["clips"][c]["peak_rss_mb"] > 50 for c in ("5", "30"))
    table = stem.with_suffix(".md").read_text()
    assert "| 30 s | mtmd | 1500 |" in table and "decode tok/s" in table
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c30 = peers["edge-af3"]["clips"]["30"]
    assert "followup_ttft_ms" in c30  # the second question about the same clip was measured

    from benchmarks.bench_encoder import main as encoder_main

    enc = encoder_main(
        [
            "--shape",
            "tiny",
            "--windows",
            "1",
            "3",
            "--repeats",
            "1",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert set(enc["peers"]) == {"transformers float32", "onnxruntime-cpu", "torch-cpu"}
    for name in ("onnxruntime-cpu", "torch-cpu"):
        assert enc["peers"][name]["cosine"] >= 0.9999 and enc["peers"][name]["max_abs"] <= 1e-4
        assert set(enc["peers"][name]["timing"]) == {"1", "3"}
    assert "| torch-cpu |" in (tmp_path / "out" / "encoder-tiny-cpu.md").read_text()


def test_cpu_levers_benchmark_smoke_on_tiny(tiny_ckpt, tmp_path):
    from benchmarks.bench_cpu import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_ckpt, work / "tiny-seed0")
    report = main(
        [
            "--shape",
            "tiny",
            "--sections",
            "encoder",
            "overlap",
            "memory",
            "--repeats",
            "1",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    enc = report["sections"]["encoder"]
    mixed = enc["mixed precision (int8 fc1 only, one head at a time)"]
    assert enc["fp32"]["cosine_vs_fp32"] == [1.0, 1.0] or min(enc["fp32"]["cosine_vs_fp32"]) > 0.999999
    assert 0.999 < min(mixed["cosine_vs_fp32"]) < 1.0 and mixed["session_mb"] is not None  # quantized: close, not equal
    assert set(report["sections"]["overlap"]) == {"overlap off", "overlap on"}
    stages = [r["stage"] for r in report["sections"]["memory"]["stages"]]
    assert stages[0] == "python + numpy" and stages[-1] == "closed"
    assert set(report["sections"]["memory"]["llm_alone"]) == {
        "pages released (edge-af3)",
        "mapping kept (llama.cpp's tools)",
    }
    assert (
        "| mixed precision (int8 fc1 only, one head at a time) |"
        in (tmp_path / "out" / "cpu-levers-tiny.md").read_text()
    )


@pytest.mark.skipif(not read_cpu().supports("AVX512_VNNI"), reason="llama.cpp's AMX kernels need AVX-512 VNNI")
def test_cpu_levers_amx_section_runs(tiny_ckpt, amx_emulator, tmp_path):
    """The amx section (timed only on an AMX CPU) runs its code: under the emulator where the CPU
    has no AMX, on one type."""
    from benchmarks.bench_cpu import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_ckpt, work / "tiny-seed0")
    args = ["--shape", "tiny", "--sections", "amx", "--amx-types", "q4_0", "--work", str(work)]
    args += ["--out", str(tmp_path / "out")] + ([] if read_cpu().has_amx else ["--amx-emulator", str(amx_emulator)])
    amx = main(args)["sections"]["amx"]
    assert {"bench/q4_0/no AMX", "bench/q4_0/AMX fixed"} <= set(amx)
    assert all(amx[k]["rows_per_s"] > 0 for k in ("bench/q4_0/no AMX", "bench/q4_0/AMX fixed"))
    assert amx.get("emulated", False) is not read_cpu().has_amx
    md = (tmp_path / "out" / "cpu-levers-tiny.md").read_text()
    assert "| bench | q4_0 | AMX fixed |" in md and ("EMULATED" in md) is not read_cpu().has_amx


def test_server_benchmark_smoke_on_tiny(tiny_ckpt, tmp_path):
    """bench_server on tiny: every run and peer present, token counts as asked; no timing asserted."""
    from benchmarks.bench_server import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_ckpt, work / "tiny-seed0")
    report = main(
        [
            "--shape",
            "tiny",
            "--clients",
            "1",
            "4",
            "--new-tokens",
            "4",
            "--requests",
            "2",
            "--work",
            str(work),
            "--out",
            str(tmp_path / "out"),
            "--vllm-eager",
        ]
    )
    assert "vllm_error" not in report, report["vllm_error"]
    runs = {(r["server"], r["parallel"], r["audio"], r["clients"]): r for r in report["runs"]}
    vllm = {("vLLM (CPU)", "-", a, n) for a in (True, False) for n in (1, 4)}
    assert set(runs) == {("edge-af3", p, a, n) for p in (1, 4) for a in (True, False) for n in (1, 4)} | vllm | {
        ("llama-cpp-python", 1, False, 1),
        ("llama-cpp-python", 1, False, 4),
    }
    # read from vLLM's own start-up log (bfloat16: its default for a float32 checkpoint on a CPU)
    assert report["vllm"] == "vllm 0.32.0, eager, dtype torch.bfloat16, torch threads 1"
    for (server, _, _, n), r in runs.items():
        assert len(r["ttft_ms"]) >= n and r["ttft_ms_p95"] >= r["ttft_ms_p50"]
        if server != "llama-cpp-python":  # ignore_eos: every request gave exactly the tokens asked for
            assert r["completion_tokens"] == 4 * n
    assert report["in_process"]["completion_tokens"] == 4 * 2 and report["paired_ttft_ratio"] > 0
    assert set(report["decode_step_ms"]) == {"1", "2", "4"}
    assert {g["goal"].split(":")[0] for g in report["goals"]} == {"1 client", "4 clients"}
    assert "| llama-cpp-python | 1 | text | 4 |" in (tmp_path / "out" / "server-tiny-q4_k_m-cpu.md").read_text()


def test_adapters_benchmark_smoke_on_tiny(tmp_path):
    """bench_adapters on tiny: the think bundle, the LoRA types, the trainer; no timing asserted."""
    from benchmarks.bench_adapters import main

    report = main(
        [
            "--shape",
            "tiny",
            "--repeats",
            "1",
            "--new-tokens",
            "4",
            "--train-steps",
            "2",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    rt = report["runtime"]
    assert set(rt) >= {"base", "think", "think-f32", "think-q8_0", "switch_decode_ms", "think_encoder_extra_rss_mb"}
    assert report["lora"]["r"] == 64 and report["lora"]["type"] == "f16"
    assert report["trainer"]["tiny"]["steps"] == 2
    assert "| decode tok/s |" in (tmp_path / "out" / "adapters-tiny.md").read_text()


def test_voice_benchmark_smoke_on_tiny(tiny_ckpt, tmp_path):
    """bench_voice on tiny with both engines: every figure present and the English answer spoken
    (audio of a plausible length for the words given); no timing asserted."""
    from benchmarks.bench_voice import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_ckpt, work / "tiny-seed0")
    out = tmp_path / "out"
    report = main(["--shape", "tiny", "--runs", "1", "--new-tokens", "24", "--work", str(work), "--out", str(out)])
    assert set(report["voices"]) == {"piper:en_US-joe-medium", "espeak-ng:en-us"}
    for v in report["voices"].values():
        assert v["sentences"] >= 2 and 24 / 6 < v["audio_s"] < 24  # 24 English words, spoken
        assert v["first_token_to_first_audio_ms"] > 0 and v["rtf_alone"] > 0
    assert isinstance(report["barge_in"], dict) and report["barge_in"]["runs"] == 5
    assert "| piper:en_US-joe-medium |" in (out / "voice-tiny.md").read_text()
