"""What every command shares: the consoles, one-line errors, the options ask/chat/listen/plan
declare alike, model loading and the settings a dry run would load with."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import OptionsError

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

DEFAULT_MODEL = "nvidia/audio-flamingo-3-hf"
MODEL_HELP = "Bundle, HF checkpoint folder or Hub id (exported once into the cache). Env: EDGE_AF3_MODEL."
DEVICE_HELP = "auto | cpu | cuda (cuda: the best GPU encoder engine, all LLM layers offloaded)"
ENGINE_HELP = "Force the encoder engine: tensorrt | onnxruntime-cuda | torch-cuda | onnxruntime-cpu | torch-cpu."
KV_HELP = "KV cache type: f16 (default) | bf16 | q8_0 | f32"
N_CTX_HELP = "Context length (default 16384: a 10 min clip's 15000 audio tokens + text + answer)."
EXACT_HELP = "The configuration whose greedy tokens equal transformers' (f32 KV, flash attention off)."

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", envvar="EDGE_AF3_MODEL", help=MODEL_HELP)]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
KvOpt = Annotated[str | None, typer.Option("--kv", help=KV_HELP)]
EngineOpt = Annotated[str | None, typer.Option("--engine", help=ENGINE_HELP)]
NCtxOpt = Annotated[int | None, typer.Option("--n-ctx", help=N_CTX_HELP)]
ExactOpt = Annotated[bool, typer.Option("--exact", help=EXACT_HELP)]
ENC_PREC_HELP = (
    "How a checkpoint (-m folder or Hub id) is exported: auto | fp32 | fp16 | int8 | mixed (auto: fp32 "
    "with --exact, a CUDA GPU or a CPU without VNNI, else mixed); each is its own cached bundle. A bundle "
    "keeps its own."
)
QUANT_HELP = (
    "LLM weights: auto | q4_k_m | iq4_nl | q4_0 | q8_0 | f16 | f32 (auto: q4_k_m when every matrix width is a "
    "multiple of 256, as in the real AF3; else iq4_nl)"
)
ENC_ATTN_EXPORT_HELP = (
    "auto | per-head | batched: the encoder graph's attention (auto: per-head, one head's scores at a time, "
    "which ONNX Runtime runs fastest on a CPU, for int8/mixed and for fp32 on a machine without a CUDA GPU; "
    "batched, which GPU engines fuse, for fp16 and for fp32 with a GPU; a bundle for a GPU exported on a "
    "CPU-only machine: --encoder-precision fp32 --encoder-attention batched)"
)
ENC_PREC_EXPORT_HELP = (
    "auto | fp32 | fp16 | int8 | mixed (auto: fp32 where this machine has a CUDA GPU, whose engines build fp16 "
    "from it, or a CPU without VNNI, where int8 loses accuracy; else mixed: int8 on each layer's fc1 only)"
)
EncPrecOpt = Annotated[str, typer.Option("--encoder-precision", help=ENC_PREC_HELP)]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all cores).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the memory plan for these settings; load nothing.")]
VerifyOpt = Annotated[bool, typer.Option("--verify", help="Re-hash every bundle file (normally once per file).")]


def error_line(e: BaseException) -> str:
    """A failure as the CLI's one line: a user error with its code (the server's, docs/cli.md),
    anything else with its kind."""
    from ..errors import EdgeAF3Error

    if isinstance(e, EdgeAF3Error):
        return f"[bold red]error:[/] {e} [dim]\\[{e.code}][/]"
    return f"[bold red]error:[/] {type(e).__name__}: {e}"


def quiet_transformers() -> None:
    """A command that reports its own steps (train, make-tiny --think): transformers' weight-
    loading bars and its deprecation chatter (warnings about its own internals, raised by PEFT)
    would only interleave with them."""
    import warnings

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def step_line(msg: str) -> None:
    """A progress step as one timestamped line on stderr (no source-file suffix)."""
    import time

    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)


class ExportProgress:
    """Rich progress for an export: each step as a timestamped line, and a bar over the steps
    with elapsed time and the time left (estimated from the steps done so far)."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None
        self.total = total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:
            self.progress.stop()

    def __call__(self, msg: str) -> None:
        step_line(msg)
        if self.task is None:  # the first step: only an export reports any (a bundle loads quietly)
            self.progress.start()
            self.task = self.progress.add_task("exporting", total=self.total)
        task = self.progress.tasks[0]
        if msg.startswith("exporting adapter"):  # each adapter adds its export (+ its check)
            self.progress.update(self.task, total=task.total + 2)
        done = task.total if msg.startswith("bundle ready") else min(task.completed + 1, task.total - 1)
        self.progress.update(self.task, completed=done, description=msg[:48])


