"""An answer spoken while it is written: text pieces -> sentences -> audio chunks, in order.

`Speaker(voice)` takes pieces with `feed` (or a whole `Stream` with `audio(stream)`), cuts them
into sentences and synthesises each on a thread of its own while the LLM writes the next; the
audio comes out of `iter(speaker)` in order, for a player or a WAV file. `cancel()` drops what
is not spoken yet (a barge-in). Timings: first text -> first audio, synthesis real-time factor,
and the gaps a real-time listener would hear between sentences (`Timeline`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import VoiceError
from .sentences import SentenceCutter


def speakable(sentence: str) -> bool:
    """Whether a sentence has anything a voice can say (not only symbols or emoji)."""
    return any(ch.isalnum() for ch in sentence)


@dataclass
class Chunk:
    samples: np.ndarray  # float32 mono in [-1, 1]
    rate: int
    sentence: str
    ready_at: float  # perf_counter when it was synthesised

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.rate


@dataclass
class Timeline:
    """Audio as a real-time listener hears it: playback starts with the first chunk and goes on
    without pause while chunks are ready; a chunk that comes after the previous one has finished
    playing leaves a gap."""

    start: float | None = None
    end: float = 0.0  # when what was scheduled so far finishes playing
    gaps: list[float] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        if self.start is None:
            self.start = self.end = chunk.ready_at
        elif chunk.ready_at > self.end:
            self.gaps.append(chunk.ready_at - self.end)
            self.end = chunk.ready_at
        self.end += chunk.seconds


class Speaker:
    """Speech for one answer. Not reusable: one answer, one Speaker."""

    def __init__(self, voice, cutter: SentenceCutter | None = None):
        self.voice = voice
        self.cutter = cutter or SentenceCutter()
        self._sentences: queue.Queue = queue.Queue()
        self._audio: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.sentences: list[str] = []  # synthesised
        self.heard: list[str] = []  # handed to the player / file (a sentence counts from its first chunk)
        self.t_first_text: float | None = None
        self.t_first_audio: float | None = None
        self.synth_s = 0.0
        self.audio_s = 0.0
        self.timeline = Timeline()
        self._finished = False
        self._thread = threading.Thread(target=self._synthesise, name="edge-af3-voice", daemon=True)
        self._thread.start()

    # -- text in ----------------------------------------------------------------------------
    def feed(self, piece: str) -> None:
        if self._cancel.is_set() or self._finished:
            return
        if self.t_first_text is None and piece.strip():
            self.t_first_text = time.perf_counter()
        for sentence in self.cutter.feed(piece):
            self._sentences.put(sentence)

    def finish(self) -> None:
        """The answer is complete: its last words are spoken too."""
        if self._finished:
            return
        self._finished = True
        for sentence in self.cutter.flush():
            self._sentences.put(sentence)
        self._sentences.put(None)

    def audio(self, stream: Iterable[str]) -> Iterator[Chunk]:
        """The audio of a whole text stream (an AF3 `Stream`), read on a thread as it comes."""

        def read() -> None:
            try:
                for piece in stream:
                    self.feed(piece)
            finally:
                self.finish()

        threading.Thread(target=read, name="edge-af3-voice-text", daemon=True).start()
        return iter(self)

    def cancel(self) -> None:
        """Stop: nothing more is synthesised; the audio iterator ends after the chunk in hand."""
        self._cancel.set()
        self._finished = True
        self._sentences.put(None)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- audio out --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        while True:
            item = self._audio.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if self._cancel.is_set():
                continue
            if not self.heard or self.heard[-1] is not item.sentence:
                self.heard.append(item.sentence)
            yield item

    def _synthesise(self) -> None:
        try:
            while not self._cancel.is_set():
                sentence = self._sentences.get()
                if sentence is None:
                    break
                if not speakable(sentence):
                    continue
                t0 = time.perf_counter()
                for samples, rate in self.voice.speak(sentence):
                    if self._cancel.is_set():
                        break
                    now = time.perf_counter()
                    chunk = Chunk(np.asarray(samples, np.float32), int(rate), sentence, now)
                    if self.t_first_audio is None:
                        self.t_first_audio = now
                    self.audio_s += chunk.seconds
                    self.timeline.add(chunk)
                    self._audio.put(chunk)
                self.synth_s += time.perf_counter() - t0
                self.sentences.append(sentence)
        except VoiceError as e:
            self._audio.put(e)
        except Exception as e:  # noqa: BLE001 - an engine's own failure reaches the reader as one kind
            self._audio.put(VoiceError(f"{self.voice.name} failed: {type(e).__name__}: {e}"))
        finally:
            self._audio.put(None)

    @property
    def heard_text(self) -> str:
        """What a listener got of the answer so far: the sentences that started playing."""
        return " ".join(self.heard)

    def stats(self) -> dict:
        first = (
            (self.t_first_audio - self.t_first_text) * 1000
            if self.t_first_audio is not None and self.t_first_text is not None
            else None
        )
        return {
            "voice": self.voice.name,
            "sentences": len(self.sentences),
            "audio_s": round(self.audio_s, 3),
            "synthesis_s": round(self.synth_s, 3),
            "real_time_factor": round(self.synth_s / self.audio_s, 3) if self.audio_s else None,
            "first_text_to_audio_ms": round(first, 1) if first is not None else None,
            "gaps_s": [round(g, 3) for g in self.timeline.gaps],
            "cancelled": self.cancelled,
        }
