"""Voice/sound activity for `listen`: frame detectors and the segmenter that cuts what AF3 is asked about.

AF3 answers about speech *and* sounds, so the default detector is the union of Silero VAD v6
(speech; its ONNX model run by the ONNX Runtime we already ship, so no torch and no second native
library) and an adaptive energy gate (any sound event well above the room's noise floor). benchmarks/bench_vad.py
measures the candidates on a labelled timeline; docs/architecture.md has the figures.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MissingDependencyError, OptionsError

RATE = 16000
FRAME = 512  # 32 ms: Silero v5's frame
DETECTORS = ("silero+energy", "silero", "energy", "webrtc")


SILERO_WHEEL = ("silero-vad", "6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
SILERO_MEMBER = "silero_vad/data/silero_vad_16k_op15.onnx"


SILERO_ONNX_SHA256 = "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"  # the wheel's 16k op15 model


def silero_model() -> Path:
    """Silero VAD v6's ONNX model (MIT; `data/SILERO_VAD_LICENSE`): `EDGE_AF3_SILERO_ONNX` when
    set, else the copy shipped inside the package (1.3 MB: listen works offline on first use),
    else taken once from the pinned `silero-vad` wheel on PyPI (a package installed without its
    data: pip downloads the wheel, its sha256 is checked, the one .onnx file is cached).
    """
    import hashlib
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile

    from .paths import cache_dir

    if os.environ.get("EDGE_AF3_SILERO_ONNX"):
        return Path(os.environ["EDGE_AF3_SILERO_ONNX"])
    packaged = Path(__file__).resolve().parent / "data" / "silero_vad_16k_op15.onnx"
    if packaged.is_file():
        return packaged
    name, version, sha = SILERO_WHEEL
    dest = cache_dir() / "vad" / f"silero-{version}-16k.onnx"
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                tmp,
                f"{name}=={version}",
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise MissingDependencyError(
                f"could not fetch the Silero VAD model ({name}=={version} from PyPI): "
                f"{res.stderr.strip()[-300:]}; set EDGE_AF3_SILERO_ONNX or use --vad energy"
            )
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != sha:
            raise RuntimeError(f"{wheels[0].name}: sha256 {digest} is not the pinned {sha}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        with zipfile.ZipFile(wheels[0]) as z:
            part.write_bytes(z.read(SILERO_MEMBER))
        part.replace(dest)
    return dest


class SileroDetector:
    """Silero VAD (speech probability per 32 ms frame) on ONNX Runtime, the runtime's own engine."""

    name = "silero"

    def __init__(self, threshold: float = 0.5):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(silero_model()), sess_options=opts, providers=["CPUExecutionProvider"])
        self.threshold = threshold
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros(64, np.float32)  # the model sees the previous frame's last 64 samples
        self.sr = np.array(RATE, np.int64)

    def probability(self, frame: np.ndarray) -> float:
        x = np.concatenate([self.context, frame.astype(np.float32, copy=False)])[None, :]
        out, self.state = self.session.run(None, {"input": x, "state": self.state, "sr": self.sr})
        self.context = x[0, -64:]
        return float(out[0, 0])

    def is_active(self, frame: np.ndarray) -> bool:
        return self.probability(frame) >= self.threshold


class EnergyDetector:
    """Active when a frame is `margin_db` above a noise floor that follows the room both ways: it
    drops at once to a quieter frame and rises `rise_db_per_s` under sustained sound. It starts at
    a quiet room's level (not at the first frame's), so a sound already there when listening
    starts (a machine, music) is heard first, then becomes the floor if it stays steady."""

    name = "energy"

    def __init__(self, margin_db: float = 9.0, min_dbfs: float = -55.0, rise_db_per_s: float = 3.0):
        self.margin_db, self.min_dbfs = margin_db, min_dbfs
        self.rise = rise_db_per_s * FRAME / RATE
        self.floor: float = min_dbfs - margin_db  # a quiet room: anything at or above min_dbfs is heard

    def is_active(self, frame: np.ndarray) -> bool:
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
        db = 20 * math.log10(rms + 1e-10)
        floor = min(self.floor + self.rise, db) if db < self.floor + self.margin_db else self.floor + self.rise
        self.floor = max(floor, self.min_dbfs - self.margin_db)  # digital silence does not sink it forever
        return db >= max(self.floor + self.margin_db, self.min_dbfs)