def export_steps(
    quant: str,
    *,
    encoder_precision: str = "auto",
    encoder_attention: str = "auto",
    verify: bool = True,
    mmproj: bool = False,
) -> int:
    """How many progress steps an export reports (before its adapters): an unquantized LLM skips
    the quantizer; each `auto` choice says what it picked."""
    autos = (quant == "auto") + (encoder_precision == "auto") + (encoder_attention == "auto")
    return 4 + (2 if verify else 0) + (quant not in ("f32", "f16")) + ((1 + verify) if mmproj else 0) + autos


def bundled_clip() -> Path:
    """The short speech clip shipped with the package (espeak-ng, 16 kHz FLAC)."""
    return Path(str(resources.files("edge_af3") / "data" / "clip.flac"))


def emit(text: str) -> None:
    """Model text to stdout as it is (no markup, no tab expansion, no wrapping), flushed."""
    out.file.write(text)
    out.file.flush()


def emit_json(obj) -> None:
    """One JSON object on one line (JSON Lines: `--json` output is machine-readable as it streams)."""
    emit(json.dumps(obj, ensure_ascii=False) + "\n")


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise OptionsError(f"--threads must be >= 1, got {threads}")


def load_model(
    spec: str | None,
    *,
    n_ctx: int | None,
    threads: int | None,
    device: str = "auto",
    kv_type: str | None = None,
    encoder_engine: str | None = None,
    exact: bool = False,
    verify: bool = False,
    quant: str = "auto",
    encoder_precision: str = "auto",
    n_seq: int = 1,
):
    """AF3.load with progress on stderr; says which encoder engine runs, and why faster ones were skipped.
    User errors propagate as EdgeAF3Error (main prints them as one line)."""
    from ..runtime import AF3

    check_threads(threads)
    spec = spec or DEFAULT_MODEL
    from ..quants import checked_encoder_precision, exact_quant
    from ..runtime.locate import first_use, first_use_line

    precision = checked_encoder_precision(encoder_precision, exact=exact)
    quant = exact_quant(quant, exact)
    need = first_use(spec, quant, precision)  # a big download / export ahead is said before it starts
    if need:
        pull = f"edge-af3 models pull {spec}" + (
            "" if encoder_precision == "auto" else f" --encoder-precision {precision}"
        )
        pull += " --exact" if exact else ""
        console.print(f"[yellow]{first_use_line(spec, need)}[/]; `{pull}` does it ahead", highlight=False)
    with ExportProgress(export_steps(quant, encoder_precision=precision)) as steps:  # shown only if it exports
        model = AF3.load(
            spec,
            n_ctx=n_ctx,
            threads=threads,
            quant=quant,
            encoder_precision=precision,
            device=device,
            kv_type=kv_type,
            encoder_engine=encoder_engine,
            exact=exact,
            check_hashes=True if verify else None,
            progress=steps,
            n_seq=n_seq,
        )
    from ..paths import mark_used

    mark_used(model.bundle.path)
    if n_ctx and model.llm.n_ctx != n_ctx:  # llama.cpp pads the context to a multiple of 256
        console.print(
            f"[dim]--n-ctx {n_ctx}: llama.cpp rounds the context up to a multiple of 256: "
            f"{model.llm.n_ctx} positions[/]"
        )
    if model.engine_choice.skipped or device == "cuda":
        console.print(f"[dim]{model.engine_choice.explain()}; LLM layers on GPU: {model.llm.n_gpu_layers}[/]")
    return model


def bundle_for(spec: str | None, export_precision: str = "auto", exact: bool = False) -> Path:
    """The bundle folder a model spec names (a checkpoint is exported once first, with the encoder
    precision that loading it would use: plans read bundles)."""
    from ..quants import resolve_encoder_precision
    from ..runtime import locate

    precision = resolve_encoder_precision(export_precision, exact=exact)
    return locate(spec or DEFAULT_MODEL, encoder_precision=precision)


