"""Finding an AF3 checkpoint (a local HF folder or a Hub id) and checking that it is one.

Torch-free: the runtime resolves `AF3.load("org/name")` with it before exporting, and the
reference loader and exporters build on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CHECKPOINT_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "merges.txt", "vocab.json", "think/*"]

# AF3; Music Flamingo and Audio Flamingo Next (the same architecture: AF3 + rotary time embeddings)
MODEL_TYPES = ("audioflamingo3", "musicflamingo")

# the generation settings AF3's checkpoints carry in generation_config.json (and their meaning here)
GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
    "max_new_tokens",
)


def resolve_checkpoint(src: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as it is, or a Hub id downloaded into (or, offline, read from) the Hub cache.

    Honours `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE`/`HF_HOME` through huggingface_hub.
    """
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: a checkpoint is a folder, this is a file")
        return path.resolve()
    text = str(src)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such folder, and not a Hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{text}: not in the local Hub cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it once with network access"
        ) from e
    except HFValidationError as e:
        raise CheckpointError(f"{text}: not a valid Hub id ({e})") from e
    except Exception as e:  # noqa: BLE001 - network errors, 404s, gated repos: all say what was tried
        raise CheckpointError(f"{text}: could not fetch from the Hub: {e}") from e


def read_config(path: Path) -> dict[str, Any]:
    """config.json of an AF3 checkpoint; refuses anything else with the reason."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json, not an HF checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type is {kind!r}, not an Audio Flamingo checkpoint ({' or '.join(MODEL_TYPES)})"
        )
    return cfg


def read_generation_config(path: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json, reduced to the keys the runtime applies ({} if absent)."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    return {k: raw[k] for k in GENERATION_KEYS if raw.get(k) is not None}


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; every shard the index names must exist."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing weight shard(s) {', '.join(missing)}")
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def content_key(path: Path) -> str:
    """A key for what a checkpoint folder holds, not where it is: every file's name, size and
    mtime (think/ included) and the index's sha256, so an edited checkpoint never maps to a
    bundle exported from its earlier state (hashing GBs of weights on every load is avoided)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if f.name.endswith(".json") and st.st_size < 4 << 20:  # configs and the index: their content
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]
