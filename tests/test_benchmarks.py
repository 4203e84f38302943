"""The only benchmark run inside the test suite: a smoke run of the suite on `tiny` (every peer,
one 5 s clip, one repeat). It checks the outputs and the audio token counts each peer used,
not any timing."""

from __future__ import annotations

import json
import shutil


def test_suite_smoke_on_tiny(tiny_ckpt, tmp_path):
    from benchmarks.suite import main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_ckpt, work / "tiny-seed0")  # the suite reuses a checkpoint it finds
    report = main(["--shape", "tiny", "--clips", "5", "30", "--repeats", "1", "--new-tokens", "4",
                   "--work", str(work), "--out", str(tmp_path / "out")])  # fmt: skip
    peers = report["peers"]
    assert set(peers) == {"edge-af3", "reference", "mtmd", "raw"}
    tokens = {p: {s: c["audio_tokens"]["median"] for s, c in peers[p]["clips"].items()} for p in ("edge-af3", "reference", "mtmd")}
    assert tokens["edge-af3"] == tokens["reference"] == {"5": 125, "30": 750}
    assert tokens["mtmd"] == {"5": 750, "30": 1500}  # llama.cpp's own AF3 path: no padding mask, extra window
    for p in peers.values():
        assert p["decode_tok_s"]["median"] > 0 and p["peak_rss_mb"] > 0
    stem = tmp_path / "out" / "suite-tiny-cpu"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert saved["goals"] and {g["goal"] for g in saved["goals"]} >= {"TTFT 30 s vs reference (>= 2x)", "peak RSS <= mtmd's"}
    table = stem.with_suffix(".md").read_text()
    assert "| 30 s | mtmd | 1500 |" in table and "decode tok/s" in table
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
