"""`make-tiny`, `export`, `features`, `demo`: making checkpoints and bundles, looking at audio."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import typer

from ..errors import OptionsError
from .common import (
    ENC_ATTN_EXPORT_HELP,
    ENC_PREC_EXPORT_HELP,
    QUANT_HELP,
    ExportProgress,
    ModelOpt,
    bundled_clip,
    console,
    emit,
    emit_json,
    export_steps,
    load_model,
    out,
    timings_line,
)


def make_tiny(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder to write the checkpoint into."),
    shape: str = typer.Option("tiny", "--shape", help="tiny | bench-small | full"),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
    think: bool = typer.Option(
        False, "--think", help="Add a think/ adapter as AF3 ships it (LoRA + non-LoRA weights; needs peft)."
    ),
    arch: str = typer.Option(
        "audioflamingo3",
        "--arch",
        help="audioflamingo3 | musicflamingo (Music Flamingo: time embeddings, 20 min) | afnext (AF-Next: 30 min).",
    ),
) -> None:
    """Write a randomly initialised AF3 checkpoint in the real HF layout (real Qwen2 vocabulary).

    \b
    Example: edge-af3 make-tiny ./af3-tiny --shape tiny --seed 0 --think
    """
    from rich.progress import Progress

    from ..reference.tiny import ARCHS, SHAPES, make_checkpoint, tensor_specs
    from .common import quiet_transformers

    quiet_transformers()

    if shape not in SHAPES:
        raise OptionsError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if arch not in ARCHS:
        raise OptionsError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    n = len(tensor_specs(SHAPES[shape]))
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"writing {shape} checkpoint", total=n)
            path = make_checkpoint(
                out_dir,
                shape=shape,
                seed=seed,
                force=force,
                think=think,
                arch=arch,
                progress=lambda _: bar.advance(task),
            )
    except FileExistsError as e:
        raise OptionsError(str(e)) from e
    extra = (f", {arch}" if arch != "audioflamingo3" else "") + (", think/ adapter" if think else "")
    console.print(f"[green]wrote[/] {path} ({shape}, seed {seed}, {n} tensors{extra})")


def export_cmd(
    src: str = typer.Argument(
        ..., metavar="SRC", help="AF3 checkpoint: a local HF folder or a Hub id (nvidia/audio-flamingo-3-hf)."
    ),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Bundle folder to create."),
    quant: str = typer.Option(
        "auto",
        "--quant",
        help=QUANT_HELP,
    ),
    encoder_precision: str = typer.Option(
        "auto",
        "--encoder-precision",
        help=ENC_PREC_EXPORT_HELP,
    ),
    encoder_attention: str = typer.Option("auto", "--encoder-attention", help=ENC_ATTN_EXPORT_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity checks against PyTorch."),
    accept: bool = typer.Option(
        False,
        "--accept",
        help="Write the bundle even when a parity check is below its type's floor (recorded in the manifest).",
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    mmproj: bool = typer.Option(False, "--mmproj", help="Also write llama.cpp's mmproj GGUF (musicflamingo)."),
    mmproj_type: str = typer.Option("f16", "--mmproj-type", help="mmproj weights: f16 | f32"),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest's verification as JSON."),
    adapter: list[str] = typer.Option(
        [], "--adapter", help="NAME=DIR: add a PEFT LoRA folder (e.g. one `train` wrote); repeatable."
    ),
    adapter_type: str = typer.Option(
        "f16", "--adapter-type", help="LoRA tensors in the GGUF adapters: f16 | f32 | q8_0"
    ),
) -> None:
    """Export an AF3 checkpoint into a verified bundle (ONNX encoder + GGUF LLM + manifest).
    The checkpoint's think/ adapter comes along as `think`.

    \b
    Examples:
      edge-af3 export nvidia/audio-flamingo-3-hf ./af3 --quant q4_k_m
      edge-af3 export ./my-af3-finetune ./af3-q8 --quant q8_0 --encoder-precision fp16 --mmproj
    """
    from ..export import export

    adapters = {}
    for spec in adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise OptionsError(f"--adapter takes NAME=DIR, got {spec!r}")
        if not Path(folder).expanduser().is_dir():
            raise OptionsError(f"--adapter {name}: {folder} is not a folder")
        adapters[name] = Path(folder).expanduser()
    try:
        with ExportProgress(
            export_steps(
                quant,
                encoder_precision=encoder_precision,
                encoder_attention=encoder_attention,
                verify=not no_verify,
                mmproj=mmproj,
            )
        ) as steps:
            path = export(
                src,
                out_dir,
                quant=quant,
                encoder_precision=encoder_precision,
                encoder_attention=encoder_attention,
                force=force,
                verify=not no_verify,
                revision=revision,
                mmproj=mmproj,
                mmproj_type=mmproj_type,
                adapters=adapters,
                adapter_type=adapter_type,
                accept=accept,
                progress=steps,
            )
    except FileExistsError as e:
        raise OptionsError(str(e)) from e
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        emit_json(
            {
                "bundle": str(path),
                "verification": manifest["verification"],
                "parity_gate": manifest["parity_gate"],
                "files": manifest["files"],
            }
        )
        return
    for stage, result in manifest["verification"].items():
        out.print(
            f"{stage:8s} "
            + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
        )
    g = manifest["parity_gate"]
    if not g["verified"]:
        out.print("[yellow]parity: not verified (--no-verify)[/]")
    elif g["failures"]:
        out.print(
            "[yellow]parity: below the floor, written because of --accept:[/] " + "; ".join(g["failures"]),
            highlight=False,
        )
    else:
        out.print("parity: every figure above its type's floor")
    out.print(f"[green]bundle[/] {path} ({manifest['export_seconds']} s)")


def features_cmd(
    audio: Path = typer.Argument(
        ..., metavar="AUDIO", help="Audio file (wav, flac, ogg, mp3; m4a, mp4, webm, opus with the av extra)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what AF3 sees of a clip: windows, mask, audio token count, log-mel range.

    Only the first 600 s of a longer file are read (AF3 uses no more).

    \b
    Example: edge-af3 features clip.wav --json
    """
    from ..audio import load_audio
    from ..features import extract_features

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_audio(audio)
        feats = extract_features(clip)
    ms = (time.perf_counter() - t0) * 1000
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    seconds = clip.source_seconds if clip.source_seconds is not None else clip.seconds
    info = {
        "file": str(audio),
        "source_rate": clip.source_rate,
        "source_channels": clip.source_channels,
        "seconds": round(seconds, 3),
        "seconds_used": round(feats.seconds, 3),
        "truncated": feats.truncated,
        "windows": feats.windows,
        "valid_frames": [int(m) for m in feats.mask.sum(axis=1)],
        "rows_per_window": list(feats.rows_per_window),
        "audio_tokens": feats.n_tokens,
        "log_mel_min": float(feats.features.min()),
        "log_mel_max": float(feats.features.max()),
        "ms": round(ms, 1),
    }
    if as_json:
        emit_json(info)
        return
    out.print(
        f"{audio}: {info['seconds']} s ({clip.source_rate} Hz, {clip.source_channels} ch) -> "
        f"{feats.windows} window(s), {feats.n_tokens} audio tokens, log-mel "
        f"[{info['log_mel_min']:.3f}, {info['log_mel_max']:.3f}], {ms:.1f} ms"
    )


