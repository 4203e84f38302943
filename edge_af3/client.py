"""`AF3.connect(base_url)`: the same `ask` / `stream` / `chat` calls as a loaded model, over
OpenAI's chat API with `input_audio` parts, so one program runs against `edge-af3 serve` or a
vLLM server of `nvidia/audio-flamingo-3-hf` by changing its base URL (extra `client`: the
`openai` package). Several base URLs make a pool tried in order (`servers.py`).

What maps where: max_new_tokens -> max_tokens; temperature, top_p, seed, stop as OpenAI's;
top_k, repetition_penalty, ignore_eos in the body as vLLM reads them; think -> AF3's think
suffix written into the prompt (what both servers understand) plus `"think": true` for
edge-af3's server. Options left None are the server's defaults (both use the checkpoint's
generation_config.json). A remote answer has no token ids: `Answer.tokens` is empty.
What a server cannot do is said, not sent: more clips than it takes in one prompt (vLLM's AF3:
one) is a PromptError; `transcribe` on a server without `/v1/audio/transcriptions` (vLLM for AF3)
asks AF3's transcription prompt through chat instead; every server error is an EdgeAF3Error.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

from .audio import Audio, load_audio
from .constants import ASR_PROMPT, SAMPLE_RATE, THINK_SUFFIX
from .errors import AudioError, OptionsError, ServerError, SessionBusyError
from .runtime.types import Answer, GenerationOptions, Timings
from .servers import Pool, Server, stream_error

FINISH = {"stop": "stop", "length": "length", "content_filter": "stop", None: "stop"}
_MAGIC = (
    (b"RIFF", "wav"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"\xff\xfb", "mp3"),
    (b"\xff\xf3", "mp3"),
)


def _rate(data: bytes) -> int | None:
    import soundfile as sf

    try:
        return sf.info(io.BytesIO(data)).samplerate
    except Exception:  # libsndfile cannot read it: decoded here instead
        return None


def audio_part(audio) -> dict:
    """An `input_audio` content part: a 16 kHz wav/mp3/flac/ogg file is sent as it is, anything
    else (a file at another rate, an array, `(array, rate)`, an `Audio`, another format) as a
    16 kHz float WAV of its samples, resampled here: every server then hears the same samples,
    and vLLM's AF3, whose resampler needs torchaudio (which its CPU install cannot load), is
    never asked to resample."""
    data = fmt = None
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise AudioError(f"{path}: no such file")
        data = path.read_bytes()
    elif isinstance(audio, (bytes, bytearray)):
        data = bytes(audio)
    if data is not None:
        fmt = next((f for magic, f in _MAGIC if data.startswith(magic)), None)
        if fmt is not None and _rate(data) != SAMPLE_RATE:
            fmt = None
    if fmt is None:
        import soundfile as sf

        clip = load_audio(audio) if not isinstance(audio, Audio) else audio
        buf = io.BytesIO()
        sf.write(buf, clip.samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
        data, fmt = buf.getvalue(), "wav"
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt}}


def _as_list(audio) -> list:
    return [] if audio is None else audio if isinstance(audio, list) else [audio]


class RemoteStream:
    """A streamed answer from the server: iterate for text; `.answer` when it ends; `cancel()`
    closes the connection (the server frees its slot within a token)."""

    def __init__(self, server: Server, response, t0: float, on_end=None):
        self.server, self._response, self._on_end = server, response, on_end
        self._t0, self._t_first = t0, None
        self._pieces: list[str] = []
        self._finish, self._usage = None, None
        self.answer: Answer | None = None
        self._it = iter(response)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while self.answer is None:
            try:
                ch = next(self._it)
            except StopIteration:
                self._end(self._finish or "stop")
                raise
            except Exception as e:  # the SDK's APIError (an SSE error event), or httpx's when the connection breaks
                self._response.close()
                self._end("cancelled", notify=False)
                raise stream_error(self.server, e, len(self._pieces)) from None
            if getattr(ch, "usage", None):
                self._usage = ch.usage
            for choice in ch.choices or []:
                if choice.finish_reason:
                    self._finish = FINISH.get(choice.finish_reason, "stop")
                piece = choice.delta.content if choice.delta else None
                if piece:
                    if self._t_first is None:
                        self._t_first = time.perf_counter()
                    self._pieces.append(piece)
                    return piece
        raise StopIteration

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def result(self) -> Answer:
        for _ in self:
            pass
        return self.answer

    def cancel(self) -> None:
        if self.answer is None:
            self._response.close()
            self._end("cancelled")

    close = cancel

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    def _end(self, reason: str, notify: bool = True) -> None:
        t_end = time.perf_counter()
        u = self._usage
        details = getattr(u, "prompt_tokens_details", None) if u else None
        n = u.completion_tokens if u else len(self._pieces)
        first = self._t_first or t_end
        timings = Timings(
            features_ms=None,  # the server's own stages: not known to a client
            encoder_ms=None,
            prefill_ms=None,
            first_token_ms=(first - self._t0) * 1000,
            decode_tokens_per_s=(n - 1) / (t_end - first) if n > 1 and t_end > first else 0.0,
            prompt_tokens=u.prompt_tokens if u else 0,
            audio_tokens=(getattr(details, "audio_tokens", None) or 0) if details else 0,
            reused_tokens=(getattr(details, "cached_tokens", None) or 0) if details else 0,
        )
        self.answer = Answer(text=self.text, tokens=(), timings=timings, finish_reason=reason)
        if self._on_end and notify:
            self._on_end(self)


class RemoteChat:
    """A conversation kept on the client: every turn re-sends the history and its audio (the
    server reuses its KV prefix and cached rows, so only the new turn costs)."""

    def __init__(self, owner: RemoteAF3, system: str | None = None):
        self.owner, self.system = owner, system
        self._open: RemoteStream | None = None
        self.reset()

    def reset(self) -> None:
        if self._open is not None:
            self._open.cancel()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.last_answer: Answer | None = None

    def stream(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> RemoteStream:
        if self._open is not None and self._open.answer is None:
            raise SessionBusyError("this session's previous answer is still streaming; finish or cancel() it first")
        text = prompt + (THINK_SUFFIX if think else "")
        user = {"role": "user", "content": [audio_part(a) for a in _as_list(audio)] + [{"type": "text", "text": text}]}

        def ended(s: RemoteStream) -> None:
            self.last_answer = s.answer
            if s.answer.finish_reason != "cancelled":
                self.messages += [user, {"role": "assistant", "content": s.answer.text}]

        opts = GenerationOptions.of(options, **overrides)
        self._open = self.owner._request(self.messages + [user], think, opts, ended, adapter=adapter)
        return self._open

    def ask(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> Answer:
        return self.stream(prompt, audio, think=think, adapter=adapter, options=options, **overrides).result()

    send = ask

    def append(
        self, prompt: str, audio=None, answer: str = "", *, think: bool = False, adapter: str | None = None
    ) -> None:  # noqa: ARG002
        """Add a finished turn to the history without asking (a restored conversation)."""
        text = prompt + (THINK_SUFFIX if think else "")
        user = {"role": "user", "content": [audio_part(a) for a in _as_list(audio)] + [{"type": "text", "text": text}]}
        self.messages += [user, {"role": "assistant", "content": answer}]


class RemoteAF3:
    """A model behind an OpenAI-compatible server, or a pool of them (`AF3.connect`)."""

    def __init__(self, base_url, api_key: str | None = None, model: str | None = None, *, timeout: float = 600):
        self.pool = Pool(base_url, api_key=api_key, model=model, timeout=timeout)

    @property
    def base_url(self) -> str:
        """The server that answered last (the first of the pool that could be reached)."""
        return self.pool.current.url

    @property
    def model(self) -> str:
        return self.pool.current.model

    @property
    def label(self) -> str:
        return f"{self.model} at {self.base_url}"

    def _body(self, s: Server, think: bool, opts: GenerationOptions, adapter: str | None) -> dict:
        kw: dict = {"model": s.model, "max_tokens": opts.max_new_tokens}
        for name in ("temperature", "top_p"):
            if getattr(opts, name) is not None:
                kw[name] = getattr(opts, name)
        if opts.seed:
            kw["seed"] = opts.seed
        if opts.stop:
            kw["stop"] = list(opts.stop)
        extra = {k: getattr(opts, k) for k in ("top_k", "repetition_penalty") if getattr(opts, k) is not None}
        extra |= {"ignore_eos": True} if opts.ignore_eos else {}
        if s.kind == "edge-af3":  # fields only edge-af3's server reads
            extra |= {"think": True} if think else {}
            extra |= {"adapter": adapter} if adapter else {}
        elif adapter:  # vLLM serves a LoRA adapter as a model of its own (--lora-modules NAME=PATH)
            if adapter not in s.models:
                raise OptionsError(
                    f"{s.url} ({s.kind}) serves no adapter {adapter!r}: it serves {', '.join(s.models)} "
                    "(vLLM serves a LoRA adapter as a model name: --lora-modules NAME=PATH)"
                )
            kw["model"] = adapter
        return kw | {"extra_body": extra or None}

    def _request(
        self, messages: list[dict], think: bool, opts: GenerationOptions, on_end=None, adapter: str | None = None
    ) -> RemoteStream:
        clips = sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] != "text")
        self.pool.check_audios(clips)

        def send(s: Server) -> RemoteStream:
            body = self._body(s, think, opts, adapter)
            t0 = time.perf_counter()
            response = s.client.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **body
            )
            return RemoteStream(s, response, t0, on_end)

        return self.pool.call(send)

    def stream(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> RemoteStream:
        return self.chat().stream(prompt, audio, think=think, adapter=adapter, options=options, **overrides)

    def ask(
        self,
        prompt: str,
        audio=None,
        *,
        think: bool = False,
        adapter: str | None = None,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> Answer:
        return self.chat().ask(prompt, audio, think=think, adapter=adapter, options=options, **overrides)

    def chat(self, system: str | None = None) -> RemoteChat:
        return RemoteChat(self, system)

    def transcribe(self, audio, prompt: str | None = None) -> str:
        """The clip's speech as text: the server's /v1/audio/transcriptions, or, on a server without
        one (vLLM for AF3 answers 404), AF3's transcription prompt through chat, greedy, as
        edge-af3's server words it (the prompt appended to "Transcribe the input speech.")."""
        part = audio_part(audio)

        def send(s: Server) -> str:
            if s.transcriptions:
                data = base64.b64decode(part["input_audio"]["data"])
                try:
                    r = s.client.audio.transcriptions.create(
                        model=s.model,
                        file=(f"audio.{part['input_audio']['format']}", data),
                        **({"prompt": prompt} if prompt else {}),
                    )
                    return r.text
                except self.pool.openai.NotFoundError as e:
                    if "model" in str(e).lower() and "does not exist" in str(e).lower():
                        raise
                    s.transcriptions = False  # no such route: ask through chat from now on
            text = ASR_PROMPT + (f" {prompt}" if prompt else "")
            messages = [{"role": "user", "content": [part, {"type": "text", "text": text}]}]
            body = self._body(s, False, GenerationOptions(temperature=0.0), None)
            r = s.client.chat.completions.create(messages=messages, **body)
            if not r.choices:
                raise ServerError(f"{s.url}: a transcription through chat came back with no answer", status=None)
            return r.choices[0].message.content or ""

        return self.pool.call(send)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
