"""`POST /v1/audio/speech`: text to speech in OpenAI's request shape, with the voices `serve --voice`
names (docs/voice.md).

Body: `input` (the text, up to 10 000 characters), `voice` (a served voice's name; `default` or
one of OpenAI's own voice names means the first served voice), `response_format` wav | pcm
(16-bit little-endian mono at the voice's rate, given in `X-Sample-Rate`), `stream_format`
audio (bytes as each sentence is synthesised) | sse (`speech.audio.delta` events with base64
audio, then `speech.audio.done`), `model` (any: the voice decides), `speed` (1 only).
The voice's engine starts at the first request that needs it.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import VoiceError
from .http import auth_check
from .openai_api import APIError, bad, json_body

MAX_INPUT = 10_000
OPENAI_VOICES = frozenset("alloy ash ballad coral echo fable onyx nova sage shimmer verse marin cedar".split())


class Voices:
    """The served voices by name, each opened once, at first use."""

    def __init__(self, specs: list[str]):
        self.specs = list(dict.fromkeys(specs))
        self._open: dict[str, object] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str) -> str:
        if not self.specs:
            raise APIError(404, "this server speaks no voice (start it with --voice)", code="no_voice")
        if name in ("default", *OPENAI_VOICES):
            return self.specs[0]
        if name in self.specs:
            return name
        raise bad(f"no voice {name!r}; this server has: {', '.join(self.specs)} (or 'default')", "voice")

    def get(self, spec: str):
        from ..voice import open_voice

        with self._lock:
            voice = self._open.get(spec)
            if voice is None:
                try:
                    voice = self._open[spec] = open_voice(spec)
                except VoiceError as e:
                    raise APIError(503, f"voice {spec!r} cannot speak: {e}", type="server_error") from None
            return voice

    def close(self) -> None:
        with self._lock:
            for voice in self._open.values():
                voice.close()
            self._open.clear()


def wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes at their maximum)."""
    size = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", size)
    )


def parse_speech(payload) -> dict:
    if not isinstance(payload, dict):
        raise bad("the body must be a JSON object")
    text = payload.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad("'input' must be a non-empty string", "input")
    if len(text) > MAX_INPUT:
        raise bad(f"'input' has {len(text)} characters; at most {MAX_INPUT}", "input")
    voice = payload.get("voice", "default")
    if not isinstance(voice, str):
        raise bad("'voice' must be a string (a served voice's name, or 'default')", "voice")
    fmt = payload.get("response_format", "wav")
    if fmt not in ("wav", "pcm"):
        raise bad(f"response_format {fmt!r} is not supported (wav, pcm)", "response_format")
    stream = payload.get("stream_format", "audio")
    if stream not in ("audio", "sse"):
        raise bad(f"stream_format {stream!r} is not supported (audio, sse)", "stream_format")
    speed = payload.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or speed != 1:
        raise bad("only speed 1 is supported", "speed")
    return {"text": text, "voice": voice, "format": fmt, "stream": stream}


def add_speech_route(app: FastAPI, voices: Voices, api_key: str | None) -> None:
    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        from ..voice import speakable
        from ..voice.output import to_pcm16
        from ..voice.sentences import split_sentences

        auth_check(request, api_key)
        req = parse_speech(json_body(await request.body()))
        spec = voices.resolve(req["voice"])
        sentences = [s for s in split_sentences(req["text"]) if speakable(s)]
        if not sentences:
            raise bad("'input' has nothing to say (only symbols or emoji)", "input")
        voice = await run_in_threadpool(voices.get, spec)
        # the first sentence before the response starts: its rate goes in the headers, its
        # failure is an error status, not a cut stream
        try:
            first = await run_in_threadpool(lambda: list(voice.speak(sentences[0])))
        except VoiceError as e:
            raise APIError(503, f"voice {spec!r} failed: {e}", type="server_error") from None
        rate = first[0][1]

        def audio() -> Iterator[bytes]:
            yield from (to_pcm16(samples) for samples, _ in first)
            for sentence in sentences[1:]:
                for samples, r in voice.speak(sentence):
                    if r != rate:
                        raise VoiceError(f"the voice changed its rate mid-answer ({rate} -> {r} Hz)")
                    yield to_pcm16(samples)

        headers = {"X-Sample-Rate": str(rate), "X-Voice": spec}
        if req["stream"] == "sse":

            def events() -> Iterator[str]:
                t0, n = time.perf_counter(), 0
                try:
                    for pcm in audio():
                        n += len(pcm) // 2
                        delta = {"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()}
                        yield f"data: {json.dumps(delta)}\n\n"
                except VoiceError as e:
                    yield f"data: {json.dumps(APIError(500, str(e), type='server_error').body())}\n\n"
                    return
                done = {"type": "speech.audio.done", "seconds": n / rate, "synthesis_s": time.perf_counter() - t0}
                yield f"data: {json.dumps(done)}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        def body_bytes() -> Iterator[bytes]:
            if req["format"] == "wav":
                yield wav_header(rate)
            yield from audio()  # an engine failing later ends the body early (the status is sent)

        media = "audio/wav" if req["format"] == "wav" else "audio/pcm"
        return StreamingResponse(body_bytes(), media_type=media, headers=headers)
