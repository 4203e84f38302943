"""The CLI through a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from edge_af3.features import extract_features

from .conftest import noise, run_cli
from .test_runtime import conversation, strip_eos


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


def _greedy_text(bundle, audio, prompt, n):
    from edge_af3 import AF3

    with AF3.load(bundle) as m:  # the CLI's defaults
        return m.ask(prompt, audio, max_new_tokens=n).text


def test_ask_streams_the_api_answer(tiny_bundle, speech_wav):
    res = run_cli("ask", str(speech_wav), "What do you hear?", "--model", str(tiny_bundle), "-n", "16")
    assert res.returncode == 0, res.stderr[-2000:]
    want = _greedy_text(tiny_bundle, speech_wav, "What do you hear?", 16)
    assert res.stdout.rstrip("\n") == want and want
    assert "new audio tokens" in res.stderr and "tok/s" in res.stderr  # timings go to stderr, not into the answer


def test_ask_json_two_clips_and_env_model(tiny_bundle, speech_wav, tmp_path):
    other = tmp_path / "n.wav"
    sf.write(other, noise(3.0), 16000)
    res = run_cli(
        "ask",
        str(speech_wav),
        str(other),
        "Compare them.",
        "--json",
        "-n",
        "6",
        env={"EDGE_AF3_MODEL": str(tiny_bundle)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    n_tokens = extract_features(speech_wav).n_tokens + extract_features(other).n_tokens
    assert info["timings"]["audio_tokens"] == n_tokens and len(info["tokens"]) == 6
    assert info["audio"] == [str(speech_wav), str(other)]


def test_ask_errors_are_one_clear_line(tiny_bundle, tmp_path):
    res = run_cli("ask", str(tmp_path / "missing.wav"), "hi", "-m", str(tiny_bundle))
    assert res.returncode == 1 and "no such file" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("ask", "-m", str(tiny_bundle))
    assert res.returncode == 1 and "give audio file(s) and then the question" in res.stderr
    clip = tmp_path / "c.wav"
    sf.write(clip, noise(1.0), 16000)
    res = run_cli("ask", str(clip), "hi", "-m", str(tmp_path / "nowhere"), env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 1 and "tried:" in res.stderr and "does not exist" in res.stderr
    res = run_cli("ask", str(clip), "hi", "-m", "acme/not-here", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 1 and "Hub id" in res.stderr and "Traceback" not in res.stderr


def test_ctrl_c_exits_130_without_traceback(tiny_bundle, tmp_path):
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    clip = tmp_path / "long.wav"
    sf.write(clip, noise(120.0), 16000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_af3",
            "ask",
            str(clip),
            "Describe.",
            "-m",
            str(tiny_bundle),
            "-n",
            "100000",
            "--n-ctx",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the answer starts streaming
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready and os.read(proc.stdout.fileno(), 1):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err


def test_doctor_json():
    res = run_cli("doctor", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    names = {p["package"]: p["version"] for p in info["packages"]}
    assert names["onnxruntime"] and names["llama-cpp-python"] and info["ok"] is True
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    import llama_cpp

    assert info["llama_cpp_gpu_offload"] is bool(llama_cpp.llama_supports_gpu_offload())  # what this build can do
    missing = [p for p in info["packages"] if not p["version"]]
    assert all(p["install"].startswith("pip install") for p in missing)


class Terminal:
    """A command in a real terminal (tmux): read the screen, wait for text, send keys."""

    def __init__(self, tmp_path, cmd: str, env: dict, width: int = 220):
        import subprocess

        self.tmux = shutil.which("tmux")
        assert self.tmux, "tmux is required (scripts/setup.sh installs it)"
        self.sock = str(tmp_path / "tmux.sock")
        subprocess.run(
            [
                self.tmux,
                "-S",
                self.sock,
                "new-session",
                "-d",
                "-x",
                str(width),
                "-y",
                "50",
                "-s",
                "t",
                "env " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + cmd,
            ],
            check=True,
        )

    def screen(self) -> str:
        import subprocess

        return subprocess.run(
            [self.tmux, "-S", self.sock, "capture-pane", "-p", "-J", "-t", "t", "-S", "-2000"],
            capture_output=True,
            text=True,
        ).stdout

    def wait_for(self, text: str, count: int = 1, timeout: float = 180) -> str:
        import time

        end = time.time() + timeout  # a deadline guard for the terminal, not a timing assertion
        while time.time() < end:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} x{count} never appeared:\n{self.screen()[-3000:]}")

    def send(self, *keys: str) -> None:
        import subprocess

        subprocess.run([self.tmux, "-S", self.sock, "send-keys", "-t", "t", *keys], check=True)

    def close(self) -> None:
        import subprocess

        subprocess.run([self.tmux, "-S", self.sock, "kill-server"], capture_output=True)


def test_chat_in_a_terminal(tiny_bundle, speech_wav, tmp_path):
    """`chat` in a real terminal (tmux): /audio, a question, a streamed answer, /save, /quit."""
    import sys

    saved = tmp_path / "conv.json"
    term = Terminal(
        tmp_path,
        f"{sys.executable} -m edge_af3 chat -m {tiny_bundle} -n 12; echo EXIT=$?; sleep 30",
        {"EDGE_AF3_CACHE": str(tmp_path / "cache"), "TERM": "xterm"},
    )
    try:
        term.wait_for("you>")
        term.send(f"/audio {speech_wav}", "Enter")
        term.wait_for("attached")
        term.send("What do you hear?", "Enter")
        term.wait_for("tok/s")
        term.send(f"/save {saved}", "Enter")
        term.wait_for("saved 1 turn")
        term.send("/quit", "Enter")
        screen = term.wait_for("EXIT=")
    finally:
        term.close()
    assert "EXIT=0" in screen and "Traceback" not in screen
    conv = json.loads(saved.read_text())
    turn = conv["turns"][0]
    assert turn["audio"] == [str(speech_wav)] and turn["user"] == "What do you hear?"
    assert turn["assistant"] == _greedy_text(tiny_bundle, speech_wav, "What do you hear?", 12)
    assert "af3> " + turn["assistant"][:10] in screen.replace("\n", "")


def _two_utterances(tmp_path, speech_wav):
    """speech, 2.5 s of silence, speech again (16 kHz): the VAD must cut exactly two segments."""
    from edge_af3.audio import load_audio

    s = load_audio(speech_wav).samples
    x = np.concatenate([np.zeros(8000, np.float32), s, np.zeros(40000, np.float32), s, np.zeros(16000, np.float32)])
    path = tmp_path / "two.wav"
    sf.write(path, x, 16000)
    return path, s.size / 16000


def test_listen_file_cuts_segments_and_answers(tiny_bundle, speech_wav, tmp_path):
    from edge_af3 import AF3
    from edge_af3.listen import Listener, file_blocks
    from edge_af3.vad import make_detector

    path, seconds = _two_utterances(tmp_path, speech_wav)
    res = run_cli("listen", "--file", str(path), "-m", str(tiny_bundle), "-n", "6", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(chunk) for chunk in res.stdout.replace("}\n{", "}\x00{").split("\x00")]
    answers, summary = lines[:-1], lines[-1]["summary"]
    assert len(answers) == 2 and summary["segments"] == 2 and summary["answered"] == 2
    for a, start in zip(answers, (0.5, 0.5 + seconds + 2.5)):  # timestamps within the VAD's pre-roll/hangover
        assert abs(a["start"] - start) < 0.4 and abs((a["end"] - a["start"]) - seconds) < 0.9
    # the loop answers what the API answers for the same segment
    from edge_af3.audio import load_audio

    with AF3.load(tiny_bundle) as m:
        segs = []
        Listener(
            m,
            "x",
            detector=make_detector(),
            wait=True,
            on_event=lambda e: segs.append(e.segment) if e.kind == "segment" else None,
            max_new_tokens=1,
        ).run(file_blocks(load_audio(path).samples, realtime=False))
        want = m.ask(
            "Describe what you hear. If there is speech, transcribe it.", (segs[0].samples, 16000), max_new_tokens=6
        ).text
    assert answers[0]["text"] == want


def test_listen_mic_reads_a_real_portaudio_input(tiny_bundle, speech_wav, tmp_path, pulse):
    """A PulseAudio null sink's monitor as the microphone: two spoken utterances -> two answers."""
    import select
    import signal
    import subprocess
    import sys
    import time

    path, _ = _two_utterances(tmp_path, speech_wav)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_af3",
            "listen",
            "--mic",
            "--input",
            "pulse",
            "--json",
            "-m",
            str(tiny_bundle),
            "-n",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=pulse,
    )
    try:
        end = time.time() + 60
        err = b""
        while b"listening" not in err and time.time() < end:  # the stream is open
            r, _, _ = select.select([proc.stderr], [], [], 0.2)
            if r:
                err += os.read(proc.stderr.fileno(), 4096)
        assert b"listening" in err, err.decode()[-2000:]
        time.sleep(1.0)
        subprocess.run(["paplay", "-d", "edgeaf3", str(path)], env=pulse, check=True)
        seen = _wait_for(proc.stdout, '"text"', 120, count=2)  # both segments answered
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
        out = seen + out
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in rest, rest[-2000:]
    chunks = [json.loads(c) for c in out.replace("}\n{", "}\x00{").split("\x00")]
    summary = chunks[-1]["summary"]
    assert summary["segments"] == 2 and summary["answered"] == 2 and len(chunks) == 3
    assert chunks[1]["start"] - chunks[0]["start"] > 2.0


