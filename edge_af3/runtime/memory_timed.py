"""The audio memory on a model whose rows carry their place (Music Flamingo, AF-Next: the rotary
time embedding inside the encoder). A window's rows depend on where in the clip it lies, so when
its place changes its rows must be made again from its samples, which the memory keeps for these
models (one 30 s window: 1.9 MB): after an eviction in exact mode (the kept windows become windows
0, 1, ... of the memory), and for a time-range question (the windows asked about become a clip
of their own). For AF3 the rows are the same wherever they lie, and none of this runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..audio import Audio
from ..constants import SAMPLE_RATE
from .clips import Clip

if TYPE_CHECKING:
    from .memory import Memory, Window


def placed_key(memory: Memory, index: int, samples_key: str, place: int) -> str:
    """A window's identity in the KV cache: which window, its samples, and its place in the clip
    (the same samples at another place are other rows on these models)."""
    return f"memory{memory._id}/{index}/{samples_key[:16]}@{place}"


def encode_at(memory: Memory, samples: np.ndarray, index: int, place: int) -> tuple[np.ndarray, str]:
    """(rows, key) of a window's samples encoded as window `place` of its clip (AF3's encoder
    reads no place: its rows are the same wherever the window lies)."""
    clip = memory._encoder.encode(Clip(Audio(samples, SAMPLE_RATE, 1, f"window {index}")), first=place)
    return clip.rows, placed_key(memory, index, clip.key, place)


def replaced(memory: Memory, held: list[Window]) -> list[tuple[np.ndarray, str]]:
    """Exact mode: the held windows' (rows, key) at their places now (0, 1, ...), encoded again
    where a window's place changed since it was encoded."""
    out = []
    for place, w in enumerate(held):
        out.append((w.rows, w.key) if w.key.endswith(f"@{place}") else encode_at(memory, w.samples, w.index, place))
    return out


def range_windows(memory: Memory, infos, tail: Window | None) -> list[Window]:
    """The windows heard in a time range as one clip of their own: each encoded at its place in
    that clip from the samples the archive kept (a window whose samples are gone is left out)."""
    from .memory import Window

    found = []
    for info in infos:
        samples = memory.archive.samples(info.index)
        if samples is not None:
            rows, key = encode_at(memory, samples, info.index, len(found))
            found.append(Window(info.index, info.start_s, info.seconds, rows, key, key))
    if tail is not None:
        rows, key = encode_at(memory, tail.samples, tail.index, len(found))
        found.append(Window(tail.index, tail.start_s, tail.seconds, rows, key, key))
    return found
