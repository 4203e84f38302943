"""vLLM for real: its CPU build (scripts/setup_vllm.sh, started by deploy/vllm/serve-cpu.sh) serving
the tiny checkpoint on a free localhost port, next to `edge-af3 serve --exact` on the same
checkpoint's bundle. Checked: `AF3.connect` and `ask --base-url` against vLLM give transformers'
greedy tokens (and edge-af3's exact ones); what vLLM cannot do is said as edge-af3 errors; the
documented request shapes are accepted by both servers with the same greedy text; a pool of base
URLs fails over from a dead server to a live one, a conversation included."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess

import httpx2 as httpx
import numpy as np
import pytest

from edge_af3 import AF3
from edge_af3.constants import ASR_PROMPT
from edge_af3.errors import ContextOverflowError, EdgeAF3Error, ModelNotFoundError, PromptError, ServerError

from .conftest import ROOT, free_port, noise, run_cli, wait_up
from .test_runtime import conversation, strip_eos
from .test_server import Server, wav_bytes

pytestmark = pytest.mark.slow
SERVE_CPU = ROOT / "deploy" / "vllm" / "serve-cpu.sh"
NAME = "af3-tiny"  # both servers serve the checkpoint under this name
QUESTION = "What do you hear?"


class VLLM:
    """deploy/vllm/serve-cpu.sh in its own process group (vLLM starts an engine process beside its
    API server), up when /v1/models answers."""

    def __init__(self, ckpt, log):
        venv = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm")  # relative: to the repository, as the scripts read it
        assert (venv / "bin" / "python").exists(), "vLLM's CPU venv is missing: run scripts/setup_vllm.sh"
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
        # float32 (the checkpoint's dtype) for exact greedy parity; eager: torch.compile adds minutes
        # to start-up on 2 cores and changes no result
        args = ["--port", str(self.port), "--served-model-name", NAME, "--dtype", "float32", "--enforce-eager"]
        args += ["--max-model-len", "4096"]
        self.proc = subprocess.Popen(
            [str(SERVE_CPU), str(ckpt), *args],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_up(self.proc, self.url + "/v1/models", 480, self.tail, "vLLM")  # about a minute here

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def vllm(tiny_ckpt, tmp_path_factory):
    server = VLLM(tiny_ckpt, tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edge(tiny_bundle, tmp_path_factory):
    server = Server(tiny_bundle, "--exact", "--name", NAME, tmp_path=tmp_path_factory.mktemp("edge"), key=None)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def exact(tiny_bundle):
    with AF3.load(tiny_bundle, exact=True) as m:
        yield m


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return noise(6.0, seed=28)


def test_connect_ask_stream_chat_give_transformers_tokens(vllm, exact, reference, clip, speech_wav):
    remote = AF3.connect(vllm.url)
    assert remote.model == NAME and remote.pool.current.kind == "vllm"
    tok = reference.processor.tokenizer
    want = strip_eos(reference.generate(conversation(clip), max_new_tokens=16))
    got = remote.ask(QUESTION, (clip, 16000), max_new_tokens=16, temperature=0)
    assert got.text == tok.decode(want, skip_special_tokens=True)
    assert got.text == exact.ask(QUESTION, (clip, 16000), max_new_tokens=16, temperature=0).text
    assert got.timings.prompt_tokens == reference.inputs(conversation(clip))["input_ids"].shape[1]
    with remote.stream(QUESTION, (clip, 16000), max_new_tokens=16, temperature=0) as s:
        assert "".join(s) == got.text and s.answer.finish_reason == got.finish_reason
    # a file at 22.05 kHz: resampled by the client, so vLLM hears what edge-af3 hears
    local = exact.ask(QUESTION, str(speech_wav), max_new_tokens=12, temperature=0)
    assert remote.ask(QUESTION, str(speech_wav), max_new_tokens=12, temperature=0).text == local.text
    # two turns, the clip in the first: the history is re-sent, the follow-up equals transformers'
    chat = remote.chat()
    first = chat.ask(QUESTION, (clip, 16000), max_new_tokens=10, temperature=0)
    second = chat.ask("Tell me more.", max_new_tokens=12, temperature=0)
    conv = conversation(clip) + [
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {"role": "user", "content": [{"type": "text", "text": "Tell me more."}]},
    ]
    assert second.text == tok.decode(strip_eos(reference.generate(conv, max_new_tokens=12)), skip_special_tokens=True)
    mine = exact.chat()
    mine.ask(QUESTION, (clip, 16000), max_new_tokens=10, temperature=0)
    assert second.text == mine.ask("Tell me more.", max_new_tokens=12, temperature=0).text


def _part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def test_what_vllm_cannot_do_is_said(vllm, edge, reference, clip):
    remote = AF3.connect(vllm.url)
    two = [(clip, 16000), (noise(2.0, seed=3), 16000)]
    with pytest.raises(PromptError, match="at most 1 audio clip"):  # vLLM's own 400, explained
        remote.ask("Compare them.", two, max_new_tokens=4)
    chat = remote.chat()
    chat.ask(QUESTION, (clip, 16000), max_new_tokens=4, temperature=0)
    with pytest.raises(PromptError, match="this one holds 2"):  # known now: refused before sending
        chat.ask("And this one?", (noise(2.0, seed=3), 16000), max_new_tokens=4)
    assert len(chat.messages) == 2  # the refused turn left the conversation as it was
    # vLLM's AF3 resamples with torchaudio, which its CPU install cannot load: a raw 22.05 kHz WAV
    # fails there (why the client sends 16 kHz); the same clip through the client is answered
    raw = [{"role": "user", "content": [_part(wav_bytes(noise(2.0, seed=5), 22050)), {"type": "text", "text": "Hi"}]}]
    r = httpx.post(
        vllm.url + "/v1/chat/completions", json={"model": NAME, "messages": raw, "max_tokens": 2}, timeout=120
    )
    assert r.status_code == 500, r.text
    # no /v1/audio/transcriptions for AF3 in vLLM: AF3's transcription prompt through chat instead
    text = remote.transcribe((clip, 16000))
    assert remote.pool.current.transcriptions is False
    want = strip_eos(reference.generate(conversation(clip, ASR_PROMPT), max_new_tokens=500))
    assert text == reference.processor.tokenizer.decode(want, skip_special_tokens=True)
    served = httpx.post(
        edge.url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes(clip))}, timeout=300
    ).json()["text"]
    assert text == served
    assert text == remote.ask(ASR_PROMPT, (clip, 16000), temperature=0).text
    with pytest.raises(ModelNotFoundError):
        AF3.connect(vllm.url, model="no-such-model").ask("Hi", max_new_tokens=2)
    with pytest.raises(ContextOverflowError):
        remote.ask("Hi", max_new_tokens=5000)
    with pytest.raises(EdgeAF3Error, match="serves no adapter"):
        remote.ask("Hi", adapter="think", max_new_tokens=2)
    with pytest.raises(ServerError, match="no server answered"):
        AF3.connect(f"http://127.0.0.1:{free_port()}")


def _data(x: np.ndarray, fmt: str = "WAV") -> str:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, 16000, format=fmt, subtype="FLOAT" if fmt == "WAV" else "PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def _shapes(x: np.ndarray) -> dict[str, dict]:
    """Request bodies: every shape vLLM documents for audio models and every field edge-af3's
    client sends. True: greedy, so both servers must give the same text."""
    audio = {"type": "input_audio", "input_audio": {"data": _data(x), "format": "wav"}}
    url = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + _data(x)}}
    flac = {"type": "input_audio", "input_audio": {"data": _data(x, "FLAC"), "format": "flac"}}
    ask = lambda part, text=QUESTION: [{"role": "user", "content": [part, {"type": "text", "text": text}]}]  # noqa: E731
    g = {"temperature": 0, "max_tokens": 12}
    return {
        "input_audio wav": (True, {"messages": ask(audio)} | g),
        "audio_url data URL": (True, {"messages": ask(url)} | g),
        "input_audio flac": (True, {"messages": ask(flac)} | g),
        "text only, content as a string": (True, {"messages": [{"role": "user", "content": "Hi"}]} | g),
        "max_completion_tokens": (True, {"messages": ask(audio), "temperature": 0, "max_completion_tokens": 9}),
        "top_k + repetition_penalty": (True, {"messages": ask(audio), "top_k": 1, "repetition_penalty": 1.3} | g),
        "stop strings": (True, {"messages": ask(audio), "stop": ["e", "a"]} | g),
        "ignore_eos": (True, {"messages": ask(audio), "ignore_eos": True} | g),
        "system and a follow-up turn": (
            True,
            {
                "messages": [{"role": "system", "content": "You are terse."}]
                + ask(audio)
                + [{"role": "assistant", "content": "A sound."}, {"role": "user", "content": "Tell me more."}]
            }
            | g,
        ),
        "stream with usage": (
            True,
            {"messages": ask(audio), "stream": True, "stream_options": {"include_usage": True}} | g,
        ),
        "sampled: temperature, top_p, seed": (
            False,
            {"messages": ask(audio), "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 8},
        ),
    }


def _post(url: str, body: dict) -> tuple[int, str, int | None]:
    """(status, text, completion tokens) of a chat completion, streamed or not."""
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME} | body, timeout=300)
    if r.status_code != 200:
        return r.status_code, r.text, None
    if not body.get("stream"):
        out = r.json()
        return 200, out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
    text, used = "", None
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                text += (c.get("delta") or {}).get("content") or ""
            used = (chunk.get("usage") or {}).get("completion_tokens", used)
    return 200, text, used


def test_the_same_request_shapes_work_on_both_servers(vllm, edge, clip):
    shapes = _shapes(clip)
    for name, (greedy, body) in shapes.items():
        a, b = _post(edge.url, body), _post(vllm.url, body)
        assert a[0] == 200 and b[0] == 200, (name, a, b)
        assert a[2] is not None and b[2] is not None, (name, "usage")
        if greedy:
            assert a[1] == b[1], (name, a, b)
    _, _, n = _post(vllm.url, shapes["ignore_eos"][1])
    assert n == 12
    _, _, n = _post(edge.url, shapes["max_completion_tokens"][1])
    assert n <= 9


def test_a_pool_fails_over_from_a_dead_server_to_a_live_one(tiny_bundle, vllm, exact, clip, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    edge = Server(tiny_bundle, "--exact", "--name", NAME, tmp_path=tmp_path, key=None)
    try:
        remote = AF3.connect([dead, edge.url, vllm.url])
        assert remote.base_url == edge.url + "/v1"  # the dead one was passed over
        # a host that never answers the connection is passed over after 5 s, not after a whole answer's time
        assert {(s.client.timeout.connect, s.client.timeout.read) for s in remote.pool.servers} == {(5.0, 600)}
        chat = remote.chat()
        first = chat.ask(QUESTION, (clip, 16000), max_new_tokens=10, temperature=0)
    finally:
        edge.stop()
    second = chat.ask("Tell me more.", max_new_tokens=12, temperature=0)  # edge is gone: vLLM answers
    assert remote.base_url == vllm.url + "/v1"
    mine = exact.chat()
    assert first.text == mine.ask(QUESTION, (clip, 16000), max_new_tokens=10, temperature=0).text
    assert second.text == mine.ask("Tell me more.", max_new_tokens=12, temperature=0).text
    # the CLI takes the pool as a comma-separated --base-url
    res = run_cli("ask", "Hi", "--base-url", f"{dead},{vllm.url}", "-t", "0", "-n", "8", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["text"] == exact.ask("Hi", max_new_tokens=8, temperature=0).text


def test_cli_chat_base_url_in_a_terminal(vllm, exact, clip, tmp_path):
    """`edge-af3 chat --base-url` against vLLM in a real terminal (tmux): a clip, a question, a
    follow-up; the saved turns are the exact in-process session's answers."""
    import sys

    import soundfile as sf

    from .test_cli import Terminal

    wav, saved = tmp_path / "clip.wav", tmp_path / "conv.json"
    sf.write(wav, clip, 16000, subtype="FLOAT")
    cmd = f"{sys.executable} -m edge_af3 chat --base-url {vllm.url} -t 0 -n 10; echo EXIT=$?; sleep 30"
    term = Terminal(tmp_path, cmd, {"TERM": "xterm"})
    try:
        term.wait_for("you>")
        term.send(f"/audio {wav}", "Enter")
        term.wait_for("attached")
        term.send(QUESTION, "Enter")
        term.wait_for("tok/s")
        term.send("Tell me more.", "Enter")
        term.wait_for("tok/s", count=2)
        term.send(f"/save {saved}", "Enter")
        term.wait_for("saved 2 turn")
        term.send("/quit", "Enter")
        screen = term.wait_for("EXIT=")
    finally:
        term.close()
    assert "EXIT=0" in screen and "Traceback" not in screen
    turns = json.loads(saved.read_text())["turns"]
    mine = exact.chat()
    assert turns[0]["assistant"] == mine.ask(QUESTION, str(wav), max_new_tokens=10, temperature=0).text
    assert turns[1]["assistant"] == mine.ask("Tell me more.", max_new_tokens=10, temperature=0).text