def test_listen_device_faults(tiny_bundle, tmp_path, pulse):
    import subprocess
    import sys
    import time

    # no input device at all (no PulseAudio reachable, no ALSA capture card)
    res = run_cli(
        "listen", "--mic", "-m", str(tiny_bundle), env={"XDG_RUNTIME_DIR": str(tmp_path), "PULSE_SERVER": "unix:/nope"}
    )
    assert res.returncode == 1 and "no audio input device" in res.stderr and "Traceback" not in res.stderr
    # a device index or name that is not there: said before the model loads
    for wrong, why in (("99", "Error querying device 99"), ("nosuch", "No input device matching 'nosuch'")):
        res = run_cli("listen", "--mic", "--input", wrong, "-m", str(tiny_bundle), env=pulse)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert (
            f"no input device {wrong if wrong == '99' else repr(wrong)} ({why}); see `edge-af3 listen --list-devices`"
            in (res.stderr)
        )
        assert "listening to" not in res.stderr and "encoder engine" not in res.stderr  # nothing was loaded
    res = run_cli("listen", "--list-devices", "--json", env=pulse)
    assert res.returncode == 0 and any(d["name"] == "pulse" for d in json.loads(res.stdout))
    # the device vanishes mid-stream: the only source of a second audio server is unloaded
    from .conftest import start_pulse, stop_pulse

    lone = start_pulse(tmp_path / "xdg2", "lone")
    try:
        mod = subprocess.run(["pactl", "list", "modules", "short"], env=lone, capture_output=True, text=True).stdout
        sink_module = next(line.split()[0] for line in mod.splitlines() if "sink_name=lone" in line)
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_af3", "listen", "--mic", "--input", "pulse", "-m", str(tiny_bundle)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=lone,
        )
        _wait_for(proc.stderr, "listening to", 120)  # loaded and capturing
        time.sleep(1.0)
        subprocess.run(["pactl", "unload-module", sink_module], env=lone, check=True)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_pulse(lone)
    assert proc.returncode == 1, err[-2000:]
    assert "stopped delivering audio" in err and "Traceback" not in err and "segment(s)" in err


