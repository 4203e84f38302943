"""`edge-af3 serve` over real HTTP: a server subprocess (torch and transformers blocked in it, as
on a Jetson) on a free localhost port, the official `openai` SDK and `AF3.connect` as clients,
answers compared with `edge-af3 ask --json` and the in-process API on the same bundle."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from edge_af3 import AF3
from edge_af3.constants import ASR_PROMPT

from .conftest import ROOT, free_port, noise, run_cli, sweep, wait_up
from .test_layers import BLOCKER
from .test_runtime import conversation, strip_eos

KEY = "test-key"
SERVE = (
    BLOCKER
    + """
from edge_af3.cli import main
sys.argv = ["edge-af3", "serve"] + sys.argv[1:]
main()
"""
)


class Server:
    """`edge-af3 serve` in a subprocess, up when /health says 200."""

    def __init__(self, bundle, *args: str, tmp_path=None, key: str | None = KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = (tmp_path / f"server-{self.port}.log") if tmp_path else None
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL
        extra = ["--api-key", key] if key else []
        env = dict(os.environ, EDGE_AF3_API_KEY="")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "-m", str(bundle), "--port", str(self.port), *extra, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        wait_up(self.proc, self.url + "/health", 180, self.tail)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log and self.log.exists() else ""

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"} | kw.pop("headers", {})
        return httpx.post(self.url + path, headers=headers, timeout=120, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"} | kw.pop("headers", {})
        return httpx.get(self.url + path, headers=headers, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wav_bytes(x: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def user(text: str, *audios: bytes) -> dict:
    return {"role": "user", "content": [audio_part(a) for a in audios] + [{"type": "text", "text": text}]}


GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = Server(
        tiny_bundle,
        "--parallel",
        "4",
        "--max-queue",
        "32",
        "--max-body-mb",
        "16",
        "--decode-batching",
        "always",
        tmp_path=tmp_path_factory.mktemp("server"),
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(tiny_bundle):
    with AF3.load(tiny_bundle) as m:
        yield m


@pytest.fixture(scope="module")
def clips(speech_wav, real_clip) -> list[bytes]:
    return [speech_wav.read_bytes(), real_clip.read_bytes(), wav_bytes(noise(3.0, seed=4)), wav_bytes(sweep(2.0))]


def test_batched_decode_of_four_sequences_equals_each_alone(tiny_bundle):
    """llama.cpp's multi-sequence KV: four prompts decoded in one batch per step give the tokens
    each gives alone in a one-sequence context (repetition penalty on, as AF3's config has it)."""
    from edge_af3.engines.llamacpp import LlamaEngine, SamplerOptions

    gguf = next(tiny_bundle.glob("llm-*.gguf"))
    prompts = ["hello there", "What is it?", "Describe the sound in detail", "x"]
    opts = SamplerOptions(repetition_penalty=1.05)

    def start(e, text, seq):
        ids = e.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
        e.seqs[seq].decode_tokens(ids)
        s = e.make_sampler(opts)
        e.accept(s, ids)
        return s, [e.sample(s)]

    with LlamaEngine(gguf, n_ctx=512, threads=2) as one:
        alone = []
        for p in prompts:
            one.truncate(0)
            s, out = start(one, p, 0)
            for _ in range(31):
                one.decode_tokens([out[-1]])
                out.append(one.sample(s))
            one.free_sampler(s)
            alone.append(out)
    with LlamaEngine(gguf, n_ctx=512, threads=2, n_seq=4) as four:
        assert four.n_ctx == 512 and four.n_seq == 4
        started = [start(four, p, i) for i, p in enumerate(prompts)]
        samplers, outs = [s for s, _ in started], [o for _, o in started]
        for _ in range(31):
            four.decode_step([(i, outs[i][-1]) for i in range(4)])
            for i in range(4):
                outs[i].append(four.sample(samplers[i], i))
        assert [four.seqs[i].n_past for i in range(4)] == [len(four.seqs[i].items) for i in range(4)]
        for s in samplers:
            four.free_sampler(s)
    assert outs == alone


def test_stop_strings_are_cut_across_pieces():
    from edge_af3.runtime.types import StopScanner

    scan = StopScanner(("</end>", "STOP"))
    shown = [scan.feed(p) for p in ["Hello ", "wor", "ld</", "en", "d> more"]]
    assert "".join(shown) == "Hello world" and scan.hit and scan.text == "Hello world"
    assert shown[2] == "ld"  # "</" held back until the next piece tells
    scan = StopScanner(("STOP",))
    assert [scan.feed(p) for p in ["ST", "ART"]] == ["", "START"] and scan.flush() == "" and not scan.hit
    scan = StopScanner(("STOP",))
    assert scan.feed("a ST") == "a " and scan.flush() == "ST" and scan.text == "a ST"


def test_openai_sdk_plain_and_stream_equal_ask_json(server, tiny_bundle, speech_wav):
    res = run_cli("ask", str(speech_wav), "What do you hear?", "-m", str(tiny_bundle), "-t", "0", "-n", "24", "--json")
    assert res.returncode == 0, res.stderr
    want = json.loads(res.stdout)
    client = server.client()
    msgs = [user("What do you hear?", speech_wav.read_bytes())]
    r = client.chat.completions.create(model="edge-af3", messages=msgs, max_tokens=24, **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].finish_reason == {"length": "length", "stop": "stop"}[want["finish_reason"]]
    assert r.usage.prompt_tokens == want["timings"]["prompt_tokens"]
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.usage.prompt_tokens_details.audio_tokens == want["timings"]["audio_tokens"]
    chunks = list(
        client.chat.completions.create(
            model="edge-af3",
            messages=msgs,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["tokens"])
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt: the slot's KV prefix
    # vLLM's other documented shape: audio_url with a data: URL
    data_url = "data:audio/wav;base64," + base64.b64encode(speech_wav.read_bytes()).decode()
    r2 = client.chat.completions.create(
        model="edge-af3",
        max_tokens=24,
        **GREEDY,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "audio_url", "audio_url": {"url": data_url}},
                    {"type": "text", "text": "What do you hear?"},
                ],
            }
        ],
    )
    assert r2.choices[0].message.content == want["text"]


