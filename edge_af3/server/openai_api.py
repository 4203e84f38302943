"""OpenAI's chat and transcription schema <-> edge-af3: request parsing, response shapes, errors.

Parsing is by hand, not by a schema library, so every refusal names the field at fault in
OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`). What is accepted:
- messages: roles system | developer (as system) | user | assistant; content a string or a list of
  parts `text`, `input_audio` (`{"data": base64, "format": "wav" | "mp3" | "flac" | "ogg"}`) and
  `audio_url` (`{"url": "data:audio/...;base64,..."}`; http(s) only with `--allow-urls`). Audio in
  any user turn, several per turn; a `<sound>` written in the text places a clip there (as the HF
  processor does), otherwise the message's clips go before its text as AF3's template puts them.
- sampling: max_tokens / max_completion_tokens, temperature, top_p, seed, stop, n=1, and the
  fields vLLM also takes: top_k, repetition_penalty, ignore_eos; `think` (AF3's think mode: the
  bundle's think adapter + AF3's suffix), `adapter` (an exported adapter by name).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..constants import THINK_SUFFIX
from ..prompt import Message
from ..runtime.types import GenerationOptions

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "logprobs",
    "top_logprobs",
    "audio",
    "modalities",
    "response_format",
)


class APIError(Exception):
    """An answer that is an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def json_body(body: bytes):
    """A request body as JSON, or the 400 that says why not."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the body is not valid JSON ({e})") from None


@dataclass
class ChatRequest:
    model: str | None
    messages: list[Message]
    audios: list[tuple[str, bytes]]  # (the field it came from, file bytes), in prompt order
    options: GenerationOptions
    stream: bool = False
    include_usage: bool = False
    think: bool = False
    adapter: str | None = None


def _number(body: dict, name: str, kind=float, lo=None, hi=None):
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise bad(f"'{name}' must be a {'whole ' if kind is int else ''}number, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {value!r}", name)
    return kind(value)


def options_from(body: dict, default_max: int) -> GenerationOptions:
    """The sampling fields of a request as `GenerationOptions` (None = the checkpoint's default)."""
    n = _number(body, "n", int, 1, 1 << 30)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    max_new = _number(body, "max_completion_tokens", int, 1, 1 << 30) or _number(body, "max_tokens", int, 1, 1 << 30)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise bad("'stop' must be a string or a list of strings", "stop")
    stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    if len(stop) > 16:
        raise bad("'stop' takes at most 16 strings", "stop")
    seed = _number(body, "seed", int)
    top_k = _number(body, "top_k", int, -1, 1 << 20)  # vLLM's -1 = off is our 0
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be true or false", "ignore_eos")
    return GenerationOptions(
        max_new_tokens=max_new or default_max,
        temperature=_number(body, "temperature", float, 0, 2),
        top_p=_number(body, "top_p", float, 1e-9, 1),
        top_k=None if top_k is None else max(0, top_k),
        repetition_penalty=_number(body, "repetition_penalty", float, 1e-3, 100),
        seed=(seed or 0) & 0xFFFFFFFF,  # noqa
        ignore_eos=ignore_eos,
        stop=tuple(stop),
    )


def _b64(data, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad("audio data must be a non-empty base64 string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"audio data is not valid base64 ({e})", param) from None


def _audio_url(url, param: str, allow_urls: bool, max_bytes: int) -> bytes:
    if not isinstance(url, str) or not url:
        raise bad("audio_url.url must be a string", param)
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad("a data: URL must be base64 (data:audio/wav;base64,...)", param)
        return _b64(payload, param)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https") or not allow_urls:
        raise bad(
            f"audio_url scheme {scheme or '(none)'!r} is not allowed: send a data: URL or input_audio "
            "(the server takes http(s) URLs only when started with --allow-urls)",
            param,
            "url_not_allowed",
        )
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - http(s) only, opted in
            data = r.read(max_bytes + 1)
    except OSError as e:
        raise bad(f"could not fetch {url}: {e}", param) from None
    if len(data) > max_bytes:
        raise APIError(413, f"{url} is over the {max_bytes >> 20} MB body limit", param=param)
    return data


def parse_chat(body, *, default_max: int, allow_urls: bool = False, max_bytes: int = 64 << 20) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    messages, audios = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or ROLES.get(m.get("role")) is None:
            raise bad(f"{where} needs a role of {', '.join(ROLES)}", f"{where}.role")
        role, content = ROLES[m["role"]], m.get("content")
        texts, n_audio = [], 0
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        for j, part in enumerate(parts):
            p = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("input_audio", "audio_url") and role == "user":
                if kind == "input_audio":
                    spec = part.get("input_audio") or {}
                    fmt = spec.get("format", "wav") if isinstance(spec, dict) else None
                    if fmt not in AUDIO_FORMATS:
                        raise bad(
                            f"{p}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}",
                            f"{p}.input_audio.format",
                        )
                    data = _b64(spec.get("data"), f"{p}.input_audio.data")
                else:
                    spec = part.get("audio_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    data = _audio_url(url, f"{p}.audio_url.url", allow_urls, max_bytes)
                audios.append((p, data))
                n_audio += 1
            elif kind in ("input_audio", "audio_url"):
                raise bad(f"audio can only be in a user message, not {m['role']}", p)
            else:
                raise bad(f"unsupported content part {kind!r} (text, input_audio, audio_url)", f"{p}.type")
        text = "".join(texts)
        in_text = text.count("<sound>")
        if in_text > n_audio:
            raise bad(
                f"{where} has {in_text} <sound> placeholder(s) for {n_audio} audio clip(s)",
                f"{where}.content",
                "sound_placeholder_mismatch",
            )
        messages.append(Message(role, text, n_audio=n_audio - in_text))
    if messages[-1].role != "user":
        raise bad("the last message must be the user's", f"messages[{len(raw) - 1}].role")
    think = body.get("think", False)
    if not isinstance(think, bool):
        raise bad("'think' must be true or false", "think")
    if think and messages[-1].text.endswith(THINK_SUFFIX):  # a client that wrote the suffix itself
        last = messages[-1]
        messages[-1] = Message(last.role, last.text[: -len(THINK_SUFFIX)], last.n_audio)
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise bad("'adapter' must be an adapter's name", "adapter")
    so = body.get("stream_options") or {}
    stream = body.get("stream", False)
    if not isinstance(stream, bool) or not isinstance(so, dict):
        raise bad("'stream' must be true or false and 'stream_options' an object", "stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    try:
        options = options_from(body, default_max)
    except ValueError as e:  # OptionsError
        raise bad(str(e)) from None
    return ChatRequest(
        model=model,
        messages=messages,
        audios=audios,
        options=options,
        stream=stream,
        include_usage=bool(so.get("include_usage")),
        think=think,
        adapter=adapter,
    )


# -- responses -------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop", None: "stop"}


def usage(job) -> dict:
    return {
        "prompt_tokens": job.prompt_len,
        "completion_tokens": len(job.tokens),
        "total_tokens": job.prompt_len + len(job.tokens),
        "prompt_tokens_details": {"audio_tokens": job.audio_tokens, "cached_tokens": job.reused},
    }


def completion(job, model: str, created: int, warnings: list[str]) -> dict:
    out = {
        "id": job.id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.text},
                "logprobs": None,
                "finish_reason": FINISH[job.finish_reason],
            }
        ],
        "usage": usage(job),
    }
    if warnings:
        out["warnings"] = warnings
    return out


def chunk(job_id: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": job_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def now() -> int:
    return int(time.time())
