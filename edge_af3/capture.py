"""`listen`'s sources: iterators of float32 mono 16 kHz blocks from a microphone (PortAudio
through sounddevice: the callback only copies into a bounded queue) or a file (optionally paced
at real speed)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import numpy as np

from .errors import InputDeviceError
from .vad import FRAME, RATE


def list_input_devices() -> list[dict]:
    import sounddevice as sd

    return [
        {"index": i, "name": d["name"], "channels": d["max_input_channels"], "default_rate": d["default_samplerate"]}
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


class MicSource:
    """Blocks from a PortAudio input; the callback only copies into a bounded queue."""

    def __init__(
        self, device: str | int | None = None, *, block: int = FRAME, stall_s: float = 3.0, startup_s: float = 10.0
    ):
        try:
            import sounddevice as sd
        except (ImportError, OSError) as e:  # OSError: the PortAudio library itself is missing
            raise InputDeviceError(
                f"microphone input needs sounddevice and PortAudio: pip install 'edge-af3[mic]' "
                f"and apt-get install libportaudio2 ({e})"
            ) from e
        self._sd = sd
        if not list_input_devices():
            raise InputDeviceError(
                "no audio input device found; plug a microphone in or check PulseAudio/ALSA "
                "(`edge-af3 listen --list-devices`, `pactl list sources short`)"
            )
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        if device is not None:  # a wrong index or name: said now, before the model loads, not once it has
            try:
                sd.query_devices(device, "input")
            except (sd.PortAudioError, ValueError) as e:
                raise InputDeviceError(f"no input device {device!r} ({e}); see `edge-af3 listen --list-devices`") from e
        self.device = device
        self.block = block
        self.stall_s = stall_s
        self.startup_s = startup_s  # PulseAudio/ALSA can take over a second to deliver the first block
        self.blocks: queue.Queue = queue.Queue(maxsize=int(60 * RATE / block))  # a minute of audio
        self.overflows = 0
        self.lost_samples = 0  # blocks dropped because the reader fell a minute behind
        self.stream = None

    def _callback(self, indata, frames, time_info, status):  # PortAudio's thread: copy and return
        if status and status.input_overflow:
            self.overflows += 1
        try:
            self.blocks.put_nowait(indata[:, 0].copy())
        except queue.Full:
            self.overflows += 1
            self.lost_samples += frames

    def __iter__(self) -> Iterator[np.ndarray]:
        sd = self._sd
        try:
            self.stream = sd.InputStream(
                samplerate=RATE,
                channels=1,
                dtype="float32",
                blocksize=self.block,
                device=self.device,
                callback=self._callback,
            )
            self.stream.start()
        except (sd.PortAudioError, ValueError) as e:
            raise InputDeviceError(
                f"cannot open input device {self.device if self.device is not None else '(default)'}: "
                f"{e}; see `edge-af3 listen --list-devices`"
            ) from e
        try:
            wait = self.startup_s
            while True:
                try:
                    yield self.blocks.get(timeout=wait)
                    wait = self.stall_s
                except queue.Empty:
                    raise InputDeviceError(
                        f"the input device stopped delivering audio (no samples for {wait:.0f} s"
                        f"{'' if self.stream.active else ', stream closed'}); was it unplugged?"
                    ) from None
        finally:
            self.close()

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.abort(ignore_errors=True)
                self.stream.close(ignore_errors=True)
            except Exception:
                pass
            self.stream = None


def file_blocks(source, *, realtime: bool, block: int = FRAME) -> Iterator[np.ndarray]:
    """16 kHz mono blocks of a decoded clip (an array) or of a file, read and resampled a block at a
    time (a 3-hour file is never held whole); `realtime` paces them like a microphone would."""
    from .audio import stream_file

    blocks = (
        stream_file(source, block)
        if not isinstance(source, np.ndarray)
        else (source[i : i + block] for i in range(0, len(source), block))
    )
    t0 = time.perf_counter()
    done = 0
    for b in blocks:
        if realtime:
            delay = t0 + done / RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        done += b.shape[0]
        yield b