def test_two_turns_two_clips_reuse_the_prefix_and_the_rows(server, model, clips):
    session = model.chat()
    a1 = session.ask(
        "What is in the first clip?", (sf.read(io.BytesIO(clips[2]))[0], 16000), max_new_tokens=12, **GREEDY
    )
    a2 = session.ask("And in this one?", (sf.read(io.BytesIO(clips[3]))[0], 16000), max_new_tokens=12, **GREEDY)
    client = server.client()
    before = server.metrics()
    msgs = [user("What is in the first clip?", clips[2])]
    r1 = client.chat.completions.create(model="edge-af3", messages=msgs, max_tokens=12, **GREEDY)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, user("And in this one?", clips[3])]
    r2 = client.chat.completions.create(model="edge-af3", messages=msgs, max_tokens=12, **GREEDY)
    after = server.metrics()
    assert [r1.choices[0].message.content, r2.choices[0].message.content] == [a1.text, a2.text]
    assert r2.usage.prompt_tokens == a2.timings.prompt_tokens
    # turn 2 decodes only its own part: turn 1's prompt and the answer up to where its re-tokenised
    # text parts from the sampled tokens (random weights write text that BPE splits otherwise) are
    # the slot's KV prefix, as in the in-process session ...
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert abs(r2.usage.prompt_tokens_details.cached_tokens - a2.timings.reused_tokens) <= 1
    # ... and clip 1 is not encoded again: 2 clips encoded over the two requests, 1 from the rows cache
    enc = 'edge_af3_audio_clips_total{source="encoded"}'
    cache = 'edge_af3_audio_clips_total{source="cache"}'
    assert after[enc] - before.get(enc, 0) == 2 and after[cache] - before.get(cache, 0) == 1


