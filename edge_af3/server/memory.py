"""`serve --memory 10m --memory-input SRC`: the server listens too, and answers about what it
heard: `POST /v1/memory/ask`, `GET /v1/memory`.

SRC: `mic` or `mic:DEVICE` (PortAudio), a file (read at real speed, as a live stream; with
`--memory-fast` as fast as the model takes it), or an http(s) stream URL (decoded by ffmpeg,
which must be on PATH). The memory has llama.cpp sequences of its own beside the slots; its
windows are prefilled under the model lock between the slots' steps (a window's prefill delays
them once per 30 s).

POST /v1/memory/ask body: `question` (required), `at` ([start_s, end_s]: about that stretch,
from the archive), and the sampling fields of a chat completion (`max_tokens`, `temperature`,
`top_p`, `top_k`, `seed`, `stop`, `repetition_penalty`). Answer: `answer`, `span` (the stretches
of stream time it covered), `finish_reason`, `usage` (`prompt_tokens`, `prefilled_tokens`,
`completion_tokens`), `first_token_ms`.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..errors import EdgeAF3Error, InputDeviceError, OptionsError
from .http import auth_check
from .openai_api import APIError, bad, json_body, options_from

log = logging.getLogger("edge_af3.server")


@dataclass
class MemoryConfig:
    seconds: float
    source: str  # mic | mic:DEVICE | PATH | http(s)://...
    fast: bool = False  # a file source read as fast as the model takes it
    exact: bool = False
    directory: str | None = None
    skip_silence: bool = False

    @property
    def sequences(self) -> int:
        """llama.cpp sequences beside the slots: the memory's (two when exact), one for time ranges."""
        return 3 if self.exact else 2

    def check(self, n_ctx: int | None) -> None:
        """Before the model loads: the folder, the context and the source."""
        from ..runtime.windows import check_memory_options

        check_memory_options(f"{self.seconds:g}s", self.seconds, self.directory, n_ctx, 500)
        src = self.source
        if src == "mic" or src.startswith("mic:"):
            return
        if src.startswith(("http://", "https://")):
            if not shutil.which("ffmpeg"):
                raise OptionsError("--memory-input URL needs ffmpeg on PATH to decode the stream (apt install ffmpeg)")
            return
        if not Path(src).is_file():
            raise OptionsError(f"--memory-input {src}: no such file (mic, mic:DEVICE, a file or an http(s) URL)")

    def blocks(self):
        from ..capture import MicSource, file_blocks

        src = self.source
        if src == "mic" or src.startswith("mic:"):
            return MicSource(src[4:] or None)
        if src.startswith(("http://", "https://")):
            return FfmpegSource(src)
        return file_blocks(src, realtime=not self.fast)


