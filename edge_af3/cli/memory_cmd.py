"""`edge-af3 listen --memory 10m`: what was heard stays in the KV cache; questions typed at the
prompt (or given with --ask) are answered about it at the cost of a text question."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionsError
from .common import console, emit, emit_json, error_line, out


def parse_duration(text: str) -> float:
    """'10m', '90s', '1m30s', '600' -> seconds (30 s to 30 minutes: the longest model's clip; the
    loaded model's own limit — AF3 10 minutes, Music Flamingo 20 — is checked when it loads)."""
    t = text.strip().lower()
    total, number = 0.0, ""
    try:
        for ch in t:
            if ch.isdigit() or ch == ".":
                number += ch
            elif ch in "ms" and number:
                total += float(number) * (60 if ch == "m" else 1)
                number = ""
            else:
                raise ValueError
        total += float(number) if number else 0.0
    except ValueError:
        raise OptionsError(f"--memory takes a duration like 10m, 90s or 600, got {text!r}") from None
    if not 30 <= total <= 1800:
        raise OptionsError(
            f"--memory holds 30 s to 30m (AF3 reads at most 10 minutes, Music Flamingo 20, AF-Next 30), got {text!r}"
        )
    return total


def stamp(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


@dataclass
class MemoryOptions:
    seconds: float
    exact: bool
    directory: Path | None
    skip_silence: bool
    tail_every: float | None
    questions: list[str]

    @classmethod
    def checked(cls, memory: str, exact, directory, skip_silence, tail_every, questions, n_ctx, max_new_tokens):
        """Every value checked before the model loads."""
        from ..runtime.windows import check_memory_options

        seconds = parse_duration(memory)
        if tail_every is not None and tail_every != 0 and not 1 <= tail_every < 30:
            raise OptionsError(
                f"--tail-every takes 1 to 29 seconds (0: hold the window until full), got {tail_every:g}"
            )
        check_memory_options(memory, seconds, directory, n_ctx, max_new_tokens or 500)
        return cls(seconds, exact, directory, skip_silence, tail_every or None, list(questions or []))


def _typed_questions(listener) -> None:
    """Lines on standard input are questions; `/at 12:00-14:00 QUESTION` asks about that stretch."""
    import sys

    from ..memory_listen import parse_question

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            listener.ask(*parse_question(line))
        except ValueError as e:
            console.print(f"[yellow]{e}[/]")


def run_memory(af3, opts: MemoryOptions, blocks, what: str, *, wait: bool, as_json: bool, system, options) -> int:
    """The loop, its output and its summary; returns the exit code."""
    from ..memory_listen import MemoryListener

    memory = af3.memory(
        opts.seconds,
        system=system,
        tail_every=opts.tail_every,
        skip_silence=opts.skip_silence,
        exact=opts.exact,
        directory=opts.directory,
        max_new_tokens=options.get("max_new_tokens"),
    )

    def on_event(ev) -> None:
        info = ev.info or {}
        if ev.kind == "dropped":
            console.print(
                f"[yellow]dropped {stamp(info['start_s'])}–{stamp(info['start_s'] + 30)}: {info['reason']}[/]"
            )
        elif ev.kind == "error":
            console.print(f"[yellow]not answered: {info['question']!r}: {ev.text}[/]", highlight=False)
        elif ev.kind == "window":  # (stderr, also with --json)
            console.print(
                f"[dim]remembered {stamp(info['start_s'])}–{stamp(info['start_s'] + 30)} ({info['work_ms']:.0f} ms)[/]"
            )
        elif as_json:
            if ev.kind == "done":
                emit_json({"answer": ev.text} | info)
        elif ev.kind == "question":
            out.print(f"[bold cyan]? {ev.text}[/]", highlight=False)
        elif ev.kind == "piece":
            emit(ev.text)
        elif ev.kind == "done":
            out.print()
            span = ", ".join(f"{stamp(a)}–{stamp(b)}" for a, b in info["span"]) or "nothing heard yet"
            console.print(
                f"[dim](about {span}; {info['prefilled']} positions prefilled, first token "
                f"{info['first_token_ms']:.0f} ms)[/]"
            )

    listener = MemoryListener(memory, on_event=on_event, wait=wait, **options)
    console.print(
        f"[dim]remembering the last {stamp(opts.seconds)} of {what}; type a question (or /at 12:00-14:00 "
        "QUESTION) and Enter; Ctrl-C to stop[/]"
    )
    threading.Thread(target=_typed_questions, args=(listener,), daemon=True, name="edge-af3-typed").start()
    code = 0
    try:
        summary = listener.run(blocks, opts.questions)
    except KeyboardInterrupt:
        summary, code = listener.summary(), 130
    except Exception as e:  # noqa: BLE001 - a device or inference fault ends the run, with what was remembered
        console.print(error_line(e), highlight=False)
        summary, code = listener.summary(), 1
    finally:
        listener.close()  # (after a second Ctrl-C, the work in flight ends before the model closes)
    if as_json:
        emit_json({"summary": summary})
    else:
        span = ", ".join(f"{stamp(a)}–{stamp(b)}" for a, b in summary["remembered"]) or "nothing"
        console.print(
            f"[bold]heard {stamp(summary['heard_s'])}, remembering {span}[/] ({summary['windows']} window(s), "
            f"{summary['evicted']} evicted, {summary['skipped_silent']} silent skipped, {summary['dropped']} dropped); "
            f"encode p50 {summary['encode_ms_p50']} ms, prefill p50 {summary['prefill_ms_p50']} ms, real-time factor "
            f"{summary['real_time_factor']}; {summary['questions']} question(s) answered"
            + (
                f", first token p50 {summary['first_token_s_p50']} s"
                if summary["first_token_s_p50"] is not None
                else ""
            ),
            highlight=False,
        )
    return code
