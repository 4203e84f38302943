"""`--speak`, `--speak-to` and `--voice` of ask / chat: each answer spoken while it streams."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..errors import OptionsError, OutputError

VOICE_HELP = (
    "auto | espeak-ng[:VOICE] | piper[:NAME] | PATH.onnx (auto: Piper with an installed voice, else espeak-ng)."
)
SpeakOpt = Annotated[bool, typer.Option("--speak", help="Speak the answer as it is written (the sound card).")]
SpeakToOpt = Annotated[
    Path | None, typer.Option("--speak-to", help="Write the spoken answer to this WAV file instead of playing it.")
]
VoiceOpt = Annotated[str, typer.Option("--voice", help=VOICE_HELP)]
OutputDeviceOpt = Annotated[
    str | None, typer.Option("--output", help="--speak: output device index or name (default: the system's).")
]


@dataclass
class SpeechOptions:
    """Speech out (ask, chat): play or write each answer as it streams."""

    speak: SpeakOpt = False
    speak_to: SpeakToOpt = None
    voice: VoiceOpt = "auto"
    output: OutputDeviceOpt = None

    def open(self) -> SpokenAnswers | None:
        """The voice and its sink, checked now (before the model loads); None without speech."""
        if not self.speak and self.speak_to is None:
            return None
        return SpokenAnswers(self.voice, play=self.speak, to=self.speak_to, device=self.output)


class SpokenAnswers:
    """The voice and the sink, checked before the model loads; `answer()` per answer."""

    def __init__(self, voice: str, *, play: bool, to: Path | None, device: str | None = None):
        from ..voice import open_voice
        from ..voice.output import Player

        if play and to is not None:
            raise OptionsError("choose --speak (play it) or --speak-to FILE (write it), not both")
        if to is not None and not to.parent.is_dir():
            raise OutputError(f"{to.parent}: no such folder for --speak-to")
        self.to = to
        self.device = int(device) if device is not None and device.isdigit() else device
        self.player = Player(self.device) if play else None  # no output device: one line now
        self.voice = open_voice(voice)
        # the engine's first sentence costs its start-up (Piper: loading the voice): paid while the model loads
        self._warm = threading.Thread(target=self._warm_up, daemon=True)
        self._warm.start()

    def _warm_up(self) -> None:
        try:
            for _ in self.voice.speak("Ready."):
                pass
        except Exception:  # noqa: BLE001 - a broken engine says so on the first real sentence
            pass

    def answer(self, turn: int | None = None) -> SpokenAnswer:
        """The next answer's speech; `turn` (chat) numbers the --speak-to file: out.wav -> out-1.wav."""
        self._warm.join()
        to = self.to
        if to is not None and turn is not None:
            to = to.with_name(f"{to.stem}-{turn}{to.suffix or '.wav'}")
        return SpokenAnswer(self, to)

    def close(self) -> None:
        self.voice.close()


class SpokenAnswer:
    """One answer: `feed` its pieces, `finish()` waits until it is all spoken (or written)."""

    def __init__(self, owner: SpokenAnswers, to: Path | None):
        from ..voice import Speaker
        from ..voice.output import Player

        self.speaker = Speaker(owner.voice)
        self.error: BaseException | None = None
        self.player = Player(owner.device) if owner.player is not None else None  # its own stop flag
        self.to = to
        self._sink = threading.Thread(target=self._drain, daemon=True, name="edge-af3-speech-out")
        self._sink.start()

    def _drain(self) -> None:
        from ..voice.output import write_wav

        try:
            if self.player is not None:
                self.player.play(self.speaker)
            else:
                write_wav(self.to, self.speaker)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by finish()
            self.error = e
            self.speaker.cancel()

    def feed(self, piece: str) -> None:
        self.speaker.feed(piece)

    def finish(self) -> dict:
        self.speaker.finish()
        self._sink.join()
        if self.error is not None:
            raise self.error
        return self.speaker.stats()

    def cancel(self) -> None:
        self.speaker.cancel()
        if self.player is not None:
            self.player.stop()
        self._sink.join(timeout=5)


def speech_line(stats: dict, to: Path | None = None) -> str:
    """One line of what speaking an answer cost."""
    first = stats["first_text_to_audio_ms"]
    where = f"wrote {to}" if to is not None else "spoke"
    return (
        f"{where}: {stats['audio_s']:.1f} s of speech ({stats['voice']}, {stats['sentences']} sentence(s))"
        + (f" | first audio {first:.0f} ms after the first text" if first is not None else "")
        + (f" | synthesis {stats['real_time_factor']:.3f}x real time" if stats["real_time_factor"] else "")
        + (f" | {len(stats['gaps_s'])} gap(s), longest {max(stats['gaps_s']):.2f} s" if stats["gaps_s"] else "")
    )