class FfmpegSource:
    """An http(s) audio stream decoded by ffmpeg (a separate program) to 16 kHz mono blocks."""

    def __init__(self, url: str, block: int = 1600):
        self.url, self.block = url, block
        self.proc = subprocess.Popen(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", url, "-f", "f32le", "-ac", "1", "-ar", "16000", "-"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def __iter__(self):
        while data := self.proc.stdout.read(self.block * 4):
            yield np.frombuffer(data[: len(data) // 4 * 4], np.float32)
        if self.proc.wait() != 0:
            why = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise InputDeviceError(f"{self.url}: ffmpeg could not read the stream ({why[-1] if why else 'no reason'})")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ServedMemory:
    """The memory, its listening thread and its state for /v1/memory."""

    def __init__(self, config: MemoryConfig):
        self.config = config
        self.memory = self.listener = None
        self.error: BaseException | None = None
        self.ended = False
        self.asking = threading.Lock()  # one question at a time; others wait their turn

    def start(self, model) -> None:
        from ..memory_listen import MemoryListener

        c = self.config
        self._model = model
        self._aside = model.claim_sequence(required=True)  # questions about a time range (never a slot's)
        try:
            self.memory = model.memory(
                c.seconds, exact=c.exact, directory=c.directory, skip_silence=c.skip_silence, aside=self._aside
            )
        except BaseException:
            model.release_sequence(self._aside)
            raise
        self.listener = MemoryListener(self.memory, wait=c.fast, on_event=self._log)
        self._thread = threading.Thread(target=self._run, name="edge-af3-memory-input", daemon=True)
        self._thread.start()

    def _log(self, ev) -> None:
        if ev.kind == "dropped":
            log.warning("memory: dropped the window at %.0f s (%s)", ev.info["start_s"], ev.info["reason"])

    def _run(self) -> None:
        try:
            self._blocks = self.config.blocks()
            summary = self.listener.run(self._blocks)
            log.info("memory input ended: %s", summary)
        except BaseException as e:  # noqa: BLE001 - said by /v1/memory; the server keeps serving
            self.error = e
            log.error("memory input failed: %s", e)
        finally:
            self.ended = True

    def status(self) -> dict:
        out = {"status": "error" if self.error else ("ended" if self.ended else "listening")}
        if self.error:
            out["error"] = str(self.error)
        return out | (self.listener.summary() if self.listener else {})

    def close(self) -> None:
        """Stop listening and let the work in flight end (the model closes after this)."""
        if self.listener is not None:
            self.listener.stop()
            from ..capture import MicSource

            if isinstance(getattr(self, "_blocks", None), MicSource | FfmpegSource):
                self._blocks.close()  # a microphone or a stream stops at once
            self.listener.close()
            self._thread.join(timeout=60)
        elif self.memory is not None:
            self.memory.close()
        if self.memory is not None:
            self._model.release_sequence(self._aside)


def _question(body) -> tuple[str, tuple[float, float] | None]:
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    q = body.get("question")
    if not isinstance(q, str) or not q.strip():
        raise bad("'question' (a non-empty string) is required", "question")
    at = body.get("at")
    if at is not None:
        ok = isinstance(at, list) and len(at) == 2 and all(isinstance(v, int | float) for v in at)
        if not ok or not 0 <= at[0] < at[1]:
            raise bad("'at' is [start_s, end_s] with 0 <= start_s < end_s", "at")
        at = (float(at[0]), float(at[1]))
    return q.strip(), at


def add_memory_routes(app: FastAPI, state, served: ServedMemory | None, api_key: str | None) -> None:
    def require() -> ServedMemory:
        state.require()
        if served is None or served.memory is None:
            raise APIError(404, "this server keeps no audio memory (start it with --memory)", code="no_memory")
        return served

    @app.get("/v1/memory")
    def memory_status(request: Request):  # (a worker thread: the event loop never waits on the memory)
        auth_check(request, api_key)
        return require().status()

    @app.post("/v1/memory/ask")
    async def memory_ask(request: Request):
        auth_check(request, api_key)
        served_memory = require()
        mem = served_memory.memory
        body = json_body(await request.body())
        question, at = _question(body)
        options = options_from(body, state.model.options.max_new_tokens)

        def run():
            with served_memory.asking:
                try:
                    stream = mem.stream(question, at=at, options=options)
                    return stream, stream.result()
                except EdgeAF3Error as e:
                    raise bad(str(e), code=e.code) from None
                except RuntimeError as e:  # the model is being closed (the server stops)
                    raise APIError(503, f"the memory cannot answer now: {e}", type="server_error") from None

        stream, answer = await run_in_threadpool(run)
        t = answer.timings
        return {
            "object": "memory.answer",
            "model": state.name,
            "answer": answer.text,
            "span": [[round(a, 3), round(b, 3)] for a, b in stream.span],
            "finish_reason": answer.finish_reason,
            "first_token_ms": round(t.first_token_ms, 1),
            "usage": {
                "prompt_tokens": t.prompt_tokens,
                "prefilled_tokens": t.prompt_tokens - t.reused_tokens,
                "completion_tokens": len(answer.tokens),
            },
        }
