"""A bundle is a folder the exporters wrote: encoder.onnx, llm-<quant>.gguf, manifest.json.

The manifest describes every file (sha256, size) and the model (shapes, special ids, feature
parameters); `open_bundle` refuses a bundle whose files are missing or do not match it.
No torch here: this is read by the runtime on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """The folder is not a usable edge-af3 bundle."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def staged_folder(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; on success it replaces `out`, on any failure
    (Ctrl-C included) it is removed, so `out` is either complete or untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def encoder(self) -> Path:
        return self.path / self.manifest["encoder"]["file"]

    @property
    def llm(self) -> Path:
        return self.path / self.manifest["llm"]["file"]

    @property
    def mmproj(self) -> Path | None:
        """llama.cpp's mmproj GGUF when the bundle was exported with `--mmproj`."""
        mm = self.manifest.get("mmproj")
        return self.path / mm["file"] if mm else None

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["llm_hidden"])


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not an edge-af3 bundle (export one with `edge-af3 export`)")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {version!r}; this edge-af3 reads format {FORMAT_VERSION}")
    return manifest


def open_bundle(path: str | os.PathLike, *, check_hashes: bool = True) -> Bundle:
    """Read and check a bundle: every file the manifest lists exists with its size (and sha256)."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files", {})
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise BundleError(f"{path}: {', '.join(missing)} missing (re-export the bundle)")
    for name, meta in files.items():
        f = path / name
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}")
        if check_hashes and sha256_file(f) != meta["sha256"]:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest (corrupt or replaced)")
    return Bundle(path=path, manifest=manifest)
