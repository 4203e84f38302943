"""The TensorRT engine cache next to a bundle: keyed, verified on load, rebuilt when stale.

A serialized engine is only valid for the ONNX it was built from, the TensorRT version that
built it, the GPU (name + compute capability), the precision and the optimisation profile
(window-count buckets). All of it is the key; the plan's own sha256 guards against a corrupt file.

    bundle/.engines/encoder-<key>.plan   the engine
    bundle/.engines/encoder-<key>.json   the key fields + the plan's sha256 and size

`lookup` returns a usable plan or None with the reasons (shown to the user, e.g. "built by
TensorRT 10.3, this is 10.7"); `store` writes atomically. Pure Python: tested on CPU CI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..bundle import sha256_file

FOLDER = ".engines"


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt: str  # TensorRT version that builds / runs it
    gpu: str  # device name
    compute_capability: str  # e.g. "8.7" (Orin), "9.0" (H100)
    precision: str  # fp16 | int8 | fp8
    buckets: tuple  # shapes with their own profile / CUDA graph, e.g. ("w1", "w4", "w20", "f500")

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def _paths(bundle: Path, key: EngineKey) -> tuple[Path, Path]:
    base = Path(bundle) / FOLDER / f"encoder-{key.digest()}"
    return base.with_suffix(".plan"), base.with_suffix(".json")


def _describe_mismatch(old: dict, key: EngineKey) -> str:
    diffs = []
    for f in fields(EngineKey):
        was, now = old.get(f.name), getattr(key, f.name)
        if isinstance(now, tuple):
            was = tuple(was or ())
        if was != now:
            diffs.append(f"{f.name} {was} -> {now}")
    return ", ".join(diffs) or "unknown"


def lookup(bundle: Path, key: EngineKey) -> tuple[Path | None, list[str]]:
    """(plan path, []) when a verified engine for `key` exists; (None, reasons) otherwise."""
    plan, meta = _paths(bundle, key)
    reasons = []
    if plan.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError:
            info = {}
        if info.get("key") != json.loads(json.dumps(asdict(key))):
            reasons.append("its metadata does not match the key")
        elif info.get("bytes") != plan.stat().st_size or info.get("sha256") != sha256_file(plan):
            reasons.append("the engine file is corrupt (size or sha256 differs from its metadata)")
        else:
            return plan, []
    else:
        others = sorted((Path(bundle) / FOLDER).glob("encoder-*.json"))
        for other in others:
            try:
                old = json.loads(other.read_text())["key"]
            except (json.JSONDecodeError, KeyError):
                continue
            reasons.append(f"{other.stem} is stale ({_describe_mismatch(old, key)})")
        if not others:
            reasons.append("no engine built yet")
    return None, reasons


def store(bundle: Path, key: EngineKey, plan_bytes: bytes) -> Path:
    """Write the engine and its metadata atomically; stale engines of the same bundle are removed."""
    plan, meta = _paths(bundle, key)
    plan.parent.mkdir(parents=True, exist_ok=True)
    for old in plan.parent.glob("encoder-*"):
        if old.stem != plan.stem:
            old.unlink()
    tmp = plan.with_name(plan.name + ".part")
    tmp.write_bytes(plan_bytes)
    tmp.replace(plan)
    info = {"key": asdict(key), "bytes": len(plan_bytes), "sha256": hashlib.sha256(plan_bytes).hexdigest()}
    tmp = meta.with_name(meta.name + ".part")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(meta)
    return plan
