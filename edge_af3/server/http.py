"""The HTTP edge: body limits, API keys, a request id and one log line per request."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from .openai_api import APIError

log = logging.getLogger("edge_af3.server")


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(
            413, f"the request body is over the server's {limit >> 20} MB limit (--max-body-mb)", code="body_too_large"
        )


def auth_check(request, key: str | None) -> None:
    if not key:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'"
            if got
            else "missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


class BodyLimit:
    """Pure ASGI middleware: a request id per request (header X-Request-Id), a declared body over
    the limit answered 413 before it is read, a streamed one cut off as it passes the limit, and
    one log line + metrics when the response has been sent (for a stream: when it ends)."""

    def __init__(self, app, max_bytes: int, metrics=None):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        prefix = "chatcmpl" if scope["path"].endswith("/completions") else "req"
        rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
        state = scope.setdefault("state", {})
        t0, status = time.perf_counter(), [0]
        state["request_id"], state["t_arrival"] = rid, t0
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            err = BodyTooLarge(self.max_bytes)
            body = json.dumps(err.body()).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return self._done(scope, 413, t0, rid)

        logged, received = [False], [0]

        async def receive_counted():  # a chunked body (no Content-Length) is cut off as it passes the limit
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = list(message.get("headers") or []) + [(b"x-request-id", rid.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not logged[0]:
                logged[0] = True
                self._done(scope, status[0], t0, rid)

        try:
            await self.app(scope, receive_counted, send_logged)
        finally:
            if not logged[0]:  # the client went away before the end (499, as nginx logs it)
                self._done(scope, 499 if status[0] in (0, 200) else status[0], t0, rid)

    def _done(self, scope, status: int, t0: float, rid: str) -> None:
        path, job = scope["path"], scope.get("state", {}).get("job")
        ms = (time.perf_counter() - t0) * 1000
        if self.metrics:
            self.metrics.request(path, status)
        if job is None:
            log.info("%s %s %s %d %.0fms", rid, scope["method"], path, status, ms)
            return
        ttft = f"{job.ttft_s * 1000:.0f}ms" if job.ttft_s is not None else "-"
        log.info(
            "%s %s %s %d audio=%.1fs prompt=%d cached=%d tokens=%d prepare=%.0fms ttft=%s finish=%s slot=%d %.0fms",
            rid,
            scope["method"],
            path,
            status,
            job.audio_seconds,
            job.prompt_len,
            job.reused,
            len(job.tokens),
            job.prepare_s * 1000,
            ttft,
            job.finish_reason or ("cancelled" if status == 499 else "-"),
            job.slot,
            ms,
        )
