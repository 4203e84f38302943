"""`models push`: one checkpoint's bundles as one Hub repo (hub.py's layout) with a model card."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .bundle import MANIFEST, encoder_files
from .errors import OptionsError
from .hub import read_bundles, variants
from .quants import stored_attention

# the source checkpoints whose licence we know: NVIDIA's, carried over, never relicensed
NVIDIA_LICENSE = (
    "NVIDIA OneWay Noncommercial License (the licence of the source checkpoint, carried over: these files are "
    "derived from its weights; research and non-commercial use only)"
)
KNOWN_LICENSES = {"nvidia/audio-flamingo": NVIDIA_LICENSE, "nvidia/music-flamingo": NVIDIA_LICENSE}


def stage(bundles: list[Path], out: Path) -> dict:
    """Write the repo into `out` (files linked, not copied): the variants side by side, the root
    manifest listing them, README.md. Returns the root manifest."""
    ms = read_bundles(bundles)
    root = copy.deepcopy(ms[0])
    llm_v, enc_v, files = {}, {}, {}
    for path, m in zip(bundles, ms):
        q, p = m["llm"]["quant"], m["encoder"]["precision"]
        llm_file = m["llm"]["file"]
        if q in llm_v:  # the same LLM beside another encoder precision: once, if it is the same file
            if files[llm_v[q]["file"]]["sha256"] != m["files"][llm_file]["sha256"]:
                raise OptionsError(f"two bundles hold different {q} LLMs ({llm_file}); publish one of them")
        else:
            llm_v[q] = m["llm"]
            _link(Path(path) / llm_file, out / llm_file)
            files[llm_file] = m["files"][llm_file]
        if p in enc_v:  # the same precision again: once, if it is the same graph
            seen = files[enc_v[p]["file"]]["sha256"]
            if seen != m["files"][m["encoder"]["file"]]["sha256"]:
                raise OptionsError(
                    f"two bundles hold different {p} encoders (attention {enc_v[p].get('attention', '?')} and "
                    f"{m['encoder'].get('attention', '?')}, or other weights); publish one of them"
                )
        else:
            folder = "" if not enc_v else f"encoder-{p}/"  # the first at the root, as a plain bundle has it
            enc_v[p] = dict(m["encoder"], file=folder + m["encoder"]["file"])
            for n in encoder_files(m):
                _link(Path(path) / n, out / (folder + n))
                files[folder + n] = m["files"][n]
    first = ms[0]
    taken = {first["llm"]["file"], *encoder_files(first)}
    for n, meta in first["files"].items():  # adapters and the rest: the first bundle's
        if n not in taken and not n.startswith("llm-") and n != (first.get("mmproj") or {}).get("file"):
            _link(Path(bundles[0]) / n, out / n)
            files[n] = meta
    if len(enc_v) > 1 and any(a.get("encoder") for a in (first.get("adapters") or {}).values()):
        raise OptionsError(
            "an adapter here carries encoder weights, which fit one encoder graph; publish one encoder precision"
        )
    root["variants"] = {"llm": llm_v, "encoder": enc_v}
    root["files"] = files
    root.pop("mmproj", None)
    (out / MANIFEST).write_text(json.dumps(root, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return root


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def licence(m: dict) -> str:
    src = str((m.get("source") or {}).get("id") or "")
    for prefix, text in KNOWN_LICENSES.items():
        if src.startswith(prefix):
            return text
    return f"the licence of the source checkpoint {src or '(unknown)'}, carried over (see its model card)"


def card(m: dict, repo_id: str) -> str:
    """The model card: base model, licence, variants with sizes and the devices each fits, the
    parity figures, the commands."""
    from .hub import need_bytes
    from .plan import GIB, TARGETS

    llm_v, enc_v = variants(m)
    src = (m.get("source") or {}).get("id") or "unknown"
    fam = m.get("family", {}).get("name", "AF3")
    lines = [
        "---",
        "license: other",
        f"base_model: {src}",
        "tags: [edge-af3, gguf, onnx, audio-text-to-text]",
        "---",
        "",
        f"# {repo_id}: {fam} as an edge-af3 bundle",
        "",
        f"Exported from `{src}` by edge-af3 {m.get('exporter', {}).get('edge-af3', '?')}: the audio encoder as ONNX, "
        "the Qwen2 LLM as GGUF, a manifest with every file's sha256 and the parity figures.",
        "",
        f"**Licence**: {licence(m)}.",
        "",
        "## Variants",
        "",
        "| LLM | encoder | attention | download | memory (est.) | fits |",
        "|---|---|---|---:|---:|---|",
    ]
    from .hub import files_for

    for q in llm_v:
        for p in enc_v:
            size = sum(m["files"][n]["bytes"] for n in files_for(m, q, p))
            need = need_bytes(m, q, p)
            fits = ", ".join(t for t, (budget, _) in TARGETS.items() if need <= budget) or "none of the targets"
            lines.append(
                f"| {q} | {p} | {stored_attention(enc_v[p])} | {size / GIB:.2f} GiB | {need / GIB:.2f} GiB | {fits} |"
            )
    lines += ["", f"## Parity (from the manifest of the {next(iter(llm_v))} / {next(iter(enc_v))} export)", ""]
    for name, check in (m.get("verification") or {}).items():
        figures = ", ".join(f"{k} {v:.4g}" for k, v in check.items() if isinstance(v, float))
        lines.append(f"- {name}: {figures or json.dumps(check)}")
    if not m.get("verification"):
        lines.append("- exported without verification")
    first_q = next(iter(llm_v))
    lines += [
        "",
        "## Run it",
        "",
        "```",
        "pip install edge-af3",
        f'edge-af3 ask -m {repo_id} clip.wav "What do you hear?"   # downloads the variant that fits',
        f"edge-af3 models pull {repo_id} --quant {first_q}          # or pick one",
        f"edge-af3 serve -m {repo_id}",
        "```",
        "",
    ]
    return "\n".join(lines)


def push(bundles: list[Path], repo_id: str, *, dry_run: bool = False, private: bool = False) -> dict:
    """Stage the repo and upload it (the token from huggingface_hub's usual places); dry_run:
    only what would be uploaded, and the card."""
    import tempfile

    if repo_id.count("/") != 1:
        raise OptionsError(f"{repo_id!r}: a Hub repo is ORG/NAME")
    with tempfile.TemporaryDirectory(prefix="edge-af3-push-") as tmp:
        staged = Path(tmp)
        root = stage([Path(b) for b in bundles], staged)
        text = card(root, repo_id)
        (staged / "README.md").write_text(text, "utf-8")
        listing = {str(f.relative_to(staged)): f.stat().st_size for f in sorted(staged.rglob("*")) if f.is_file()}
        report = {"repo": repo_id, "files": listing, "total_bytes": sum(listing.values()), "card": text}
        if dry_run:
            return report | {"uploaded": False}
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(staged), commit_message="edge-af3 bundle")
        return report | {"uploaded": True, "commit": getattr(commit, "oid", str(commit))}
