"""Clips to rows: features, then the encoder engine one run at a time, in line or on a thread.

The features are made FEATURE_WINDOWS windows at a time (bounded memory: AF-Next's 30 minutes are
60 windows), and the encoder gives rows in prompt order, one chunk per run: full windows
`windows_per_run` at a time, then a partial last window cut just past its
valid frames when the engine takes fewer frames (a 5 s clip costs a sixth of a window; same rows).
On a thread (the GPU default: `overlap`), each chunk goes through a `RowFeed` to the prefill,
which decodes it while the encoder makes the next.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from ..constants import N_FRAMES, ROWS_PER_WINDOW
from ..family import pooled_rows, row_times
from ..features import feature_groups
from .clips import Clip, RowsCache

FEATURE_WINDOWS = 8  # windows whose features are made at once (a 30-minute clip, 60 windows: 51 MB, not 132)


def cut_frames(valid: int) -> int:
    """Frames a partial window is cut to: 4 past its valid frames (the convolutions reach 2), even."""
    return min(N_FRAMES, valid + 4 + (valid % 2))


def iter_windows(
    encoder, feats, windows_per_run: int = 1, lock: threading.Lock | None = None, *, timed: bool = False, first: int = 0
) -> Iterator[np.ndarray]:
    """Valid projected rows [n, H] of a clip, in prompt order, one chunk per encoder run. `timed`:
    the graph embeds the rows' times (Music Flamingo); the clip's windows are `first`.. of the audio
    the rows belong to (0: the clip is the whole audio)."""
    lock = lock or contextlib.nullcontext()
    n_windows = feats.features.shape[0]
    full = [w for w in range(n_windows) if feats.rows_per_window[w] == ROWS_PER_WINDOW]
    for start in range(0, len(full), max(1, windows_per_run)):
        ws = full[start : start + windows_per_run]
        times = np.concatenate([row_times(first + w, 1) for w in ws]) if timed else None
        with lock:
            rows = _encode(encoder, feats.features[ws], feats.mask[ws], times)
        yield rows[:, :ROWS_PER_WINDOW].reshape(-1, rows.shape[-1])
    for w in range(n_windows):
        if feats.rows_per_window[w] != ROWS_PER_WINDOW:  # only ever the last window
            frames = cut_frames(int(feats.mask[w].sum())) if encoder.dynamic_frames else N_FRAMES
            times = row_times(first + w, 1, pooled_rows(frames)) if timed else None
            with lock:
                rows = _encode(encoder, feats.features[w : w + 1, :, :frames], feats.mask[w : w + 1, :frames], times)
            yield rows[0, : feats.rows_per_window[w]]


def _encode(encoder, features: np.ndarray, mask: np.ndarray, times: np.ndarray | None) -> np.ndarray:
    """An engine's encode; the times only for a time-embedding graph (engines without one take two)."""
    return encoder.encode(features, mask) if times is None else encoder.encode(features, mask, times)


class RowFeed:
    """Chunks of rows from an encoder thread to one reader, in order; the thread's error is raised
    in the reader."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, chunk: np.ndarray) -> None:
        self._queue.put(chunk)

    def close(self, error: BaseException | None = None) -> None:
        self._queue.put(error)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                self._queue.put(item)  # a second reader (a history re-decoded) sees it too
                raise item
            yield item


class ClipEncoder:
    """Gives clips their rows with one encoder engine: `encode(clip)` in line, `start(clip)` on a
    thread. The rows are kept on the clip (a history re-decoded later uses them) and in the cache."""

    def __init__(
        self, encoder, windows_per_run: int, lock: threading.Lock | None, cache: RowsCache, *, timed: bool = False
    ):
        self.encoder, self.windows_per_run, self.lock, self.cache = encoder, windows_per_run, lock, cache
        self.timed = timed  # the graph takes the rows' times (Music Flamingo's time embedding)

    def encode(self, clip: Clip, emit: Callable[[np.ndarray], None] | None = None, *, first: int = 0) -> Clip:
        """`first`: the clip's first window's place in the audio its rows join (the memory's
        windows; 0 for a clip of its own) — only a time-embedding graph reads it."""
        run = max(1, self.windows_per_run)
        group = run * math.ceil(FEATURE_WINDOWS / run)  # whole encoder runs: the same batches as one group
        got, features_s, encoder_s = [], 0.0, 0.0
        t0 = time.perf_counter()
        for w0, feats in feature_groups(clip.audio, group):
            t1 = time.perf_counter()
            features_s += t1 - t0
            for chunk in iter_windows(self.encoder, feats, run, self.lock, timed=self.timed, first=first + w0):
                got.append(chunk)
                if emit:
                    emit(chunk)
            t0 = time.perf_counter()
            encoder_s += t0 - t1
        clip.features_ms, clip.encoder_ms = features_s * 1000, encoder_s * 1000
        clip.rows = np.concatenate(got)
        self.cache.put(clip.key, clip.rows)  # (the samples stay: another adapter's encoder may need them)
        return clip

    def start(self, clip: Clip) -> Clip:
        """`encode(clip)` on a thread; `clip.chunks()` hands over each chunk as it comes."""
        clip.feed = RowFeed()
        threading.Thread(target=self._encode_fed, args=(clip,), name="edge-af3-encoder", daemon=True).start()
        return clip

    def _encode_fed(self, clip: Clip) -> None:
        try:
            self.encode(clip, emit=clip.feed.put)
            clip.feed.close()
        except BaseException as e:  # handed to the reader, raised there
            clip.feed.close(e)
