"""Log-mel features, masks and audio-token counts, exactly as AF3's processor makes them (numpy).

A clip is cut into at most 20 contiguous 30 s windows; each window is zero-padded to 480 000
samples *before* the STFT, so every window has 3 000 frames and its own log-mel maximum.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .audio import Audio, AudioSource, AudioTooLongWarning, load_audio  # noqa: F401 (re-exported)
from .constants import (
    DYNAMIC_RANGE,
    HOP_LENGTH,
    LOG_FLOOR,
    MAX_SAMPLES,
    N_FFT,
    N_FRAMES,
    N_MELS,
    N_SAMPLES,
    SAMPLE_RATE,
    rows_for_frames,
)
from .errors import AudioError


@dataclass(frozen=True)
class AudioFeatures:
    """What the encoder needs for one clip."""

    features: np.ndarray  # [W, 128, 3000] float32 log-mel, per-window normalised
    mask: np.ndarray  # [W, 3000] int64, 1 where a frame covers real samples
    rows_per_window: tuple[int, ...]  # encoder rows kept from each window (<= 750)
    seconds: float  # duration used (after the model's cap: AF3 600 s)
    truncated: bool  # True when the clip was cut to the cap

    @property
    def windows(self) -> int:
        return self.features.shape[0]

    @property
    def n_tokens(self) -> int:
        """How many `<sound>` slots this clip fills in the prompt."""
        return sum(self.rows_per_window)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear to 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    mel = hz / f_sp
    high = hz >= min_log_hz
    return np.where(high, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), mel * f_sp)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-normalised triangular filters [201, n_mels] over 0-8 kHz (float32)."""
    n_freqs = N_FFT // 2 + 1
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, n_freqs)
    mel_pts = np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)  # [n_mels + 2] filter edges
    widths = np.diff(hz_pts)
    slopes = hz_pts[None, :] - fft_freqs[:, None]  # [201, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= 2.0 / (hz_pts[2:] - hz_pts[:-2])  # slaney: equal area per filter
    return bank.astype(np.float32)


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    n = np.arange(N_FFT, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)  # periodic Hann


@lru_cache(maxsize=1)
def _mel_filters64_t() -> np.ndarray:
    return np.ascontiguousarray(mel_filters().astype(np.float64).T)  # [128, 201]


FRAMES_PER_TASK = 750  # a window's 3000 frames are cut into 4 tasks so every core has work
WINDOWS_IN_FLIGHT = 4  # bounds the float64 work buffers of a 20-window clip (all at once: ~140 MB)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # numpy's FFT and BLAS calls release the GIL, so threads run the tasks in parallel.
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="edge-af3-mel")


