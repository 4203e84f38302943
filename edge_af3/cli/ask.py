"""`edge-af3 ask` and `edge-af3 chat`: questions about clips, one-shot or as a conversation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_MAX_NEW_TOKENS
from ..errors import OptionsError
from .common import (
    DeviceOpt,
    DryRunOpt,
    EncPrecOpt,
    EngineOpt,
    ExactOpt,
    KvOpt,
    ModelOpt,
    NCtxOpt,
    ThreadsOpt,
    VerifyOpt,
    console,
    emit,
    emit_json,
    generation_overrides,
    load_model,
    out,
    show_plan,
    timings_line,
)

TEMP_HELP = "0 = greedy. Default: the checkpoint's generation_config.json (AF3: 0.7, top-k 20, top-p 0.8)."
PENALTY_HELP = "transformers' repetition penalty (1 = off). Default: the checkpoint's (AF3: 1.05)."
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate.")]
TempOpt = Annotated[float | None, typer.Option("--temperature", "-t", help=TEMP_HELP)]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus mass (1 = off). Default: the checkpoint's.")]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", help="Keep the k likeliest (0 = off). Default: the checkpoint's.")
]
PenaltyOpt = Annotated[float | None, typer.Option("--repetition-penalty", help=PENALTY_HELP)]
SeedOpt = Annotated[int, typer.Option("--seed", help="The sampler's seed.")]
IgnoreEosOpt = Annotated[
    bool, typer.Option("--ignore-eos", help="Generate exactly --max-new-tokens (benchmarks, tests).")
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        envvar="EDGE_AF3_BASE_URL",
        help="Ask an OpenAI-compatible server (edge-af3 serve, vLLM) instead of loading a model.",
    ),
]
AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", help="Run with an exported adapter by name (see the bundle's manifest).")
]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", envvar="EDGE_AF3_API_KEY", help="The server's API key.")]


def connect_or_load(base_url, model, **load):
    """A server (--base-url: -m names the served model) or a model loaded here."""
    if base_url:
        from ..runtime import AF3

        return AF3.connect(base_url, api_key=load.pop("api_key", None), model=model)
    load.pop("api_key", None)
    return load_model(model, **load)


def ask_cmd(
    args: list[str] | None = typer.Argument(
        None, metavar="AUDIO... PROMPT", help="One or more clips, then the question."
    ),
    model: ModelOpt = None,
    think: bool = typer.Option(
        False, "--think", help="Reason step by step before answering (AF3 think mode: the think adapter + prompt)."
    ),
    adapter: AdapterOpt = None,
    system: str | None = typer.Option(None, "--system", help="System prompt (default: the checkpoint's template's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer, tokens, finish reason and timings as JSON."),
    max_new_tokens: MaxNewOpt = DEFAULT_MAX_NEW_TOKENS,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: PenaltyOpt = None,
    seed: SeedOpt = 0,
    ignore_eos: IgnoreEosOpt = False,
    n_ctx: NCtxOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    kv_type: KvOpt = None,
    engine: EngineOpt = None,
    exact: ExactOpt = False,
    encoder_precision: EncPrecOpt = "auto",
    verify: VerifyOpt = False,
    dry: DryRunOpt = False,
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Ask one question about one or more clips; the answer streams as it is produced.

    \b
    Examples:
      edge-af3 ask clip.wav "What do you hear?"
      edge-af3 ask a.wav b.wav "Which of the two clips is louder, and why?" --think
      edge-af3 ask meeting.flac "Transcribe the input speech." --json > answer.json
      arecord -f S16_LE -r 16000 -d 5 -t wav | edge-af3 ask - "What was that?"
      edge-af3 ask "What can you do?"                  (text only)
    """
    from ..audio import load_audio

    if dry:
        return show_plan(
            model,
            n_ctx=n_ctx,
            kv_type=kv_type,
            device=device,
            encoder_engine=engine,
            exact=exact,
            as_json=as_json,
            export_precision=encoder_precision,
        )
    args = args or []
    if not args:
        raise OptionsError('give audio file(s) and then the question, e.g. edge-af3 ask clip.wav "What is it?"')
    *paths, prompt = args
    if not paths and (prompt == "-" or Path(prompt).is_file()):
        raise OptionsError(f'{prompt}: give the question after the audio, e.g. edge-af3 ask {prompt} "What is it?"')
    if paths.count("-") > 1:
        raise OptionsError("standard input (-) can hold one clip")
    # bad audio fails before the model loads; "-" reads a clip from standard input
    clips = [load_audio(sys.stdin.buffer.read(), name="<stdin>") if p == "-" else load_audio(p) for p in paths]
    opts = generation_overrides(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        ignore_eos=ignore_eos or None,
    )
    af3 = connect_or_load(
        base_url,
        model,
        n_ctx=n_ctx,
        threads=threads,
        device=device,
        kv_type=kv_type,
        encoder_engine=engine,
        exact=exact,
        encoder_precision=encoder_precision,
        verify=verify,
        api_key=api_key,
    )
    with af3:
        stream = af3.chat(system).stream(prompt, clips, think=think, adapter=adapter, **opts)  # context checked first
        with stream:
            for piece in stream:
                if not as_json:
                    emit(piece)
        answer = stream.answer
    if as_json:
        emit_json(
            {
                "model": af3.label,
                "audio": paths,
                "prompt": prompt,
                "think": think,
                "adapter": answer.adapter,
                "text": answer.text,
                "tokens": list(answer.tokens),
                "finish_reason": answer.finish_reason,
                "settings": af3.settings.__dict__ if hasattr(af3, "settings") else None,
                "options": answer.options.__dict__ if answer.options else None,
                "timings": answer.timings.__dict__,
            }
        )
        return
    out.print()
    if answer.finish_reason == "context":
        console.print(
            f"[yellow]the context ({af3.llm.n_ctx} positions) filled up; the answer was cut there "
            "(--n-ctx raises it)[/]"
        )
    console.print(f"[dim]{timings_line(answer.timings, answer.finish_reason)}[/]")


