"""The CLI through a real subprocess."""

from __future__ import annotations

import json
import shutil

import numpy as np
import soundfile as sf

from edge_af3.features import extract_features

from .conftest import noise, run_cli


def test_features_json(tmp_path):
    clip = tmp_path / "n.wav"
    sf.write(clip, noise(45.0), 16000, subtype="FLOAT")
    res = run_cli("features", str(clip), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    ours = extract_features(clip)
    assert info["audio_tokens"] == ours.n_tokens == 1125
    assert info["windows"] == 2 and info["rows_per_window"] == [750, 375]


def test_features_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("hello")
    res = run_cli("features", str(bad))
    assert res.returncode == 1
    assert "error:" in res.stderr and "not a readable audio file" in res.stderr
    assert "Traceback" not in res.stderr


def test_make_tiny_refuses_existing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    res = run_cli("make-tiny", str(tmp_path / "x"))
    assert res.returncode == 1 and "exists" in res.stderr and "Traceback" not in res.stderr


def test_demo_uses_cached_checkpoint(tmp_path, tiny_ckpt):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_ckpt, cache / "checkpoints" / "tiny-seed0")
    res = run_cli("demo", env={"EDGE_AF3_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    assert "120 <sound> tokens" in res.stdout  # the bundled 4.82 s clip: 482 frames -> 120 rows
    res = run_cli("demo", "--model", str(tmp_path / "nowhere" / "x"), env={"EDGE_AF3_CACHE": str(cache)})
    assert res.returncode == 1 and "error:" in res.stderr
