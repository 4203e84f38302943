"""`--model` / `AF3.load(source)`: a bundle folder as it is; an AF3 checkpoint folder or Hub id
exported once into the user cache (keyed by the checkpoint's content) and reused."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import content_key, resolve_checkpoint
from ..errors import CheckpointError, MissingDependencyError, ModelNotFoundError
from ..paths import cache_dir


def locate(source: str | os.PathLike, *, quant: str = "q4_k_m", progress=None) -> Path:
    """The bundle folder for `source`; raises ModelNotFoundError listing what was tried."""
    text = str(source)
    path = Path(text).expanduser()
    tried = []
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return path
        tried.append(f"bundle: {path} has no manifest.json")
        if (path / "config.json").is_file():
            return exported(path, quant, progress)  # a non-AF3 config is refused there, with the reason
        tried.append(f"checkpoint folder: {path} has no config.json")
    elif path.exists():
        tried.append(f"bundle or checkpoint folder: {path} is a file")
    else:
        tried.append(f"local folder: {path} does not exist")
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            try:
                return exported(text, quant, progress)
            except CheckpointError as e:
                tried.append(f"Hub id: {e}")
        else:
            tried.append(f"Hub id: {text!r} is not of the form 'org/name'")
    raise ModelNotFoundError(f"cannot load model {text!r}; tried:\n  - " + "\n  - ".join(tried))


def cached_bundle_path(ckpt: Path, quant: str) -> Path:
    """Where the bundle exported from this checkpoint's current content lives in the cache."""
    return cache_dir() / "bundles" / f"{ckpt.name}-{quant}-{content_key(ckpt)}"


def exported(source, quant: str, progress=None) -> Path:
    """Export a checkpoint (folder or Hub id) once into ~/.cache/edge-af3/bundles and reuse it."""
    from ..checkpoint import read_config

    ckpt = resolve_checkpoint(source)
    read_config(ckpt)  # refuse a non-AF3 folder before anything is exported
    out = cached_bundle_path(ckpt, quant)
    if not (out / "manifest.json").is_file():
        try:
            from ..export import export  # layer-ok: only a checkpoint (not a bundle) needs the exporter
        except ImportError as e:
            raise MissingDependencyError(
                f"{source} is a checkpoint; exporting it needs the export extra ({e.name} is missing): "
                "pip install 'edge-af3[export]', or pass an exported bundle"
            ) from e
        export(ckpt, out, quant=quant, force=True, progress=progress)
    return out