def show_plan(
    spec: str | None,
    *,
    n_ctx: int | None,
    kv_type: str | None,
    device: str = "auto",
    encoder_engine: str | None = None,
    exact: bool = False,
    target: str | None = None,
    encoder_precision: str | None = None,
    as_json: bool = False,
    export_precision: str = "auto",
) -> None:
    """`--dry-run` and `plan`: the settings AF3.load would resolve here (or on `target`) and their memory.
    encoder_precision: what the encoder computes in, for the estimate; export_precision: how a
    checkpoint source is exported (ask/chat's --encoder-precision)."""
    from ..bundle import read_manifest
    from ..family import Family
    from ..plan import KNOWN_MODELS, plan, plan_known, render
    from ..settings import resolve

    spec = spec or DEFAULT_MODEL
    path = _local_bundle(spec, export_precision, exact) if spec in KNOWN_MODELS else None
    if spec in KNOWN_MODELS and path is None:  # the published AF3, not here: its known shapes, no download
        from ..quants import exact_quant

        quant = "f32" if exact_quant("auto", exact) == "f32" else "q4_k_m"  # what its export would pick

        def make(**kw):
            return plan_known(spec, quant, **kw)

        stored = "fp32"
        family = Family(max_windows=KNOWN_MODELS[spec]["max_windows"])
    else:
        path = path or bundle_for(spec, export_precision, exact)
        manifest = read_manifest(path)
        stored, family = manifest["encoder"]["precision"], Family.from_manifest(manifest)

        def make(**kw):
            return plan(path, **kw)

    n_ctx = family.n_ctx if n_ctx is None else n_ctx  # room for the model's longest clip, as AF3.load sets it
    encoder_engine = family.encoder_engine(encoder_engine)  # as AF3.load picks it
    if target is None:
        s = resolve(
            stored,
            device=device,
            encoder_engine=encoder_engine,
            kv_type=kv_type,
            n_ctx=n_ctx,
            exact=exact,
            timed=family.time_embedding,
        )
        p = make(
            n_ctx=s.n_ctx,
            kv_type=s.kv_type,
            encoder_precision=encoder_precision or s.encoder_precision,
            windows_per_run=s.windows_per_run,
            machine=s,
        )
    else:  # a GPU target: its engines build fp16 from an fp32 bundle and run 4 windows at a time
        choice = _gpu_choice(target, family.time_embedding)
        s = resolve(stored, kv_type=kv_type, n_ctx=n_ctx, exact=exact, choice=choice, llm_gpu=True)
        p = make(
            n_ctx=s.n_ctx,
            kv_type=s.kv_type,
            encoder_precision=encoder_precision or s.encoder_precision,
            windows_per_run=s.windows_per_run,
            target=target,
        )
    if as_json:
        emit_json(p)
    else:
        render(p, out)


def _local_bundle(spec: str, export_precision: str, exact: bool) -> Path | None:
    """The bundle of a Hub id already downloaded and exported here (None: planning it would need
    the network; nothing is fetched to find out)."""
    from ..quants import exact_quant, resolve_encoder_precision
    from ..runtime.locate import cached_bundle_path

    try:
        from huggingface_hub import snapshot_download

        ckpt = Path(snapshot_download(repo_id=spec, local_files_only=True))
        bundle = cached_bundle_path(
            ckpt, exact_quant("auto", exact), resolve_encoder_precision(export_precision, exact=exact)
        )
    except Exception:  # noqa: BLE001 - not in the Hub cache (or no huggingface_hub): not here
        return None
    return bundle if (bundle / "manifest.json").is_file() else None


def _gpu_choice(target: str, timed: bool = False):
    """A GPU target's encoder engine: TensorRT, or ONNX Runtime CUDA for a time-embedding model."""
    from ..engines.select import NO_TIMES, EncoderChoice

    if timed:
        return EncoderChoice("onnxruntime-cuda", f"cuda ({target})", (("tensorrt", NO_TIMES),), gpu=target)
    return EncoderChoice("tensorrt", f"cuda ({target})", gpu=target)


def timings_line(t, finish_reason: str | None = None) -> str:
    """One line of what a turn cost: the prompt (the whole conversation's positions, how many of
    them the KV cache already held, this turn's new audio tokens) and each stage."""
    end = f" | finish {finish_reason}" if finish_reason else ""
    stages = "".join(  # a server's answer does not know its stages: they are left out, not shown as 0
        f" | {name} {ms:.0f} ms"
        for name, ms in (("features", t.features_ms), ("encoder", t.encoder_ms), ("prefill", t.prefill_ms))
        if ms is not None
    )
    return (
        f"prompt {t.prompt_tokens} positions, {t.reused_tokens} from the KV cache, {t.audio_tokens} new audio tokens"
        f"{stages} | first token {t.first_token_ms:.0f} ms | {t.decode_tokens_per_s:.1f} tok/s{end}"
    )