def _wait_for(stream, text: str, timeout: float, count: int = 1) -> str:
    """Read a subprocess pipe until `text` appears `count` times (or fail after `timeout` s); returns what was read."""
    import select
    import time

    seen, deadline = "", time.time() + timeout
    while seen.count(text) < count:
        if time.time() > deadline:  # a guard against a hung process, not a timing assertion
            raise AssertionError(f"{text!r} not seen in {timeout} s; got {seen[-500:]!r}")
        ready, _, _ = select.select([stream], [], [], 0.2)
        if ready:
            chunk = os.read(stream.fileno(), 4096).decode(errors="replace")
            assert chunk, f"the process closed its output before {text!r}: {seen[-500:]!r}"
            seen += chunk
    return seen


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_bundle, speech_wav, tmp_path):
    """Ctrl-C mid-answer returns to `you>`; the next question sees the earlier turns (not the
    stopped one); Ctrl-C at the prompt, /save to a missing folder and /load of a bad file are one
    line each; /save stores absolute paths and /load restores the conversation."""
    import sys
    import time

    saved, home = tmp_path / "conv.json", tmp_path / "home"
    (home / "clips").mkdir(parents=True)
    shutil.copyfile(speech_wav, home / "clips" / "speech.wav")
    term = Terminal(
        tmp_path,
        f"{sys.executable} -m edge_af3 chat -m {tiny_bundle} -n 1500 --ignore-eos; echo EXIT=$?; sleep 30",
        {"EDGE_AF3_CACHE": str(tmp_path / "cache"), "TERM": "xterm", "HOME": str(home)},
        width=200,
    )
    try:
        term.wait_for("you>")
        term.send("C-c")  # at the prompt
        term.wait_for("Ctrl-D or /quit leaves")
        term.send("/audio ~/clips/speech.wav", "Enter")  # ~ is the user's home
        term.wait_for("attached")
        term.send("Describe it.", "Enter")
        term.wait_for("tok/s")  # turn 1 completes
        term.send("Now write a very long story.", "Enter")
        term.wait_for("af3>", count=2)
        time.sleep(0.5)
        term.send("C-c")  # mid-answer
        term.wait_for("(stopped; this turn is not part of the conversation)")
        term.wait_for("you>", count=4)
        term.send("And the tempo?", "Enter")
        screen = term.wait_for("tok/s", count=2)
        term.send("/save /nonexistent/dir/c.json", "Enter")
        term.wait_for("cannot save to /nonexistent/dir/c.json")
        term.send(f"/save {saved}", "Enter")
        term.wait_for("saved 2 turn(s)")
        term.send(f"/load {tmp_path / 'missing.json'}", "Enter")
        term.wait_for("(the conversation is unchanged)")
        term.send(f"/load {saved}", "Enter")
        term.wait_for("loaded 2 turn(s)")
        term.send("/quit", "Enter")
        screen = term.wait_for("EXIT=")
    finally:
        term.close()
    assert "EXIT=0" in screen and "Traceback" not in screen
    turns = json.loads(saved.read_text())["turns"]
    assert [t["user"] for t in turns] == ["Describe it.", "And the tempo?"]  # the stopped turn is not there
    assert turns[0]["audio"] == [str(home / "clips" / "speech.wav")]
    import re

    stats = re.findall(r"prompt (\d+) positions, (\d+) from the KV cache", screen)
    first_prompt, (third_prompt, third_reused) = int(stats[0][0]), stats[-1]
    assert int(third_prompt) > first_prompt and int(third_reused) >= first_prompt  # turn 3 carries turn 1


