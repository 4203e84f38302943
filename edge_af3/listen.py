"""`listen`: a live loop over a microphone (PortAudio through sounddevice) or a file.

    capture thread --blocks--> ring queue --> segmenter (VAD) --segments--> inference thread
                                                    |                          (AF3.stream)
                                          or every S s: the last S s

Capture never waits for inference: when the model falls behind, the oldest waiting segment is
dropped and reported. Ctrl-C (or the end of a file) ends the loop with a summary: segments,
drops, real-time factor, latency from the end of a segment to its first token and to its answer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .capture import MicSource, file_blocks, list_input_devices  # noqa: F401 - the sources, importable from here
from .errors import InputDeviceError, OptionsError  # noqa: F401 - InputDeviceError: importable from here
from .vad import FRAME, RATE, Segment, Segmenter

MAX_SEGMENT_S = 30.0  # one AF3 window


# -- the loop ------------------------------------------------------------------------------------------
@dataclass
class ListenStats:
    segments: int = 0
    answered: int = 0
    dropped: int = 0  # segments never answered: inference was behind
    overflows: int = 0  # capture blocks lost: the input's buffer overflowed (PortAudio, or the ring queue)
    audio_s: float = 0.0  # stream audio seen
    busy_s: float = 0.0  # time inference (and speaking) ran
    barge_ins: int = 0  # answers the user interrupted by speaking
    first_token_latency_s: list[float] = field(default_factory=list)  # segment end -> first token
    answer_latency_s: list[float] = field(default_factory=list)  # segment end -> full answer

    def summary(self) -> dict:
        def pct(xs, q):
            return round(float(np.percentile(xs, q)), 3) if xs else None

        return {
            "segments": self.segments,
            "answered": self.answered,
            "dropped": self.dropped,
            "overflows": self.overflows,
            "barge_ins": self.barge_ins,
            "audio_s": round(self.audio_s, 2),
            "real_time_factor": round(self.busy_s / self.audio_s, 3) if self.audio_s else None,
            "first_token_latency_p50_s": pct(self.first_token_latency_s, 50),
            "first_token_latency_p95_s": pct(self.first_token_latency_s, 95),
            "answer_latency_p50_s": pct(self.answer_latency_s, 50),
            "answer_latency_p95_s": pct(self.answer_latency_s, 95),
        }


@dataclass(frozen=True)
class Typed:
    """A turn typed instead of spoken (`/text` in `listen --chat`), at a point of the stream."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Event:
    kind: str  # "segment" (answer starts), "piece", "done", "dropped", "barge_in"
    segment: Segment | None = None
    text: str = ""
    info: dict | None = None


