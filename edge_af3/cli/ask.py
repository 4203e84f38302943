"""`edge-af3 ask` and `edge-af3 chat`: questions about clips, one-shot or as a conversation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import OptionsError
from .common import DryRunOpt, console, emit, emit_json, out, timings_line
from .options import LoadOptions, RemoteOptions, SamplingOptions, takes
from .speech import SpeechOptions, speech_line

AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", help="Run with an exported adapter by name (see the bundle's manifest).")
]
SystemOpt = Annotated[
    str | None, typer.Option("--system", help="System prompt (default: the checkpoint's template's).")
]


@takes(sampling=SamplingOptions, load=LoadOptions, remote=RemoteOptions, speech=SpeechOptions)
def ask_cmd(
    args: list[str] | None = typer.Argument(
        None, metavar="AUDIO... PROMPT", help="One or more clips, then the question."
    ),
    think: bool = typer.Option(
        False, "--think", help="Reason step by step before answering (AF3 think mode: the think adapter + prompt)."
    ),
    adapter: AdapterOpt = None,
    system: SystemOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print the answer, tokens, finish reason and timings as JSON."),
    dry: DryRunOpt = False,
    *,
    sampling: SamplingOptions,
    load: LoadOptions,
    remote: RemoteOptions,
    speech: SpeechOptions,
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
    from ..audio import LONGEST, load_audio

    if dry:
        return load.show_plan(as_json=as_json)
    args = args or []
    if not args:
        raise OptionsError('give audio file(s) and then the question, e.g. edge-af3 ask clip.wav "What is it?"')
    *paths, prompt = args
    if not paths and (prompt == "-" or Path(prompt).is_file()):
        raise OptionsError(f'{prompt}: give the question after the audio, e.g. edge-af3 ask {prompt} "What is it?"')
    if paths and Path(prompt).is_file() and not all(p == "-" or Path(p).exists() for p in paths):
        missing = next(p for p in paths if p != "-" and not Path(p).exists())
        raise OptionsError(f'{missing!r} is not a file, and the question comes last: edge-af3 ask {prompt} "{missing}"')
    if paths.count("-") > 1:
        raise OptionsError("standard input (-) can hold one clip")
    # bad audio fails before the model loads; "-" reads a clip from standard input
    # read up to the longest model's limit; the model then cuts to its own, with the warning
    clips = [
        load_audio(sys.stdin.buffer.read() if p == "-" else p, name="<stdin>" if p == "-" else None, **LONGEST)
        for p in paths
    ]
    opts = sampling.overrides()
    load.check_adapter(adapter)
    spoken = speech.open()  # the voice and where it goes are checked before the model loads
    try:
        af3 = remote.connect_or_load(load)
        with af3:
            stream = af3.chat(system).stream(prompt, clips, think=think, adapter=adapter, **opts)  # context checked
            voice = spoken.answer() if spoken else None
            try:
                with stream:
                    for piece in stream:
                        if not as_json:
                            emit(piece)
                        if voice:
                            voice.feed(piece)
                spoken_stats = voice.finish() if voice else None
            except BaseException:
                if voice:
                    voice.cancel()
                raise
            answer = stream.answer
    finally:
        if spoken:
            spoken.close()
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
                "speech": spoken_stats,
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
    if spoken_stats:
        console.print(f"[dim]{speech_line(spoken_stats, speech.speak_to)}[/]")


@takes(sampling=SamplingOptions, load=LoadOptions, remote=RemoteOptions, speech=SpeechOptions)
def chat_cmd(
    audio: list[Path] = typer.Option([], "--audio", "-a", help="Clip(s) attached to the first message."),
    system: SystemOpt = None,
    think: bool = typer.Option(False, "--think", help="Start with think mode on (/think off to stop)."),
    adapter: AdapterOpt = None,
    dry: DryRunOpt = False,
    *,
    sampling: SamplingOptions,
    load: LoadOptions,
    remote: RemoteOptions,
    speech: SpeechOptions,
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
        return load.show_plan()
    opts = sampling.overrides()
    load.check_adapter(adapter)
    spoken = speech.open(per_turn_files=True)  # answer N of the chat -> FILE-N.wav
    try:
        with remote.connect_or_load(load) as af3:
            run_chat(af3, audio=list(audio), system=system, think=think, options=opts, adapter=adapter, spoken=spoken)
    finally:
        if spoken:
            spoken.close()
