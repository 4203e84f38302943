"""The seam every encoder engine fits: what the runtime may call, and nothing else.

    rows = encoder.encode(features, mask)   # [W,128,F] float32, [W,F] int64 -> [W,F/4,H] float32
    rows = encoder.encode(features, mask, times)  # + [W,F/4] float32: the rows' seconds (time-embedding
                                                  #   graphs: Music Flamingo; engines that lack it raise)
    encoder.close()                         # idempotent; frees sessions, graphs, device memory

`dynamic_frames`: the engine takes a partial window cut to fewer than 3000 frames (the runtime
then encodes a 5 s clip's window only up to its valid frames); otherwise it is fed whole windows.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    name: str  # "onnxruntime-cpu", "onnxruntime-cuda", "torch-cuda", "torch-cpu", "tensorrt"
    dynamic_frames: bool

    def encode(self, features: np.ndarray, mask: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """features [W,128,F], mask [W,F] -> projected rows [W,F/4,H] (F <= 3000)."""
        ...

    def close(self) -> None:
        """Release what the engine holds; calling it twice is harmless."""
        ...
