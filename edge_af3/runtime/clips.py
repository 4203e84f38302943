"""A prompt's clips: identity, row count and rows; the rows cache; what a prompt's segments put
in the KV cache and count for the repetition penalty. Encoding is runtime/encoding.py's."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..audio import Audio
from ..constants import SOUND_TOKEN_ID
from ..features import token_count

if TYPE_CHECKING:
    from .encoding import RowFeed


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
    sample count before encoding) and its rows: ready (cached or encoded), or coming chunk by
    chunk from an encoder thread (`feed`; runtime/encoding.py makes both)."""

    def __init__(
        self, audio: Audio, rows: np.ndarray | None = None, *, key: str | None = None, variant: str | None = None
    ):
        self.audio = audio
        self.variant = variant  # the adapter whose encoder weights make its rows (None: the base encoder)
        self.key = key or hashlib.sha256(audio.samples.tobytes()).hexdigest() + (f"/{variant}" if variant else "")
        self.count = token_count(audio.samples.shape[0], audio.limit)
        self.rows = rows
        self.features_ms = self.encoder_ms = 0.0
        self.feed: RowFeed | None = None  # set while an encoder thread makes its rows

    @classmethod
    def of_rows(cls, rows: np.ndarray, key: str) -> Clip:
        """A clip known by its rows alone (an audio memory's window: its samples are gone)."""
        clip = cls.__new__(cls)
        clip.audio, clip.variant, clip.key, clip.count, clip.rows = None, None, key, rows.shape[0], rows
        clip.features_ms = clip.encoder_ms = 0.0
        clip.feed = None
        return clip

    def __len__(self) -> int:
        return self.count

    @property
    def pending(self) -> bool:
        """Neither encoded nor being encoded yet."""
        return self.rows is None and self.feed is None

    def chunks(self) -> Iterator[np.ndarray]:
        """The rows: all at once when made, else each chunk as the encoder thread hands it over."""
        if self.rows is not None:
            yield self.rows
            return
        n = 0
        for chunk in self.feed:
            n += chunk.shape[0]
            yield chunk
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
