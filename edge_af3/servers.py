"""The servers behind one `AF3.connect` client: one base URL, or several tried in order.

A server that cannot be reached (the connection refused, or not made within `CONNECT_S`) or that
answers 502 / 503 (a proxy with no backend, a server still loading its model) has not started on
the request: it is passed over for the next one, and tried again after `RETRY_S` seconds. Any
other failure — an HTTP error, a read timeout, a connection lost after the request was sent, a
504 (the backend may be at work on it) — is raised as an `EdgeAF3Error`, never re-sent elsewhere:
a generation is not run twice.
Each request starts from the server that answered last, so a conversation stays where its KV
prefix is cached until that server goes away.

What each server can do is learnt from it, not assumed: its kind (`owned_by` in `/v1/models`:
"edge-af3", "vllm", ...), the most audio clips it takes in one prompt (vLLM's AF3 takes one: read
from its 400 answer, then checked before sending), whether it has `/v1/audio/transcriptions`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

from .errors import (
    ContextOverflowError,
    EdgeAF3Error,
    MissingDependencyError,
    ModelNotFoundError,
    OptionsError,
    PromptError,
    QueueFullError,
    ServerError,
    kinds,
)

RETRY_S = 30.0  # a server passed over is tried again after this long
CONNECT_S = 5.0  # a server that takes longer to accept the connection is passed over
FAILOVER_STATUS = (502, 503)  # the request did not reach a backend
NOT_CONNECTED = ("ConnectError", "ConnectTimeout")  # httpx's errors before the request was sent
_AUDIO_LIMIT = re.compile(r"at most (\d+) audio", re.IGNORECASE)


@dataclass
class Server:
    url: str  # ends in /v1
    client: Any  # openai.OpenAI
    model: str | None = None
    kind: str | None = None  # None until its /v1/models was read
    models: tuple[str, ...] = ()
    max_audios: int | None = None  # None: no limit known
    transcriptions: bool = True  # False once its /v1/audio/transcriptions answered 404
    down_until: float = 0.0


def api_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise OptionsError(f"{url!r} is not a server's URL: give http(s)://HOST:PORT")
    return url if url.endswith("/v1") else url + "/v1"


def urls_of(base_url) -> list[str]:
    """One URL, a comma-separated list (the CLI's --base-url), or a list of URLs."""
    items = base_url.split(",") if isinstance(base_url, str) else list(base_url or [])
    urls = [api_url(u) for u in items if u.strip()]
    if not urls:
        raise OptionsError("no server URL given")
    return urls


class Pool:
    def __init__(self, base_url, api_key: str | None = None, model: str | None = None, *, timeout: float = 600):
        try:
            import openai
        except ImportError:
            raise MissingDependencyError(
                "connecting to a server needs the openai package: pip install 'edge-af3[client]'"
            ) from None
        self.openai = openai
        urls = urls_of(base_url)
        key = api_key or os.environ.get("EDGE_AF3_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        retries = 2 if len(urls) == 1 else 0  # with several servers, the next server is the retry
        limit = openai.Timeout(timeout, connect=min(CONNECT_S, timeout))  # an unreachable host: the next one soon
        self.servers = [
            Server(u, openai.OpenAI(base_url=u, api_key=key, timeout=limit, max_retries=retries)) for u in urls
        ]
        self.model = model
        self.current = self.servers[0]
        self.call(lambda s: s)  # the first server that answers: it is known now, or none is reachable

    def _learn(self, s: Server) -> None:
        if s.kind is not None:
            return
        models = list(s.client.models.list())
        if not models:
            raise ServerError(f"{s.url} serves no model", status=None)
        s.models = tuple(m.id for m in models)
        s.kind = str(getattr(models[0], "owned_by", None) or "unknown")
        s.model = self.model or models[0].id

    def _order(self) -> list[Server]:
        i = self.servers.index(self.current)
        ring = self.servers[i:] + self.servers[:i]
        now = time.monotonic()
        return [s for s in ring if s.down_until <= now] + [s for s in ring if s.down_until > now]

    def call(self, fn):
        """fn(server) on the first server that answers; the next one when it cannot be reached."""
        passed: list[str] = []
        for s in self._order():
            try:
                self._learn(s)
                out = fn(s)
            except self.openai.APIConnectionError as e:
                if type(e.__cause__).__name__ not in NOT_CONNECTED:  # sent, then lost: not re-sent
                    raise ServerError(f"{s.url}: {e} ({type(e.__cause__).__name__})", status=None) from None
                s.down_until = time.monotonic() + RETRY_S
                passed.append(f"{s.url}: {e}")
                continue
            except self.openai.APIStatusError as e:
                if e.status_code in FAILOVER_STATUS:
                    s.down_until = time.monotonic() + RETRY_S
                    passed.append(f"{s.url}: {e.status_code} {message(e)}")
                    continue
                raise error_from(s, e) from None
            except self.openai.OpenAIError as e:
                raise ServerError(f"{s.url}: {e}", status=None) from None
            s.down_until = 0.0
            self.current = s
            return out
        raise ServerError("no server answered: " + "; ".join(passed), status=None)

    def check_audios(self, n: int) -> None:
        """Refuse now a prompt with more clips than the current server is known to take."""
        s = self.current
        if s.max_audios is not None and n > s.max_audios:
            raise PromptError(audio_limit(s, n))

    def close(self) -> None:
        for s in self.servers:
            s.client.close()


def audio_limit(s: Server, n: int | None) -> str:
    holds = f", and this one holds {n}" if n else ""
    return (
        f"{s.url} ({s.kind}) takes at most {s.max_audios} audio clip(s) in one prompt{holds} (a chat re-sends "
        "every earlier turn's clips). Ask about each clip in a conversation of its own (ask(), or a new chat()), "
        "or use edge-af3 serve, which takes several clips in one prompt."
    )


def message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)


def error_from(s: Server, e) -> EdgeAF3Error:
    """An HTTP error answer as edge-af3's error of the same meaning, naming the server."""
    text = message(e)
    limit = _AUDIO_LIMIT.search(text)
    if limit and e.status_code == 400:
        s.max_audios = int(limit[1])
        return PromptError(audio_limit(s, None) + f" The server said: {text}")
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    msg = f"{s.url}: {e.status_code} {text}"
    if code == QueueFullError.code or e.status_code == 429:
        retry = e.response.headers.get("retry-after", "1") if getattr(e, "response", None) is not None else "1"
        return QueueFullError(msg, retry_after=int(retry) if retry.isdigit() else 1)
    cls = _by_code(code)
    if cls is None and e.status_code == 404 and "model" in text.lower():
        cls = ModelNotFoundError
    if cls is None and e.status_code == 400 and ("context length" in text or "max_model_len" in text):
        cls = ContextOverflowError  # vLLM's words for a prompt + max_tokens over its context
    if cls is None:
        return ServerError(msg, status=e.status_code)
    return cls(msg)


def stream_error(s: Server, e, pieces: int) -> EdgeAF3Error:
    """An error that came inside a streamed answer (an SSE error event: its code, no status), or
    the stream broken off."""
    status = getattr(e, "status_code", None)
    if status is not None:
        return error_from(s, e)
    cls = _by_code(getattr(e, "code", None))
    if cls is not None and cls is not QueueFullError:
        return cls(f"{s.url}: {message(e)}")
    return ServerError(f"{s.url}: the answer broke off after {pieces} pieces: {message(e)}", status=None)


def _by_code(code) -> type[EdgeAF3Error] | None:
    """edge-af3's error class for an error code its server sent (None: no such code)."""
    if not isinstance(code, str):
        return None
    cls = {c.code: c for c in kinds() if c is not EdgeAF3Error}.get(code)
    return None if cls is ServerError else cls
