"""Fixed shapes for engines that capture CUDA graphs (torch, ONNX Runtime CUDA) or build
optimisation profiles (TensorRT): a run of W windows x F frames goes to the smallest bucket that
holds it, padded so the valid rows do not change.

    full windows           (W in WINDOW_BUCKETS, 3000 frames)
    a partial last window  (1, F in FRAME_BUCKETS), cut past its valid frames by the runtime

Padded windows get an all-valid mask (any mask works: their rows are dropped); padded frames get
a zero mask and zero features (masked keys; the convolutions never reach back into the valid
frames, which end at least 4 frames before the cut).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..constants import N_FRAMES, N_MELS, rows_for_frames

WINDOW_BUCKETS = (1, 2, 4, 8, 20)
FRAME_BUCKETS = (500, 1000, 1500, 2000, 2500, 3000)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (n above the largest: ValueError)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} is above the largest bucket {buckets[-1]}")


def window_buckets(max_windows: int) -> tuple[int, ...]:
    return tuple(b for b in WINDOW_BUCKETS if b < max_windows) + (max_windows,)


@dataclass(frozen=True)
class Run:
    start: int  # first input window
    windows: int  # input windows in this run
    shape: tuple[int, int]  # (windows, frames) of the bucket
    rows: int  # rows per window to keep from the output


def plan(n_windows: int, frames: int, buckets: tuple[int, ...]) -> Iterator[Run]:
    """The bucketed runs for an input of n_windows x frames (more windows than the largest bucket:
    several runs)."""
    if not 0 < frames <= N_FRAMES:
        raise ValueError(f"frames must be in 1..{N_FRAMES}, got {frames}")
    step = buckets[-1]
    for start in range(0, n_windows, step):
        w = min(step, n_windows - start)
        shape = (bucket(w, buckets), N_FRAMES) if (frames == N_FRAMES or w > 1) else (1, bucket(frames, FRAME_BUCKETS))
        yield Run(start, w, shape, rows_for_frames(frames))


def padded(features: np.ndarray, mask: np.ndarray, run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The run's inputs padded to its bucket: features [Wb,128,Fb] float32, mask [Wb,Fb] int64."""
    wb, fb = run.shape
    w, f = run.windows, features.shape[2]
    feats = np.zeros((wb, N_MELS, fb), np.float32)
    m = np.ones((wb, fb), np.int64)
    feats[:w, :, :f] = features[run.start : run.start + w]
    m[:w, :f] = mask[run.start : run.start + w]
    m[:w, f:] = 0
    return feats, m


def padded_times(times: np.ndarray, run: Run) -> np.ndarray:
    """The rows' times [Wb, rows of Fb] float32 for a time-embedding graph: the run's windows' own,
    zeros in the padding (whose rows are dropped)."""
    wb, fb = run.shape
    out = np.zeros((wb, rows_for_frames(fb)), np.float32)
    part = times[run.start : run.start + run.windows]
    out[: run.windows, : part.shape[1]] = part
    return out


def run_bucketed(
    features: np.ndarray,
    mask: np.ndarray,
    buckets: tuple[int, ...],
    run_one: Callable[..., np.ndarray],
    times: np.ndarray | None = None,
) -> np.ndarray:
    """Every bucketed run of an input: its padded inputs through `run_one(run, features, mask[,
    times])` (-> [Wb, rows, H], which may be the engine's reused output buffer), the valid windows
    and rows copied out, concatenated. `times` [W, rows]: a time-embedding graph's third input."""
    out = []
    for run in plan(features.shape[0], features.shape[2], buckets):
        feats, m = padded(features, mask, run)
        extra = () if times is None else (padded_times(times, run),)
        out.append(np.array(run_one(run, feats, m, *extra)[: run.windows, : run.rows], dtype=np.float32))
    return out[0] if len(out) == 1 else np.concatenate(out)
