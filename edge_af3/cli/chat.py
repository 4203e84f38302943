"""`edge-af3 chat`: an interactive conversation over audio, with readline editing and history."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

HELP = """commands:
  /audio PATH     attach a clip to your next message (repeat for several)
  /think on|off   step-by-step reasoning before the answer (the think adapter when the bundle has one)
  /adapter NAME|off  answer with an exported adapter (the whole conversation is recomputed with it)
  /reset          forget the conversation (and its KV cache)
  /save FILE      write the conversation so far as JSON (audio as absolute paths)
  /load FILE      continue a saved conversation (its clips are read again)
  /help           this text
  /quit           leave (Ctrl-D works too); Ctrl-C stops an answer and returns here"""


def _readline(history: Path):
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.exists():
            readline.read_history_file(str(history))
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline


@contextlib.contextmanager
def _ctrl_c_cancels(stream):
    """While an answer streams, Ctrl-C stops it (within a token) instead of ending the program."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def save(target: Path, conversation: dict) -> None:
    """Write the conversation (temporary file + rename); an unwritable place is one line, not a crash."""
    from .common import console

    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(json.dumps(conversation, indent=2, ensure_ascii=False) + "\n", "utf-8")
        tmp.replace(target)  # never a half-written file
    except OSError as e:
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        console.print(f"[red]cannot save to {target}: {e.strerror or e}[/]")
        return
    console.print(f"[dim]saved {len(conversation['turns'])} turn(s) to {target}[/]")


def load(path: Path, session):
    """A /save file restored into a fresh session like `session` (its clips read again):
    (session, turns), or None and one line when it cannot (the current conversation stays)."""
    from ..errors import EdgeAF3Error
    from .common import console

    fresh = (
        session.model.chat(system=session.system) if hasattr(session, "model") else session.owner.chat(session.system)
    )
    try:
        turns = json.loads(path.read_text("utf-8"))["turns"]
        for t in turns:
            fresh.append(
                t["user"],
                list(t.get("audio") or []),
                t["assistant"],
                think=bool(t.get("think")),
                adapter=t.get("adapter"),
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EdgeAF3Error) as e:
        console.print(
            f"[red]cannot load {path}: {getattr(e, 'strerror', None) or e}[/] (the conversation is unchanged)"
        )
        return None
    console.print(f"[dim]loaded {len(turns)} turn(s) from {path}[/]")
    return fresh, turns


def run_chat(
    af3,
    *,
    audio: list[Path],
    system: str | None,
    think: bool,
    options: dict,
    adapter: str | None = None,
    spoken=None,
) -> None:
    """The interactive loop; `spoken` (cli/speech.py's SpokenAnswers): each answer also spoken."""
    from ..audio import LONGEST, load_audio
    from ..errors import AudioError, EdgeAF3Error, VoiceError
    from ..paths import cache_dir
    from .common import console, emit, out, timings_line
    from .speech import speech_line

    history = cache_dir() / "chat_history"
    rl = _readline(history)
    session = af3.chat(system=system)
    pending: list = []
    names: list[str] = []
    transcript: list[dict] = []

    def attach(path: str) -> None:
        path = str(Path(path).expanduser().resolve())
        try:
            pending.append(load_audio(path, **LONGEST))
        except AudioError as e:
            console.print(f"[red]{e}[/]")
            return
        names.append(path)
        console.print(f"[dim]attached {path} ({pending[-1].samples.size / 16000:.1f} s) to your next message[/]")

    for p in audio:
        attach(str(p))
    console.print(f"[bold]edge-af3 chat[/] — {af3.label}. /help for commands, Ctrl-D to leave.")
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                out.print()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, the session stays
                out.print()
                console.print("[dim](Ctrl-D or /quit leaves)[/]")
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd, _, arg = text.partition(" ")
                arg = arg.strip()
                if cmd in ("/quit", "/exit"):
                    break
                if cmd == "/help":
                    out.print(HELP, markup=False)
                elif cmd == "/audio":
                    attach(arg) if arg else console.print("[red]usage: /audio PATH[/]")
                elif cmd == "/think":
                    if arg not in ("on", "off"):
                        console.print("[red]usage: /think on|off[/]")
                    else:
                        think = arg == "on"
                        console.print(f"[dim]think mode {arg}[/]")
                elif cmd == "/adapter":
                    known = sorted(getattr(af3, "adapters", {}) or {})
                    if arg == "off":
                        adapter = None
                        console.print("[dim]no adapter[/]")
                    elif arg in known:
                        adapter = arg
                        console.print(f"[dim]adapter {arg}[/]")
                    else:
                        console.print(
                            f"[red]usage: /adapter NAME|off[/] (this model has: {', '.join(known) or 'none'})"
                        )
                elif cmd == "/reset":
                    session.reset()
                    pending.clear()
                    names.clear()
                    transcript.clear()
                    console.print("[dim]conversation reset[/]")
                elif cmd == "/save":
                    if not arg:
                        console.print("[red]usage: /save FILE[/]")
                        continue
                    save(Path(arg).expanduser(), {"model": af3.label, "system": system, "turns": transcript})
                elif cmd == "/load":
                    if not arg:
                        console.print("[red]usage: /load FILE[/]")
                        continue
                    loaded = load(Path(arg).expanduser(), session)
                    if loaded is not None:
                        session, transcript[:] = loaded
                        pending.clear()
                        names.clear()
                else:
                    console.print(f"[red]unknown command {cmd}[/]; /help lists them")
                continue
            out.print("af3> ", end="")
            t0 = time.time()
            voice = spoken.answer() if spoken else None
            try:
                with session.stream(text, list(pending), think=think, adapter=adapter, **options) as stream:
                    with _ctrl_c_cancels(stream):
                        for piece in stream:
                            emit(piece)
                            if voice:
                                voice.feed(piece)
            except EdgeAF3Error as e:
                out.print()
                console.print(f"[red]{e}[/] (/reset starts over)")
                if voice:
                    voice.cancel()
                continue
            out.print()
            answer = stream.answer
            if answer.finish_reason == "cancelled":  # Ctrl-C: the turn is dropped, the history kept
                if voice:
                    voice.cancel()
                console.print("[dim](stopped; this turn is not part of the conversation)[/]")
                continue
            console.print(f"[dim]{timings_line(answer.timings, answer.finish_reason)}[/]")
            if voice:
                try:
                    console.print(f"[dim]{speech_line(voice.finish(), voice.to)}[/]")
                except KeyboardInterrupt:  # Ctrl-C while it speaks: silence, the turn stays
                    voice.cancel()
                    console.print("[dim](stopped speaking)[/]")
                except (VoiceError, OSError) as e:  # the voice failed: the text stands, the chat goes on
                    console.print(f"[red]speech: {e}[/]")
            transcript.append(
                {
                    "time": t0,
                    "user": text,
                    "audio": list(names),
                    "think": think,
                    "adapter": answer.adapter,
                    "assistant": answer.text,
                }
            )
            pending.clear()
            names.clear()
    finally:
        if rl is not None:
            try:
                rl.write_history_file(str(history))
            except OSError:
                pass