class WebrtcDetector:
    name = "webrtc"

    def __init__(self, mode: int = 2):
        try:
            import webrtcvad
        except ImportError as e:
            raise MissingDependencyError("the webrtc VAD needs webrtcvad-wheels: pip install webrtcvad-wheels") from e
        self._vad = webrtcvad.Vad(mode)

    def is_active(self, frame: np.ndarray) -> bool:
        pcm = (np.clip(frame[:480], -1, 1) * 32767).astype("<i2").tobytes()  # WebRTC takes 10/20/30 ms
        return self._vad.is_speech(pcm, RATE)


class UnionDetector:
    def __init__(self, *parts):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def is_active(self, frame: np.ndarray) -> bool:
        hits = [p.is_active(frame) for p in self.parts]  # every part sees every frame (state)
        return any(hits)


def make_detector(name: str = "silero+energy"):
    if name == "silero":
        return SileroDetector()
    if name == "energy":
        return EnergyDetector()
    if name == "webrtc":
        return WebrtcDetector()
    if name == "silero+energy":
        return UnionDetector(SileroDetector(), EnergyDetector())
    raise OptionsError(f"unknown VAD {name!r}; choose one of {', '.join(DETECTORS)}")


@dataclass(frozen=True)
class Segment:
    start: float  # seconds since the stream began
    end: float
    samples: np.ndarray  # float32, 16 kHz


class Segmenter:
    """Frames in, segments out: opens after `on_frames` active frames (with `preroll_s` of audio
    before them), closes after `hangover_s` of inactivity or at `max_s`; drops blips under `min_s`."""

    def __init__(
        self,
        detector,
        *,
        on_frames: int = 2,
        hangover_s: float = 0.6,
        preroll_s: float = 0.25,
        min_s: float = 0.3,
        max_s: float = 30.0,
    ):
        self.detector = detector
        self.on_frames = on_frames
        self.hang = max(1, round(hangover_s * RATE / FRAME))
        self.pre = deque(maxlen=max(1, round(preroll_s * RATE / FRAME)))
        self.min_frames = round(min_s * RATE / FRAME)
        self.max_frames = round(max_s * RATE / FRAME)
        self.pos = 0  # frames seen
        self.active_run = 0
        self.quiet_run = 0
        self.current: list[np.ndarray] | None = None
        self.start_frame = 0
        self.opened_at = 0

    def push(self, frame: np.ndarray) -> list[Segment]:
        """Feed one FRAME-sample frame; returns the segments it closed (0 or 1)."""
        out = []
        active = self.detector.is_active(frame)
        self.pos += 1
        if self.current is None:
            self.pre.append(frame)
            self.active_run = self.active_run + 1 if active else 0
            if self.active_run >= self.on_frames:
                self.current = list(self.pre)
                self.start_frame = self.pos - len(self.current)
                self.opened_at = self.pos
                self.pre.clear()
                self.quiet_run = 0
            return out
        self.current.append(frame)
        self.quiet_run = 0 if active else self.quiet_run + 1
        if self.quiet_run >= self.hang or len(self.current) >= self.max_frames:
            seg = self._close(trim=self.quiet_run if self.quiet_run >= self.hang else 0)
            if seg is not None:
                out.append(seg)
        return out

    def skip(self, frame: np.ndarray) -> None:  # noqa: ARG002 - the frame is not listened to
        """A frame not listened to (the loudspeaker is on): time goes on, nothing is heard; a
        segment open when it began is dropped (it would have a hole)."""
        self.pos += 1
        self.current, self.active_run, self.quiet_run = None, 0, 0
        self.pre.clear()

    @property
    def open_frames(self) -> int:
        """Frames heard since the segment now open began (its pre-roll not counted; 0: none open)."""
        return self.pos - self.opened_at if self.current is not None else 0

    def flush(self) -> list[Segment]:
        """Close an open segment at the end of the stream."""
        seg = self._close(trim=self.quiet_run) if self.current is not None else None
        return [seg] if seg is not None else []

    def _close(self, trim: int) -> Segment | None:
        frames = self.current[: len(self.current) - max(0, trim - 2)] if trim else self.current
        self.current, self.active_run, self.quiet_run = None, 0, 0
        if len(frames) < self.min_frames:
            return None
        start = self.start_frame * FRAME / RATE
        return Segment(start, start + len(frames) * FRAME / RATE, np.concatenate(frames))
