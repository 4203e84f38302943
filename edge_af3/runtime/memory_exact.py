"""An exact audio memory (`--memory-exact`): after an eviction, the remembered windows are
re-prefilled from the head on a spare llama.cpp sequence, a batch at a time on a thread of their
own (a question's decode steps go first), and the spare becomes the memory's sequence when it
has caught up. Windows heard meanwhile are applied by the sync that follows the swap; an eviction
among them makes the memory approximate again and calls for the next rebuild. On a model whose
rows carry their place (Music Flamingo), the kept windows are encoded again at their new places
first (memory_timed.py)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .clips import Clip
from .memory_timed import replaced
from .prefill import Prefill

if TYPE_CHECKING:
    from .memory import Memory


class Rebuilder:
    def __init__(self, memory: Memory):
        self.memory = memory
        self.error: BaseException | None = None  # the last rebuild's failure (the memory stays approximate)
        self._due = threading.Event()
        self._running = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="edge-af3-memory-exact", daemon=True)
        self._thread.start()

    def due(self) -> None:
        """The memory's KV was shifted: rebuild it."""
        self._due.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until no rebuild runs or is due; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._running or self._due.is_set():
            if self._stopped or (deadline is not None and time.monotonic() > deadline):
                return not (self._running or self._due.is_set())
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self._stopped = True
        self._due.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while self._due.wait() and not self._stopped:
            self._running = True
            self._due.clear()
            try:
                self._rebuild()
            except BaseException as e:  # noqa: BLE001 - the memory goes on, approximate; said by .error
                self.error = e
            finally:
                self._running = self._due.is_set() and not self._stopped

    def _answering(self) -> bool:
        q = self.memory._open
        return q is not None and q.answer is None

    def _rebuild(self) -> None:
        mem = self.memory
        model = mem.model
        held = mem.held
        # rows that carry their place (Music Flamingo) are encoded again at their place now
        fresh = replaced(mem, held) if mem.family.time_embedding else [(w.rows, w.key) for w in held]
        clips = [Clip.of_rows(rows, key) for rows, key in fresh]
        prefill = Prefill(mem._spare, [mem.head] + clips, step=model.llm.n_batch)
        t0 = time.perf_counter()
        while True:
            if self._stopped:
                return
            if self._answering():
                time.sleep(0.02)  # a question is answered: its decode steps go first
                continue
            with model.lock:
                if self._stopped or model.closed:
                    return
                if next(prefill, None) is None:
                    break
        while not self._stopped:
            with mem._lock:
                if not self._answering():
                    # the spare holds `held`, freshly computed: it becomes the memory's sequence
                    mem.seq, mem._spare = mem._spare, mem.seq
                    for w, (rows, key) in zip(held, fresh):
                        w.rows, w.key, w.label = rows, key, key
                    mem._in_kv = held
                    mem.stats.rebuilds += 1
                    mem.stats.rebuild_ms.append((time.perf_counter() - t0) * 1000)
                    mem.sync()  # what was heard (and evicted) since goes in now
                    return
            time.sleep(0.05)