def demo(
    model: ModelOpt = None,
    audio: Path | None = typer.Option(None, "--audio", help="Clip to use (default: the bundled one)."),
    prompt: str = typer.Option("What do you hear? Transcribe any speech.", "--prompt"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
) -> None:
    """The main job: export (once, cached) and run AF3 on a clip, streaming the answer with timings.

    Without --model it builds a tiny randomly initialised AF3 (its answer is gibberish by design;
    the pipeline, token counts and timings are real).

    \b
    Example: edge-af3 demo --model ./af3-bundle --audio clip.wav
    """
    from ..audio import load_audio
    from ..constants import N_SAMPLES
    from ..features import token_count
    from ..paths import cache_dir

    clip = load_audio(audio or bundled_clip())
    if model is None:
        from ..reference.tiny import make_checkpoint

        ckpt = cache_dir() / "checkpoints" / "tiny-seed0"
        if not (ckpt / "config.json").exists():
            console.print(f"building a tiny AF3 checkpoint in {ckpt} (once)")
            make_checkpoint(ckpt, shape="tiny", seed=0, force=True)
        model = str(ckpt)
    with load_model(model, n_ctx=None, threads=None) as af3:
        session = af3.chat()
        out.print(f"bundle      {af3.bundle.path}")
        windows = max(1, -(-clip.samples.shape[0] // N_SAMPLES))
        out.print(
            f"clip        {clip.name}  {clip.seconds:.2f} s -> {windows} window(s), "
            f"{token_count(clip.samples.shape[0])} <sound> tokens"
        )
        out.print(f"question    {prompt}")
        out.print("answer      ", end="")
        with session.stream(prompt, clip, max_new_tokens=max_new_tokens) as stream:
            for piece in stream:
                emit(piece)
        out.print()
        first = stream.answer
        console.print(f"[dim]{timings_line(first.timings, first.finish_reason)}[/]")
        follow = "In one word?"
        answer = session.ask(follow, max_new_tokens=4)  # a follow-up reuses the KV cache
        out.print(f"follow-up   {follow}")
        out.print(f"answer      {answer.text}", markup=False, highlight=False)
        console.print(f"[dim]{timings_line(answer.timings, answer.finish_reason)} (no re-encoding)[/]")
