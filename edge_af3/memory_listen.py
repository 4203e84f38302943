"""`listen --memory`: a microphone or a file fed to an audio memory, questions answered any time.

    capture (this thread) --blocks--> Windower --windows--> memory thread (encode + prefill)
    questions (typed, --ask) -----------------------------> question thread (Memory.stream)

Capture never waits for the model: a tail waiting to be encoded is replaced by a newer one, and
when full windows pile up (the model is slower than real time) the oldest waiting one is dropped,
said, and left out of the memory (its time stays a gap). Ctrl-C, the end of a file or a device
fault end the loop with what was remembered and the figures.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .runtime.windows import Heard


@dataclass(frozen=True)
class MemoryEvent:
    kind: str  # "window", "dropped", "question", "piece", "done", "error"
    text: str = ""
    info: dict | None = None


def parse_clock(text: str) -> float:
    """'12:30' / '1:02:03' / '95' / '95.5' -> seconds."""
    parts = text.strip().split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"not a time: {text!r} (write 12:30, 1:02:03 or seconds)") from None
    if len(values) > 3 or any(v < 0 for v in values):
        raise ValueError(f"not a time: {text!r} (write 12:30, 1:02:03 or seconds)")
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    return seconds


def parse_question(line: str) -> tuple[str, tuple[float, float] | None]:
    """A typed line -> (question, time range): `/at 12:00-14:00 QUESTION` asks about that stretch."""
    line = line.strip()
    if not line.startswith("/at "):
        return line, None
    _, span, *rest = line.split(maxsplit=2) + [""]
    start, sep, end = span.partition("-")
    if not sep or not rest[0].strip():
        raise ValueError("write /at START-END QUESTION, e.g. /at 12:00-14:00 what was said?")
    return rest[0].strip(), (parse_clock(start), parse_clock(end))


class MemoryListener:
    """Feeds `memory` from a block stream on its own thread; `ask()` from any thread."""

    def __init__(
        self,
        memory,
        *,
        on_event: Callable[[MemoryEvent], None] = lambda e: None,
        wait: bool = False,
        backlog: int = 2,
        tail_budget: float = 0.5,
        **options,
    ):
        """wait: never drop (a file read as fast as the model takes it). backlog: full windows
        that may wait for the model before the oldest is dropped. tail_budget: the tail is
        re-encoded only while the loop's work stays under this fraction of the audio's time (it
        triples the work per window: docs/memory.md); past it, windows go in when full.
        options: generation keywords."""
        self.memory, self.on_event, self.wait, self.backlog, self.options = memory, on_event, wait, backlog, options
        self.tail_budget = tail_budget
        self.tails_skipped = 0
        self._pending: collections.deque[Heard] = collections.deque()
        self._cond = threading.Condition()
        self._ended = False
        self._questions: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.busy_s = 0.0  # the memory thread's work
        self.ttft_s: list[float] = []
        self.answered = 0
        self._feeder = threading.Thread(target=self._feed, name="edge-af3-memory", daemon=True)
        self._asker = threading.Thread(target=self._answer, name="edge-af3-memory-questions", daemon=True)

    # -- questions --------------------------------------------------------------------------
    def ask(self, question: str, at: tuple[float, float] | None = None) -> None:
        """Answered on the question thread as soon as it is free (on what the memory holds then)."""
        self._questions.put((question, at))

    def _answer(self) -> None:
        while True:
            item = self._questions.get()
            if item is None:
                return
            question, at = item
            self.on_event(MemoryEvent("question", question, {"at": at}))
            t0 = time.perf_counter()
            try:
                stream = self.memory.stream(question, at=at, **self.options)
                first = None
                for piece in stream:
                    first = first or time.perf_counter()
                    self.on_event(MemoryEvent("piece", piece))
            except Exception as e:  # noqa: BLE001 - a bad question is said; the memory keeps listening
                self.on_event(MemoryEvent("error", str(e), {"question": question}))
                continue
            self.answered += 1
            self.ttft_s.append((first or time.perf_counter()) - t0)
            t = stream.answer.timings
            info = {
                "question": question,
                "span": [[round(a, 3), round(b, 3)] for a, b in stream.span],
                "finish_reason": stream.answer.finish_reason,
                "first_token_ms": round(t.first_token_ms, 1),
                "prefilled": t.prompt_tokens - t.reused_tokens,
                "audio_tokens": t.audio_tokens,
            }
            self.on_event(MemoryEvent("done", stream.answer.text, info))

    # -- hearing ----------------------------------------------------------------------------
    def _submit(self, heard: Heard) -> None:
        with self._cond:
            if self._pending and not self._pending[-1].full and self._pending[-1].index == heard.index:
                self._pending.pop()  # a newer tail (or the full window) supersedes the waiting tail
            self._pending.append(heard)
            while self.wait and sum(h.full for h in self._pending) > self.backlog and self._error is None:
                self._cond.wait(0.1)
            full = [h for h in self._pending if h.full]
            if len(full) > self.backlog:
                self._pending.remove(full[0])
                self.memory.stats.dropped += 1
                self.on_event(
                    MemoryEvent(
                        "dropped",
                        info={"index": full[0].index, "start_s": full[0].start_s, "reason": "the model is behind"},
                    )
                )
            self._cond.notify_all()

    def _feed(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._ended:
                        self._cond.wait()
                    if not self._pending or self._stop.is_set():
                        return
                    heard = self._pending.popleft()
                    self._cond.notify_all()
                if not heard.full and self.busy_s > self.tail_budget * heard.end_s:
                    self.tails_skipped += 1  # the loop has no room for it: this window goes in when full
                    continue
                t0 = time.perf_counter()
                self.memory.add(heard)
                dt = time.perf_counter() - t0
                self.busy_s += dt
                if heard.full:
                    info = {"index": heard.index, "start_s": heard.start_s, "work_ms": round(dt * 1000, 1)}
                    self.on_event(MemoryEvent("window", info=info))
        except BaseException as e:  # reported by run()
            self._error = e
            with self._cond:
                self._cond.notify_all()

    def run(self, blocks, questions: list[str] = ()) -> dict:
        """Consume `blocks` until they end (or Ctrl-C), then remember the tail, answer
        `questions` and every question still waiting, and return the summary. A device fault
        propagates after the same."""
        self._feeder.start()
        self._asker.start()
        windower = self.memory.windower
        interrupted, fault, lost_seen = False, None, 0
        try:
            for block in blocks:
                if self._error is not None:
                    raise self._error
                if self._stop.is_set():
                    break
                lost = getattr(blocks, "lost_samples", 0) - lost_seen
                if lost > 0:  # the microphone's queue overflowed: silence keeps the windows on the clock
                    lost_seen += lost
                    block = np.concatenate([np.zeros(lost, np.float32), np.asarray(block, np.float32)])
                for heard in windower.push(np.asarray(block, np.float32)):
                    self._submit(heard)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:  # noqa: BLE001 - a device fault: what was heard is still remembered
            fault = e
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        self._feeder.join()
        tail = None if self._stop.is_set() else windower.tail()  # the last seconds: remembered whatever the budget
        held = getattr(self.memory, "tail", None)
        if held is not None and tail is not None and held.index == tail.index and held.seconds >= tail.seconds:
            tail = None  # in memory already
        if tail is not None and self._error is None:
            t0 = time.perf_counter()
            self.memory.add(tail)
            self.busy_s += time.perf_counter() - t0
        for q in questions:
            self.ask(q)
        self._questions.put(None)
        self._asker.join()
        if self._error is not None:
            raise self._error
        if fault is not None:
            raise fault
        if interrupted:
            raise KeyboardInterrupt
        return self.summary()

    def stop(self) -> None:
        """End `run` at the next block; windows still waiting are not remembered."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self, timeout: float = 60) -> None:
        """Stop, let the work in flight end and close the memory: the model may be closed after
        this (a second Ctrl-C, a server stopping)."""
        self.stop()
        self.memory.close()
        self._questions.put(None)
        for t in (self._feeder, self._asker):
            if t.ident is not None:
                t.join(timeout)

    def summary(self) -> dict:
        mem, stats = self.memory, self.memory.stats

        def p50(xs):
            return round(float(np.median(xs)), 1) if xs else None

        heard_s = mem.windower.heard_s
        return {
            "heard_s": round(heard_s, 2),
            "remembered": [[round(a, 2), round(b, 2)] for a, b in mem.span()],
            "windows": stats.windows,
            "evicted": stats.evicted,
            "skipped_silent": stats.skipped,
            "dropped": stats.dropped,
            "tails": stats.tails,
            "tails_skipped": self.tails_skipped,
            "encode_ms_p50": p50(stats.encode_ms),
            "prefill_ms_p50": p50(stats.prefill_ms),
            "real_time_factor": round(self.busy_s / heard_s, 3) if heard_s else None,
            "questions": self.answered,
            "first_token_s_p50": round(float(np.median(self.ttft_s)), 3) if self.ttft_s else None,
        }
