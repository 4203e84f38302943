"""`--speak`, `--speak-to` and `--voice` of ask / chat: each answer spoken while it streams."""

from __future__ import annotations

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
    Path | None,
    typer.Option(
        "--speak-to",
        help="Write the spoken answer to this WAV file instead of playing it (chat: FILE-1.wav, FILE-2.wav, ...; "
        "listen: every answer, at real speed, in one file).",
    ),
]
VoiceOpt = Annotated[str, typer.Option("--voice", help=VOICE_HELP)]
OutputDeviceOpt = Annotated[
    str | None, typer.Option("--output", help="--speak: output device index or name (default: the system's).")
]


@dataclass
class SpeechOptions:
    """Speech out (ask, chat, listen): play or write each answer as it streams."""

    speak: SpeakOpt = False
    speak_to: SpeakToOpt = None
    voice: VoiceOpt = "auto"
    output: OutputDeviceOpt = None

    def open(self, *, per_turn_files: bool = False, one_file: bool = False):
        """The voice and its sink, checked now (before the model loads); None without speech.
        per_turn_files (chat): answer N goes to out-N.wav; one_file (listen): every answer,
        played at real speed, into one file written at close."""
        from ..voice import open_voice
        from ..voice.answers import SpeechOut, WavFile
        from ..voice.output import PacedWav, Player

        if not self.speak and self.speak_to is None:
            return None
        if self.speak and self.speak_to is not None:
            raise OptionsError("choose --speak (play it) or --speak-to FILE (write it), not both")
        to = self.speak_to
        if to is not None and not to.parent.is_dir():
            raise OutputError(f"{to.parent}: no such folder for --speak-to")
        device = int(self.output) if self.output is not None and self.output.isdigit() else self.output
        if self.speak:
            Player(device)  # no output device: one line now (before a voice's process starts)
        voice = open_voice(self.voice)
        if self.speak:
            return SpeechOut(voice, lambda turn: Player(device))
        if one_file:
            paced = PacedWav(to)
            return SpeechOut(voice, lambda turn: paced, on_close=paced.close)
        if per_turn_files:
            return SpeechOut(voice, lambda turn: WavFile(to.with_name(f"{to.stem}-{turn}{to.suffix or '.wav'}")))
        return SpeechOut(voice, lambda turn: WavFile(to))


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
