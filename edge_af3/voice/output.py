"""Where spoken audio goes: a sound card through PortAudio (sounddevice), or a WAV file."""

from __future__ import annotations

import os
import threading
import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, OutputError, VoiceError
from .speaker import Chunk

BLOCK = 1024  # frames per write: stop() silences the output within one block


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def write_wav(path: str | os.PathLike, chunks: Iterable[Chunk]) -> float:
    """Every chunk into one 16-bit mono WAV (a temporary name, renamed when complete: a failure
    leaves no half file). Returns the seconds written."""
    target = Path(path)
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: no such folder for the speech file")
    tmp = target.with_name(f".{target.name}.part")
    rate = None
    frames = 0
    try:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            for chunk in chunks:
                if rate is None:
                    rate = chunk.rate
                    w.setframerate(rate)
                elif chunk.rate != rate:
                    raise VoiceError(f"the voice changed its rate mid-answer ({rate} -> {chunk.rate} Hz)")
                w.writeframes(to_pcm16(chunk.samples))
                frames += chunk.samples.shape[0]
            if rate is None:
                w.setframerate(22050)  # nothing was said: a valid, empty file
        tmp.replace(target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return frames / rate if rate else 0.0


def output_devices() -> list[dict]:
    """PortAudio's output devices (index, name, channels, default rate)."""
    sd = _sounddevice()
    return [
        {"index": i, "name": d["name"], "channels": d["max_output_channels"], "default_rate": d["default_samplerate"]}
        for i, d in enumerate(sd.query_devices())
        if d["max_output_channels"] > 0
    ]


def _sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as e:
        raise MissingDependencyError(f"sounddevice/PortAudio unavailable: {e}; pip install 'edge-af3[mic]'") from e
    return sounddevice


class Player:
    """Plays chunks through PortAudio in order, without gaps while they come in time.
    `stop()` (any thread) silences it within one block of `BLOCK` frames."""

    def __init__(self, device: int | str | None = None):
        self.sd = _sounddevice()
        self.device = device
        try:
            info = self.sd.query_devices(device, "output")
        except (ValueError, self.sd.PortAudioError) as e:
            raise VoiceError(
                f"no output device {device!r}: {e}" if device is not None else f"no output device: {e}"
            ) from e
        self.device_name = info["name"]
        self._stop = threading.Event()
        self.played_s = 0.0
        self.stopped_at: float | None = None

    def stop(self) -> None:
        self._stop.set()

    def play(self, chunks: Iterable[Chunk]) -> float:
        """Blocks until everything is played (or `stop()`); returns the seconds played."""
        stream = None
        try:
            for chunk in chunks:
                if self._stop.is_set():
                    break
                if stream is None:
                    stream = self.sd.OutputStream(
                        samplerate=chunk.rate, channels=1, dtype="float32", device=self.device, blocksize=BLOCK
                    )
                    stream.start()
                    rate = chunk.rate
                elif chunk.rate != rate:
                    raise VoiceError(f"the voice changed its rate mid-answer ({rate} -> {chunk.rate} Hz)")
                data = np.ascontiguousarray(chunk.samples, np.float32).reshape(-1, 1)
                for start in range(0, data.shape[0], BLOCK):
                    if self._stop.is_set():
                        break
                    stream.write(data[start : start + BLOCK])
                    self.played_s += min(BLOCK, data.shape[0] - start) / rate
        except self.sd.PortAudioError as e:
            raise VoiceError(f"playback failed on {self.device_name}: {e}") from e
        finally:
            if stream is not None:
                if self._stop.is_set():
                    stream.abort()  # drop what is buffered: silence now
                else:
                    stream.stop()  # let the buffered audio finish
                stream.close()
        return self.played_s


class PacedWav:
    """A player that writes instead of sounding: chunks are "played" at real speed (so a barge-in
    can cut them as it would a sound card's, within one block) and kept; `close()` writes every
    answer played, one after another, to one WAV file. For `listen --speak-to` and tests."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise OutputError(f"{self.path.parent}: no such folder for the speech file")
        self._stop = threading.Event()
        self._chunks: list[Chunk] = []
        self.played_s = 0.0

    def stop(self) -> None:
        self._stop.set()

    def play(self, chunks: Iterable[Chunk]) -> float:
        import time

        self._stop.clear()
        played = 0.0
        for chunk in chunks:
            if self._stop.is_set():
                break
            t0, kept = time.perf_counter(), 0
            for start in range(0, chunk.samples.shape[0], BLOCK):
                if self._stop.is_set():
                    break
                kept = min(chunk.samples.shape[0], start + BLOCK)
                # the block "plays" until its end is due
                delay = t0 + kept / chunk.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self._chunks.append(Chunk(chunk.samples[:kept], chunk.rate, chunk.sentence, chunk.ready_at))
            played += kept / chunk.rate
        self.played_s += played
        return played

    def close(self) -> float:
        return write_wav(self.path, self._chunks)
