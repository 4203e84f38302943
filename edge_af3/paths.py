"""Where edge-af3 keeps its files (torch-free: the runtime, the VAD and the engines use it)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$EDGE_AF3_CACHE`, else `$XDG_CACHE_HOME/edge-af3`, else `~/.cache/edge-af3`."""
    root = os.environ.get("EDGE_AF3_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge-af3"
    )
    return Path(root)
