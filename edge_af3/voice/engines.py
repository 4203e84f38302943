"""Speech engines, each a separate program edge-af3 talks to over pipes.

Both engines that exist as packages here are GPL-3 (Piper 1.8's `piper-tts`, espeak-ng);
edge-af3 is Apache-2.0, so neither is imported into the edge-af3 process: espeak-ng runs once
per sentence (`espeak-ng --stdout`), Piper as one long-lived `python -m piper` that reads a
sentence per line on stdin, writes one WAV per line into a private folder and names the file on
stderr — the voice is loaded once. (docs/voice.md: the choice and each licence.)
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import VoiceError


def read_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """16-bit mono WAV bytes -> float32 samples in [-1, 1] and the rate."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2:
                raise VoiceError(f"{what} wrote {8 * w.getsampwidth()}-bit audio; 16-bit expected")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            if w.getnchannels() > 1:
                pcm = pcm.reshape(-1, w.getnchannels())[:, 0]
            return (pcm.astype(np.float32) / 32768.0), w.getframerate()
    except (wave.Error, EOFError) as e:
        raise VoiceError(f"{what} wrote no readable WAV ({e})") from e


class EspeakVoice:
    """espeak-ng (GPL-3, a separate program): formant speech, always there on Debian/Ubuntu,
    robotic but instant. `voice`: an espeak-ng voice name (en-us, de, fr, zh, ...)."""

    engine = "espeak-ng"
    licence = "GPL-3.0-or-later (run as a separate program)"

    def __init__(self, voice: str = "en-us", *, rate_wpm: int = 175, exe: str | None = None):
        self.exe = exe or shutil.which("espeak-ng") or shutil.which("espeak")
        if not self.exe:
            raise VoiceError("espeak-ng is not installed (apt install espeak-ng)")
        self.voice, self.rate_wpm = voice, rate_wpm
        self.name = f"espeak-ng:{voice}"

    def speak(self, text: str) -> Iterator[tuple[np.ndarray, int]]:
        cmd = [self.exe, "--stdout", "-v", self.voice, "-s", str(self.rate_wpm), "--", text]
        try:
            run = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired as e:
            raise VoiceError(f"espeak-ng took over 60 s on a {len(text)}-character sentence") from e
        if run.returncode != 0:
            err = run.stderr.decode(errors="replace").strip()
            raise VoiceError(f"espeak-ng failed (exit {run.returncode}): {err or 'no message'}")
        yield read_wav(run.stdout, "espeak-ng")

    def close(self) -> None:
        pass


class PiperVoice:
    """A Piper voice (`.onnx` + `.onnx.json`) spoken by Piper's own CLI in a worker process.
    `exe`: the command that runs Piper (default: this Python's `-m piper`, from `piper-tts`)."""

    engine = "piper"
    licence = "piper-tts: GPL-3.0-or-later (run as a separate program); the voice: its model card's"

    def __init__(self, model: str | os.PathLike, *, exe: list[str] | None = None, start_timeout: float = 60):
        self.model = Path(model)
        if not self.model.is_file():
            raise VoiceError(f"{self.model}: no such Piper voice file")
        config = Path(str(self.model) + ".json")
        if not config.is_file():
            raise VoiceError(f"{self.model}: its config {config.name} is missing (a Piper voice is .onnx + .onnx.json)")
        self.name = f"piper:{self.model.stem}"
        self._exe = exe or [sys.executable, "-m", "piper"]
        self._dir = tempfile.TemporaryDirectory(prefix="edge-af3-piper-")
        self._lock = threading.Lock()  # one sentence at a time through the pipe
        self._lines: queue.Queue = queue.Queue()  # the worker's stderr lines (None: it ended)
        self._proc = None
        self._closed = False
        self._start_timeout = start_timeout
        self._start()

    def _start(self) -> None:
        Path(self._dir.name).mkdir(exist_ok=True)
        cmd = [*self._exe, "-m", str(self.model), "-d", self._dir.name]
        self._lines = lines = queue.Queue()  # a worker of its own: an old one's end is not this one's
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                bufsize=1,
            )
        except OSError as e:
            raise VoiceError(f"cannot start Piper ({' '.join(self._exe)}): {e}") from e
        args = (self._proc, lines)
        threading.Thread(target=self._read_stderr, args=args, daemon=True, name="edge-af3-piper").start()

    @staticmethod
    def _read_stderr(proc, lines: queue.Queue) -> None:
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # the process ended

    def speak(self, text: str) -> Iterator[tuple[np.ndarray, int]]:
        line = " ".join(text.split())
        if not line:
            return
        with self._lock:
            if self._closed:
                raise VoiceError(f"{self.name} is closed")
            if self._proc is None or self._proc.poll() is not None:
                self._reap()
                self._start()  # a worker that died is started again for the next sentence
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as e:
                raise VoiceError(f"the Piper worker ended: {self._tail()}") from e
            seen = []
            while True:
                try:
                    msg = self._lines.get(timeout=self._start_timeout)
                except queue.Empty as e:
                    self._reap()  # a stuck worker: killed; the next sentence starts a new one
                    raise VoiceError(f"Piper gave no audio within {self._start_timeout:g} s") from e
                if msg is None:
                    self._reap()
                    raise VoiceError(f"the Piper worker ended: {' | '.join(seen[-3:]) or 'no message'}")
                if "Wrote " in msg:
                    path = Path(msg.split("Wrote ", 1)[1].strip())
                    break
                seen.append(msg)
        data = path.read_bytes()
        path.unlink(missing_ok=True)
        yield read_wav(data, "Piper")

    def _tail(self) -> str:
        return "exit " + str(self._proc.poll()) if self._proc else "not running"

    def _reap(self) -> None:
        """End the worker (if any) and collect it: its pipes closed, no zombie left."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # (its stderr is closed by the reader thread's end of file, not here: it may be reading it)

    def close(self) -> None:
        """Idempotent; a sentence being spoken is finished first (the lock), nothing starts after."""
        with self._lock:
            self._closed = True
            self._reap()
            self._dir.cleanup()
