"""The always-on audio memory: what was heard, encoded and prefilled once, as it is heard, so a
question about the last minutes costs what a text question costs.

AF3's prompt for a clip is `head <rows of window 0> <rows of window 1> ... question`: the rows of
each 30 s window, in order, in one `<sound>` slot. A `Memory` keeps exactly that in one llama.cpp
sequence — the chat template's head, then every remembered window's rows — and grows it a window
at a time. A question is decoded after the audio, answered, and cut away again at the next
window. Until the first eviction the answer is the reference's for the remembered audio as one
clip (tests/test_memory.py). When the memory is full, its oldest window's positions are removed
and the later ones shifted back (`KVSequence.remove`): constant cost per window over hours, an
approximation (the kept rows were computed after the evicted window) whose drift
benchmarks/bench_memory_listen.py measures; `exact=True` re-prefills the remaining windows on a
second sequence in the background and swaps to it when done.

The window in progress (the tail) is re-encoded every `tail_every` seconds (None: held until
full), so a question also covers what was heard up to that many seconds ago.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..constants import ROWS_PER_WINDOW, SOUND_TOKEN, THINK_SUFFIX
from ..errors import ContextOverflowError, OptionsError, PromptError, SessionBusyError
from ..prompt import Message, render, split_sound
from .clips import Clip, RowsCache, items
from .memory_exact import Rebuilder
from .memory_timed import encode_at, range_windows
from .prefill import Prefill
from .session import Turn, check_fits
from .stream import Stream
from .types import Answer, GenerationOptions
from .windows import WINDOW_S, Archive, Heard, Windower, WindowInfo, check_family, is_silent, memory_positions

_ids = itertools.count()


@dataclass(eq=False)
class Window:
    """A window the memory holds: its rows, its identity, and the label its KV positions carry
    in the live sequence (its identity, until a shift made them an approximation of it)."""

    index: int
    start_s: float
    seconds: float
    rows: np.ndarray
    key: str
    label: str
    samples: np.ndarray | None = None  # kept where rows carry their place (memory_timed.py)

    def clip(self, fresh: bool = False) -> Clip:
        return Clip.of_rows(self.rows, self.key if fresh else self.label)


@dataclass
class MemoryStats:
    windows: int = 0  # full windows remembered
    tails: int = 0  # tail re-encodings
    evicted: int = 0
    skipped: int = 0  # silent windows not remembered (skip_silence)
    dropped: int = 0  # windows lost because inference fell behind (reported by the feeder)
    rebuilds: int = 0  # exact mode: re-prefills swapped in
    encode_ms: list = None  # per window or tail: features + encoder
    prefill_ms: list = None  # per change of the KV: evictions + the new rows
    rebuild_ms: list = None  # exact mode: from a rebuild's start to its swap

    def __post_init__(self):
        self.encode_ms, self.prefill_ms, self.rebuild_ms = [], [], []


class _Asker:
    """The session side of a memory question's `Stream`: its sequence, its prefill, its end."""

    def __init__(self, memory: Memory, seq, on_end):
        self.memory, self.model, self.seq, self._on_end = memory, memory.model, seq, on_end
        self.prefilled_tokens = 0

    def _prefill(self, target: list, adapter: str | None = None) -> int:
        prefill = Prefill(self.seq, target, adapter)
        reused = prefill.run()
        self.prefilled_tokens += prefill.decoded
        return reused

    def _ended(self, stream: Stream, *, failed: bool = False) -> None:
        self._on_end(stream)


