"""The Audio Flamingo family: what a bundle's model changes over AF3, read once from the checkpoint
at export and from the manifest at load (torch-free).

| | AF3 | Music Flamingo | Audio Flamingo Next |
|---|---|---|---|
| config `model_type` | audioflamingo3 | musicflamingo | musicflamingo |
| audio per clip | 600 s (20 windows) | 1200 s (40) | 1800 s (60) |
| rows of a clip | `<sound>` x n | `<\\|sound_bos\\|>` `<sound>` x n `<\\|sound_eos\\|>` | same as Music Flamingo |
| encoder output | pooled, normed rows -> projector | rotary time embedding on them first | same |

The time embedding makes a row depend on its window's index within the clip and its time within
the window: `row_times` gives the seconds transformers computes for them (`MusicFlamingoModel.
_build_audio_timestamps`), and the encoder graph takes them as its `audio_times` input, so a
clip's rows stay a function of the clip alone (cacheable) and the graphs keep their shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .constants import CHUNK_SECONDS, DEFAULT_N_CTX, MAX_WINDOWS, N_SAMPLES, ROWS_PER_WINDOW

FRAME_STEP = 0.01  # s per mel frame (hop 160 at 16 kHz): `audio_frame_step` of the config
ROW_STEP = FRAME_STEP * 4  # s per audio row (stride-2 conv, then pooling by 2)
MAX_AUDIO_LEN = {"audioflamingo3": 600, "musicflamingo": 1200}  # the processors' defaults (s)


@dataclass(frozen=True)
class Family:
    model_type: str = "audioflamingo3"
    name: str = "AF3"  # what messages call the model
    max_windows: int = MAX_WINDOWS  # 30 s windows per clip: the processor's max_audio_len / 30
    sound_bos: int | None = None  # the ids around each clip's rows (Music Flamingo, AF-Next)
    sound_eos: int | None = None
    time_embedding: bool = False  # rotary time embedding inside the encoder graph (input `audio_times`)

    @property
    def max_samples(self) -> int:
        return self.max_windows * N_SAMPLES

    @property
    def max_seconds(self) -> int:
        return self.max_windows * CHUNK_SECONDS

    @property
    def around(self) -> tuple[int, int] | None:
        """(before, after) token ids of every clip's rows, or None (AF3)."""
        return None if self.sound_bos is None else (self.sound_bos, self.sound_eos)

    @property
    def n_ctx(self) -> int:
        """The default context: the longest clip's rows plus AF3's room for the prompt and an answer
        (16 384 for AF3's 15 000 rows), in multiples of 1024: Music Flamingo 31 744, AF-Next 47 104."""
        need = self.max_windows * ROWS_PER_WINDOW + (DEFAULT_N_CTX - MAX_WINDOWS * ROWS_PER_WINDOW)
        return -(-need // 1024) * 1024

    def encoder_engine(self, asked: str | None) -> str | None:
        """The encoder engine to ask for: the rows' times are an input ONNX Runtime's engines take
        (CPU, and CUDA with bound buffers and CUDA graphs), so a time-embedding model runs there
        (TensorRT and torch are refused; none asked: ONNX Runtime CUDA where it works, else CPU)."""
        from .engines.select import TIMED_ENGINES

        if not self.time_embedding:
            return asked
        if asked not in (None, *TIMED_ENGINES):
            from .errors import OptionsError

            raise OptionsError(
                f"{self.name}'s encoder (rotary time embedding) runs on {' or '.join(TIMED_ENGINES)}, not {asked}"
            )
        return asked

    def to_manifest(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Family:
        """The manifest's `family` (bundles from before it: AF3)."""
        entry = manifest.get("family") or {}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in known})  # fields of a newer exporter: left out

    @classmethod
    def from_checkpoint(cls, path: Path, cfg: dict) -> Family:
        """From config.json (`cfg`) and processor_config.json's max_audio_len."""
        kind = cfg["model_type"]
        seconds = MAX_AUDIO_LEN[kind]
        proc = Path(path) / "processor_config.json"
        if proc.is_file():
            seconds = int(json.loads(proc.read_text()).get("max_audio_len", seconds))
        windows = max(1, seconds // CHUNK_SECONDS)
        if kind == "audioflamingo3":
            return cls(max_windows=windows)
        step = float(cfg.get("audio_frame_step", FRAME_STEP))
        if abs(step - FRAME_STEP) > 1e-12:  # row_times and the features assume 10 ms frames
            from .errors import CheckpointError

            raise CheckpointError(f"{path}: audio_frame_step {step} s; edge-af3 reads 10 ms frames (hop 160 at 16 kHz)")
        text = cfg.get("text_config") or {}
        theta = (text.get("rope_parameters") or {}).get("rope_theta") or text.get("rope_theta") or 0
        # both publish model type musicflamingo: AF-Next reads 30 minutes over a long-context Qwen2
        name = "AF-Next" if windows >= 60 or float(theta) > 1e7 else "Music Flamingo"
        return cls(
            model_type=kind,
            name=name,
            max_windows=windows,
            sound_bos=int(cfg.get("audio_bos_token_id", 151670)),
            sound_eos=int(cfg.get("audio_eos_token_id", 151671)),
            time_embedding=True,
        )


def row_times(first_window: int, windows: int, rows: int = ROWS_PER_WINDOW) -> np.ndarray:
    """[windows, rows] float32 seconds from the clip's start of the rows of windows first_window..,
    computed in float32 as transformers does (window index x 750 x 0.04 + row x 0.04)."""
    w = (np.arange(first_window, first_window + windows, dtype=np.int64) * ROWS_PER_WINDOW).astype(np.float32)
    step = np.float32(ROW_STEP)
    return (w[:, None] * step + np.arange(rows, dtype=np.float32)[None, :] * step).astype(np.float32)


def pooled_rows(frames: int) -> int:
    """Rows the encoder gives for `frames` input frames (padded ones included)."""
    return ((frames - 1) // 2 + 1) // 2
