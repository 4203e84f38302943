"""The errors a person trips on (#29): one vocabulary of codes for the CLI and the server, the
table in docs/cli.md generated from it, and each mistake one line before anything loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from edge_af3.errors import EdgeAF3Error, kinds, markdown_table

from .conftest import ROOT, run_cli

LOADED = "encoder engine"  # what load_model says once a model is loaded (here: always, on a CPU box)


def one_line_error(r, *words: str, code: str = "invalid_option") -> str:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1, r.stderr
    for w in words:
        assert w in line[0], line[0]
    assert line[0].endswith(f"[{code}]"), line[0]  # the code the server would answer
    return line[0]


def test_every_error_kind_has_its_own_snake_case_code_and_the_docs_table_is_generated():
    codes = [cls.code for cls in kinds()]
    assert len(codes) == len(set(codes)) and all(re.fullmatch(r"[a-z][a-z0-9_]+", c) for c in codes)
    assert kinds()[0] is EdgeAF3Error and len(kinds()) >= 15
    doc = (ROOT / "docs" / "cli.md").read_text()
    begin, end = "<!-- errors:begin -->\n", "<!-- errors:end -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == markdown_table(), (
        "docs/cli.md's error table is stale: regenerate it with `python -m edge_af3.errors`"
    )


def test_bad_quant_and_precision_are_one_line_before_anything_is_read(tiny_ckpt, tmp_path):
    out = tmp_path / "bx"
    one_line_error(run_cli("export", str(tiny_ckpt), str(out), "--quant", "q5"), "unknown quant 'q5'", "q4_k_m")
    one_line_error(run_cli("export", str(tiny_ckpt), str(out), "--encoder-precision", "int4"), "'int4'")
    assert not out.exists()
    one_line_error(run_cli("models", "pull", str(tiny_ckpt), "--quant", "q5", "--yes"), "unknown quant 'q5'")


def test_sampling_and_adapter_mistakes_are_refused_before_the_model_loads(tiny_bundle, speech_wav):
    bad = (
        ("-t", "-1", "temperature"),
        ("--top-p", "3", "top_p"),
        ("--top-k", "-2", "top_k"),
        ("--adapter", "nope", "no adapter 'nope'"),
    )
    for flag, value, word in bad:
        r = run_cli("ask", str(speech_wav), "What?", "-m", str(tiny_bundle), flag, value)
        one_line_error(r, word)
        assert LOADED not in r.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["chat", "-t", "-1"], ["temperature"]),
        (["chat", "--top-p", "3"], ["top_p"]),
        (["chat", "--adapter", "nope"], ["no adapter 'nope'"]),
        (["chat", "--threads", "0"], ["--threads"]),
        (["listen", "--mic", "--file", "x.wav"], ["choose one input"]),
        (["listen", "--file", "x.wav", "--every", "0.1"], ["--every must be between"]),
        (["listen", "--file", "x.wav", "-t", "-1"], ["temperature"]),
        (["plan", "--target", "nowhere"], ["unknown target 'nowhere'"]),
        (["plan", "--kv", "q3"], ["KV"]),
        (["plan", "--encoder-precision", "int4"], ["'int4'"]),
        (["serve", "--decode-batching", "sometimes"], ["--decode-batching"]),
        (["serve", "--memory", "1m"], ["--memory-input"]),
        (["serve", "--memory", "1m", "--memory-input", "x.wav"], ["no such file"]),
        (["serve", "--memory", "1m", "--memory-input", "mic", "--n-ctx", "1024"], ["--n-ctx >="]),
    ],
)
def test_bad_values_of_chat_listen_plan_and_serve_before_the_model_loads(tiny_bundle, tmp_path, args, words):
    args = [str(tmp_path / "x.wav") if a == "x.wav" else a for a in args]
    r = run_cli(*args, "-m", str(tiny_bundle))
    one_line_error(r, *words)
    assert LOADED not in r.stderr


def test_models_verify_rm_and_list(tiny_bundle, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    (cache / "bundles").mkdir(parents=True)
    long_name = "tiny-iq4_nl-fp32-0123456789abcdef0123456789"
    shutil.copytree(tiny_bundle, cache / "bundles" / long_name)
    env = {"EDGE_AF3_CACHE": str(cache), "COLUMNS": "80"}
    line = one_line_error(run_cli("models", "verify", "nope", env=env), "no bundle 'nope'", code="model_not_found")
    assert long_name in line and "manifest.json" not in line.split("(")[-1]
    r = run_cli("models", "list", env=env)
    assert r.returncode == 0 and long_name in r.stdout  # never cut, in 80 columns or a pipe
    r = subprocess.run(  # end of input at the question (</dev/null): "no"
        [sys.executable, "-m", "edge_af3", "models", "rm", long_name],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
        timeout=120,
    )
    assert r.returncode == 0 and "kept" in r.stderr and (cache / "bundles" / long_name).is_dir()


def test_ask_hints_and_files(tiny_bundle, speech_wav, tmp_path):
    r = run_cli("ask", "What is this?", str(speech_wav), "-m", str(tiny_bundle))
    one_line_error(r, "the question comes last", f'edge-af3 ask {speech_wav} "What is this?"')
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    one_line_error(run_cli("ask", str(empty), "What?", "-m", str(tiny_bundle)), "empty (0 bytes)", code="invalid_audio")
    r = run_cli("ask", "Hi", "-m", str(tiny_bundle), "--n-ctx", "300", "-n", "2")
    assert r.returncode == 0 and "--n-ctx 300: llama.cpp rounds the context up to a multiple of 256: 512" in r.stderr


def test_serve_on_a_port_in_use_is_one_line(tiny_bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "-m", str(tiny_bundle), "--port", str(port))
    one_line_error(r, f"cannot listen on 127.0.0.1:{port}", "in use", "--port")
    assert "listening on" not in r.stderr


def test_train_says_the_steps_it_runs_and_checks_before_loading(tiny_ckpt, tmp_path):
    """A 4-line file with --max-steps 60: 4 steps, and the line says why and what would reach 60;
    a non-empty output folder is refused before any weights load (no progress bar drawn)."""
    import json

    import numpy as np
    import soundfile as sf

    t = np.arange(16000) / 16000
    sf.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    lines = [{"audio": "tone.wav", "prompt": "What is it?", "answer": f"a tone {i}"} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    r = run_cli("train", str(tiny_ckpt), str(data), str(busy), "--max-steps", "60")
    one_line_error(r, "is not empty")
    assert "training" not in r.stderr  # refused before the run (and its bar) started
    r = run_cli("train", str(tiny_ckpt), str(data), str(tmp_path / "out"), "--max-steps", "60", "--r", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "training 4 steps, not 60" in r.stderr and "--epochs 15 reaches --max-steps 60" in r.stderr
    assert ": 4 steps" in r.stdout  # what ran
    assert "%|" not in r.stderr and "FutureWarning" not in r.stderr  # no transformers bar or chatter


def test_doctor_takes_what_every_m_takes(tiny_ckpt, tiny_bundle, tmp_path):
    r = run_cli("doctor", "-m", str(tiny_ckpt), "--json", env={"EDGE_AF3_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-2000:]
    model = json.loads(r.stdout)["model"]
    assert model["checkpoint"] == str(tiny_ckpt) and model["bundle"] is None  # not exported in this cache yet
    r = run_cli("doctor", "-m", str(tiny_bundle), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["bundle"] == str(tiny_bundle)
    one_line_error(run_cli("doctor", "-m", str(tmp_path / "nothere")), "no such bundle", code="model_not_found")
    one_line_error(run_cli("doctor", "-m", str(tmp_path)), "not an HF checkpoint", code="invalid_checkpoint")


def test_listen_stamps_round_to_the_minute(tiny_bundle, tmp_path):
    """--every 20 over 60 s: the last segment is [00:40.0–01:00.0], never 00:60.0."""
    import numpy as np
    import soundfile as sf

    x = (0.05 * np.random.default_rng(0).standard_normal(60 * 16000)).astype(np.float32)
    sf.write(tmp_path / "minute.wav", x, 16000)
    r = run_cli("listen", "--file", str(tmp_path / "minute.wav"), "--every", "20", "-m", str(tiny_bundle), "-n", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[00:40.0–01:00.0]" in r.stdout and "00:60.0" not in r.stdout, r.stdout
