"""`listen --memory`: the real command on a file (answers against transformers), its bad values
refused before loading, Ctrl-C; and the loop itself when the model is behind or the device
fails (a stand-in memory whose speed the test controls)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from edge_af3.constants import EOS_TOKEN_ID, SOUND_TOKEN_ID
from edge_af3.errors import InputDeviceError
from edge_af3.memory_listen import MemoryListener, parse_question
from edge_af3.runtime.memory import MemoryStats
from edge_af3.runtime.windows import Windower

from .conftest import noise, run_cli

QUESTION = "What do you hear?"


@pytest.fixture(scope="module")
def wav95(tmp_path_factory):
    x = noise(95, seed=95)
    path = tmp_path_factory.mktemp("mem") / "95s.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    return path, x


def test_listen_memory_on_a_file_answers_as_the_reference(tiny_bundle, reference, wav95):
    path, x = wav95
    res = run_cli(
        "listen",
        "--file",
        str(path),
        "--memory",
        "2m",
        "--ask",
        QUESTION,
        "--json",
        "-m",
        str(tiny_bundle),
        "--exact",
        "-t",
        "0",
        "-n",
        "16",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    answer, summary = (json.loads(line) for line in res.stdout.strip().splitlines())
    conv = [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": QUESTION}]}]
    ids = reference.generate(conv, max_new_tokens=16)
    ids = ids[: ids.index(EOS_TOKEN_ID)] if EOS_TOKEN_ID in ids else ids
    assert answer["answer"] == reference.processor.tokenizer.decode(ids)
    prompt = reference.inputs(conv)["input_ids"][0].tolist()
    assert answer["prefilled"] == len(prompt) - 1 - max(i for i, t in enumerate(prompt) if t == SOUND_TOKEN_ID)
    assert answer["span"] == [[0.0, 30.0], [30.0, 60.0], [60.0, 90.0], [90.0, 95.0]]
    s = summary["summary"]
    assert s["remembered"] == [[0.0, 95.0]] and s["windows"] == 3 and s["questions"] == 1 and s["dropped"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "5h"], "duration like 10m"),
        (["--memory", "31m"], "30 s to 30m"),
        (["--memory", "10m", "--n-ctx", "4096"], "needs --n-ctx >= "),
        (["--memory", "1m", "--tail-every", "45"], "--tail-every takes 1 to 29"),
        (["--memory", "1m", "--chat"], "does not combine"),
        (["--skip-silence"], "go with --memory"),
        (["--memory", "1m", "--memory-dir", "NONEMPTY"], "not an empty folder"),
    ],
)
def test_listen_memory_bad_values_fail_before_loading(tmp_path, wav95, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = [str(tmp_path / "full") if a == "NONEMPTY" else a for a in args]
    res = run_cli("listen", "--file", str(wav95[0]), *args, "-m", str(tmp_path / "no-such-model"))
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert "[invalid_option]" in res.stderr and "Traceback" not in res.stderr
    assert "no-such-model" not in res.stderr  # refused before the model was looked for


def test_listen_memory_ctrl_c_says_what_was_remembered(tiny_bundle, wav95):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_af3",
            "listen",
            "--file",
            str(wav95[0]),
            "--realtime",
            "--memory",
            "1m",
            "-m",
            str(tiny_bundle),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=False,
    )
    try:
        err, end = b"", time.time() + 120
        while b"remembered 00:00" not in err and time.time() < end:  # the first window is in
            r, _, _ = select.select([proc.stderr], [], [], 0.2)
            if r:
                err += os.read(proc.stderr.fileno(), 4096)
        assert b"remembered 00:00" in err, err.decode()[-2000:]
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in rest, rest.decode()[-2000:]
    s = json.loads(out)["summary"]
    assert s["windows"] >= 1 and s["remembered"][0][0] == 0.0 and s["heard_s"] >= 30


class SlowMemory:
    """The memory's interface with an `add` that waits until the test releases it."""

    def __init__(self):
        self.windower, self.stats = Windower(tail_every=None), MemoryStats()
        self.release, self.added = threading.Event(), []

    def add(self, heard):
        assert self.release.wait(60), "never released"
        self.added.append(heard.index)

    def span(self):
        return []


def blocks(seconds, fail_at=None):
    for i in range(int(seconds)):
        if fail_at is not None and i == fail_at:
            raise InputDeviceError("the input device stopped delivering audio (unplugged?)")
        yield np.full(16000, 0.1, np.float32)


def test_when_the_model_is_behind_windows_are_dropped_and_capture_goes_on():
    mem = SlowMemory()
    events = []
    listener = MemoryListener(mem, on_event=events.append, backlog=2)
    done = threading.Event()
    result = {}

    def run():
        result["summary"] = listener.run(blocks(30 * 6))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    deadline = time.time() + 30
    while mem.windower.heard_s < 180 and time.time() < deadline:  # capture runs on while add() is stuck
        time.sleep(0.05)
    assert mem.windower.heard_s == 180
    mem.release.set()
    assert done.wait(60)
    dropped = [e.info["index"] for e in events if e.kind == "dropped"]
    assert dropped and mem.stats.dropped == len(dropped) and result["summary"]["dropped"] == len(dropped)
    assert sorted(mem.added + dropped) == list(range(6)) and mem.added[-2:] == [4, 5]  # the newest kept


def test_a_device_fault_ends_the_run_after_the_tail_is_remembered():
    mem = SlowMemory()
    mem.release.set()
    listener = MemoryListener(mem)
    with pytest.raises(InputDeviceError, match="unplugged"):
        listener.run(blocks(100, fail_at=45))
    assert mem.added == [0, 1]  # window 0 and the 15 s heard of window 1


def test_typed_questions_and_time_ranges():
    assert parse_question("  what was said? ") == ("what was said?", None)
    assert parse_question("/at 12:00-14:30 what was said?") == ("what was said?", (720.0, 870.0))
    assert parse_question("/at 1:00:00-1:02:00 and?") == ("and?", (3600.0, 3720.0))
    for bad in ("/at 12:00 what", "/at 12:xx-13:00 what", "/at 12:00-13:00"):
        with pytest.raises(ValueError):
            parse_question(bad)
