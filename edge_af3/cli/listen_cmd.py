"""`edge-af3 listen`: a microphone or a file, cut into segments, each asked the standing prompt."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from ..errors import OptionsError
from .common import console, emit, emit_json, error_line, out
from .options import LoadOptions, SamplingOptions, takes
from .speech import SpeechOptions


def _typed_turns(listener) -> None:
    """Lines on standard input: `/text QUESTION` is a typed turn; anything else is refused
    with a hint. Ends at end of input."""
    import sys

    for line in sys.stdin:
        cmd, _, text = line.strip().partition(" ")
        if cmd == "/text" and text.strip():
            try:
                listener.type_turn(text.strip())
            except Exception as e:  # noqa: BLE001 - the run has ended (or is ending): say so, never a traceback
                console.print(f"[yellow]not asked: {e}[/]")
                return
        elif line.strip():
            console.print("[yellow]type /text QUESTION to ask in writing; speak to ask aloud[/]")


LISTEN_PROMPT = "Describe what you hear. If there is speech, transcribe it."


# answers about each segment are short: 200 tokens unless told
@takes(sampling=(SamplingOptions, {"max_new_tokens": 200}), load=LoadOptions, speech=SpeechOptions)
def listen_cmd(
    mic: bool = typer.Option(False, "--mic", help="Listen to a microphone (PortAudio)."),
    file: Path | None = typer.Option(None, "--file", help="Run the same loop on an audio file (read as a stream)."),
    realtime: bool = typer.Option(False, "--realtime", help="With --file: feed it at real speed (drops as live)."),
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help=f"The standing question asked of each segment (default: {LISTEN_PROMPT!r}; with --chat: none, "
        "the spoken clip is the question).",
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="Voice chat: each segment is the next turn of one conversation (with --speak: answers spoken, "
        "and speaking over an answer interrupts it).",
    ),
    duplex: bool = typer.Option(
        False,
        "--duplex",
        help="--mic --speak: keep listening while an answer plays (headphones; without them the microphone "
        "hears the answer). Off: the microphone is ignored while the answer plays, so no barge-in.",
    ),
    every: float | None = typer.Option(None, "--every", help="Ask about the last S seconds every S seconds (no VAD)."),
    vad: str = typer.Option("silero+energy", "--vad", help="silero+energy | silero | energy | webrtc"),
    input_device: str | None = typer.Option(
        None, "--input", "-i", help="Microphone: input device index or name (see --list-devices)."
    ),
    list_devices: bool = typer.Option(False, "--list-devices", help="List input devices and exit."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer, then the summary."),
    think: bool = typer.Option(False, "--think", help="AF3 think mode for every segment."),
    adapter: str | None = typer.Option(None, "--adapter", help="Answer with an exported adapter by name."),
    system: str | None = typer.Option(None, "--system", help="System prompt for every segment's question."),
    memory: str | None = typer.Option(
        None,
        "--memory",
        help="Remember the last DURATION heard (30s to 10m for AF3; Music Flamingo 20m, AF-Next 30m) in the KV "
        "cache instead of answering segments: type questions (or /at 12:00-14:00 QUESTION) at any time; "
        "each costs what a text question costs.",
    ),
    memory_exact: bool = typer.Option(
        False, "--memory-exact", help="--memory: re-prefill what is left after each eviction (exact, costs CPU)."
    ),
    memory_dir: Path | None = typer.Option(
        None, "--memory-dir", help="--memory: keep every window's rows in this new folder, for /at questions."
    ),
    skip_silence: bool = typer.Option(False, "--skip-silence", help="--memory: do not remember silent windows."),
    tail_every: float = typer.Option(
        10.0, "--tail-every", help="--memory: re-encode the window in progress every S seconds (0: when full)."
    ),
    ask: list[str] | None = typer.Option(None, "--ask", help="--memory: a question asked when the input ends."),
    *,
    sampling: SamplingOptions,
    load: LoadOptions,
    speech: SpeechOptions,
) -> None:
    """Listen continuously: a VAD cuts speech and sound events, each is asked the standing prompt.

    Answers stream with timestamps; when inference falls behind, the oldest waiting segment is
    dropped and reported. Ctrl-C ends with a summary (segments, real-time factor, latency p50/p95).

    \b
    Examples:

      edge-af3 listen --mic

      edge-af3 listen --mic --input 2 --prompt "Is anyone asking for help?"

      edge-af3 listen --file meeting.wav --realtime --every 10

      edge-af3 listen --mic --memory 10m
    """
    from ..audio import stream_file
    from ..listen import Listener, MicSource, file_blocks, list_input_devices
    from ..vad import make_detector

    if list_devices:
        try:
            devices = list_input_devices()
        except (ImportError, OSError) as e:
            raise OptionsError(f"sounddevice/PortAudio unavailable: {e}; pip install 'edge-af3[mic]'") from e
        if as_json:
            emit_json(devices)
        elif not devices:
            out.print("no input devices")
        for d in devices if not as_json else []:
            out.print(f"[{d['index']}] {d['name']} ({d['channels']} ch, {d['default_rate']:.0f} Hz)", markup=False)
        return
    if load.device not in ("auto", "cpu", "cuda"):
        raise OptionsError(
            f"--device is the compute device (auto, cpu or cuda), got {load.device!r}; the microphone is --input"
        )
    if mic == (file is not None):
        raise OptionsError("choose one input: --mic or --file PATH")
    options = sampling.overrides()  # option values first, then the input
    if every is not None and not 0.5 <= every <= 30:  # checked before the model loads
        raise OptionsError(f"--every must be between 0.5 and 30 seconds (one AF3 window at most), got {every:g}")
    remember = None
    if memory is not None:
        from .memory_cmd import MemoryOptions

        if adapter is not None:
            raise OptionsError("--memory keeps the base model's KV: it does not take --adapter")
        if chat or every is not None or speech.speak or speech.speak_to is not None:
            raise OptionsError("--memory answers typed questions: it does not combine with --chat, --every or --speak")
        remember = MemoryOptions.checked(
            memory, memory_exact, memory_dir, skip_silence, tail_every, ask, load.n_ctx, sampling.max_new_tokens
        )
    elif memory_exact or memory_dir or skip_silence or ask:
        raise OptionsError("--memory-exact, --memory-dir, --skip-silence and --ask go with --memory DURATION")
    detector = make_detector(vad) if every is None and remember is None else None
    if mic:
        source = MicSource(input_device)
    else:
        next(iter(stream_file(file, 16)), None)  # a missing or unreadable file fails before the model loads
    if prompt is None:
        prompt = "" if chat else LISTEN_PROMPT
    load.check_adapter(adapter)
    spoken = speech.open(one_file=True)  # --speak-to: every answer, at real speed, into one file
    try:
        af3 = load.load(n_seq=1 if remember is None else (3 if remember.exact else 2))
    except BaseException:
        if spoken:
            spoken.close()
        raise
    if adapter is not None:
        af3.resolve_adapter(False, adapter)  # an unknown name fails now, not at the first segment

    def stamp(seconds: float) -> str:
        tenths = round(seconds * 10)  # rounded first: 59.99 s is 01:00.0, not 00:60.0
        return f"{tenths // 600:02d}:{tenths % 600 / 10:04.1f}"

    def on_event(ev) -> None:
        seg = ev.segment
        if ev.kind == "dropped":
            console.print(f"[yellow]dropped[/] {stamp(seg.start)}–{stamp(seg.end)}: {ev.info['reason']}")
        elif ev.kind == "barge_in":
            if as_json:
                emit_json({"event": "barge_in", "at_s": ev.info["at_s"]})
            else:
                console.print(f"[yellow](interrupted at {stamp(ev.info['at_s'])})[/]")
        elif as_json:
            if ev.kind == "done":
                emit_json({"start": round(seg.start, 3), "end": round(seg.end, 3), "text": ev.text} | ev.info)
        elif ev.kind == "segment":
            out.print(f"[bold cyan][{stamp(seg.start)}–{stamp(seg.end)}][/] ", end="")
        elif ev.kind == "piece":
            emit(ev.text)
        elif ev.kind == "done":
            out.print()

    if remember is not None:
        from .memory_cmd import run_memory

        what = f"microphone {input_device if input_device is not None else '(default)'}" if mic else str(file)
        blocks = source if mic else file_blocks(file, realtime=realtime)
        try:
            code = run_memory(
                af3,
                remember,
                blocks,
                what,
                wait=file is not None and not realtime,
                as_json=as_json,
                system=system,
                options=options | {"think": think},
            )
        finally:
            if mic:
                source.close()
            af3.close()
        if code:
            raise typer.Exit(code)
        return
    listener = Listener(
        af3,
        prompt,
        detector=detector,
        every_s=every,
        wait=file is not None and not realtime,
        on_event=on_event,
        chat=chat,
        speech=spoken,
        barge_in=spoken is not None and (mic or realtime),  # a file read faster than real time cannot be spoken over
        duplex=duplex or not mic,  # a file has no loudspeaker to hear
        think=think,
        adapter=adapter,
        system=system,
        **options,
    )
    what = f"microphone {input_device if input_device is not None else '(default)'}" if mic else str(file)
    console.print(f"[dim]listening to {what} ({f'every {every:.1f} s' if every else 'VAD ' + vad}); Ctrl-C to stop[/]")
    blocks = source if mic else file_blocks(file, realtime=realtime)
    if chat:  # `/text QUESTION` typed while listening is a turn too
        threading.Thread(target=_typed_turns, args=(listener,), daemon=True, name="edge-af3-typed").start()
    code = 0
    try:
        summary = listener.run(blocks)
    except KeyboardInterrupt:
        summary, code = listener.stats.summary(), 130
    except Exception as e:  # noqa: BLE001 - a device or inference fault ends the run, with its summary
        console.print(error_line(e), highlight=False)
        summary, code = listener.stats.summary(), 1
    finally:
        if mic:
            source.close()
        af3.close()
        if spoken:
            spoken.close()  # --speak-to: the file is written now
    if as_json:
        emit_json({"summary": summary})
    else:
        p50, p95 = summary["first_token_latency_p50_s"], summary["first_token_latency_p95_s"]
        latency = f"first-token latency p50 {p50} s / p95 {p95} s" if p50 is not None else "nothing answered"
        console.print(
            f"[bold]{summary['segments']} segment(s)[/], {summary['answered']} answered, {summary['dropped']} dropped, "
            f"{summary['audio_s']:.1f} s of audio, real-time factor {summary['real_time_factor']}, {latency}"
            + (f", [yellow]{summary['overflows']} capture overflow(s)[/]" if summary["overflows"] else "")
            + (f", {summary['barge_ins']} interrupted" if summary["barge_ins"] else "")
        )
    if code:
        raise typer.Exit(code)
