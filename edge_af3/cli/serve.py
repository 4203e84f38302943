"""`edge-af3 serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import typer

from ..errors import OptionsError
from .common import DEFAULT_MODEL, check_threads
from .options import LoadOptions, takes


@takes(load=LoadOptions)
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 to serve the network)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="EDGE_AF3_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/*. Env: EDGE_AF3_API_KEY.",
    ),
    parallel: int = typer.Option(
        1,
        "--parallel",
        "-np",
        min=1,
        max=64,
        help="Slots decoded together (each its own KV cache of --n-ctx positions).",
    ),
    max_queue: int = typer.Option(16, "--max-queue", min=0, help="Requests that may wait for a slot; more get 429."),
    max_body_mb: int = typer.Option(64, "--max-body-mb", min=1, help="Largest request body (413 above it)."),
    timeout: float = typer.Option(30.0, "--timeout", min=0, help="Seconds SIGTERM waits for requests in flight."),
    allow_urls: bool = typer.Option(
        False, "--allow-urls", help="Fetch http(s) audio_url parts (data: URLs always work)."
    ),
    decode_batching: str = typer.Option(
        "auto",
        "--decode-batching",
        help="auto: batch the slots' decode steps where measured cheaper at start-up "
        "than one slot at a time (K-quants on some CPUs are not) | always.",
    ),
    name: str | None = typer.Option(None, "--name", help="Model id to serve under (default: the checkpoint's Hub id)."),
    log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error"),
    voice: list[str] = typer.Option(
        [],
        "--voice",
        help="A voice for /v1/audio/speech (repeat for several; the first is 'default'): auto | espeak-ng[:VOICE] "
        "| piper[:NAME] | PATH.onnx. Default: auto. Each starts at its first request.",
    ),
    memory: str | None = typer.Option(
        None,
        "--memory",
        help="Listen to --memory-input and remember the last DURATION (30s to 10m for AF3; Music Flamingo 20m, "
        "AF-Next 30m): /v1/memory/ask.",
    ),
    memory_input: str | None = typer.Option(
        None,
        "--memory-input",
        help="What the memory hears: mic | mic:DEVICE | a file (at real speed) | an http(s) URL.",
    ),
    memory_fast: bool = typer.Option(
        False, "--memory-fast", help="A file --memory-input read as fast as the model takes it (a recording)."
    ),
    memory_exact: bool = typer.Option(False, "--memory-exact", help="Re-prefill what is left after each eviction."),
    memory_dir: str | None = typer.Option(None, "--memory-dir", help="Keep every window's rows here (new folder)."),
    skip_silence: bool = typer.Option(False, "--skip-silence", help="Do not remember silent windows."),
    *,
    load: LoadOptions,
) -> None:
    """Serve AF3 over OpenAI's API: /v1/chat/completions (audio as input_audio or data: audio_url,
    streaming), /v1/audio/transcriptions, /v1/audio/speech, /v1/memory/ask (with --memory),
    /v1/models, /health, /metrics. Binds to localhost unless
    --host says otherwise. Needs the `server` extra: pip install 'edge-af3[server]'.

    \b
    Examples:
      edge-af3 serve -m ./af3-bundle --parallel 4
      EDGE_AF3_API_KEY=secret edge-af3 serve --host 0.0.0.0 --port 8080
    """
    from ..server import serve
    from ..server.app import ServerConfig

    check_threads(load.threads)
    if decode_batching not in ("auto", "always"):
        raise OptionsError(f"--decode-batching must be auto or always, got {decode_batching!r}")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise OptionsError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    remember = None
    if memory is not None or memory_input is not None:
        from ..server.memory import MemoryConfig
        from .memory_cmd import parse_duration

        if memory is None or memory_input is None:
            raise OptionsError("an audio memory needs both --memory DURATION and --memory-input SOURCE")
        remember = MemoryConfig(
            parse_duration(memory), memory_input, memory_fast, memory_exact, memory_dir, skip_silence
        )
        remember.check(load.n_ctx)
    elif memory_fast or memory_exact or memory_dir or skip_silence:
        raise OptionsError("--memory-fast, --memory-exact, --memory-dir and --skip-silence go with --memory")
    config = ServerConfig(
        model=load.model or DEFAULT_MODEL,
        name=name,
        api_key=api_key or None,
        parallel=parallel,
        max_queue=max_queue,
        max_body_mb=max_body_mb,
        timeout=timeout,
        allow_urls=allow_urls,
        decode_batching=decode_batching,
        load=load.af3_kwargs(),
        voices=list(voice) or ["auto"],
        memory=remember,
    )
    serve(config, host, port, log_level=log_level)