def test_listen_hears_a_sound_that_is_there_from_the_first_frame(tiny_bundle, tmp_path):
    """A tone from frame 1 (the room's machine), silence, the tone again: two segments, the first at 0 s."""
    t = np.arange(12 * 16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, np.concatenate([tone, np.zeros(3 * 16000, np.float32), tone]), 16000)
    res = run_cli("listen", "--file", str(path), "-m", str(tiny_bundle), "-n", "2", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]  # JSON Lines
    segments, summary = lines[:-1], lines[-1]["summary"]
    assert summary["segments"] == 2 and [round(s["start"]) for s in segments] == [0, 15]


def test_user_mistakes_are_one_line_before_anything_loads(tiny_bundle, tmp_path):
    """Each of these was a traceback or a silent change of meaning; now one line and exit 1."""
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("edge-af3 0.1.0")
    res = run_cli("bench", "--help")  # the suite's own options
    assert res.returncode == 0 and "--clips" in res.stdout and "--peers" in res.stdout
    assert "Usage: edge-af3 bench [OPTIONS]" in res.stdout and "usage:" not in res.stdout  # styled as the rest
    assert "[default: bench-small]" in res.stdout
    res = run_cli("train", "--help")
    assert res.returncode == 0 and "<bool>" not in res.stdout and "CKPT" in res.stdout.splitlines()[0]
    cases = [
        (["export", str(tmp_path / "nope"), "/proc/x"], "no "),  # a missing checkpoint is named first
        (["make-tiny", "/proc/t"], "cannot write /proc/t"),
        (
            ["listen", "--file", str(tmp_path / "x.wav"), "-m", str(tiny_bundle), "--every", "0"],
            "--every must be between",
        ),
        (
            ["listen", "--file", str(tmp_path / "x.wav"), "-m", str(tiny_bundle), "--every", "100"],
            "--every must be between",
        ),
        (["demo", "--audio", str(tmp_path / "missing.wav")], "no such file"),
        (["plan", str(tiny_bundle), "--encoder-precision", "int4"], "unknown encoder precision"),
        (["ask", str(tmp_path / "x.wav"), "q", "-m", str(tiny_bundle), "--threads", "0"], "--threads must be >= 1"),
        (["listen", "--mic", "--device", "2", "-m", str(tiny_bundle)], "the microphone is --input"),
        (
            ["listen", "--file", str(tmp_path / "x.wav"), "-m", str(tiny_bundle), "--adapter", "nope"],
            "no adapter 'nope'",
        ),
    ]
    sf.write(tmp_path / "x.wav", np.zeros(16000, np.float32), 16000)
    for args, message in cases:
        res = run_cli(*args)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, (
            args,
            res.stderr[-500:],
        )


