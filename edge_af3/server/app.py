"""`edge-af3 serve`: AF3 behind OpenAI's HTTP API (FastAPI + uvicorn).

The model loads on a thread after the socket is open (`/health` says 503 until it is ready);
requests are parsed and their audio encoded on worker threads, then queued for the scheduler's
slots; text comes back from the scheduler thread through the event loop. Every refusal is an
OpenAI-shaped error with its status; nothing a client sends takes the server down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constants import ASR_PROMPT
from ..errors import EdgeAF3Error
from ..prompt import Message
from .http import BodyLimit, auth_check
from .jobs import prepare
from .memory import MemoryConfig, ServedMemory, add_memory_routes
from .metrics import Metrics
from .openai_api import (
    FINISH,
    APIError,
    ChatRequest,
    bad,
    chunk,
    completion,
    json_body,
    now,
    options_from,
    parse_chat,
    usage,
)
from .scheduler import Job, QueueFullError, Scheduler
from .speech import Voices, add_speech_route

log = logging.getLogger("edge_af3.server")


@dataclass
class ServerConfig:
    model: str
    name: str | None = None  # the served model id (default: the checkpoint's Hub id, else the bundle's folder)
    api_key: str | None = None
    parallel: int = 1
    max_queue: int = 16
    max_body_mb: int = 64
    timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    allow_urls: bool = False
    decode_batching: str = "auto"  # auto: batch the slots' steps where measured cheaper | always
    load: dict = field(default_factory=dict)  # AF3.load settings (device, n_ctx, kv_type, threads, ...)
    voices: list[str] = field(default_factory=lambda: ["auto"])  # /v1/audio/speech's voices (opened at first use)
    memory: MemoryConfig | None = None  # --memory: the server listens and answers /v1/memory/ask


class State:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.model = self.scheduler = None
        self.names: set[str] = set()
        self.name = config.name or "edge-af3"
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.on_failed = None  # serve() stops the process when the model cannot be loaded
        self.metrics = Metrics(self)
        self.memory = ServedMemory(config.memory) if config.memory else None

    def load(self, model=None) -> None:
        try:
            if model is None:
                from ..runtime.model import AF3

                extra = self.config.memory.sequences if self.config.memory else 0
                model = AF3.load(self.config.model, n_seq=self.config.parallel + extra, **self.config.load)
            source = (model.bundle.manifest.get("source") or {}).get("id") or ""
            folder = Path(model.bundle.path).name
            self.name = self.config.name or (source if source.count("/") == 1 and not Path(source).exists() else folder)
            self.names = {self.name, folder, source, "edge-af3"} - {""}
            self.scheduler = Scheduler(
                model,
                self.config.parallel,
                self.config.max_queue,
                on_done=self.metrics.job_done,
                on_step=self.metrics.step,
            )
            if self.config.parallel > 1 and self.config.decode_batching == "auto":
                with model.lock:
                    costs = self.scheduler.calibrate()
                log.info(
                    "decode step of 1..%d slots: %s ms -> batched for %s",
                    self.config.parallel,
                    " / ".join(f"{c:.1f}" for c in costs),
                    [n for n in range(1, len(costs) + 1) if self.scheduler.batch_cheaper(n)],
                )
            self.scheduler.start()
            if self.memory:
                self.memory.start(model)
            self.model = model  # ready: /health says 200 from here on
            self.ready.set()
            log.info(
                "ready: %s (%s), %d slot(s) of %d positions",
                self.name,
                model.bundle.path,
                self.config.parallel,
                model.llm.n_ctx,
            )
        except BaseException as e:  # noqa: BLE001 - reported by /health and by serve() (exit 1)
            self.error = e
            self.ready.set()
            log.error("the model failed to load: %s", e)
            if self.on_failed:
                self.on_failed()

    def require(self):
        if self.model is None:
            if self.error is not None:
                raise APIError(503, f"the model failed to load: {self.error}", type="server_error")
            raise APIError(503, "the model is still loading", type="server_error", headers={"Retry-After": "5"})
        return self.model

    def check_model(self, name: str | None) -> None:
        if name and name not in self.names:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def user_error(e: EdgeAF3Error) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), type="rate_limit_error", code=e.code, headers={"Retry-After": str(e.retry_after)})
    return bad(str(e), code=e.code)  # the error vocabulary's code (edge_af3/errors.py), as the CLI's


def create_app(config: ServerConfig, *, model=None) -> FastAPI:
    """The ASGI app; `model` (an `AF3` loaded with n_seq >= config.parallel) skips the loading thread."""
    state = State(config)
    voices = Voices(config.voices)

    async def lifespan(app):
        threading.Thread(target=state.load, args=(model,), name="edge-af3-load", daemon=True).start()
        yield
        voices.close()
        if state.memory:
            state.memory.close()
        if state.scheduler:
            state.scheduler.stop()
        if state.model and model is None:
            state.model.close()
        log.info("stopped")  # (here, not after uvicorn returns: it re-raises the signal it caught)

    app = FastAPI(title="edge-af3", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.af3 = state
    app.add_middleware(BodyLimit, max_bytes=config.max_body_mb << 20, metrics=state.metrics)

    add_speech_route(app, voices, config.api_key)
    add_memory_routes(app, state, state.memory, config.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(EdgeAF3Error)
    async def _user_error(request, e: EdgeAF3Error):
        return _error(user_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error(APIError(e.status_code, str(e.detail), type="invalid_request_error", code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _bug(request, e):
        log.exception("internal error on %s", request.url.path)
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health():
        if state.model is not None:
            return {
                "status": "ok",
                "model": state.name,
                "slots": config.parallel,
                "n_ctx": state.model.llm.n_ctx,
                "decode_step_ms": [round(c, 2) for c in state.scheduler.step_ms],
            }
        body = {"status": "error" if state.error else "loading"}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        auth_check(request, config.api_key)
        state.require()
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "edge-af3"}]}

    async def submit(request: Request, messages, audios, options, **how) -> tuple[Job, asyncio.Queue, list[str]]:
        model = state.require()
        t_arrival = request.state.t_arrival
        state.scheduler.reserve()
        try:
            job, warns = await run_in_threadpool(lambda: prepare(model, messages, audios, options, **how))
            job.prepare_s, job.t_submit = time.perf_counter() - t_arrival, t_arrival
        except BaseException:
            state.scheduler.release()
            raise
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(kind, value):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        job.sink, job.id = sink, request.state.request_id
        request.state.job = job
        state.scheduler.submit(job)
        return job, events, warns

    async def collect(request: Request, job: Job, events: asyncio.Queue) -> Job:
        """Wait for the end; a client that goes away cancels its job."""
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                continue
            if kind == "done":
                return value
            if kind == "error":
                raise value

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth_check(request, config.api_key)
        model = state.require()
        body = await request.body()  # BodyLimit refuses (413) a body past --max-body-mb as it arrives

        def parse() -> ChatRequest:  # JSON, base64 and --allow-urls fetches: off the event loop
            return parse_chat(
                json_body(body),
                default_max=model.options.max_new_tokens,
                allow_urls=config.allow_urls,
                max_bytes=config.max_body_mb << 20,
            )

        req = await run_in_threadpool(parse)
        state.check_model(req.model)
        job, events, warns = await submit(
            request, req.messages, req.audios, req.options, think=req.think, adapter=req.adapter
        )
        headers = {"X-Request-Id": job.id} | ({"X-Edge-AF3-Warning": "; ".join(warns)[:1000]} if warns else {})
        created = now()
        if not req.stream:
            job = await collect(request, job, events)
            return JSONResponse(completion(job, state.name, created, warns), headers=headers)

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def gen():
            try:
                first = chunk(job.id, state.name, created, {"role": "assistant", "content": ""})
                if warns:
                    first["warnings"] = warns
                yield sse(first)
                while True:
                    kind, value = await events.get()
                    if kind == "piece":
                        yield sse(chunk(job.id, state.name, created, {"content": value}))
                    elif kind == "done":
                        yield sse(chunk(job.id, state.name, created, {}, FINISH[value.finish_reason]))
                        if req.include_usage:
                            yield sse(
                                {
                                    "id": job.id,
                                    "object": "chat.completion.chunk",
                                    "created": created,
                                    "model": state.name,
                                    "choices": [],
                                    "usage": usage(value),
                                }
                            )
                        break
                    else:
                        err = (
                            value
                            if isinstance(value, APIError)
                            else APIError(500, f"generation failed: {value}", type="server_error")
                        )
                        yield sse(err.body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                if job.finish_reason is None:  # the client went away: free the slot
                    job.cancel()

        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers | {"Cache-Control": "no-cache"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        auth_check(request, config.api_key)
        model = state.require()
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad("a multipart 'file' with the audio is required", "file")
        data = await upload.read()
        state.check_model(form.get("model") or None)
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json"):
            raise bad(f"response_format {fmt!r} is not supported (json, text, verbose_json)", "response_format")
        try:
            fields = {"temperature": float(form["temperature"]) if form.get("temperature") else 0.0}
            options = options_from(fields, model.options.max_new_tokens)
        except ValueError as e:
            raise bad(str(e), "temperature") from None
        prompt = ASR_PROMPT + (f" {form['prompt']}" if form.get("prompt") else "")
        job, events, warns = await submit(request, [Message("user", prompt, n_audio=1)], [("file", data)], options)
        job = await collect(request, job, events)
        if fmt == "text":
            return PlainTextResponse(job.text)
        out = {"text": job.text}
        if fmt == "verbose_json":
            out |= {
                "task": "transcribe",
                "language": form.get("language") or "unknown",
                "duration": job.audio_seconds,
                "segments": [{"id": 0, "start": 0.0, "end": job.audio_seconds, "text": job.text}],
            }
        out["usage"] = {
            "type": "tokens",
            "input_tokens": job.prompt_len,
            "output_tokens": len(job.tokens),
            "total_tokens": job.prompt_len + len(job.tokens),
        }
        if warns:
            out["warnings"] = warns
        return out

    return app
