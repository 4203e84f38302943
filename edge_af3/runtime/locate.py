"""`--model` / `AF3.load(source)`: a bundle folder as it is; a Hub bundle repo's variant that fits,
downloaded once (hub.py); an AF3 checkpoint folder or Hub id exported once into the user cache
(keyed by the checkpoint's content) and reused."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import content_key, resolve_checkpoint
from ..errors import CheckpointError, MissingDependencyError, ModelNotFoundError
from ..paths import cache_dir
from ..quants import resolve_encoder_precision, resolve_quant


def locate(source: str | os.PathLike, *, quant: str = "auto", encoder_precision: str = "auto", progress=None) -> Path:
    """The bundle folder for `source`; raises ModelNotFoundError listing what was tried. `quant`
    and `encoder_precision` apply to a checkpoint (a bundle is taken as it was exported)."""
    text = str(source)
    path = Path(text).expanduser()
    tried = []
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return path
        tried.append(f"bundle: {path} has no manifest.json")
        if (path / "config.json").is_file():
            return exported(
                path, quant, progress, encoder_precision
            )  # a non-AF3 config is refused there, with the reason
        tried.append(f"checkpoint folder: {path} has no config.json")
    elif path.exists():
        tried.append(f"bundle or checkpoint folder: {path} is a file")
    else:
        tried.append(f"local folder: {path} does not exist")
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            from ..hub import pull, remote_manifest

            manifest = remote_manifest(text)  # a bundle repo: the variant that fits, no export
            if manifest is not None:
                # quiet: huggingface_hub shows the download (`progress` is an export's steps)
                return pull(text, quant=quant, encoder_precision=encoder_precision, manifest=manifest)
            tried.append("Hub bundle repo: no manifest.json at its root (or not in the cache offline)")
            try:
                return exported(text, quant, progress, encoder_precision)
            except CheckpointError as e:
                tried.append(f"Hub id: {e}")
        else:
            tried.append(f"Hub id: {text!r} is not of the form 'org/name'")
    raise ModelNotFoundError(f"cannot load model {text!r}; tried:\n  - " + "\n  - ".join(tried))


def cached_bundle_path(ckpt: Path, quant: str, encoder_precision: str = "auto") -> Path:
    """Where the bundle exported from this checkpoint's current content, in this LLM type and
    encoder precision, lives in the cache (`auto` named by what it picks here)."""
    if quant == "auto":
        from ..checkpoint import read_config

        quant = resolve_quant(quant, read_config(ckpt)["text_config"])
    precision = resolve_encoder_precision(encoder_precision)
    return cache_dir() / "bundles" / f"{ckpt.name}-{quant}-{precision}-{content_key(ckpt)}"


def exported(source, quant: str, progress=None, encoder_precision: str = "auto") -> Path:
    """Export a checkpoint (folder or Hub id) once into ~/.cache/edge-af3/bundles and reuse it."""
    from ..checkpoint import read_config

    ckpt = resolve_checkpoint(source)
    read_config(ckpt)  # refuse a non-AF3 folder before anything is exported
    out = cached_bundle_path(ckpt, quant, resolve_encoder_precision(encoder_precision))
    if not (out / "manifest.json").is_file():
        try:
            from ..export import export  # layer-ok: only a checkpoint (not a bundle) needs the exporter
        except ImportError as e:
            raise MissingDependencyError(
                f"{source} is a checkpoint; exporting it needs the export extra ({e.name} is missing): "
                "pip install 'edge-af3[export]', or pass an exported bundle"
            ) from e
        export(ckpt, out, quant=quant, encoder_precision=encoder_precision, force=True, progress=progress)
    return out


# The export's peak RSS, measured on the 7B's 16.55 GB of bf16 safetensors with every check on
# (benchmarks/results/epyc-zen4-avx512/export-memory-full-q4_k_m.md): 8.42 GB in the LLM check,
# 3.86 GB of it the process's own (0.233 per checkpoint byte) and the rest llama.cpp's mapping of the
# GGUF it checks (so it grows with the type: F32 for --exact); 5.25 GB at most before it (0.32).
# Small checkpoints are dominated by the libraries themselves (~1 GB).
EXPORT_CHECK_OWN_PER_BYTE = 0.233
EXPORT_OTHER_PER_BYTE = 0.32
EXPORT_RAM_FLOOR = 1.0e9


def export_ram_bytes(checkpoint_bytes: int, quant: str) -> float:
    """The export's peak RSS for a bf16 checkpoint of `checkpoint_bytes` exported as `quant`."""
    from ..plan import GGUF_BITS

    gguf = checkpoint_bytes / 2 * GGUF_BITS.get(quant, GGUF_BITS["q4_k_m"]) / 8  # ~1 parameter per 2 bytes
    check = EXPORT_CHECK_OWN_PER_BYTE * checkpoint_bytes + gguf
    return max(EXPORT_RAM_FLOOR, check, EXPORT_OTHER_PER_BYTE * checkpoint_bytes)


def first_use(source: str | os.PathLike, quant: str = "auto", encoder_precision: str = "auto") -> dict | None:
    """What loading `source` will do first when its bundle is not made yet: {download_gb,
    remote, disk_gb, ram_gb, free_disk_gb, ram_avail_gb}; None when nothing big is ahead (a
    bundle, an already exported checkpoint) or its size cannot be known (offline). RAM: the
    export's measured peak scaled to this checkpoint and type (`export_ram_bytes`)."""
    import shutil

    path = Path(str(source)).expanduser()
    if (path / "manifest.json").is_file():
        return None
    if path.is_dir():
        if (path / "config.json").is_file() and (
            cached_bundle_path(path.resolve(), quant, encoder_precision) / "manifest.json"
        ).is_file():
            return None
        size, remote = sum(f.stat().st_size for f in path.glob("*.safetensors")), False
    else:
        try:
            from huggingface_hub import HfApi, snapshot_download

            from ..hub import remote_manifest

            if remote_manifest(str(source)) is not None:  # a bundle repo: a download, no export
                return None

            try:  # already downloaded and exported: nothing to say
                local = Path(snapshot_download(repo_id=str(source), local_files_only=True))
                if (cached_bundle_path(local, quant, encoder_precision) / "manifest.json").is_file():
                    return None
            except Exception:  # noqa: BLE001 - not in the Hub cache
                pass
            info = HfApi().model_info(str(source), files_metadata=True)
            size, remote = sum(s.size or 0 for s in info.siblings if s.rfilename.endswith(".safetensors")), True
        except Exception:  # noqa: BLE001 - offline or unknown: the export itself says what is wrong
            return None
    try:
        with open("/proc/meminfo") as f:
            avail = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}.get("MemAvailable", 0)
    except OSError:
        avail = 0
    root = cache_dir()
    free = shutil.disk_usage(root if root.exists() else Path.home()).free
    return {
        "download_gb": size / 1e9,
        "remote": remote,
        "disk_gb": size * (2 if remote else 1) / 1e9,
        "ram_gb": export_ram_bytes(size, quant) / 1e9,
        "free_disk_gb": free / 1e9,
        "ram_avail_gb": avail / 1e9,
    }


def first_use_line(source, need: dict) -> str:
    return (
        f"{source}: first use: {need['download_gb']:.1f} GB of weights to {'download and ' if need['remote'] else ''}"
        f"export into the cache; about {need['disk_gb']:.1f} GB of disk and {need['ram_gb']:.1f} GB of RAM "
        f"(this machine: {need['free_disk_gb']:.1f} GB free disk, {need['ram_avail_gb']:.1f} GB RAM available)"
    )
