"""Many generations in one llama.cpp context: slots, a bounded queue, one batched decode per step.

Each slot is one llama.cpp sequence (`seq_id`) with its own KV cache, which it keeps after a
request ends: the slot's prefix cache. A request waits in the queue until a slot is free, then
takes the free slot whose cache holds the longest prefix of its prompt (a follow-up turn lands
where its conversation is, and decodes only the new part). The scheduler thread alternates one
prefill chunk (at most n_batch rows of one slot) with one `llama_decode` that advances every
decoding slot by a token, as llama-server's slots do, so a long prompt never stalls the others
for more than a chunk. Requests are prepared (audio decoded and encoded) before they queue, on
the caller's thread; the encoder takes one clip at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import QueueFullError
from ..runtime.clips import items, penalty_ids
from ..runtime.generation import Generation, tokens_per_s
from ..runtime.prefill import Prefill
from ..runtime.types import FinishReason, GenerationOptions

EventSink = Callable[[str, object], None]  # ("piece", str) | ("done", Job) | ("error", BaseException)


@dataclass(eq=False)
class Job:
    """One generation: what to decode (segments with every clip's rows ready), how, and where its
    text goes. The scheduler fills in the outcome."""

    target: list
    prompt_len: int
    options: GenerationOptions  # resolved: no None left
    eos: frozenset[int]
    sink: EventSink
    id: str = ""
    audio_tokens: int = 0
    audio_seconds: float = 0.0
    clips_encoded: int = 0  # clips of the prompt the encoder ran for (the others came from the rows cache)
    clips_cached: int = 0
    adapter: str | None = None  # the LoRA adapter it runs with
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    reused: int = 0
    slot: int = -1
    t_submit: float = field(default_factory=time.perf_counter)  # the request's arrival (the server sets it)
    prepare_s: float = 0.0  # arrival -> queued: audio decoded, features, encoder
    t_start: float | None = None  # a slot took it
    t_first: float | None = None
    t_last: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _wake: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop (any thread): a queued job never starts, a running one ends within one token."""
        self._cancel.set()
        if self._wake:
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit

    @property
    def decode_tokens_per_s(self) -> float:
        return tokens_per_s(len(self.tokens), self.t_first, self.t_last)


class Slot:
    def __init__(self, seq: int):
        self.seq = seq
        self.job: Job | None = None
        self.gen: Generation | None = None  # the job's sampler, text and finish rules
        self.pending: int | None = None  # the sampled token the next batched step feeds
        self.prefill: Prefill | None = None  # one chunk per next(), True after the last
        self.used = 0.0


class Scheduler:
    """Runs jobs on `parallel` slots of `model.llm` (loaded with n_seq >= parallel) on one thread."""

    def __init__(
        self,
        model,
        parallel: int = 1,
        max_queue: int = 16,
        on_done: Callable[[Job], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ):
        if model.llm.n_seq < parallel:
            raise ValueError(f"the LLM context has {model.llm.n_seq} sequences for {parallel} slots")
        self.model, self.llm = model, model.llm
        self.slots = [Slot(i) for i in range(parallel)]
        self.capacity = parallel + max_queue
        self.on_done, self.on_step = on_done, on_step  # on_step(n): a batched decode of n slots ran
        self._waiting: deque[Job] = deque()
        self._reserved = 0  # requests taken and not yet done: being prepared, queued or in a slot
        self._cv = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._rr = itertools.count()
        self.step_ms: list[float] = []  # measured cost of a decode step of 1..parallel slots (calibrate)

    # -- admission (any thread) -------------------------------------------------------------
    def reserve(self) -> None:
        """Take a place for a request about to be prepared, or refuse it when the queue is full."""
        with self._cv:
            if not self._running:
                raise QueueFullError("the server is shutting down", retry_after=5)
            if self._reserved >= self.capacity:
                raise QueueFullError(
                    f"all {len(self.slots)} slots are busy and {self.capacity - len(self.slots)} "
                    "requests are waiting; retry later"
                )
            self._reserved += 1

    def release(self) -> None:
        """Give back a place whose request never reached `submit` (it failed while being prepared)."""
        with self._cv:
            self._reserved -= 1

    def submit(self, job: Job) -> Job:
        """Queue a prepared job (after `reserve`); its events go to `job.sink` from the scheduler thread."""
        job._wake = self._wake
        with self._cv:
            self._waiting.append(job)
            self._cv.notify()
        return job

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @property
    def queued(self) -> int:
        """Requests taken but not in a slot yet (being prepared or waiting)."""
        return self._reserved - self.in_flight

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="edge-af3-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; jobs still queued or running end cancelled."""
        with self._cv:
            self._running = False
            for job in list(self._waiting) + [s.job for s in self.slots if s.job]:
                job._cancel.set()
            self._cv.notify()
        if self._thread:
            self._thread.join(timeout=30)

    # -- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                self._admit()
                busy = any(s.job for s in self.slots)
                if not busy:
                    if not self._running and not self._waiting:
                        return
                    self._cv.wait(timeout=1.0)
                    continue
            with self.model.lock:
                try:
                    self._work()
                except Exception as e:  # noqa: BLE001 - a failed decode ends the jobs it carried, not the server
                    for slot in self.slots:
                        if slot.job:
                            self._end(slot, None, error=e)

    def _admit(self) -> None:
        while self._waiting and self._waiting[0].cancelled:
            self._drop(self._waiting.popleft())
        free = [s for s in self.slots if s.job is None]
        while self._waiting and free:
            job = self._waiting.popleft()
            if job.cancelled:
                self._drop(job)
                continue
            want = list(items(job.target))
            seqs = self.llm.seqs  # a cache computed under another adapter is no prefix of this job's
            best = max(
                free,
                key=lambda s: (
                    seqs[s.seq].common_prefix(want) if seqs[s.seq].adapter == job.adapter else 0,
                    -s.used,
                ),
            )
            free.remove(best)
            self._begin(best, job)

    def _drop(self, job: Job) -> None:
        job.finish_reason = "cancelled"
        self._reserved -= 1
        self._deliver(job)

    def _begin(self, slot: Slot, job: Job) -> None:
        slot.job, slot.pending, job.slot, job.t_start = job, None, slot.seq, time.perf_counter()
        slot.gen = Generation(self.llm, job.options, job.eos, penalty_ids(job.target))
        job.tokens = slot.gen.tokens
        slot.prefill = Prefill(self.llm.seqs[slot.seq], job.target, job.adapter, step=self.llm.n_batch)

    def _work(self) -> None:
        """One prefill chunk (slots in turn), then one decode step of every decoding slot."""
        for slot in self.slots:
            if slot.job and slot.job.cancelled:
                self._end(slot, "cancelled")
        prefilling = [s for s in self.slots if s.job and s.prefill]
        if prefilling:
            slot = prefilling[next(self._rr) % len(prefilling)]
            try:
                last = next(slot.prefill, True)
                slot.job.reused = slot.prefill.reused
                if last:  # its last chunk: sample now, before another decode moves the logits
                    slot.prefill = None
                    self._take(slot, slot.gen.sample())
            except Exception as e:  # noqa: BLE001 - this job fails; the others go on
                self._end(slot, None, error=e)
        decoding = [s for s in self.slots if s.job and s.pending is not None]
        # one batch per adapter (llama.cpp's adapters are the context's), unless measured dearer
        # than one decode per slot (K-quants on some CPUs)
        groups = []
        for name in dict.fromkeys(s.job.adapter for s in decoding):
            same = [s for s in decoding if s.job.adapter == name]
            groups += [same] if self.batch_cheaper(len(same)) else [[s] for s in same]
        for group in groups:
            self.llm.activate(group[0].job.adapter)
            self.llm.decode_step([(s.seq, s.pending) for s in group])
            if self.on_step:
                self.on_step(len(group))
            for i, slot in enumerate(group):
                slot.pending = None
                self._take(slot, slot.gen.sample(i))

    def batch_cheaper(self, n: int) -> bool:
        costs = self.step_ms
        return n <= 1 or not costs or n > len(costs) or costs[n - 1] <= n * costs[0]

    def calibrate(self, steps: int = 4) -> list[float]:
        """Time one batched decode step of 1..parallel sequences on this machine (before serving:
        it uses, then clears, the KV cache). `--decode-batching auto` batches only where that is
        cheaper than decoding each slot alone."""
        llm, n = self.llm, len(self.slots)
        costs = []
        for b in range(1, n + 1):
            for i in range(b):
                llm.seqs[i].truncate(0)
                llm.seqs[i].decode_tokens(llm.tokenize("<|im_start|>user\nhello"), logits="none")
            pairs = [(i, 13) for i in range(b)]
            llm.decode_step(pairs)  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                llm.decode_step(pairs)
            costs.append((time.perf_counter() - t0) / steps * 1000)
        llm.reset()
        self.step_ms = costs
        return costs

    def _take(self, slot: Slot, tok: int) -> None:
        """A sampled token: its text to the sink; the job ends when the generation says so, else
        the token is fed at the next batched step."""
        job, gen = slot.job, slot.gen
        piece = gen.take(tok, self.llm.seqs[slot.seq].n_past, self.llm.n_ctx)
        job.t_first, job.t_last = gen.t_first, gen.t_last
        if piece:
            job.sink("piece", piece)
        if gen.ended:
            return self._end(slot, gen.finish_reason)
        slot.pending = tok

    def _end(self, slot: Slot, reason: FinishReason | None, *, error: BaseException | None = None) -> None:
        job, gen = slot.job, slot.gen
        tail = gen.finish(reason or "cancelled")  # "" when the generation ended itself
        if tail and error is None:
            job.sink("piece", tail)
        slot.job = slot.gen = slot.pending = slot.prefill = None
        slot.used = time.perf_counter()
        job.text, job.finish_reason = gen.text, (gen.finish_reason if error is None else None)
        with self._cv:
            self._reserved -= 1
        self._deliver(job, error)

    def _deliver(self, job: Job, error: BaseException | None = None) -> None:
        if self.on_done and error is None:
            self.on_done(job)
        job.sink("error", error) if error is not None else job.sink("done", job)
