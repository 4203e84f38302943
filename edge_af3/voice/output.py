"""Where spoken audio goes: a sound card through PortAudio (sounddevice), or a WAV file."""

from __future__ import annotations

import collections
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


def write_wav(path: str | os.PathLike, chunks: Iterable[Chunk], keep=lambda: True) -> float:
    """Every chunk into one 16-bit mono WAV (a temporary name, renamed when complete: a failure,
    or `keep()` false at the end — a cancelled answer —, leaves no half file). Returns the
    seconds written."""
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
        if not keep():
            tmp.unlink(missing_ok=True)
            return 0.0
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


class _Feed:
    """Samples waiting for the sound card, taken by PortAudio's callback a block at a time."""

    def __init__(self):
        self._parts: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self.taken = 0  # frames handed to the card (silence for an underrun not counted)

    def push(self, samples: np.ndarray) -> None:
        with self._lock:
            self._parts.append(np.ascontiguousarray(samples, np.float32))

    def pending(self) -> int:
        with self._lock:
            return sum(p.shape[0] for p in self._parts)

    def pull(self, out: np.ndarray) -> None:
        n, want = 0, out.shape[0]
        with self._lock:
            while n < want and self._parts:
                part = self._parts[0]
                k = min(want - n, part.shape[0])
                out[n : n + k, 0] = part[:k]
                n += k
                if k == part.shape[0]:
                    self._parts.popleft()
                else:
                    self._parts[0] = part[k:]
        out[n:] = 0.0  # an underrun: silence until the next sentence comes
        self.taken += n


class Player:
    """Plays chunks through PortAudio in order, without gaps while they come in time. PortAudio
    pulls the audio through a callback, so `stop()` (any thread) aborts the stream at once: the
    card is silent within its own buffer (about one block), never waiting for a blocking write."""

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
        self._stream = None
        self._lock = threading.Lock()
        self.played_s = 0.0
        self.playing = False  # sound is going out (from the first block to the end or stop())

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._stream is not None:
                self._stream.abort()  # drop what is buffered: silence now

    def play(self, chunks: Iterable[Chunk]) -> float:
        """Blocks until everything is played (or `stop()`); returns the seconds played."""
        import time

        feed, rate = _Feed(), None
        try:
            for chunk in chunks:
                if self._stop.is_set():
                    break
                if rate is None:
                    rate = chunk.rate
                    self._open(rate, feed)
                elif chunk.rate != rate:
                    raise VoiceError(f"the voice changed its rate mid-answer ({rate} -> {chunk.rate} Hz)")
                feed.push(chunk.samples)
            while rate is not None and feed.pending() and not self._stop.is_set():
                time.sleep(BLOCK / rate / 2)
            if rate is not None and not self._stop.is_set():
                time.sleep(self._stream.latency)  # what the card still holds
        except self.sd.PortAudioError as e:
            raise VoiceError(f"playback failed on {self.device_name}: {e}") from e
        finally:
            with self._lock:
                stream, self._stream = self._stream, None
            if stream is not None:
                if not self._stop.is_set():
                    stream.stop()
                stream.close()
            self.playing = False
            self.played_s += feed.taken / rate if rate else 0.0
        return self.played_s

    def _open(self, rate: int, feed: _Feed) -> None:
        def callback(outdata, frames, time_info, status):  # noqa: ARG001 - PortAudio's thread
            feed.pull(outdata)

        stream = self.sd.OutputStream(
            samplerate=rate,
            channels=1,
            dtype="float32",
            device=self.device,
            blocksize=BLOCK,
            latency="low",
            callback=callback,
        )
        with self._lock:
            if self._stop.is_set():  # stopped before the first block: never starts
                stream.close()
                return
            self._stream = stream
            stream.start()
            self.playing = True


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
        self.playing = False

    def stop(self) -> None:
        self._stop.set()

    def play(self, chunks: Iterable[Chunk]) -> float:
        self._stop.clear()
        played = 0.0
        try:
            played = self._play(chunks)
        finally:
            self.playing = False
        self.played_s += played
        return played

    def _play(self, chunks: Iterable[Chunk]) -> float:
        import time

        played = 0.0
        for chunk in chunks:
            if self._stop.is_set():
                break
            self.playing = True
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
        return played

    def close(self) -> float:
        return write_wav(self.path, self._chunks)