def test_listen_every_answers_the_tail_too(tiny_bundle, tmp_path):
    t = np.arange(int(19.8 * 16000)) / 16000
    sf.write(tmp_path / "t.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    res = run_cli(
        "listen", "--file", str(tmp_path / "t.wav"), "-m", str(tiny_bundle), "--every", "5", "-n", "1", "--json"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    spans = [(round(x["start"]), round(x["end"], 1)) for x in lines[:-1]]
    assert len(spans) == 4 and spans[-1] == (15, 19.8), spans  # 0-5, 5-10, 10-15, then the last 4.8 s


def test_listen_vad_model_ships_with_the_package(tmp_path, monkeypatch):
    """Silero's ONNX model is inside the package (offline first use); the environment variable overrides it."""
    import hashlib

    from edge_af3.vad import SILERO_ONNX_SHA256, silero_model

    monkeypatch.delenv("EDGE_AF3_SILERO_ONNX", raising=False)
    monkeypatch.setenv("EDGE_AF3_CACHE", str(tmp_path / "empty-cache"))
    path = silero_model()
    assert "edge_af3" in str(path) and hashlib.sha256(path.read_bytes()).hexdigest() == SILERO_ONNX_SHA256
    assert (path.parent / "SILERO_VAD_LICENSE").read_text().startswith("MIT License")
    monkeypatch.setenv("EDGE_AF3_SILERO_ONNX", str(tmp_path / "mine.onnx"))
    assert silero_model() == tmp_path / "mine.onnx"


def test_ask_text_only_stdin_audio_and_system(tiny_bundle, speech_wav):
    import subprocess
    import sys

    from edge_af3 import AF3

    with AF3.load(tiny_bundle) as m:
        text_only = m.ask("What can you do?", max_new_tokens=6, temperature=0).text
        clip = m.ask("What is it?", str(speech_wav), max_new_tokens=6, temperature=0).text
        sys_text = m.chat("You are terse.").ask("What is it?", str(speech_wav), max_new_tokens=6, temperature=0).text
    res = run_cli("ask", "What can you do?", "-m", str(tiny_bundle), "-t", "0", "-n", "6", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["text"] == text_only, res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_af3",
            "ask",
            "-",
            "What is it?",
            "-m",
            str(tiny_bundle),
            "-t",
            "0",
            "-n",
            "6",
            "--json",
        ],
        input=speech_wav.read_bytes(),
        capture_output=True,
    )
    assert res.returncode == 0 and json.loads(res.stdout)["text"] == clip, res.stderr[-1000:]
    res = run_cli(
        "ask",
        str(speech_wav),
        "What is it?",
        "--system",
        "You are terse.",
        "-m",
        str(tiny_bundle),
        "-t",
        "0",
        "-n",
        "6",
        "--json",
    )
    assert res.returncode == 0 and json.loads(res.stdout)["text"] == sys_text
    res = run_cli("ask", str(speech_wav), "-m", str(tiny_bundle))
    assert res.returncode == 1 and "give the question after the audio" in res.stderr


