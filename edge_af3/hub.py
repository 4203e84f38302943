"""Bundles on the Hugging Face Hub: pull the variant that fits this device, publish bundles.

A bundle repo holds an edge-af3 `manifest.json` at its root (a checkpoint repo holds a
`config.json` instead: that one is exported on the device, as before). Like a GGUF repo with
several quants, it may hold several LLM types and encoder precisions side by side; the root
manifest lists them under `variants`, and `files` hashes every file of every variant:

    manifest.json                   the bundle's manifest + "variants": {"llm": {...}, "encoder": {...}}
    llm-q4_k_m.gguf, llm-q8_0.gguf  one entry each in variants.llm (keyed by type)
    encoder.onnx                    variants.encoder["fp32"] (the first bundle's at the root)
    encoder-mixed/encoder.onnx      other precisions in their own folder (an encoder over 2 GB
                                    keeps its weights in `encoder.onnx.data` beside it, by that name)
    README.md                       the model card

`pull` downloads only what one variant needs (huggingface_hub: resumable, its progress bars, the
Hub cache, offline after the first pull), checks every file against the manifest's sha256 before
anything parses it, and makes a bundle folder in the edge-af3 cache whose files link into the
Hub cache (no copy).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .bundle import MANIFEST, encoder_files, open_bundle, read_manifest, staged_folder
from .errors import BundleError, ModelNotFoundError, OptionsError
from .family import Family
from .paths import cache_dir

# LLM types, best quality first: `auto` takes the first one that fits this machine's memory
QUALITY = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "q4_0")
FOUR_BIT = ("q4_k_m", "iq4_nl", "q4_0")


def remote_manifest(repo_id: str, revision: str | None = None) -> dict | None:
    """The bundle manifest at the root of a Hub repo; None when it has none (a checkpoint repo) or
    it cannot be read (offline and not in the cache: the checkpoint path then says why)."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id, MANIFEST, revision=revision)
    except Exception:  # noqa: BLE001 - no manifest, no network, unknown repo: not a bundle repo we can read
        return None
    try:
        m = json.loads(Path(path).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{repo_id}: its {MANIFEST} is not valid JSON ({e})") from e
    return m if isinstance(m, dict) and "format_version" in m and "llm" in m else None


def variants(m: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """(LLM entries by type, encoder entries by precision); a plain bundle has one of each."""
    v = m.get("variants") or {}
    return v.get("llm") or {m["llm"]["quant"]: m["llm"]}, v.get("encoder") or {m["encoder"]["precision"]: m["encoder"]}


def _bytes(m: dict, names: list[str]) -> int:
    return sum(m["files"][n]["bytes"] for n in names)


def need_bytes(m: dict, quant: str, precision: str) -> int:
    """Memory a variant needs, estimated: its weights, and an f16 KV cache of the family's default
    context (Qwen2's KV width is 1/7 of its hidden width at every published size)."""
    llm_v, enc_v = variants(m)
    model = m["model"]
    kv = 2 * model["llm_layers"] * Family.from_manifest(m).n_ctx * model.get("llm_kv_dim", model["llm_hidden"] // 7)
    return _bytes(m, [llm_v[quant]["file"]]) + _bytes(m, encoder_files(m, enc_v[precision])) + 2 * kv


def choose(m: dict, quant: str = "auto", encoder_precision: str = "auto", budget: int | None = None, have=()) -> dict:
    """The variant to pull: the asked type, or (`auto`) a variant already pulled (`have`) that fits,
    else the best-quality LLM whose weights and KV cache fit `budget` (unknown budget: the first
    4-bit type there is, not a 30 GB f32); the asked encoder precision, or what this machine runs
    best that is there."""
    llm_v, enc_v = variants(m)
    if encoder_precision == "auto":
        from .quants import resolve_encoder_precision

        here = resolve_encoder_precision("auto")
        precision = here if here in enc_v else ("fp32" if "fp32" in enc_v else next(iter(enc_v)))
    elif encoder_precision in enc_v:
        precision = encoder_precision
    else:
        raise OptionsError(f"no {encoder_precision} encoder in this bundle repo; it has {', '.join(enc_v)}")
    if quant != "auto":
        if quant not in llm_v:
            raise OptionsError(f"no {quant} LLM in this bundle repo; it has {', '.join(llm_v)}")
        return {"quant": quant, "encoder_precision": precision, "why": "asked for"}
    ranked = sorted(llm_v, key=lambda q: QUALITY.index(q) if q in QUALITY else len(QUALITY))
    sizes = {q: need_bytes(m, q, precision) for q in ranked}
    if budget is None:  # nothing known of this machine: a 4-bit type when there is one
        four = [q for q in ranked if q in FOUR_BIT] or ranked[-1:]
        return {"quant": four[0], "encoder_precision": precision, "why": "memory unknown", "need_bytes": sizes[four[0]]}
    kept = [q for q, pp in have if pp == precision and q in sizes and sizes[q] <= budget]
    if kept:  # the same pick as last time, while it fits: no second download, works offline
        best = min(kept, key=ranked.index)
        return {"quant": best, "encoder_precision": precision, "why": "pulled before", "need_bytes": sizes[best]}
    fits = [q for q in ranked if sizes[q] <= budget]
    if fits:
        return {
            "quant": fits[0],
            "encoder_precision": precision,
            "why": "the best that fits",
            "need_bytes": sizes[fits[0]],
        }
    small = min(ranked, key=sizes.get)
    return {
        "quant": small,
        "encoder_precision": precision,
        "why": "none fits; the smallest",
        "need_bytes": sizes[small],
    }


def files_for(m: dict, quant: str, precision: str) -> list[str]:
    """The repo files one variant needs: its LLM, its encoder (+ weights file) and everything that
    belongs to no variant (adapters); never another variant's files, nor the mmproj."""
    llm_v, enc_v = variants(m)
    variant_files = {e["file"] for e in llm_v.values()}
    for e in enc_v.values():
        variant_files.update(encoder_files(m, e))
    mm = (m.get("mmproj") or {}).get("file")
    common = [n for n in m["files"] if n not in variant_files and n != mm and n != "README.md"]
    return [llm_v[quant]["file"], *encoder_files(m, enc_v[precision]), *common]


def _budget() -> int | None:
    try:
        from .plan import machine_budget
        from .settings import resolve

        return machine_budget(resolve("fp32"))[0]
    except Exception:  # noqa: BLE001 - no budget known: `choose` takes a 4-bit type
        return None


def pull(
    repo_id: str,
    *,
    quant: str = "auto",
    encoder_precision: str = "auto",
    revision: str | None = None,
    manifest: dict | None = None,
    say=lambda _msg: None,
) -> Path:
    """The bundle folder (edge-af3 cache) for one variant of a Hub bundle repo, downloaded once."""
    from huggingface_hub import snapshot_download

    m = manifest or remote_manifest(repo_id, revision)
    if m is None:
        raise ModelNotFoundError(f"{repo_id}: no bundle manifest at its root (not in the cache, or not a bundle repo)")
    pick = choose(m, quant, encoder_precision, _budget() if quant == "auto" else None, have=pulled(repo_id))
    q, p = pick["quant"], pick["encoder_precision"]
    need = files_for(m, q, p)
    say(f"{repo_id}: LLM {q} ({pick['why']}), encoder {p}: {_bytes(m, need) / 1e9:.2f} GB")
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[MANIFEST, *need]))
    except Exception as e:  # noqa: BLE001 - offline without the files, network errors: one line
        raise ModelNotFoundError(f"{repo_id}: could not download the {q} / {p} files: {e}") from e
    missing = [n for n in need if not (snap / n).is_file()]
    if missing:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise ModelNotFoundError(f"{repo_id}: {', '.join(missing)} not in the Hub cache (HF_HUB_OFFLINE={offline})")
    out = _bundle_dir(repo_id, q, p, snap.name)
    built = not (out / MANIFEST).is_file()
    if built:
        local = {k: v for k, v in m.items() if k != "variants"}
        llm_v, enc_v = variants(m)
        local |= {"llm": llm_v[q], "encoder": enc_v[p], "files": {n: m["files"][n] for n in need}}
        local["hub"] = {"repo": repo_id, "revision": snap.name, "quant": q, "encoder_precision": p}
        with staged_folder(out, force=True) as tmp:
            for n in need:
                (tmp / n).parent.mkdir(parents=True, exist_ok=True)
                os.symlink((snap / n).resolve(), tmp / n)  # the Hub cache's blob: no second copy
            (tmp / MANIFEST).write_text(json.dumps(local, indent=2, ensure_ascii=False) + "\n", "utf-8")
    # every file against its sha256 before anything parses it: all of them when just made; later,
    # those whose size, time or inode changed since (open_bundle's record)
    open_bundle(out, check_hashes=True if built else None)
    return out


def _bundle_dir(repo_id: str, quant: str, precision: str, revision: str) -> Path:
    org, name = repo_id.split("/", 1)
    return cache_dir() / "bundles" / f"hub--{org}--{name}-{quant}-{precision}-{revision[:12]}"


def pulled(repo_id: str) -> list[tuple[str, str]]:
    """(LLM type, encoder precision) of the variants of `repo_id` already made in the cache."""
    org, name = repo_id.split("/", 1)
    root = cache_dir() / "bundles"
    out = []
    for d in root.glob(f"hub--{org}--{name}-*") if root.is_dir() else ():
        try:
            hub = json.loads((d / MANIFEST).read_text("utf-8")).get("hub") or {}
        except (OSError, json.JSONDecodeError):
            continue
        if hub.get("repo") == repo_id:
            out.append((hub["quant"], hub["encoder_precision"]))
    return out


def read_bundles(paths: list[Path]) -> list[dict]:
    """The manifests of bundles to publish together: one checkpoint's exports, one LLM type and one
    encoder precision each at most."""
    ms = [read_manifest(Path(p)) for p in paths]
    sources = {json.dumps(m.get("source", {}).get("files"), sort_keys=True) for m in ms}
    if len(sources) > 1:
        raise OptionsError("these bundles come from different checkpoints; publish each in its own repo")
    return ms
