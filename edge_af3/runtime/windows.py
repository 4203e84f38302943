"""A stream of samples cut into AF3's 30 s windows, as an audio memory hears it, and the archive
of every window's rows (RAM, or a folder with `--memory-dir`).

AF3 cuts a clip into 30 s windows from its start and encodes each on its own (its own log-mel
maximum, zero padding after the last sample), so a stream cut at the same boundaries gives the
rows of the whole clip window by window: the first 30 s heard are the clip's first window,
whatever comes later.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..constants import MAX_WINDOWS, MIN_TOKEN_SAMPLES, N_SAMPLES, ROWS_PER_WINDOW, SAMPLE_RATE
from ..errors import OptionsError, OutputError

WINDOW_S = N_SAMPLES / SAMPLE_RATE  # 30 s
QUESTION_ROOM = 128  # positions a question takes at most, beside the answer, when sizing a memory


def memory_positions(seconds: float, answer_tokens: int, max_windows: int = MAX_WINDOWS) -> int:
    """Context positions a memory of `seconds` needs beside the chat template's head: its full
    windows and the tail (the model's most: AF3 20 windows), a question and an answer."""
    windows = min(math.ceil(seconds / WINDOW_S) + 1, max_windows)
    return windows * ROWS_PER_WINDOW + QUESTION_ROOM + answer_tokens


def check_family(family, seconds: float):
    """The memory's limit for the model's family: `seconds` within its longest clip. Returns the family."""
    if not 0 < seconds <= family.max_seconds:
        raise OptionsError(
            f"a memory holds 30 s to {family.max_seconds // 60} minutes ({family.name} reads at most "
            f"{family.max_windows} windows), got {seconds:g} s"
        )
    return family


def check_memory_options(given: str, seconds: float, directory, n_ctx: int | None, answer_tokens: int) -> None:
    """`--memory-dir` and `--n-ctx` for a memory of `seconds` (`given`: as the user wrote it),
    checked before a model loads (listen and serve)."""
    if directory is not None:
        d = Path(directory)
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise OptionsError(f"--memory-dir {d}: not an empty folder; name a new one")
    # the model is not known yet: the fewest windows a model that can hold `seconds` reads (AF3 20,
    # Music Flamingo 40, AF-Next 60)
    most = next((w for w in (MAX_WINDOWS, 40, 60) if seconds <= w * WINDOW_S), 60)
    need = memory_positions(seconds, answer_tokens, most) + 64  # (+ the chat template's head)
    if n_ctx is not None and n_ctx < need:
        raise OptionsError(f"--memory {given} needs --n-ctx >= {need} (its windows, a question, the answer)")


@dataclass(frozen=True)
class Heard:
    """Audio of one window as heard so far: `full` (30 s, final) or the growing tail of the
    window in progress (its samples from the window's start up to now)."""

    index: int  # the window's number in the stream (0: the first 30 s)
    start_s: float  # stream time of its first sample
    samples: np.ndarray
    full: bool

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.start_s + self.seconds


def is_silent(samples: np.ndarray, threshold_db: float) -> bool:
    """No sound: the RMS level (dBFS) of every 100 ms of the window is under `threshold_db`."""
    n = samples.shape[0] // 1600 * 1600
    blocks = samples[:n].reshape(-1, 1600) if n else samples.reshape(1, -1)
    rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1))
    return bool(np.all(20 * np.log10(np.maximum(rms, 1e-12)) < threshold_db))


