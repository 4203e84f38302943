"""A generation as an object: iterate it for text pieces; `.answer` once it has ended.

Interleaving: a stream holds the model only while it works inside `next()` (one prefill, or one
decode step), never while it is paused between pieces. When it resumes after another stream used
the context, it re-decodes what the KV cache no longer holds of its prompt and answer (the part
before the two diverged is kept: prefix reuse), so a paused or abandoned stream never blocks
anyone, and streams read in turn give the text each would give alone. `cancel()` (any thread)
stops it within one token; `close()`, leaving a `with` block or garbage collection cancel it.
"""

from __future__ import annotations

import codecs
import threading
import time
from typing import TYPE_CHECKING

from .clips import Clip, penalty_ids
from .types import Answer, FinishReason, GenerationOptions, StopScanner, Timings

if TYPE_CHECKING:
    from .session import ChatSession, Turn


class Stream:
    """Text pieces of one answer, produced as the caller iterates."""

    def __init__(self, session: "ChatSession", turn: "Turn", options: GenerationOptions, eos: frozenset[int]):
        self.session, self.model = session, session.model
        self.turn, self.options, self._eos = turn, options, eos
        self.answer: Answer | None = None  # set when the stream ends
        self.tokens: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._scan = StopScanner(options.stop)
        self._sampler = None
        self._started = False
        self._dead = False  # a step raised: the stream is over (the error reached the caller)
        self._cancel = threading.Event()
        self._busy = threading.Lock()  # held while a step runs (cancel() finishes an idle stream itself)
        self._t_start = self._t_first = self._t_last = None
        self._prefill_ms, self._reused, self._resyncs = 0.0, 0, 0

    # -- the caller's side ------------------------------------------------------------------
    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        while self.answer is None and not self._dead:
            piece = self._step()
            if piece:
                return piece
        raise StopIteration

    @property
    def text(self) -> str:
        """The text so far (the whole answer once ended)."""
        return self.answer.text if self.answer else self.model.llm.detokenize(self.tokens)

    def result(self) -> Answer:
        """Run to the end (if not ended yet) and return the answer."""
        for _ in self:
            pass
        return self.answer

    def cancel(self) -> None:
        """Stop: within one token when a step is running, at once when the stream is paused."""
        self._cancel.set()
        if self._busy.acquire(blocking=False):
            try:
                if self.answer is None:
                    self._finish("cancelled")
            finally:
                self._busy.release()

    close = cancel

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def __del__(self):
        try:
            if self.answer is None:
                self.cancel()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    # -- one step ---------------------------------------------------------------------------
    def _step(self) -> str:
        with self._busy:
            if self.answer is not None:
                return ""
            if self._cancel.is_set():
                return self._finish("cancelled")
            if not self._started:
                self._t_start = time.perf_counter()
                self._prepare_clips()  # outside the model lock: others decode while this encodes
            with self.model.lock:
                try:
                    return self._decode_step()
                except BaseException:
                    self._dead = True
                    self._release_sampler()
                    self.session._ended(self, failed=True)
                    raise

    def _prepare_clips(self) -> None:
        for clip in self.turn.target:  # this turn's clips, and history clips re-made for another adapter's encoder
            if isinstance(clip, Clip):
                self.model.encode(clip, background=self.model.settings.overlap)

    def _target(self) -> list:
        return self.turn.target + ([self.tokens] if self.tokens else [])

    def _decode_step(self) -> str:
        llm, opts = self.model.llm, self.options
        if not self._started:
            t0 = time.perf_counter()
            self._reused = self.session._prefill(self.turn.target, self.turn.adapter)
            self._prefill_ms = (time.perf_counter() - t0) * 1000
            self._sampler = llm.make_sampler(opts)
            if opts.repetition_penalty != 1.0:  # transformers counts the whole input, <sound> ids included
                llm.accept(self._sampler, penalty_ids(self.turn.target))
            self._started = True
        elif not (llm.owner is self and llm.n_past == self.turn.prompt_len + len(self.tokens)):
            self.session._prefill(self._target(), self.turn.adapter)  # another stream used the context meanwhile
            self._resyncs += 1
        llm.owner = self
        while True:
            if self._cancel.is_set():
                return self._finish("cancelled")
            if len(self.tokens) >= opts.max_new_tokens:
                return self._finish("length")
            tok = llm.sample(self._sampler)
            if self._t_first is None:
                self._t_first = time.perf_counter()
            if tok in self._eos and not opts.ignore_eos:
                return self._finish("stop")
            self.tokens.append(tok)
            self._t_last = time.perf_counter()
            piece = self._scan.feed(self._decoder.decode(llm.piece(tok)))
            if self._scan.hit:
                return piece + self._finish("stop")
            if llm.n_past >= llm.n_ctx:  # the token is kept, but the context has no room to go on
                return piece + self._finish("context")
            llm.decode_next(tok)
            llm.owner = self
            if piece:
                return piece

    def _release_sampler(self) -> None:
        if self._sampler is not None:
            self.model.llm.free_sampler(self._sampler)
            self._sampler = None

    def _finish(self, reason: FinishReason) -> str:
        """End the stream: the answer, the session's history (unless cancelled); returns the last bytes."""
        tail = self._scan.feed(self._decoder.decode(b"", final=True))
        tail += self._scan.flush()
        self._release_sampler()
        llm = self.model.llm
        text = self._scan.text if self.options.stop else llm.detokenize(self.tokens)
        t_end = time.perf_counter()
        t_start = self._t_start or t_end
        n = len(self.tokens)
        decode_s = (self._t_last or t_end) - (self._t_first or t_end)
        clips = [c for c in self.turn.clips if isinstance(c, Clip)]
        timings = Timings(
            features_ms=sum(c.features_ms for c in clips),
            encoder_ms=sum(c.encoder_ms for c in clips),
            prefill_ms=self._prefill_ms,
            first_token_ms=((self._t_first or t_end) - t_start) * 1000,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            audio_tokens=sum(len(c) for c in clips),
            prompt_tokens=self.turn.prompt_len,
            reused_tokens=self._reused,
            resyncs=self._resyncs,
        )
        self.answer = Answer(text=text, tokens=tuple(self.tokens), timings=timings, finish_reason=reason,
                             options=self.options, adapter=self.turn.adapter)  # fmt: skip
        self.session._ended(self)
        return tail