def test_transcriptions(server, model, speech_wav):
    want = model.ask(ASR_PROMPT, str(speech_wav), temperature=0).text
    client = server.client()
    with open(speech_wav, "rb") as f:
        t = client.audio.transcriptions.create(model="edge-af3", file=f)
    assert t.text == want
    with open(speech_wav, "rb") as f:
        text = client.audio.transcriptions.create(model="edge-af3", file=f, response_format="text", language="en")
    assert text.strip() == want.strip()
    with open(speech_wav, "rb") as f:
        v = client.audio.transcriptions.create(model="edge-af3", file=f, response_format="verbose_json")
    assert v.text == want and abs(v.duration - sf.info(str(speech_wav)).duration) < 0.05
    bad = server.post("/v1/audio/transcriptions", files={"file": speech_wav.read_bytes()}, data={"temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_connect_ask_stream_chat(server, model, speech_wav, real_clip):
    remote = AF3.connect(server.url, api_key=KEY)
    assert remote.model == "f32"  # the bundle folder's name: the checkpoint's source is a local path
    want = model.ask("Describe the audio.", str(speech_wav), max_new_tokens=16, **GREEDY)
    got = remote.ask("Describe the audio.", str(speech_wav), max_new_tokens=16, **GREEDY)
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert (
        got.timings.audio_tokens == want.timings.audio_tokens
        and got.timings.prompt_tokens == want.timings.prompt_tokens
    )
    with remote.stream("Describe the audio.", str(speech_wav), max_new_tokens=16, **GREEDY) as s:
        pieces = list(s)
    assert "".join(pieces) == want.text and s.answer.finish_reason == want.finish_reason
    local, chat = model.chat(), remote.chat()
    for prompt, clip in (("What is this?", speech_wav), ("And this?", real_clip)):
        a, b = (
            local.ask(prompt, str(clip), max_new_tokens=10, **GREEDY),
            chat.ask(prompt, str(clip), max_new_tokens=10, **GREEDY),
        )
        assert a.text == b.text
    # the sampling defaults on both sides are the checkpoint's: the same seed gives the same text
    assert remote.ask("Hi", max_new_tokens=12, seed=7).text == model.ask("Hi", max_new_tokens=12, seed=7).text
    full = model.ask("Hi", max_new_tokens=40, **GREEDY).text
    stop = full[10:13]
    cut = model.ask("Hi", max_new_tokens=40, **GREEDY, stop=[stop, "never-in-the-text"])
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    got = remote.ask("Hi", max_new_tokens=40, **GREEDY, stop=[stop, "never-in-the-text"])
    assert got.text == cut.text and got.finish_reason == "stop"


def test_cli_ask_base_url(server, model, speech_wav):
    res = run_cli(
        "ask",
        str(speech_wav),
        "What do you hear?",
        "--base-url",
        server.url,
        "--api-key",
        KEY,
        "-t",
        "0",
        "-n",
        "12",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert (
        json.loads(res.stdout)["text"]
        == model.ask("What do you hear?", str(speech_wav), max_new_tokens=12, **GREEDY).text
    )
    t = json.loads(res.stdout)["timings"]  # what a client cannot know is not made up
    assert t["features_ms"] is None and t["prefill_ms"] is None and t["first_token_ms"] > 0
    res = run_cli("ask", "Hi", "--base-url", server.url, "--api-key", KEY, "-n", "2")
    assert res.returncode == 0 and "prefill" not in res.stderr and "first token" in res.stderr


def _stream(client, msgs, **kw):
    text, finish, usage = "", None, None
    for c in client.chat.completions.create(
        model="edge-af3", messages=msgs, stream=True, stream_options={"include_usage": True}, **kw
    ):
        for ch in c.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
        usage = c.usage or usage
    return text, finish, usage


def test_sixteen_concurrent_clients_on_four_slots(server, clips):
    prompts = ["What do you hear?", "Describe the sound.", "Is anyone speaking?", "How loud is it?"]
    requests = [[user(p, c)] for p in prompts for c in clips]
    client = server.client(timeout=300)
    before = server.metrics()
    results: list = [None] * len(requests)
    go = threading.Barrier(len(requests))

    def run(i):
        go.wait()
        results[i] = _stream(client, requests[i], max_tokens=20, **GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    after = server.metrics()
    assert all(r is not None and r[1] in ("stop", "length") for r in results)
    steps = after["edge_af3_decode_batch_size_count"] - before.get("edge_af3_decode_batch_size_count", 0)
    single = after['edge_af3_decode_batch_size_bucket{le="1.0"}'] - before.get(
        'edge_af3_decode_batch_size_bucket{le="1.0"}', 0
    )
    rows = after["edge_af3_decode_batch_size_sum"] - before.get("edge_af3_decode_batch_size_sum", 0)
    assert single < steps and rows / steps > 1.5  # batched: most steps advanced several slots at once
    assert (
        after['edge_af3_decode_batch_size_bucket{le="4.0"}'] == after["edge_af3_decode_batch_size_count"]
    )  # <= 4 slots
    for i, msgs in enumerate(requests):  # the same request, alone
        assert _stream(client, msgs, max_tokens=20, **GREEDY)[:2] == results[i][:2], f"request {i} differs alone"


def test_auto_decode_batching_is_measured_and_keeps_every_text(tiny_bundle, model, clips, tmp_path):
    srv = Server(tiny_bundle, "--parallel", "3", tmp_path=tmp_path)  # --decode-batching auto: the default
    try:
        costs = httpx.get(srv.url + "/health", timeout=10).json()["decode_step_ms"]
        assert len(costs) == 3 and all(c > 0 for c in costs)
        assert "decode step of 1..3 slots" in srv.tail()
        client = srv.client(timeout=300)
        out: dict = {}
        threads = [
            threading.Thread(
                target=lambda i=i: out.update(
                    {i: _stream(client, [user("What is it?", clips[i])], max_tokens=12, **GREEDY)}
                )
            )
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for i in range(3):
            want = model.ask(
                "What is it?",
                (sf.read(io.BytesIO(clips[i]))[0], sf.info(io.BytesIO(clips[i])).samplerate),
                max_new_tokens=12,
                **GREEDY,
            )
            assert out[i][0] == want.text
    finally:
        srv.stop()


def test_queue_full_429_dropped_client_frees_its_slot_sigterm_drains(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, "--parallel", "1", "--max-queue", "1", "--n-ctx", "8192", tmp_path=tmp_path, key=None)
    try:
        client = srv.client(timeout=300)
        long = dict(max_tokens=6000, extra_body={"ignore_eos": True}, **GREEDY)
        a = client.chat.completions.create(model="edge-af3", messages=[user("Count.")], stream=True, **long)
        next(iter(a))  # a holds the only slot
        b_result = {}
        b = threading.Thread(target=lambda: b_result.update(r=_stream(client, [user("Wait.")], max_tokens=8, **GREEDY)))
        b.start()
        deadline = time.monotonic() + 60
        while srv.metrics()["edge_af3_queue_depth"] < 1:  # b waits for the slot
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(
            srv.url + "/v1/chat/completions", json={"messages": [user("Third.")], "max_tokens": 4}, timeout=30
        )
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
        a.close()  # the client goes away mid-stream: its generation is cancelled and b gets the slot
        b.join(timeout=120)
        assert b_result["r"][1] == "length" and b_result["r"][2].completion_tokens == 8
        m = srv.metrics()
        assert m['edge_af3_generations_total{reason="cancelled"}'] == 1
        assert m["edge_af3_completion_tokens_total"] - 8 < 6000  # a stopped long before its 6000 tokens
        assert m["edge_af3_in_flight"] == 0 and m["edge_af3_queue_depth"] == 0
        # SIGTERM: the stream in flight finishes, new connections are refused, the process exits
        d = client.chat.completions.create(
            model="edge-af3",
            messages=[user("Drain.")],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=300,
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        it = iter(d)
        next(it)
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert rest[-1].usage.completion_tokens == 300
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
        log = srv.tail()  # start, drain and stop are said
        assert "listening on" in log and "SIGTERM: draining" in log and "1 in flight" in log
        assert log.rstrip().endswith("stopped"), log[-500:]
    finally:
        srv.stop()


def _nan_wav() -> bytes:
    x = noise(1.0)
    x[100] = np.nan
    return wav_bytes(x)


def _chat(*parts, **extra) -> dict:
    return {"model": "edge-af3", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4} | extra


TEXT = {"type": "text", "text": "What is it?"}
BAD = {
    "malformed JSON": (b'{"messages": [', 400, None),
    "not an object": ([1, 2], 400, None),
    "no messages": ({"model": "edge-af3"}, 400, "messages"),
    "bad base64": (
        _chat({"type": "input_audio", "input_audio": {"data": "%%%not base64%%%", "format": "wav"}}, TEXT),
        400,
        "messages[0].content[0].input_audio.data",
    ),
    "not audio": (_chat(audio_part(os.urandom(4000)), TEXT), 400, None),
    "NaN audio": (_chat(audio_part(_nan_wav()), TEXT), 400, None),
    "too short": (_chat(audio_part(wav_bytes(np.zeros(100, np.float32))), TEXT), 400, None),
    "bad format": (
        _chat({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, TEXT),
        400,
        "messages[0].content[0].input_audio.format",
    ),
    "more <sound> than clips": (
        _chat({"type": "text", "text": "<sound><sound> compare"}, audio_part(wav_bytes(noise(1.0)))),
        400,
        "messages[0].content",
    ),
    "http url refused": (
        _chat({"type": "audio_url", "audio_url": {"url": "http://example.com/a.wav"}}, TEXT),
        400,
        "messages[0].content[0].audio_url.url",
    ),
    "file url refused": (_chat({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}, TEXT), 400, None),
    "unknown part": (_chat({"type": "image_url", "image_url": {"url": "data:,"}}), 400, "messages[0].content[0].type"),
    "audio from the assistant": (
        {"messages": [{"role": "assistant", "content": [audio_part(b"RIFF")]}, {"role": "user", "content": "hi"}]},
        400,
        None,
    ),
    "last turn not the user's": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        400,
        None,
    ),
    "bad role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "n=2": (_chat(TEXT, n=2), 400, "n"),
    "temperature out of range": (_chat(TEXT, temperature=5), 400, "temperature"),
    "max_tokens not a number": (_chat(TEXT, max_tokens="many"), 400, "max_tokens"),
    "bad stop": (_chat(TEXT, stop=[1]), 400, "stop"),
    "tools": (_chat(TEXT, tools=[{"type": "function"}]), 400, "tools"),
    "unknown model": (_chat(TEXT, model="gpt-4o"), 404, "model"),
    "over the context": (_chat({"type": "text", "text": "hello " * 17000}), 400, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, case):
    body, status, param = BAD[case]
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = server.post("/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    if case == "over the context":
        assert err["code"] == "context_length_exceeded" and "n_ctx >=" in err["message"]
    # one error vocabulary with the CLI: a snake_case code, never a Python class name or an object repr
    codes = {"not audio": "invalid_audio", "NaN audio": "invalid_audio", "too short": "invalid_audio"}
    if case in codes:
        assert err["code"] == codes[case] and "object at 0x" not in err["message"], err
    if err["code"] is not None:
        assert err["code"].islower() and " " not in err["code"], err
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_auth_body_limit_long_audio_and_other_routes(server, clips):
    ok = _chat(audio_part(clips[3]), TEXT)
    r = httpx.post(server.url + "/v1/chat/completions", json=ok, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = server.post("/v1/chat/completions", json=ok, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # health needs no key
    r = server.post("/v1/chat/completions", content=b"{" + b" " * (17 << 20) + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: cut off as it passes the limit
        for _ in range(17):
            yield b" " * (1 << 20)

    r = server.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413

    def multipart():  # a file part that never ends within the limit
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        yield from chunked()

    r = server.post(
        "/v1/audio/transcriptions", content=multipart(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 413
    long = wav_bytes((0.1 * np.sin(np.arange(601 * 8000) * 0.05)).astype(np.float32), 8000, "PCM_16")
    r = server.post("/v1/chat/completions", json=_chat(audio_part(long), TEXT, temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        any("600 s" in w for w in body["warnings"]) and body["usage"]["prompt_tokens_details"]["audio_tokens"] == 15000
    )
    assert "600 s" in r.headers["X-Edge-AF3-Warning"]
    r = server.post("/v1/audio/transcriptions", data={"model": "edge-af3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = server.post("/v1/audio/transcriptions", files={"file": ("a.wav", clips[3])}, data={"response_format": "srt"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = server.post("/v1/nothing-here", json={})
    assert r.status_code == 404 and "error" in r.json()
    m = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "edge_af3_requests_total",
        "edge_af3_queue_depth",
        "edge_af3_in_flight",
        "edge_af3_time_to_first_token_seconds_bucket",
        "edge_af3_decode_tokens_per_second_bucket",
        "edge_af3_audio_seconds_total",
    ):
        assert name in m
    assert 'edge_af3_requests_total{path="/v1/chat/completions",status="401"}' in m
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_health_is_503_while_loading():
    from fastapi.testclient import TestClient

    from edge_af3.server.app import ServerConfig, create_app

    client = TestClient(create_app(ServerConfig(model="/nonexistent")))  # no lifespan: the model never loads
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error" and r.headers["Retry-After"]


def test_a_model_that_cannot_load_ends_serve_with_one_line(tmp_path):
    res = run_cli("serve", "-m", str(tmp_path / "missing"), "--port", "0")
    assert res.returncode == 1 and "error:" in res.stderr and "Traceback" not in res.stderr


def test_a_slow_audio_url_never_stalls_another_clients_stream(tiny_bundle, tmp_path, speech_wav):
    """With --allow-urls, B's audio_url is served by a local HTTP server that holds the response
    until the test releases it. Meanwhile A's stream must run to its end: request parsing and
    the URL fetch are off the event loop (were they on it, A's read would time out). Then B is
    released and answered."""
    import http.server

    asked, release = threading.Event(), threading.Event()
    audio = speech_wav.read_bytes()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            asked.set()
            release.wait(120)
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(audio)))
            self.end_headers()
            self.wfile.write(audio)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    srv = Server(tiny_bundle, "--parallel", "2", "--allow-urls", tmp_path=tmp_path, key=None)
    try:
        url = f"http://127.0.0.1:{web.server_address[1]}/clip.wav"
        b_result = {}
        msg_b = {
            "role": "user",
            "content": [
                {"type": "audio_url", "audio_url": {"url": url}},
                {"type": "text", "text": "What do you hear?"},
            ],
        }
        b = threading.Thread(
            target=lambda: b_result.update(
                r=srv.client(timeout=180).chat.completions.create(
                    model="edge-af3", messages=[msg_b], max_tokens=8, **GREEDY
                )
            )
        )
        b.start()
        assert asked.wait(60), "the server never fetched the audio_url"
        a = srv.client(timeout=30).chat.completions.create(
            model="edge-af3",
            messages=[user("Count to ten.")],
            max_tokens=16,
            stream=True,
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        text = "".join(c.choices[0].delta.content or "" for c in a if c.choices)
        assert text and not release.is_set()  # A finished while B's audio was still being fetched
        release.set()
        b.join(timeout=180)
        assert b_result["r"].choices[0].message.content and b_result["r"].usage.prompt_tokens_details.audio_tokens > 0
    finally:
        release.set()
        srv.stop()
        web.shutdown()


def test_server_greedy_exact_equals_transformers(tiny_bundle, reference, tmp_path):
    x = noise(4.0, seed=11)
    srv = Server(tiny_bundle, "--exact", tmp_path=tmp_path, key=None)
    try:
        r = srv.client(timeout=120).chat.completions.create(
            model="edge-af3", messages=[user("What do you hear?", wav_bytes(x))], max_tokens=24, **GREEDY
        )
    finally:
        srv.stop()
    want = strip_eos(reference.generate(conversation(x), max_new_tokens=24))
    assert r.usage.completion_tokens == len(want)
    assert r.choices[0].message.content == reference.processor.tokenizer.decode(want, skip_special_tokens=True)
