"""A prompt's clips: identity, row count, and rows, encoded in line or on a thread, and cached.

The encoder gives rows in prompt order, one chunk per run: full windows `windows_per_run` at a
time (bounded memory: a 10 min clip is 20 windows), then a partial last window cut just past its
valid frames when the engine takes fewer frames (a 5 s clip costs a sixth of a window; same rows).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..audio import Audio
from ..constants import N_FRAMES, ROWS_PER_WINDOW, SOUND_TOKEN_ID
from ..features import extract_features, token_count


def cut_frames(valid: int) -> int:
    """Frames a partial window is cut to: 4 past its valid frames (the convolutions reach 2), even."""
    return min(N_FRAMES, valid + 4 + (valid % 2))


def iter_windows(encoder, feats, windows_per_run: int = 1, lock: threading.Lock | None = None) -> Iterator[np.ndarray]:
    """Valid projected rows [n, H] of a clip, in prompt order, one chunk per encoder run."""
    lock = lock or contextlib.nullcontext()
    n_windows = feats.features.shape[0]
    full = [w for w in range(n_windows) if feats.rows_per_window[w] == ROWS_PER_WINDOW]
    for start in range(0, len(full), max(1, windows_per_run)):
        ws = full[start : start + windows_per_run]
        with lock:
            rows = encoder.encode(feats.features[ws], feats.mask[ws])
        yield rows[:, :ROWS_PER_WINDOW].reshape(-1, rows.shape[-1])
    for w in range(n_windows):
        if feats.rows_per_window[w] != ROWS_PER_WINDOW:  # only ever the last window
            frames = cut_frames(int(feats.mask[w].sum())) if encoder.dynamic_frames else N_FRAMES
            with lock:
                rows = encoder.encode(feats.features[w : w + 1, :, :frames], feats.mask[w : w + 1, :frames])
            yield rows[0, : feats.rows_per_window[w]]


class RowsCache:
    """Projected rows by the sha256 of a clip's samples; least recently used out first."""

    def __init__(self, size: int = 16):
        self.size = size
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            rows = self._rows.get(key)
            if rows is not None:
                self._rows.move_to_end(key)
            return rows

    def put(self, key: str, rows: np.ndarray) -> None:
        with self._lock:
            self._rows[key] = rows
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


class Clip:
    """One clip of a prompt: its identity (sha256 of the samples), its row count (known from the
    sample count before encoding) and its rows: ready (cached), encoded when first asked for
    (`encode`), or being encoded on a thread (`start`), the prefill taking each chunk as it comes."""

    def __init__(
        self, audio: Audio, rows: np.ndarray | None = None, *, key: str | None = None, variant: str | None = None
    ):
        self.audio = audio
        self.variant = variant  # the adapter whose encoder weights make its rows (None: the base encoder)
        self.key = key or hashlib.sha256(audio.samples.tobytes()).hexdigest() + (f"/{variant}" if variant else "")
        self.count = token_count(audio.samples.shape[0])
        self.rows = rows
        self.features_ms = self.encoder_ms = 0.0
        self.error: BaseException | None = None
        self._queue: queue.Queue | None = None

    def __len__(self) -> int:
        return self.count

    def encode(
        self, encoder, windows_per_run: int, lock, cache: RowsCache, emit: Callable[[np.ndarray], None] | None = None
    ) -> Clip:
        """Features, then the encoder one run at a time (each chunk to `emit` as it is made); the
        rows are kept here (a history re-decoded later uses them) and in the cache."""
        t0 = time.perf_counter()
        feats = extract_features(self.audio)
        t1 = time.perf_counter()
        self.features_ms = (t1 - t0) * 1000
        got = []
        for chunk in iter_windows(encoder, feats, windows_per_run, lock):
            got.append(chunk)
            if emit:
                emit(chunk)
        self.encoder_ms = (time.perf_counter() - t1) * 1000
        self.rows = np.concatenate(got)
        cache.put(self.key, self.rows)  # (the samples stay: another adapter's encoder may need them)
        return self

    def start(self, *args) -> Clip:
        """`encode(*args)` on a thread; `chunks()` hands over each chunk as it comes."""
        self._queue = queue.Queue()
        threading.Thread(target=self._encode_queued, args=args, name="edge-af3-encoder", daemon=True).start()
        return self

    def _encode_queued(self, *args) -> None:
        try:
            self.encode(*args, emit=self._queue.put)
            self._queue.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            self.error = e
            self._queue.put(e)

    @property
    def pending(self) -> bool:
        """Neither encoded nor being encoded yet."""
        return self.rows is None and self._queue is None

    def chunks(self) -> Iterator[np.ndarray]:
        if self.rows is not None:
            yield self.rows
            return
        if self.error is not None:
            raise self.error
        n = 0
        while True:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            n += item.shape[0]
            yield item
        if n != self.count:
            raise RuntimeError(f"the encoder gave {n} rows for a clip of {self.count} audio tokens")

    def all_rows(self) -> np.ndarray:
        return self.rows if self.rows is not None else np.concatenate(list(self.chunks()))


def items(segments: Sequence) -> Iterator:
    """What each KV position holds for a list of segments (token id lists and clips)."""
    for seg in segments:
        if isinstance(seg, Clip):
            for i in range(seg.count):
                yield (seg.key, i)
        else:
            yield from seg


def penalty_ids(segments: Sequence) -> Iterator[int]:
    """The token ids transformers sees for these segments (each audio row is a `<sound>` id): what
    its repetition penalty counts."""
    for seg in segments:
        if isinstance(seg, Clip):
            yield from (SOUND_TOKEN_ID,) * seg.count
        else:
            yield from seg
