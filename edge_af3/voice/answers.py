"""Speech for a run of answers: one voice, a sink per answer (a sound card, a file), and each
answer's text fed in as it streams. What ask, chat, listen and the Python API share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from .output import write_wav
from .speaker import Speaker


class WavFile:
    """A sink that writes one answer to a WAV file (a temporary name, renamed when complete)."""

    playing = False  # a file is never heard while it is written

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.played_s = 0.0
        self._aborted = False

    def play(self, chunks) -> float:
        self.played_s = write_wav(self.path, chunks, keep=lambda: not self._aborted)
        return self.played_s

    def stop(self) -> None:  # a cancelled answer leaves no file (its chunks end with the speaker's cancel)
        self._aborted = True


class SpeechOut:
    """`voice` speaking every answer into `make_sink(turn)` (turn: the answer's number, from 1).
    The engine's start-up (Piper: loading the voice) is paid on a thread from here on, while the
    model loads; the first answer waits for it."""

    def __init__(self, voice, make_sink: Callable[[int], object], *, on_close: Callable[[], object] | None = None):
        self.voice, self.make_sink, self.on_close = voice, make_sink, on_close
        self.turns = 0
        self._warm = threading.Thread(target=self._warm_up, daemon=True, name="edge-af3-voice-warm")
        self._warm.start()

    def _warm_up(self) -> None:
        try:
            for _ in self.voice.speak("Ready."):
                pass
        except Exception:  # noqa: BLE001 - a broken engine says so on the first real sentence
            pass

    def answer(self) -> SpokenAnswer:
        self._warm.join()
        self.turns += 1
        return SpokenAnswer(self.voice, self.make_sink(self.turns))

    def close(self):
        self.voice.close()
        return self.on_close() if self.on_close else None


class SpokenAnswer:
    """One answer: `feed` its pieces as they come; `finish()` waits until all is spoken (or
    written) and returns the speaker's stats; `cancel()` silences it within one audio block."""

    def __init__(self, voice, sink):
        self.speaker = Speaker(voice)
        self.sink = sink
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True, name="edge-af3-speech-out")
        self._thread.start()

    @property
    def to(self):
        return getattr(self.sink, "path", None)

    def _drain(self) -> None:
        try:
            self.sink.play(self.speaker)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by finish()
            self.error = e
            self.speaker.cancel()

    def feed(self, piece: str) -> None:
        self.speaker.feed(piece)

    def finish(self) -> dict:
        self.speaker.finish()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.speaker.stats()

    def cancel(self, wait: bool = True) -> None:
        """Silence it: the synthesis stops, the sink stops within one block; `wait` for the sink's
        thread to end (a barge-in on the capture loop does not wait)."""
        self.speaker.cancel()
        self.sink.stop()
        if wait:
            self._thread.join(timeout=5)

    @property
    def speaking(self) -> bool:
        """Sound is going out now (not merely an answer being written or synthesised)."""
        return bool(getattr(self.sink, "playing", False))

    @property
    def heard_text(self) -> str:
        return self.speaker.heard_text
