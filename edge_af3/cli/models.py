"""`edge-af3 models`: what is in the cache (~/.cache/edge-af3/bundles), checked, removed or pulled."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer

from ..errors import ModelNotFoundError, OptionsError
from .common import QUANT_HELP, EncPrecOpt, ExportProgress, console, emit_json, export_steps, out

app = typer.Typer(
    help="List, verify, remove or pull the bundles edge-af3 keeps in its cache.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _root() -> Path:
    from ..paths import cache_dir

    return cache_dir() / "bundles"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _last_used() -> dict:
    from ..paths import last_used

    return last_used()


def describe(path: Path, used: dict) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    return {
        "name": path.name,
        "path": str(path),
        "bytes": _size(path),
        "source": (m.get("source") or {}).get("id"),
        "quant": m["llm"]["quant"],
        "encoder": m["encoder"]["precision"],
        "adapters": sorted(m.get("adapters") or {}),
        "created": m.get("created_unix"),
        "last_used": used.get(str(path.resolve())),
    }


def _find(name: str) -> Path:
    root = _root()
    path = Path(name).expanduser()
    path = path if path.is_dir() else root / name
    if not (path / "manifest.json").is_file():
        known = ", ".join(sorted(p.parent.name for p in root.glob("*/manifest.json"))) if root.is_dir() else ""
        raise ModelNotFoundError(
            f"no bundle {name!r} in {root}; `edge-af3 models list` shows them" + (f" ({known})" if known else "")
        )
    return path


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="One JSON object per bundle.")) -> None:
    """The bundles in the cache: size, source, quant, adapters, when made and last used."""
    from rich.table import Table

    root, used = _root(), _last_used()
    rows = [describe(p.parent, used) for p in sorted(root.glob("*/manifest.json"))] if root.is_dir() else []
    if as_json:
        for r in rows:
            emit_json(r)
        return
    if not rows:
        out.print(f"no bundles in {root} (a checkpoint or Hub id given to -m is exported there once)")
        return
    t = Table(show_header=True, header_style="bold")
    for col in ("name", "size", "source", "quant", "encoder", "adapters", "created", "last used"):
        # the name is what verify / rm take: never cut (the other columns wrap instead)
        t.add_column(col, no_wrap=col == "name", min_width=max(len(r["name"]) for r in rows) if col == "name" else None)
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['bytes'] / 1e6:.0f} MB",
            r["source"] or "?",
            r["quant"],
            r["encoder"],
            ", ".join(r["adapters"]) or "-",
            _when(r["created"]),
            _when(r["last_used"]),
        )
    out.print(t)
    out.print(f"{len(rows)} bundle(s), {sum(r['bytes'] for r in rows) / 1e9:.2f} GB in {root}", highlight=False)


@app.command("verify")
def verify_cmd(name: str = typer.Argument(..., help="A bundle in the cache (its name) or any bundle folder.")) -> None:
    """Hash every file of a bundle against its manifest."""
    from ..bundle import open_bundle

    path = _find(name)
    bundle = open_bundle(path, check_hashes=True)
    out.print(f"[green]ok[/] {path}: {len(bundle.manifest['files'])} files match their sha256", highlight=False)


@app.command("rm")
def rm_cmd(
    name: str = typer.Argument(..., help="A bundle in the cache (see `models list`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Remove a bundle from the cache (only what edge-af3 made there; other folders are refused)."""
    path = _find(name).resolve()
    if _root().resolve() not in path.parents:
        raise OptionsError(f"{path} is not in edge-af3's cache ({_root()}); remove it yourself if you mean it")
    if not yes:
        try:
            ok = typer.confirm(f"remove {path} ({_size(path) / 1e6:.0f} MB)?", err=True)
        except (typer.Abort, EOFError):  # end of input (a pipe, </dev/null): "no"
            console.print()
            ok = False
        if not ok:
            console.print("kept")
            return
    shutil.rmtree(path)
    console.print(f"removed {path}")


@app.command("pull")
def pull_cmd(
    source: str = typer.Argument(..., help="Hub id (nvidia/audio-flamingo-3-hf) or checkpoint folder."),
    quant: str = typer.Option(
        "auto",
        "--quant",
        help=QUANT_HELP,
    ),
    encoder_precision: EncPrecOpt = "auto",
    exact: bool = typer.Option(
        False, "--exact", help="The bundle `--exact` loads (the fp32 encoder; --quant auto: F32)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before a big download / export."),
) -> None:
    """Download (a Hub id) and export into the cache, as `-m SOURCE` would on first use, saying
    first what it takes: download size, disk and RAM."""
    from ..quants import check_quant, exact_quant, resolve_encoder_precision
    from ..runtime.locate import exported, first_use, first_use_line

    check_quant(quant)  # a mistake is one line before anything is fetched
    from ..hub import pull, remote_manifest

    manifest = None if Path(source).expanduser().exists() else remote_manifest(source)
    if manifest is not None:  # a bundle repo: the variant that fits here (or the one asked for)
        t0 = time.time()
        path = pull(source, quant=quant, encoder_precision=encoder_precision, manifest=manifest, say=console.print)
        out.print(f"[green]ready[/] {path} ({time.time() - t0:.0f} s); use it with -m {source}", highlight=False)
        return
    precision = resolve_encoder_precision(encoder_precision, exact=exact)
    quant = exact_quant(quant, exact)
    need = first_use(source, quant, precision)
    if need:
        console.print(first_use_line(source, need), highlight=False)
        if need["download_gb"] > 2 and not yes and not typer.confirm("go on?", err=True):
            console.print("nothing done")
            return
    t0 = time.time()
    with ExportProgress(export_steps(quant, encoder_precision=precision)) as steps:
        path = exported(source, quant, progress=steps, encoder_precision=precision)
    out.print(f"[green]ready[/] {path} ({time.time() - t0:.0f} s); use it with -m {path}", highlight=False)


@app.command("push")
def push_cmd(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="A bundle folder (edge-af3 export)."),
    repo: str = typer.Argument(..., metavar="ORG/NAME", help="The Hub repo to create or update."),
    also: list[Path] = typer.Option(
        [], "--also", help="More bundles of the same checkpoint (other LLM types or encoder precisions), side by side."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the files and the model card; upload nothing."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    as_json: bool = typer.Option(False, "--json", help="The listing and card as one JSON object."),
) -> None:
    """Publish bundles as one Hub repo that `-m ORG/NAME` pulls the fitting variant of: the files,
    a root manifest listing the variants, and a model card (base model, the source's licence carried
    over, sizes, the devices each variant fits, parity figures, the commands). The token comes from
    huggingface_hub's usual places (HF_TOKEN, `hf auth login`).

    \b
    Example: edge-af3 models push ./af3-q4_k_m me/af3-edge --also ./af3-q8_0 --dry-run
    """
    from ..hub_publish import push

    report = push([bundle, *also], repo, dry_run=dry_run, private=private)
    if as_json:
        emit_json(report)
        return
    for name, size in report["files"].items():
        out.print(f"  {name:44s} {size / 1e9:9.3f} GB", highlight=False)
    out.print(f"  {'total':44s} {report['total_bytes'] / 1e9:9.3f} GB", highlight=False)
    if dry_run:
        out.print(report["card"], markup=False, highlight=False)
        out.print("dry run: nothing uploaded")
    else:
        out.print(f"[green]uploaded[/] https://huggingface.co/{repo} ({report['commit']})", highlight=False)
