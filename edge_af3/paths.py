"""Where edge-af3 keeps its files (torch-free: the runtime, the VAD and the engines use it)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def cache_dir() -> Path:
    """`$EDGE_AF3_CACHE`, else `$XDG_CACHE_HOME/edge-af3`, else `~/.cache/edge-af3`."""
    root = os.environ.get("EDGE_AF3_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge-af3"
    )
    return Path(root)


def last_used() -> dict[str, float]:
    """{bundle path: unix time of its last load by the CLI} (`edge-af3 models list`)."""
    try:
        return json.loads((cache_dir() / "used.json").read_text())
    except (OSError, ValueError):
        return {}


def mark_used(path: str | os.PathLike) -> None:
    """Remember when a bundle was loaded (best effort, written atomically)."""
    record = cache_dir() / "used.json"
    try:
        data = last_used()
        data[str(Path(path).resolve())] = time.time()
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(record)
    except OSError:
        pass