def chat_cmd(
    model: ModelOpt = None,
    audio: list[Path] = typer.Option([], "--audio", "-a", help="Clip(s) attached to the first message."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    think: bool = typer.Option(False, "--think", help="Start with think mode on (/think off to stop)."),
    adapter: AdapterOpt = None,
    max_new_tokens: MaxNewOpt = DEFAULT_MAX_NEW_TOKENS,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: PenaltyOpt = None,
    seed: SeedOpt = 0,
    ignore_eos: IgnoreEosOpt = False,
    n_ctx: NCtxOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    kv_type: KvOpt = None,
    engine: EngineOpt = None,
    exact: ExactOpt = False,
    encoder_precision: EncPrecOpt = "auto",
    verify: VerifyOpt = False,
    dry: DryRunOpt = False,
    base_url: BaseUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Talk about audio over several turns; the session keeps its KV cache between turns.

    In the chat: /audio PATH attaches a clip to your next message (several allowed), /think on|off,
    /adapter NAME|off, /load FILE,
    /reset, /save FILE (the conversation as JSON), /help, /quit. Up/down arrows recall history;
    Ctrl-C stops an answer and returns to the prompt; Ctrl-D leaves.

    \b
    Example: edge-af3 chat --audio street.wav
    """
    from .chat import run_chat

    if dry:
        return show_plan(
            model,
            n_ctx=n_ctx,
            kv_type=kv_type,
            device=device,
            encoder_engine=engine,
            exact=exact,
            export_precision=encoder_precision,
        )
    opts = generation_overrides(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        ignore_eos=ignore_eos or None,
    )
    af3 = connect_or_load(
        base_url,
        model,
        n_ctx=n_ctx,
        threads=threads,
        device=device,
        kv_type=kv_type,
        encoder_engine=engine,
        exact=exact,
        encoder_precision=encoder_precision,
        verify=verify,
        api_key=api_key,
    )
    with af3:
        run_chat(af3, audio=list(audio), system=system, think=think, options=opts, adapter=adapter)