class Windower:
    """Samples in, windows out: each full 30 s window once, and (tail_every=S) the window in
    progress every S seconds of it. A gap in the stream (`skip`) abandons the window in progress:
    a window never spans a gap, so every kept window is a stretch of real time."""

    def __init__(self, tail_every: float | None = 10.0):
        if tail_every is not None and not 1.0 <= tail_every < WINDOW_S:
            raise OptionsError(f"the tail is re-encoded every 1 to 29 seconds, got {tail_every:g}")
        self.tail_every = tail_every
        self.index = 0  # the window being filled
        self.start_s = 0.0
        self.heard = 0  # stream time, in samples (seconds summed block by block would drift)
        self.lost_s = 0.0  # audio lost in gaps (skipped, or dropped in a window being filled)
        self._parts: list[np.ndarray] = []
        self._n = 0
        self._next_tail = self._tail_step()

    @property
    def heard_s(self) -> float:
        return self.heard / SAMPLE_RATE

    def _tail_step(self) -> int | None:
        return int(self.tail_every * SAMPLE_RATE) if self.tail_every else None

    def push(self, samples: np.ndarray) -> Iterator[Heard]:
        samples = np.asarray(samples, np.float32).reshape(-1)
        while samples.size:
            take = min(samples.size, N_SAMPLES - self._n)
            self._parts.append(samples[:take])
            self._n += take
            self.heard += take
            samples = samples[take:]
            if self._n == N_SAMPLES:
                yield Heard(self.index, self.start_s, np.concatenate(self._parts), True)
                self._begin(self.index + 1, self.heard_s)
            elif self._next_tail is not None and self._n >= self._next_tail:
                self._next_tail += self._tail_step()
                yield self.tail()

    def tail(self) -> Heard | None:
        """The window in progress now (None when too short to give one audio token)."""
        if self._n < MIN_TOKEN_SAMPLES:
            return None
        self._parts = [np.concatenate(self._parts)]
        return Heard(self.index, self.start_s, self._parts[0], False)

    def skip(self, seconds: float) -> None:
        """`seconds` of the stream were lost (a capture gap): the window in progress goes with them."""
        self.lost_s += seconds + self._n / SAMPLE_RATE
        self.heard += round(seconds * SAMPLE_RATE)
        self._begin(self.index + 1 + int(seconds // WINDOW_S), self.heard_s)

    def _begin(self, index: int, start_s: float) -> None:
        self.index, self.start_s = index, start_s
        self._parts, self._n = [], 0
        self._next_tail = self._tail_step()


@dataclass(frozen=True)
class WindowInfo:
    """What the archive records of a window (its rows beside it)."""

    index: int
    start_s: float
    seconds: float
    silent: bool = False
    skipped: bool = False  # silent and not remembered (--skip-silence)


class Archive:
    """Every full window's rows by index (and samples, where rows carry their place): in RAM (the
    last `keep` of them) or in `directory` (one .npy each, written to a temporary name and
    renamed, and index.jsonl), so a question can be asked about any stretch heard
    (`Memory.ask(at=...)`)."""

    def __init__(self, directory: str | os.PathLike | None = None, keep: int = 20):
        self.directory = Path(directory) if directory is not None else None
        self.keep = keep
        self.infos: dict[int, WindowInfo] = {}
        self._rows: dict[int, np.ndarray] = {}
        self._samples: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if any(self.directory.iterdir()):
                    raise OutputError(f"{self.directory}: the memory folder is not empty; name a new one")
            except OSError as e:
                raise OutputError(f"{self.directory}: cannot write the memory folder ({e.strerror})") from e

    def put(self, info: WindowInfo, rows: np.ndarray | None, samples: np.ndarray | None = None) -> None:
        """A window's record, its rows and (for a model whose rows carry their place) its samples."""
        with self._lock:
            self.infos[info.index] = info
            if rows is None:
                return
            if self.directory is None:
                self._rows[info.index] = rows
                if samples is not None:
                    self._samples[info.index] = samples
                for old in sorted(self._rows)[: max(0, len(self._rows) - self.keep)]:
                    del self._rows[old]
                    self._samples.pop(old, None)
                return
            for name, array in ((f"w{info.index:06d}.npy", rows), (f"w{info.index:06d}.samples.npy", samples)):
                if array is not None:
                    fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
                    with os.fdopen(fd, "wb") as f:
                        np.save(f, array)
                    os.replace(tmp, self.directory / name)
            with open(self.directory / "index.jsonl", "a") as f:
                f.write(json.dumps(asdict(info)) + "\n")

    def rows(self, index: int) -> np.ndarray | None:
        return self._read(index, self._rows, f"w{index:06d}.npy")

    def samples(self, index: int) -> np.ndarray | None:
        return self._read(index, self._samples, f"w{index:06d}.samples.npy")

    def _read(self, index: int, kept: dict, name: str) -> np.ndarray | None:
        with self._lock:
            if self.directory is None:
                return kept.get(index)
        path = self.directory / name
        return np.load(path) if path.exists() else None

    def between(self, start_s: float, end_s: float) -> list[WindowInfo]:
        """Windows that overlap [start_s, end_s), in order, silent-skipped ones left out."""
        with self._lock:
            found = [i for i in self.infos.values() if i.start_s < end_s and i.start_s + i.seconds > start_s]
        return sorted((i for i in found if not i.skipped), key=lambda i: i.index)
