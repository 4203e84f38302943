"""A generation as an object: iterate it for text pieces; `.answer` once it has ended.

Interleaving: a stream holds the model only while it works inside `next()` (one prefill, or one
decode step), never while it is paused between pieces. When it resumes after another stream used
the context, it re-decodes what the KV cache no longer holds of its prompt and answer (the part
before the two diverged is kept: prefix reuse), so a paused or abandoned stream never blocks
anyone, and streams read in turn give the text each would give alone. `cancel()` (any thread)
stops it within one token; `close()`, leaving a `with` block or garbage collection cancel it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .clips import Clip, penalty_ids
from .generation import Generation
from .types import Answer, FinishReason, GenerationOptions, Timings

if TYPE_CHECKING:
    from .session import ChatSession, Turn


class Stream:
    """Text pieces of one answer, produced as the caller iterates."""

    def __init__(self, session: ChatSession, turn: Turn, options: GenerationOptions, eos: frozenset[int]):
        self.session, self.model = session, session.model
        self.turn, self.options, self._eos = turn, options, eos
        self.answer: Answer | None = None  # set when the stream ends
        self.gen: Generation | None = None  # made at the first step, under the model lock
        self._dead = False  # a step raised: the stream is over (the error reached the caller)
        self._epoch = -1  # the context's epoch after this stream's last step (see LlamaEngine.epoch)
        self._cancel = threading.Event()
        self._busy = threading.Lock()  # held while a step runs (cancel() finishes an idle stream itself)
        self._t_start: float | None = None
        self._prefill_ms, self._reused, self._resyncs = 0.0, 0, 0

    # -- the caller's side ------------------------------------------------------------------
    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        while self.answer is None and not self._dead:
            piece = self._step()
            if piece:
                return piece
        raise StopIteration

    @property
    def tokens(self) -> list[int]:
        return self.gen.tokens if self.gen else []

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

    def __enter__(self) -> Stream:
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
            try:
                if self.gen is None and self._t_start is None:
                    self._t_start = time.perf_counter()
                    self._prepare_clips()  # outside the model lock: others decode while this encodes
                with self.model.lock:
                    if self.model.closed:
                        raise RuntimeError("the model was closed while this answer was being generated")
                    return self._decode_step()
            except BaseException:
                self._dead = True
                if self.gen is not None:
                    self.gen.close()
                self.session._ended(self, failed=True)
                raise

    def _prepare_clips(self) -> None:
        for clip in self.turn.target:  # this turn's clips, and history clips re-made for another adapter's encoder
            if isinstance(clip, Clip):
                self.model.encode(clip, background=self.model.settings.overlap)

    def _decode_step(self) -> str:
        """One step under the model lock: the prefill (and the first token), or one more token."""
        llm = self.model.llm
        seq = self.session.seq  # the in-process runtime's shared sequence, or an audio memory's
        if self.gen is None:
            t0 = time.perf_counter()
            self._reused = self.session._prefill(self.turn.target, self.turn.adapter)
            self._prefill_ms = (time.perf_counter() - t0) * 1000
            self.gen = Generation(llm, self.options, self._eos, penalty_ids(self.turn.target))
        elif llm.epoch != self._epoch:  # another stream used the context meanwhile: re-decode what it displaced
            self.session._prefill(self.turn.target + [self.gen.tokens], self.turn.adapter)
            self._resyncs += 1
        while True:
            if self._cancel.is_set():
                return self._finish("cancelled")
            tok = self.gen.sample()
            piece = self.gen.take(tok, seq.n_past, llm.n_ctx)
            if self.gen.ended:
                return piece + self._finish(self.gen.finish_reason)
            seq.decode_next(tok)
            self._epoch = llm.epoch
            if piece:
                return piece

    def _finish(self, reason: FinishReason) -> str:
        """End the stream: the answer, the session's history (unless cancelled); returns the last text."""
        gen = self.gen
        tail = gen.finish(reason) if gen else ""
        t_end = time.perf_counter()
        t_start = self._t_start or t_end
        clips = [c for c in self.turn.clips if isinstance(c, Clip)]
        timings = Timings(
            features_ms=sum(c.features_ms for c in clips),
            encoder_ms=sum(c.encoder_ms for c in clips),
            prefill_ms=self._prefill_ms,
            first_token_ms=(((gen and gen.t_first) or t_end) - t_start) * 1000,
            decode_tokens_per_s=gen.tokens_per_s if gen else 0.0,
            audio_tokens=sum(len(c) for c in clips),
            prompt_tokens=self.turn.prompt_len,
            reused_tokens=self._reused,
            resyncs=self._resyncs,
        )
        self.answer = Answer(
            text=gen.text if gen else "",
            tokens=tuple(self.tokens),
            timings=timings,
            finish_reason=gen.finish_reason if gen else reason,
            options=self.options,
            adapter=self.turn.adapter,
        )
        self.session._ended(self)
        return tail