class Memory:
    """The last `seconds` of a stream of audio, in the KV cache. `feed(samples)` as it is heard
    (16 kHz mono float32), `ask(question)` / `stream(question)` at any time, `flush()` at its end."""

    def __init__(
        self,
        model,
        seconds: float = 600.0,
        *,
        system: str | None = None,
        tail_every: float | None = 10.0,
        skip_silence: bool = False,
        silence_db: float = -50.0,
        exact: bool = False,
        directory=None,
        max_new_tokens: int | None = None,
        aside=None,
    ):
        self.family = fam = check_family(model.family, seconds)
        self.model, self.system = model, system
        self.capacity = math.ceil(seconds / WINDOW_S)  # full windows; the tail comes on top, up to the model's most
        self.skip_silence, self.silence_db, self.exact = skip_silence, silence_db, exact
        self.windower = Windower(tail_every)
        # the ids around the rows (Music Flamingo's sound bos/eos): bos ends the head, eos starts a question
        self._bos, self._eos = ([fam.sound_bos], [fam.sound_eos]) if fam.around else ([], [])
        self.head = model.llm.tokenize(self._render("")[0]) + self._bos
        answer = max_new_tokens or model.options.max_new_tokens or 500
        need = memory_positions(seconds, answer, fam.max_windows) + len(self.head) + len(self._eos)
        if need > model.llm.n_ctx:
            raise ContextOverflowError(
                f"a memory of {self.capacity * WINDOW_S:g} s needs n_ctx >= {need} (its windows of "
                f"{ROWS_PER_WINDOW} rows, the prompt and a {answer}-token answer) but the model has "
                f"{model.llm.n_ctx}; load it with a larger n_ctx or remember less"
            )
        from .encoding import ClipEncoder

        # windows are never asked twice: a cache of their own (none), not the model's clips
        timed = fam.time_embedding
        self._encoder = ClipEncoder(
            model.encoder, model.settings.windows_per_run, model._encoder_lock, RowsCache(0), timed=timed
        )
        self._claimed = [model.claim_sequence()]
        try:
            self.seq = self._claimed[0]
            self._spare = model.claim_sequence(required=True) if exact else None
            self._claimed.append(self._spare)
            self._aside = aside or model.llm.seqs[0]  # where questions about a time range are prefilled
            self.archive = Archive(directory, keep=self.capacity + 1)
        except BaseException:
            for seq in self._claimed:
                if seq is not None:
                    model.release_sequence(seq)
            raise
        self.windows: list[Window] = []  # full windows remembered, oldest first
        self.tail: Window | None = None  # the window in progress
        self.stats = MemoryStats()
        self._id = next(_ids)
        self._in_kv: list[Window] = []  # what the live sequence holds after the head, as of the last sync
        self._open: Stream | None = None  # a question being answered: the KV waits for it
        self._lock = threading.RLock()
        self._version = 0  # bumped by every change of what is remembered
        self._closed = False
        self._rebuilder = Rebuilder(self) if exact else None

    # -- hearing ----------------------------------------------------------------------------
    def feed(self, samples: np.ndarray) -> None:
        """Samples heard next (16 kHz mono): each full window, and the tail every `tail_every`
        seconds, is encoded and prefilled here (in the caller's thread)."""
        for heard in self.windower.push(samples):
            self.add(heard)

    def flush(self) -> None:
        """The end of the stream (or a question that must cover every sample): the tail now."""
        heard = self.windower.tail()
        if heard is not None and (self.tail is None or self.tail.seconds < heard.seconds):
            self.add(heard)

    def add(self, heard: Heard) -> None:
        """Remember one window (full, or the tail so far): encode it, then prefill it unless a
        question is being answered (then at the next add or question)."""
        if self._closed:
            return
        silent = is_silent(heard.samples, self.silence_db)
        info = WindowInfo(heard.index, heard.start_s, heard.seconds, silent, silent and self.skip_silence)
        if info.skipped:
            with self._lock:
                if heard.full:
                    self.stats.skipped += 1
                    self.archive.put(info, None)
                if self.tail is not None and self.tail.index == heard.index:
                    self.tail = None
                    self._version += 1
            self.sync()
            return
        t0 = time.perf_counter()
        rows, key = encode_at(self, heard.samples, heard.index, len(self.windows))  # its place (the time embedding)
        samples = heard.samples if self.family.time_embedding else None  # rows that carry their place: kept
        window = Window(heard.index, heard.start_s, heard.seconds, rows, key, key, samples)
        with self._lock:
            self.stats.encode_ms.append((time.perf_counter() - t0) * 1000)
            if heard.full:
                self.stats.windows += 1
                self.archive.put(info, rows, samples)
                self.windows.append(window)
                self.tail = None
            else:
                self.stats.tails += 1
                self.tail = window
            # at most `capacity` full windows, and 20 with the tail (AF3's most): the oldest goes
            while len(self.windows) > self.capacity or len(self.held) > self.family.max_windows:
                self.windows.pop(0)
                self.stats.evicted += 1
            self._version += 1
        self.sync()

    def gap(self, seconds: float, windows: int = 0) -> None:
        """`seconds` of the stream were not heard (the feeder fell behind, or the device stalled)."""
        with self._lock:
            self.stats.dropped += windows
            self.windower.skip(seconds)

    @property
    def held(self) -> list[Window]:
        """The remembered windows, oldest first, the tail last (a copy; read without the lock, so
        a status never waits for a window's prefill)."""
        windows, tail = list(self.windows), self.tail
        return windows + ([tail] if tail is not None else [])

    def span(self) -> list[tuple[float, float]]:
        """The stretches of stream time the memory holds, merged: [(start_s, end_s), ...]."""
        out: list[list[float]] = []
        for w in self.held:
            if out and abs(out[-1][1] - w.start_s) < 1e-6:
                out[-1][1] = w.start_s + w.seconds
            else:
                out.append([w.start_s, w.start_s + w.seconds])
        return [(a, b) for a, b in out]

    # -- the KV cache -----------------------------------------------------------------------
    def sync(self) -> None:
        """Make the live sequence hold the head and every remembered window: evicted windows
        removed with the later positions shifted back (one remove for all), new ones decoded.
        Not while a question is answered (its stream owns the sequence until it ends)."""
        with self._lock:
            if self._open is not None and self._open.answer is None:
                return
            held = self.held
            with self.model.lock:
                if self._closed or self.model.closed:
                    return
                target = [self.head] + [w.clip() for w in held]
                if held == self._in_kv and self.seq.common_prefix(items(target)) == sum(len(s) for s in target):
                    return  # the KV holds it all already (a question after another)
                t0 = time.perf_counter()
                evicted = self._evict_in_kv(held)
                # made again: the eviction relabels the kept windows' positions
                prefill = Prefill(self.seq, [self.head] + [w.clip() for w in held])
                prefill.run()
                self._in_kv = held
                if prefill.decoded > len(self.head) or evicted:
                    self.stats.prefill_ms.append((time.perf_counter() - t0) * 1000)
            if evicted and self._rebuilder is not None:
                self._rebuilder.due()

    def _evict_in_kv(self, held: list[Window]) -> int:
        """Drop the windows the KV holds but the memory no longer does (always the oldest),
        shifting the rest back and relabelling them; returns the positions shifted."""
        gone = 0
        while gone < len(self._in_kv) and self._in_kv[gone] not in held:
            gone += 1
        if not gone:
            return 0
        seq, n_head = self.seq, len(self.head)
        kept = self._in_kv[gone:]
        want = [self.head] + [w.clip() for w in self._in_kv]
        held_len = sum(len(s) for s in want)
        if seq.common_prefix(items(want)) < held_len:
            return 0  # another question displaced the memory: the prefill re-decodes it whole
        removed = sum(w.rows.shape[0] for w in self._in_kv[:gone])
        seq.truncate(held_len)  # the last question's tokens go first
        evictions = self.stats.evicted
        for w in kept:  # positions computed after what was removed: an approximation, labelled so
            w.label = f"{w.key}~{evictions}"
        moved = [item for w in kept for item in items([w.clip()])]
        seq.remove(n_head, n_head + removed, moved=moved)
        return len(moved)  # positions shifted: what makes the KV an approximation

    # -- exact mode (runtime/memory_exact.py) -------------------------------------------------
    def wait_exact(self, timeout: float | None = None) -> bool:
        """Exact mode: wait until the memory holds freshly computed KV again (no rebuild running
        or due); False on timeout. True at once without exact mode."""
        return self._rebuilder is None or self._rebuilder.wait(timeout)

    # -- questions --------------------------------------------------------------------------
    def _render(self, text: str, n_audio: int = 1) -> list[str]:
        messages = [Message("system", self.system)] if self.system is not None else []
        full = render(self.model.template, messages + [Message("user", text, n_audio=n_audio)])
        return split_sound(full) if n_audio else [full]

    def stream(
        self,
        question: str,
        *,
        at: tuple[float, float] | None = None,
        think: bool = False,
        options: GenerationOptions | None = None,
        **overrides,
    ) -> Stream:
        """A `Stream` of the answer to `question` about what the memory holds (at=(start_s,
        end_s): about the windows heard then, from the archive, prefilled for this question on
        the model's shared sequence). A window being prefilled is waited for; windows heard while
        the answer is written are prefilled after it. `stream.span` says what audio it covered."""
        model = self.model
        opts = GenerationOptions.of(options or model.options, **overrides).resolved(model.generation)
        text = question + (THINK_SUFFIX if think else "")
        if think and "think" in model.adapters:
            raise OptionsError(
                "this bundle's think mode runs its think adapter, and the memory's KV is the base model's: "
                "ask without think"
            )
        if SOUND_TOKEN in question:
            raise OptionsError(f"a memory question cannot hold {SOUND_TOKEN}: the memory's audio is its one clip")
        with self._lock:
            if self._open is not None and self._open.answer is None:
                raise SessionBusyError("the memory is answering another question; finish or cancel() it first")
            if at is None:
                self.sync()  # a window heard while the last question was answered goes in first
            windows = self._windows_at(at) if at is not None else self.held
            clips = [w.clip(fresh=at is not None) for w in windows]
            pieces = self._render(text, n_audio=1 if clips else 0)
            llm = model.llm
            if clips and llm.tokenize(pieces[0]) + self._bos != self.head:
                raise PromptError("the chat template puts text before the audio: a memory cannot keep its audio")
            target = [self.head if clips else llm.tokenize(pieces[0])] + clips
            if clips:
                target.append(self._eos + llm.tokenize(pieces[1]))
            total = check_fits(target, clips, llm.n_ctx, opts.max_new_tokens)
            turn = Turn(
                full="".join(pieces),
                user=Message("user", text, int(bool(clips))),
                target=target,
                clips=clips,
                prompt_len=total,
            )
            asker = _Asker(self, self.seq if at is None else self._aside, self._question_ended)
            stream = Stream(asker, turn, opts, model.eos_ids)
            stream.span = [(w.start_s, w.start_s + w.seconds) for w in windows]
            self._open = stream  # the memory's KV waits for it (a window heard now is prefilled after)
            return stream

    def ask(self, question: str, **kwargs) -> Answer:
        """The whole `Answer` to `question` (the arguments of `stream`)."""
        return self.stream(question, **kwargs).result()

    def logits(self, question: str, *, at: tuple[float, float] | None = None) -> np.ndarray:
        """Next-token logits [vocab] after `question` (the drift measures, scoring)."""
        stream = self.stream(question, at=at, max_new_tokens=1)
        try:
            with self.model.lock:
                stream.session._prefill(stream.turn.target)
                return self.model.llm.last_logits()
        finally:
            stream.cancel()

    def _windows_at(self, at: tuple[float, float]) -> list[Window]:
        start, end = at
        if not end > start:
            raise OptionsError(f"a time range ends after it starts, got {start:g}-{end:g} s")
        infos = self.archive.between(start, end)
        tail = self.tail
        tail = tail if tail is not None and tail.start_s < end and tail.start_s + tail.seconds > start else None
        fam = self.family
        if len(infos) + (tail is not None) > fam.max_windows:
            n = len(infos) + (tail is not None)
            raise OptionsError(f"{start:g}-{end:g} s is {n} windows; {fam.name} reads at most {fam.max_windows}")
        if fam.time_embedding:  # the windows become a clip of their own: each encoded at its place in it
            found = range_windows(self, infos, tail)
        else:
            found = []
            for info in infos:
                rows = self.archive.rows(info.index)
                if rows is not None:
                    key = f"memory{self._id}/at/{info.index}"  # a full window's rows never change
                    found.append(Window(info.index, info.start_s, info.seconds, rows, key, key))
            if tail is not None:
                found.append(Window(tail.index, tail.start_s, tail.seconds, tail.rows, tail.key, tail.key))
        if not found:
            raise OptionsError(f"nothing remembered between {start:g} s and {end:g} s")
        return found

    def _question_ended(self, stream: Stream) -> None:
        # called by the stream under the model lock: taking the memory's lock here would invert
        # sync()'s order (memory, then model) and could deadlock; one assignment needs no lock
        if self._open is stream:
            self._open = None

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop remembering: a prefill in flight ends first (the model may be closed after this),
        the rebuilder stops, the memory's sequences are emptied and given back (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self.model.lock:  # waits for a window's prefill or a rebuild step in flight
            pass
        if self._rebuilder is not None:
            self._rebuilder.stop()
        for seq in self._claimed:
            if seq is not None:
                self.model.release_sequence(seq)

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
