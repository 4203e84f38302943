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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError, OutputError
from .paths import cache_dir

# 1: AF3 bundles; 2: bundles an edge-af3 without the model family must not load (Music Flamingo's
# encoder takes the rows' times): AF3 bundles keep writing 1, so older readers still load them
FORMAT_VERSION = 1
FORMAT_FAMILY = 2
READS = (FORMAT_VERSION, FORMAT_FAMILY)
MANIFEST = "manifest.json"


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
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary folder
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def encoder_files(manifest: dict[str, Any], entry: dict[str, Any] | None = None) -> list[str]:
    """The files of an encoder entry (default: the bundle's): its graph and, for a graph over 2 GB,
    the weights file beside it (`<graph>.data`)."""
    graph = (entry or manifest["encoder"])["file"]
    return [n for n in manifest["files"] if n == graph or n.startswith(graph + ".")]


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
    if version not in READS:
        raise BundleError(
            f"{path}: bundle format {version!r}; this edge-af3 reads formats {', '.join(map(str, READS))} "
            "(a newer edge-af3 wrote it: pip install -U edge-af3)"
        )
    return manifest


VERIFIED = "verified.json"  # in the user cache: files whose sha256 was checked, by identity


def _identity(f: Path) -> list:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _verified_record() -> dict:
    try:
        return json.loads((cache_dir() / VERIFIED).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _remember_verified(path: Path, files: dict[str, list]) -> None:
    """Record that these files (by path, size, mtime, inode) matched their hashes; atomic, best effort."""
    record = _verified_record()
    record[str(path.resolve())] = files
    target = cache_dir() / VERIFIED
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified.", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only cache only means hashing again next time


def open_bundle(path: str | os.PathLike, *, check_hashes: bool | None = None) -> Bundle:
    """Read and check a bundle: every file the manifest lists exists with its size and sha256.

    check_hashes None (default): hash each file the first time these exact files are seen and
    remember them (path, size, mtime, inode) in the user cache, so the next load does not re-hash;
    True: hash everything now (`--verify`); False: sizes only.
    """
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files", {})
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise BundleError(f"{path}: {', '.join(missing)} missing (re-export the bundle)")
    known = _verified_record().get(str(path.resolve()), {}) if check_hashes is None else {}
    seen, hashed = {}, False
    for name, meta in files.items():
        f = path / name
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}")
        ident = _identity(f) + [meta["sha256"]]
        if check_hashes is False or known.get(name) == ident:
            seen[name] = ident
            continue
        if sha256_file(f) != meta["sha256"]:
            raise BundleError(f"{path}: {name} does not match its sha256 in the manifest (corrupt or replaced)")
        seen[name], hashed = ident, True
    if hashed:
        _remember_verified(path, seen)
    return Bundle(path=path, manifest=manifest)
