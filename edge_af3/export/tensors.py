"""A checkpoint's safetensors tensors, read one at a time with plain file reads.

safetensors' `safe_open` maps each file whole: every tensor read through it stays in the process's
resident set as file pages until the kernel wants the memory back, so converting a 16.5 GB
checkpoint showed 16.5 GB of RSS however little the exporter kept. Here a tensor's bytes are read
into a buffer of its own (`torch.frombuffer`, no copy), so the process holds exactly the tensors it
keeps; the kernel's page cache still serves a second read of the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class Shard:
    """One .safetensors file: its header parsed at open, tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(f"{self.path}: not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (its header is not a table)")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.header: dict[str, dict] = header
        size = self.path.stat().st_size
        for name, info in header.items():
            try:
                start, end = (int(x) for x in info["data_offsets"])
                shape = [int(d) for d in info["shape"]]
                str(info["dtype"])
            except (TypeError, ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name!r} is malformed") from None
            if not 0 <= start <= end or self.base + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} is malformed or runs past the file's end")
            dtype = DTYPES.get(info["dtype"])
            if dtype is not None and end - start != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - start} bytes for its shape {shape}")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.header[name]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype, in memory of its own."""
        info = self.header[name]
        if info["dtype"] not in DTYPES:  # refused when read, so a file may hold types never asked for
            raise CheckpointError(f"{self.path}: tensor {name!r} has a type this reader does not take: {info['dtype']}")
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is cut short")
                got += n
        dtype = DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def shards(ckpt: Path) -> list[Shard]:
    """Every weight file of checkpoint `ckpt`, opened."""
    from ..checkpoint import weight_files

    return [Shard(f) for f in weight_files(ckpt)]


def iter_names(ckpt: Path) -> Iterator[tuple[str, Shard]]:
    """(name, shard) of every tensor in the checkpoint."""
    for shard in shards(ckpt):
        for name in shard.keys():
            yield name, shard


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
BIG_ALLOCATION = 1 << 20
# where glibc's own adaptive thresholds end up once big blocks have come and gone (its maximum
# mmap threshold on 64-bit, and twice that for the trim): what a process gets back after the export
SETTLED_MMAP, SETTLED_TRIM = 32 << 20, 64 << 20


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None


@contextlib.contextmanager
def heap_for_big_tensors():
    """For the duration, glibc gives freed memory back at once: blocks of 1 MiB and more are mapped
    on their own (released when freed) and the heap's free top is trimmed past 1 MiB. Its defaults
    keep freed blocks up to 32 MiB in the heap, where the exporter's stream of tensors fragments
    it: measured on the bench-small encoder's ONNX export, 2.85 GB peak and 2.17 GB still resident
    after it with the defaults, 1.80 and 0.78 GB with this; on AF3's encoder, 11.3 GB -> 3.2 GB.
    Afterwards the thresholds are set where glibc's adaptive ones settle (32 / 64 MiB), so a server
    that exported on first use does not map every big block afresh for the rest of its life."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, BIG_ALLOCATION)
        libc.mallopt(_M_TRIM_THRESHOLD, BIG_ALLOCATION)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, SETTLED_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, SETTLED_TRIM)


def give_back_freed() -> None:
    """Collect Python's garbage and hand the heap's free memory back to the system (malloc_trim)
    between the export's stages, so one stage's leftovers do not add to the next one's peak."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