class Listener:
    """Cut a block stream into segments and ask `prompt` about each, on a worker thread."""

    def __init__(
        self,
        model,
        prompt: str,
        *,
        detector=None,
        every_s: float | None = None,
        wait: bool = False,
        on_event: Callable[[Event], None] = lambda e: None,
        chat: bool = False,
        speech=None,
        barge_in: bool = False,
        duplex: bool = True,
        **options,
    ):
        """chat: each segment is the next turn of one conversation (voice chat: the clip is the
        question, the KV of earlier turns kept). speech: a `voice.answers.SpeechOut` that speaks
        each answer. barge_in: speech heard while an answer is generated or spoken stops it (the
        playback within one block, the generation cancelled; in a chat, what was heard of it stays
        as the answer). duplex=False: frames heard while an answer plays are not listened to (a
        microphone that hears the loudspeaker would take the assistant's voice for a question)."""
        self.system = options.pop("system", None)
        self.model, self.prompt, self.options = model, prompt, options
        self.session = model.chat(self.system) if chat else None
        self.speech, self.barge_in, self.duplex = speech, barge_in, duplex
        self._current = None  # (stream, spoken answer) being answered, for a barge-in
        self._barged = False
        self.segmenter = Segmenter(detector, max_s=MAX_SEGMENT_S) if every_s is None else None
        if every_s is not None and not 0.5 <= every_s <= MAX_SEGMENT_S:
            raise OptionsError(
                f"--every must be between 0.5 and {MAX_SEGMENT_S:g} seconds (one AF3 window at most), got {every_s:g}"
            )
        self.every = every_s
        self.wait = wait  # True: never drop (a file processed as fast as possible)
        self.on_event = on_event
        self.stats = ListenStats()
        self.pending: queue.Queue = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.worker = threading.Thread(target=self._work, name="af3-listen", daemon=True)

    def _put(self, item) -> None:
        """Queue for the worker, waiting while it works; a worker that died ends the run with its
        error instead of a wait that never ends."""
        while True:
            if self._error is not None:
                raise self._error
            if self.worker.ident is not None and not self.worker.is_alive():  # (a typed turn may come before run())
                raise self._error or RuntimeError("the listen worker stopped unexpectedly")
            try:
                self.pending.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def type_turn(self, text: str) -> None:
        """Voice chat: a typed question as the next turn (the user takes the turn: an answer in
        progress is interrupted as by speech)."""
        if self.session is None:
            raise OptionsError("typed turns are for voice chat (--chat)")
        if self.barge_in:
            self._barge()
        at = round(self.stats.audio_s, 2)
        self._submit(Typed(text, at, at))

    def _submit(self, seg: Segment | Typed) -> None:
        with self._lock:
            self.stats.segments += 1
        item = (seg, time.perf_counter())
        if self.wait:
            self._put(item)
            return
        if self._error is not None:
            raise self._error
        while True:
            try:
                self.pending.put_nowait(item)
                return
            except queue.Full:
                try:
                    old, _ = self.pending.get_nowait()  # the model is behind: drop the oldest waiting one
                    with self._lock:
                        self.stats.dropped += 1
                    self.on_event(Event("dropped", old, info={"reason": "inference is behind"}))
                except queue.Empty:
                    pass

    def _work(self) -> None:
        try:
            while True:
                item = self.pending.get()
                if item is None or self._stop.is_set():
                    return
                seg, closed_at = item
                self.on_event(Event("segment", seg))
                t0 = time.perf_counter()
                first = None
                text = []
                if self.session is not None:
                    ask = self.session.stream
                else:
                    ask = self.model.chat(self.system).stream if self.system else self.model.stream
                if isinstance(seg, Typed):
                    stream = ask(seg.text, None, **self.options)
                else:
                    stream = ask(self.prompt, (seg.samples, RATE), **self.options)
                voice = self.speech.answer() if self.speech is not None else None
                with self._lock:
                    self._current, self._barged = (stream, voice), False
                spoken = None
                try:
                    with stream:
                        for piece in stream:
                            if first is None:
                                first = time.perf_counter()
                            text.append(piece)
                            if voice is not None:
                                voice.feed(piece)
                            self.on_event(Event("piece", seg, piece))
                            if self._stop.is_set():  # the run is over (a second Ctrl-C, a device error)
                                return
                    if voice is not None:
                        spoken = voice.finish()  # while it speaks, a barge-in may cut it
                finally:
                    with self._lock:
                        self._current = None
                        barged = self._barged
                    if voice is not None and self._stop.is_set():
                        voice.cancel()
                done = time.perf_counter()
                heard = voice.heard_text if voice is not None else "".join(text)
                if barged and self.session is not None:
                    self.session.settle(stream, heard)  # the conversation keeps what the user heard
                with self._lock:
                    self.stats.answered += 1
                    self.stats.barge_ins += barged
                    self.stats.busy_s += done - t0
                    self.stats.first_token_latency_s.append((first or done) - closed_at)
                    self.stats.answer_latency_s.append(done - closed_at)
                answer = getattr(stream, "answer", None)
                info = {"finish_reason": answer and answer.finish_reason, "barged_in": barged, "speech": spoken}
                if isinstance(seg, Typed):
                    info["typed"] = seg.text
                if barged:
                    info["heard"] = heard
                self.on_event(Event("done", seg, "".join(text), info=info))
        except BaseException as e:  # reported by run()
            self._error = e

    def _speaking(self) -> bool:
        current = self._current
        return current is not None and current[1] is not None and current[1].speaking

    def _barge(self) -> None:
        """The user started to speak: the answer in progress stops (generation and playback)."""
        with self._lock:
            current = self._current
            if current is None:
                return
            self._barged = True
        self._silence(current)
        self.on_event(Event("barge_in", None, info={"at_s": round(self.stats.audio_s, 2)}))

    def _silence(self, current) -> None:
        """The answer in progress, `current` (stream, spoken answer) or none, stops: its
        generation, and its playback within one block, without waiting here (the capture loop, a stop)."""
        if current is None:
            return
        stream, voice = current
        getattr(stream, "cancel", lambda: None)()
        if voice is not None:
            voice.cancel(wait=False)

    def run(self, blocks) -> dict:
        """Consume `blocks` until they end. Ctrl-C stops listening but still answers the segment in
        progress (a second Ctrl-C stops at once, re-raised); a device error propagates after cleanup."""
        self.worker.start()
        buf = np.zeros(0, np.float32)
        window: list[np.ndarray] = []
        next_cut = self.every
        interrupted = False
        barged = False  # the open segment already interrupted an answer (no second barge-in for it)
        try:
            try:
                for block in blocks:
                    if self._error is not None:
                        raise self._error
                    block = np.asarray(block, np.float32).reshape(-1)
                    self.stats.audio_s += block.size / RATE
                    if self.every is not None:
                        window.append(block)
                        if self.stats.audio_s >= next_cut:
                            clip = np.concatenate(window)[-int(self.every * RATE) :]
                            self._submit(Segment(self.stats.audio_s - clip.size / RATE, self.stats.audio_s, clip))
                            window = [clip]
                            next_cut += self.every
                        continue
                    buf = np.concatenate([buf, block])
                    while buf.size >= FRAME:
                        frame, buf = buf[:FRAME], buf[FRAME:]
                        if not self.duplex and self._speaking():
                            self.segmenter.skip(frame)  # the loudspeaker is on: what the mic hears is no question
                            continue
                        for seg in self.segmenter.push(frame):
                            self._submit(seg)
                        # the user speaks over the answer: once the sound is long enough to be a
                        # segment at all (a click or a cough is not), once per segment
                        heard = self.segmenter.open_frames
                        if heard == 0:
                            barged = False
                        elif self.barge_in and not barged and heard >= self.segmenter.min_frames:
                            barged = True
                            self._barge()
            except KeyboardInterrupt:  # stop listening; what was being heard is still answered below
                interrupted = True
            if self.segmenter is not None:
                for seg in self.segmenter.flush():
                    self._submit(seg)
            elif window and self.stats.audio_s > next_cut - self.every + 0.3:  # the tail after the last cut
                tail = np.concatenate(window)[-int((self.stats.audio_s - (next_cut - self.every)) * RATE) :]
                self._submit(Segment(self.stats.audio_s - tail.size / RATE, self.stats.audio_s, tail))
            self._put(None)  # the end of the stream: answer what is queued, then stop
            self.worker.join()
        finally:
            self.stats.overflows = getattr(blocks, "overflows", 0)
            if self.worker.is_alive():  # a second Ctrl-C or a device error: stop without waiting for answers
                self._stop.set()  # the worker ends its answer at the next piece (it never outlives the model)
                self._silence(self._current)  # and the answer being spoken goes quiet now
                try:  # a worker waiting for a segment is woken (a full queue wakes it with that one)
                    self.pending.put_nowait(None)
                except queue.Full:
                    pass
                self.worker.join(timeout=30)
        if self._error is not None:
            raise self._error
        if interrupted:
            raise KeyboardInterrupt
        return self.stats.summary()