def _mel_power(padded: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """Mel power of frames [start, stop) of one reflect-padded window into out[:, start:stop].

    Computed in float64: the reference (torch, float32) is itself off by up to ~1e-4 in deep
    spectral dips, so the exact value is the surest way to stay within that of it.
    """
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[
        start * HOP_LENGTH : stop * HOP_LENGTH : HOP_LENGTH
    ]
    spec = np.fft.rfft(frames * _hann(), axis=-1)  # [frames, 201]
    power = spec.real * spec.real
    power += spec.imag * spec.imag
    np.matmul(_mel_filters64_t(), power.T, out=out[:, start:stop])  # [128, frames]


def _normalise(mel: np.ndarray, out: np.ndarray) -> None:
    """log10 with a 1e-10 floor, clamp to this window's max - 8, then (x + 4) / 4, into float32."""
    log = np.log10(np.maximum(mel, LOG_FLOOR, out=mel), out=mel)
    np.maximum(log, log.max() - DYNAMIC_RANGE, out=log)  # per-window dynamic range
    log += 4.0
    np.multiply(log, 0.25, out=out, casting="same_kind")


def log_mel(windows: np.ndarray) -> np.ndarray:
    """Zero-padded 30 s windows [W, 480000] -> normalised log-mel [W, 128, 3000] float32.

    Centred STFT (reflect padding), power spectrum, the last frame dropped, Slaney mel, then
    `_normalise`. Work is cut into (window, frame range) tasks on a thread pool.
    """
    pad = N_FFT // 2
    out = np.empty((len(windows), N_MELS, N_FRAMES), dtype=np.float32)
    group = WINDOWS_IN_FLIGHT  # windows whose float64 buffers (~7 MB each) exist at once
    for g in range(0, len(windows), group):
        pending = []
        for w in range(g, min(g + group, len(windows))):
            padded = np.pad(windows[w].astype(np.float64), pad, mode="reflect")
            mel = np.empty((N_MELS, N_FRAMES), dtype=np.float64)
            jobs = [
                _pool().submit(_mel_power, padded, mel, a, min(a + FRAMES_PER_TASK, N_FRAMES))
                for a in range(0, N_FRAMES, FRAMES_PER_TASK)
            ]
            pending.append((w, mel, jobs))
        finals = []
        for w, mel, jobs in pending:
            for job in jobs:
                job.result()
            finals.append(_pool().submit(_normalise, mel, out[w]))
        for job in finals:
            job.result()
    return out


def window_lengths(n_samples: int) -> list[int]:
    """Valid samples in each 30 s window of an n-sample clip (already capped at the model's limit)."""
    n_windows = max(1, math.ceil(n_samples / N_SAMPLES))
    return [min(N_SAMPLES, n_samples - w * N_SAMPLES) for w in range(n_windows)]


def token_count(n_samples: int, limit: int = MAX_SAMPLES) -> int:
    """Audio tokens spent on an n-sample 16 kHz clip (after the model's cap: AF3's 600 s by default)."""
    return sum(rows_for_frames(math.ceil(v / HOP_LENGTH)) for v in window_lengths(min(n_samples, limit)))


def _cut(clip: Audio) -> tuple[np.ndarray, bool]:
    """The samples the model reads (its limit: AF3's 600 s), warning once when cut; and whether
    the source was longer."""
    samples, limit = clip.samples, clip.limit  # the limit of the model it was loaded for (AF3: 600 s)
    if samples.size == 0:
        raise AudioError(f"{clip.name}: the audio has no samples")
    truncated = samples.shape[0] > limit or clip.truncated
    if samples.shape[0] > limit:
        warnings.warn(
            f"{clip.name}: {clip.seconds:.1f} s is longer than the model's {limit // SAMPLE_RATE} s; "
            f"only the first {limit // SAMPLE_RATE} s are used",
            AudioTooLongWarning,
            stacklevel=3,
        )
        samples = samples[:limit]
    return samples, truncated


def _features(samples: np.ndarray, truncated: bool) -> AudioFeatures:
    """The windows of `samples` (starting at a window boundary of the clip)."""
    lengths = window_lengths(samples.shape[0])
    windows = []  # full windows are views of the samples; a partial one is zero-padded before the STFT
    mask = np.zeros((len(lengths), N_FRAMES), dtype=np.int64)
    rows = []
    for w, valid in enumerate(lengths):
        part = samples[w * N_SAMPLES : w * N_SAMPLES + valid]
        windows.append(part if valid == N_SAMPLES else np.pad(part, (0, N_SAMPLES - valid)))
        frames = math.ceil(valid / HOP_LENGTH)
        mask[w, :frames] = 1
        rows.append(rows_for_frames(frames))
    return AudioFeatures(
        features=log_mel(windows),
        mask=mask,
        rows_per_window=tuple(rows),
        seconds=samples.shape[0] / SAMPLE_RATE,
        truncated=truncated,
    )


def extract_features(audio: AudioSource | Audio, sample_rate: int | None = None) -> AudioFeatures:
    """Audio (path, bytes, array + rate, `Audio`) -> `AudioFeatures` for the encoder."""
    clip = audio if isinstance(audio, Audio) else load_audio(audio, sample_rate)
    samples, truncated = _cut(clip)
    assert len(window_lengths(samples.shape[0])) <= clip.limit // N_SAMPLES
    return _features(samples, truncated)


def feature_groups(audio: Audio, windows: int) -> Iterator[tuple[int, AudioFeatures]]:
    """The clip's features `windows` windows at a time, each group with its first window's index:
    the same values as `extract_features` (each window's log-mel is its own), in bounded memory
    (a 30-minute clip's 60 windows peak at 132 MB at once — features and STFT scratch — and at
    51 MB 8 windows at a time, measured with tracemalloc)."""
    samples, truncated = _cut(audio)
    step = max(1, windows) * N_SAMPLES
    for start in range(0, samples.shape[0], step):
        yield start // N_SAMPLES, _features(samples[start : start + step], truncated)