def test_models_pull_list_verify_rm(tiny_ckpt, speech_wav, tmp_path):
    env = {"EDGE_AF3_CACHE": str(tmp_path / "cache")}
    res = run_cli("models", "list", env=env)
    assert res.returncode == 0 and "no bundles" in res.stdout
    res = run_cli("models", "pull", str(tiny_ckpt), "--quant", "f32", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "of weights to export" in res.stderr and "RAM" in res.stderr  # what it takes, said first
    res = run_cli("models", "list", "--json", env=env)
    (entry,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert (
        entry["quant"] == "f32"
        and entry["source"] == str(tiny_ckpt)
        and entry["bytes"] > 0
        and entry["last_used"] is None
    )
    res = run_cli("ask", str(speech_wav), "q", "-m", entry["path"], "-n", "2", env=env)
    assert res.returncode == 0, res.stderr[-1000:]
    (entry,) = [json.loads(line) for line in run_cli("models", "list", "--json", env=env).stdout.splitlines()]
    assert entry["last_used"] is not None
    res = run_cli("models", "verify", entry["name"], env=env)
    assert res.returncode == 0 and "match their sha256" in res.stdout
    with open(Path(entry["path"]) / "encoder.onnx", "r+b") as f:  # corrupt one byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    res = run_cli("models", "verify", entry["name"], env=env)
    assert (
        res.returncode == 1 and "encoder.onnx does not match its sha256" in res.stderr and "Traceback" not in res.stderr
    )
    res = run_cli("models", "rm", str(tiny_ckpt.parent), "--yes", env=env)
    assert res.returncode == 1
    res = run_cli("models", "rm", entry["name"], "--yes", env=env)
    assert res.returncode == 0 and not Path(entry["path"]).exists()


def test_listen_ctrl_c_answers_the_segment_in_progress_then_stops(tiny_bundle, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    t = np.arange(20 * 16000) / 16000
    sf.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_af3",
            "listen",
            "--file",
            str(tmp_path / "tone.wav"),
            "--realtime",
            "-m",
            str(tiny_bundle),
            "-n",
            "3",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        head = ""
        while "Ctrl-C to stop" not in head:  # the model is loaded and the file is being fed at real speed
            line = proc.stderr.readline()
            assert line, "listen ended before it started listening"
            head += line
        time.sleep(4)  # inside the 20 s tone, which sounds from frame 1: a segment is open
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        err = head + err
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.count("interrupted") == 1 and "Traceback" not in err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0]["start"] == 0.0 and lines[-1]["summary"]["answered"] == 1


def test_first_use_of_a_checkpoint_says_what_it_takes(tiny_ckpt, speech_wav, tmp_path):
    env = {"EDGE_AF3_CACHE": str(tmp_path / "cache")}
    first = run_cli("ask", str(speech_wav), "q", "-m", str(tiny_ckpt), "-n", "2", env=env)
    assert first.returncode == 0, first.stderr[-1000:]
    assert "first use:" in first.stderr and "GB of RAM" in first.stderr and "models pull" in first.stderr
    again = run_cli("ask", str(speech_wav), "q", "-m", str(tiny_ckpt), "-n", "2", env=env)
    assert again.returncode == 0 and "first use:" not in again.stderr  # exported once, then quiet


# -- against transformers: greedy, exact mode, the checkpoint's generation config --------------------
def _tokens_text(reference, ids) -> str:
    return reference.processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_ask_exact_from_a_checkpoint_folder(tiny_ckpt, reference, tmp_path):
    x = noise(5.0, seed=7)
    clip = tmp_path / "noise.wav"
    sf.write(clip, x, 16000, subtype="FLOAT")
    env = {"EDGE_AF3_CACHE": str(tmp_path / "cache")}
    res = run_cli(
        "ask", str(clip), "What do you hear?", "-m", str(tiny_ckpt), "--exact", "-t", "0", "-n", "24", "--json", env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    assert got["tokens"] == strip_eos(reference.generate(conversation(x), max_new_tokens=24))
    (bundle,) = (tmp_path / "cache" / "bundles").iterdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (
        manifest["encoder"]["precision"] == "fp32" and manifest["llm"]["quant"] == "f32" and "-f32-fp32-" in bundle.name
    )
    # the fast path keeps its own bundle (another encoder precision: another cache entry)
    res = run_cli(
        "ask", str(clip), "What do you hear?", "-m", str(tiny_ckpt), "-n", "2", "--encoder-precision", "int8", env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "cache" / "bundles").iterdir())
    assert len(names) == 2 and any("-int8-" in n for n in names)
    bad = run_cli("ask", str(clip), "x", "-m", str(tiny_ckpt), "--exact", "--encoder-precision", "mixed", env=env)
    assert bad.returncode == 1 and "exact mode computes the encoder in fp32" in bad.stderr


def test_listen_file_greedy_exact_equals_transformers(tiny_bundle, reference, tmp_path):
    x = noise(2.0, seed=5)
    clip = tmp_path / "two-seconds.wav"
    sf.write(clip, x, 16000, subtype="FLOAT")
    prompt = "Describe the sound."
    res = run_cli(
        "listen",
        "--file",
        str(clip),
        "--every",
        "2",
        "-p",
        prompt,
        "-m",
        str(tiny_bundle),
        "--exact",
        "-t",
        "0",
        "-n",
        "16",
        "--json",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(chunk) for chunk in res.stdout.replace("}\n{", "}\x00{").split("\x00")]
    (answer,) = lines[:-1]
    assert answer["start"] == 0.0 and answer["end"] == 2.0
    want = strip_eos(reference.generate(conversation(x, prompt), max_new_tokens=16))
    assert answer["text"] == _tokens_text(reference, want)
