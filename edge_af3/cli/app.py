"""`edge-af3 ...` commands. Each is a few lines over the library; errors become one clear line."""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="edge-af3",
    help="Run NVIDIA Audio Flamingo 3 on the edge: export, ask, chat, listen.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def bundled_clip() -> Path:
    """The short speech clip shipped with the package (espeak-ng, 16 kHz FLAC)."""
    return Path(str(resources.files("edge_af3") / "data" / "clip.flac"))


def cache_root() -> Path:
    from ..reference.vocab import cache_dir

    return cache_dir()


def fail(message: str, code: int = 1) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@app.command("make-tiny")
def make_tiny(
    out_dir: Path = typer.Argument(..., help="Folder to write the checkpoint into."),
    shape: str = typer.Option("tiny", "--shape", help="tiny | bench-small | full"),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
) -> None:
    """Write a randomly initialised AF3 checkpoint in the real HF layout (real Qwen2 vocabulary).

    Example: edge-af3 make-tiny ./af3-tiny --shape tiny --seed 0
    """
    from ..reference.tiny import SHAPES, make_checkpoint, tensor_specs

    if shape not in SHAPES:
        raise fail(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    from rich.progress import Progress

    n = len(tensor_specs(SHAPES[shape]))
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"writing {shape} checkpoint", total=n)
            path = make_checkpoint(out_dir, shape=shape, seed=seed, force=force, progress=lambda _: bar.advance(task))
    except (FileExistsError, ValueError) as e:
        raise fail(str(e))
    console.print(f"[green]wrote[/] {path} ({shape}, seed {seed}, {n} tensors)")


@app.command("export")
def export_cmd(
    src: str = typer.Argument(..., help="AF3 checkpoint: a local HF folder or a Hub id (nvidia/audio-flamingo-3-hf)."),
    out_dir: Path = typer.Argument(..., help="Bundle folder to create."),
    quant: str = typer.Option("q4_k_m", "--quant", help="LLM weights: q4_k_m | q4_0 | q8_0 | f16 | f32"),
    encoder_precision: str = typer.Option("fp32", "--encoder-precision", help="fp32 | fp16 | int8"),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity checks against PyTorch."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    mmproj: bool = typer.Option(False, "--mmproj", help="Also write llama.cpp's mmproj GGUF (musicflamingo)."),
    mmproj_type: str = typer.Option("f16", "--mmproj-type", help="mmproj weights: f16 | f32"),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest's verification as JSON."),
) -> None:
    """Export an AF3 checkpoint into a verified bundle (ONNX encoder + GGUF LLM + manifest).

    Examples:
      edge-af3 export nvidia/audio-flamingo-3-hf ./af3 --quant q4_k_m
      edge-af3 export ./my-af3-finetune ./af3-q8 --quant q8_0 --encoder-precision fp16 --mmproj
    """
    from ..export import export
    from ..reference.loader import CheckpointError

    try:
        with console.status("exporting") as status:
            path = export(src, out_dir, quant=quant, encoder_precision=encoder_precision, force=force,
                          verify=not no_verify, revision=revision, mmproj=mmproj, mmproj_type=mmproj_type,
                          progress=lambda msg: (status.update(msg), console.log(msg)))  # fmt: skip
    except (CheckpointError, FileExistsError, ValueError) as e:
        raise fail(str(e))
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        out.print_json(json.dumps({"bundle": str(path), "verification": manifest["verification"],
                                   "files": manifest["files"]}))  # fmt: skip
        return
    for stage, result in manifest["verification"].items():
        out.print(f"{stage:8s} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    out.print(f"[green]bundle[/] {path} ({manifest['export_seconds']} s)")


@app.command("features")
def features_cmd(
    audio: Path = typer.Argument(..., help="Audio file (wav, flac, ogg, mp3)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what AF3 sees of a clip: windows, mask, audio token count, log-mel range.

    Example: edge-af3 features clip.wav --json
    """
    from ..audio import AudioError, load_audio
    from ..features import extract_features

    try:
        t0 = time.perf_counter()
        clip = load_audio(audio)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            feats = extract_features(clip)
        ms = (time.perf_counter() - t0) * 1000
    except AudioError as e:
        raise fail(str(e))
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    info = {
        "file": str(audio),
        "source_rate": clip.source_rate,
        "source_channels": clip.source_channels,
        "seconds": round(clip.seconds, 3),
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
        out.print_json(json.dumps(info))
        return
    out.print(
        f"{audio}: {info['seconds']} s ({clip.source_rate} Hz, {clip.source_channels} ch) -> "
        f"{feats.windows} window(s), {feats.n_tokens} audio tokens, log-mel "
        f"[{info['log_mel_min']:.3f}, {info['log_mel_max']:.3f}], {ms:.1f} ms"
    )


@app.command("demo")
def demo(
    model: Optional[str] = typer.Option(None, "--model", envvar="EDGE_AF3_MODEL",
                                        help="Bundle, checkpoint folder or Hub id (default: a tiny random AF3)."),  # fmt: skip
    audio: Optional[Path] = typer.Option(None, "--audio", help="Clip to use (default: the bundled one)."),
    prompt: str = typer.Option("What do you hear? Transcribe any speech.", "--prompt"),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
) -> None:
    """The main job: export (once, cached) and run AF3 on a clip, streaming the answer with timings.

    Without --model it builds a tiny randomly initialised AF3 (its answer is gibberish by design;
    the pipeline, token counts and timings are real).

    Example: edge-af3 demo --model ./af3-bundle --audio clip.wav
    """
    from ..features import extract_features
    from ..reference.loader import CheckpointError
    from ..reference.tiny import make_checkpoint
    from ..runtime import AF3

    clip = audio or bundled_clip()
    try:
        if model is None:
            ckpt = cache_root() / "checkpoints" / "tiny-seed0"
            if not (ckpt / "config.json").exists():
                console.print(f"building a tiny AF3 checkpoint in {ckpt} (once)")
                make_checkpoint(ckpt, shape="tiny", seed=0, force=True)
            source = str(ckpt)
        else:
            source = model
        with console.status("loading (a checkpoint is exported once into the cache)"):
            af3 = AF3.load(source, n_ctx=4096)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise fail(str(e))
    feats = extract_features(clip)
    out.print(f"bundle      {af3.bundle.path}")
    out.print(f"clip        {clip}  {feats.seconds:.2f} s -> {feats.windows} window(s), {feats.n_tokens} <sound> tokens")
    out.print(f"question    {prompt}")
    out.print("answer      ", end="")
    session = af3.chat()
    pieces = session.stream(prompt, audio=clip, max_new_tokens=max_new_tokens)
    for piece in pieces:
        out.print(piece, end="", markup=False, highlight=False)
    out.print()
    answer = session.send("In one word?", max_new_tokens=4)  # a follow-up reuses the KV cache
    t = answer.timings
    out.print(f"follow-up   {answer.text!r} (prefill {t.prefill_ms:.1f} ms, no re-encoding)")
    first = af3.ask(clip, prompt, max_new_tokens=max_new_tokens).timings  # cached rows: encoder skipped
    out.print(
        f"timings     features {first.features_ms:.1f} ms | encoder {first.encoder_ms:.1f} ms (cached) | "
        f"prefill {first.prefill_ms:.1f} ms | first token {first.first_token_ms:.1f} ms | "
        f"decode {first.decode_tokens_per_s:.1f} tok/s"
    )
    af3.close()


# -- shared by ask / chat / listen -----------------------------------------------------------------
DEFAULT_MODEL = "nvidia/audio-flamingo-3-hf"
MODEL_HELP = "Bundle, HF checkpoint folder or Hub id (exported once into the cache). Env: EDGE_AF3_MODEL."


DEVICE_HELP = "auto | cpu | cuda (cuda: the best GPU encoder engine, all LLM layers offloaded)"
ENGINE_HELP = "Force the encoder engine: tensorrt | onnxruntime-cuda | torch-cuda | onnxruntime-cpu | torch-cpu."
KV_HELP = "KV cache type: f16 | q8_0 | f32"
# options ask, chat and plan share (the default goes in each signature)
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
KvOpt = Annotated[str, typer.Option("--kv", help=KV_HELP)]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help=ENGINE_HELP)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the memory plan for these settings; load nothing.")]


def load_model(spec: Optional[str], *, n_ctx: int, threads: Optional[int], quant: str = "q4_k_m", device: str = "auto",
               kv_type: str = "f16", encoder_engine: Optional[str] = None):  # fmt: skip
    """AF3.load with progress on stderr; every known failure becomes one clear line (exit 1); says
    which encoder engine runs, and why faster ones were skipped."""
    from ..audio import AudioError
    from ..bundle import BundleError
    from ..reference.loader import CheckpointError
    from ..runtime import AF3

    spec = spec or DEFAULT_MODEL
    try:
        with console.status(f"loading {spec}") as status:
            model = AF3.load(spec, n_ctx=n_ctx, threads=threads, quant=quant, device=device, kv_type=kv_type,
                             encoder_engine=encoder_engine, progress=lambda msg: (status.update(msg), console.log(msg)))  # fmt: skip
    except (CheckpointError, BundleError, AudioError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise fail(str(e))
    if model.engine_choice.skipped or device == "cuda":
        console.print(f"[dim]{model.engine_choice.explain()}; LLM layers on GPU: {model.llm.n_gpu_layers}[/]")
    return model


def dry_run(spec: Optional[str], *, n_ctx: int, kv_type: str, device: str, as_json: bool = False) -> None:
    """--dry-run: the memory budget for running `spec` as asked; nothing is loaded."""
    from ..engines.select import choose_encoder
    from ..plan import plan
    from ..runtime import ModelNotFoundError, locate

    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if not (path / "manifest.json").is_file():
        try:
            path = locate(spec)  # a checkpoint is exported (once) first: the plan reads the bundle
        except (ModelNotFoundError, ValueError) as e:
            raise fail(str(e))
    try:
        gpu = choose_encoder(device).engine != "onnxruntime-cpu"  # the engine AF3.load would pick
        stored = json.loads((path / "manifest.json").read_text())["encoder"]["precision"]
        # a GPU engine runs the encoder in fp16, 4 windows per run; ONNX Runtime on the CPU runs
        # the stored precision, one window per run (as the runtime does)
        p = plan(path, n_ctx=n_ctx, kv_type=kv_type, encoder_precision=None if gpu else stored,
                 windows_per_run=4 if gpu else 1)  # fmt: skip
    except (ValueError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise fail(str(e))
    show_plan(p, as_json)


def show_plan(p: dict, as_json: bool) -> None:
    from ..plan import render

    if as_json:
        out.print_json(json.dumps(p))
    else:
        render(p, out)


def generation_options(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int, think: bool) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "seed": seed, "think": think}  # fmt: skip


def timings_line(t) -> str:
    return (
        f"{t.audio_tokens} audio + {t.prompt_tokens - t.audio_tokens} text tokens | features {t.features_ms:.0f} ms | "
        f"encoder {t.encoder_ms:.0f} ms | prefill {t.prefill_ms:.0f} ms | first token {t.first_token_ms:.0f} ms | "
        f"{t.decode_tokens_per_s:.1f} tok/s"
    )


@app.command("ask", context_settings={"allow_interspersed_args": True})
def ask_cmd(
    args: Optional[list[str]] = typer.Argument(None, metavar="AUDIO... PROMPT", help="One or more clips, then the question."),
    model: Optional[str] = typer.Option(None, "--model", "-m", envvar="EDGE_AF3_MODEL", help=MODEL_HELP),
    think: bool = typer.Option(False, "--think", help="Reason step by step before answering (AF3 think mode)."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer, tokens and timings as JSON."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (the model card's setting)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int = typer.Option(0, "--seed"),
    n_ctx: int = typer.Option(16384, "--n-ctx", help="Context length (a 10 min clip alone takes 15000)."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: DeviceOpt = "auto",
    kv_type: KvOpt = "f16",
    engine: EngineOpt = None,
    dry: DryRunOpt = False,
) -> None:
    """Ask one question about one or more clips; the answer streams as it is produced.

    Examples:
      edge-af3 ask clip.wav "What do you hear?"
      edge-af3 ask a.wav b.wav "Which of the two clips is louder, and why?" --think
      edge-af3 ask meeting.flac "Transcribe the input speech." --json > answer.json
    """
    from ..audio import AudioError, load_audio
    from ..engines.llamacpp import ContextOverflowError

    if dry:
        return dry_run(model, n_ctx=n_ctx, kv_type=kv_type, device=device, as_json=as_json)
    args = args or []
    if len(args) < 2:
        raise fail("give at least one audio file and then the question, e.g. edge-af3 ask clip.wav \"What is it?\"")
    *paths, prompt = args
    try:
        clips = [load_audio(p) for p in paths]  # bad audio fails before the model loads
    except AudioError as e:
        raise fail(str(e))
    af3 = load_model(model, n_ctx=n_ctx, threads=threads, device=device, kv_type=kv_type, encoder_engine=engine)
    opts = generation_options(max_new_tokens, temperature, top_p, top_k, seed, think)
    session = af3.chat()
    try:
        if as_json:
            answer = session.send(prompt, audio=clips, **opts)
            t = answer.timings
            out.print_json(json.dumps({"model": str(af3.bundle.path), "audio": paths, "prompt": prompt,
                                       "think": think, "text": answer.text, "tokens": list(answer.tokens),
                                       "timings": t.__dict__}))  # fmt: skip
            return
        for piece in session.stream(prompt, audio=clips, **opts):
            out.print(piece, end="", markup=False, highlight=False)
        out.print()
    except (ContextOverflowError, ValueError) as e:
        raise fail(str(e))
    finally:
        af3.close()
    answer = session.last_answer
    if answer is not None:
        console.print(f"[dim]{timings_line(answer.timings)}[/]")


@app.command("chat")
def chat_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", envvar="EDGE_AF3_MODEL", help=MODEL_HELP),
    audio: list[Path] = typer.Option([], "--audio", "-a", help="Clip(s) attached to the first message."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    think: bool = typer.Option(False, "--think", help="Start with think mode on (/think off to stop)."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    n_ctx: int = typer.Option(16384, "--n-ctx"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: DeviceOpt = "auto",
    kv_type: KvOpt = "f16",
    engine: EngineOpt = None,
    dry: DryRunOpt = False,
) -> None:
    """Talk about audio over several turns; the session keeps its KV cache between turns.

    In the chat: /audio PATH attaches a clip to your next message (several allowed), /think on|off,
    /reset, /save FILE (the conversation as JSON), /help, /quit. Up/down arrows recall history.

    Example: edge-af3 chat --audio street.wav
    """
    from .chat import run_chat

    if dry:
        return dry_run(model, n_ctx=n_ctx, kv_type=kv_type, device=device)
    af3 = load_model(model, n_ctx=n_ctx, threads=threads, device=device, kv_type=kv_type, encoder_engine=engine)
    try:
        run_chat(af3, console=console, out=out, audio=list(audio), system=system, think=think,
                 options={"max_new_tokens": max_new_tokens, "temperature": temperature})  # fmt: skip
    finally:
        af3.close()


LISTEN_PROMPT = "Describe what you hear. If there is speech, transcribe it."


@app.command("listen")
def listen_cmd(
    mic: bool = typer.Option(False, "--mic", help="Listen to a microphone (PortAudio)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Run the same loop on an audio file."),
    realtime: bool = typer.Option(False, "--realtime", help="With --file: feed it at real speed (drops as live)."),
    prompt: str = typer.Option(LISTEN_PROMPT, "--prompt", "-p", help="The standing question asked of each segment."),
    every: Optional[float] = typer.Option(None, "--every", help="Ask about the last S seconds every S seconds (no VAD)."),
    vad: str = typer.Option("silero+energy", "--vad", help="silero+energy | silero | energy | webrtc"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Input device index or name (see --list-devices)."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List input devices and exit."),
    model: Optional[str] = typer.Option(None, "--model", "-m", envvar="EDGE_AF3_MODEL", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer, then the summary."),
    n_ctx: int = typer.Option(4096, "--n-ctx"),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Listen continuously: a VAD cuts speech and sound events, each is asked the standing prompt.

    Answers stream with timestamps; when inference falls behind, the oldest waiting segment is
    dropped and reported. Ctrl-C ends with a summary (segments, real-time factor, latency p50/p95).

    Examples:

      edge-af3 listen --mic

      edge-af3 listen --mic --device 2 --prompt "Is anyone asking for help?"

      edge-af3 listen --file meeting.wav --realtime --every 10
    """
    from ..audio import AudioError, load_audio
    from ..listen import InputDeviceError, Listener, MicSource, file_blocks, list_input_devices
    from ..vad import make_detector

    if list_devices:
        try:
            devices = list_input_devices()
        except (ImportError, OSError) as e:
            raise fail(f"sounddevice/PortAudio unavailable: {e}; pip install 'edge-af3[mic]'")
        if as_json:
            out.print_json(json.dumps(devices))
        elif not devices:
            out.print("no input devices")
        for d in devices if not as_json else []:
            out.print(f"[{d['index']}] {d['name']} ({d['channels']} ch, {d['default_rate']:.0f} Hz)", markup=False)
        return
    if mic == (file is not None):
        raise fail("choose one input: --mic or --file PATH")
    try:
        detector = make_detector(vad) if every is None else None
        if mic:
            source = MicSource(device)
        else:
            clip = load_audio(file)
    except (InputDeviceError, AudioError, RuntimeError, ValueError) as e:
        raise fail(str(e))
    af3 = load_model(model, n_ctx=n_ctx, threads=threads)

    def stamp(seconds: float) -> str:
        return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"

    def on_event(ev) -> None:
        seg = ev.segment
        if ev.kind == "dropped":
            console.print(f"[yellow]dropped[/] {stamp(seg.start)}–{stamp(seg.end)}: {ev.info['reason']}")
        elif as_json:
            if ev.kind == "done":
                out.print_json(json.dumps({"start": round(seg.start, 2), "end": round(seg.end, 2), "text": ev.text}))
        elif ev.kind == "segment":
            out.print(f"[bold cyan][{stamp(seg.start)}–{stamp(seg.end)}][/] ", end="")
        elif ev.kind == "piece":
            out.print(ev.text, end="", markup=False, highlight=False)
        elif ev.kind == "done":
            out.print()

    listener = Listener(af3, prompt, detector=detector, every_s=every, wait=file is not None and not realtime,
                        on_event=on_event, max_new_tokens=max_new_tokens)  # fmt: skip
    what = f"microphone {device if device is not None else '(default)'}" if mic else str(file)
    console.print(f"[dim]listening to {what} ({'every %.1f s' % every if every else 'VAD ' + vad}); Ctrl-C to stop[/]")
    blocks = source if mic else file_blocks(clip.samples, realtime=realtime)
    code = 0
    try:
        summary = listener.run(blocks)
    except InputDeviceError as e:
        console.print(f"[bold red]error:[/] {e}")
        summary, code = listener.stats.summary(), 1
    except KeyboardInterrupt:
        summary, code = listener.stats.summary(), 130
    finally:
        if mic:
            source.close()
    if as_json:
        out.print_json(json.dumps({"summary": summary}))
    else:
        lat = summary["first_token_latency_p50_s"]
        console.print(
            f"[bold]{summary['segments']} segment(s)[/], {summary['answered']} answered, {summary['dropped']} dropped, "
            f"{summary['audio_s']:.1f} s of audio, real-time factor {summary['real_time_factor']}, "
            f"first-token latency p50 {lat} s / p95 {summary['first_token_latency_p95_s']} s"
        )
    if code:
        if code == 130:
            console.print("interrupted")
        raise typer.Exit(code)


@app.command("plan")
def plan_cmd(
    bundle: Path = typer.Argument(..., help="An exported bundle."),
    target: Optional[str] = typer.Option(None, "--target", help="orin-nano-8gb | orin-nx-16gb | agx-orin-64gb | rtx-4060-laptop | rtx-4090 | h100"),
    n_ctx: int = typer.Option(8192, "--n-ctx"),
    kv_type: KvOpt = "f16",
    encoder_precision: Optional[str] = typer.Option(None, "--encoder-precision", help="fp16 | int8 | fp32 (default: fp16 for an fp32 bundle)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Dry run: the memory a bundle needs (weights, encoder, KV cache at n_ctx, buffers) and whether
    it fits a target. Nothing is loaded but the GGUF header.

    Example: edge-af3 plan ./af3 --target orin-nano-8gb --n-ctx 8192 --kv q8_0
    """
    from ..bundle import BundleError
    from ..plan import plan

    try:
        p = plan(bundle, n_ctx=n_ctx, kv_type=kv_type, encoder_precision=encoder_precision, target=target)
    except (BundleError, ValueError, RuntimeError) as e:
        raise fail(str(e))
    show_plan(p, as_json)


@app.command("doctor")
def doctor_cmd(as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")) -> None:
    """Check this machine: Python, packages, ONNX Runtime providers, CUDA/TensorRT, llama.cpp GPU
    offload, audio devices; prints the install command for whatever is missing.

    Example: edge-af3 doctor
    """
    from .doctor import checks, render

    report = checks()
    if as_json:
        out.print_json(json.dumps(report))
        return
    render(report, out)


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_cmd(ctx: typer.Context) -> None:
    """Run the benchmark suite (edge-af3 vs transformers, llama.cpp's mtmd and raw llama.cpp).

    Takes the options of `python -m benchmarks --help`, e.g.:
      edge-af3 bench --shape bench-small --clips 5 30 --repeats 3
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "suite.py").is_file():
        raise fail("the benchmarks ship with the source checkout: git clone the project and run `edge-af3 bench` there")
    sys.path.insert(0, str(root))
    from benchmarks.suite import main as suite_main

    suite_main(list(ctx.args))


def main() -> None:
    """Console entry point: Ctrl-C exits 130 without a traceback."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit as e:  # typer turns Ctrl-C inside a command into Exit(130)
        if e.code == 130:
            console.print("interrupted")
        raise


