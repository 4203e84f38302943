"""Audio in: decode, check, downmix to mono and resample to 16 kHz (numpy + soundfile + soxr).

The steps are the ones transformers' own `load_audio` takes (soundfile decode, average the
channels, soxr "HQ" resampling, length `ceil(n * 16000 / sr)`), so a file gives the reference
the same samples it gives us.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import numpy as np

from .constants import MAX_SAMPLES, SAMPLE_RATE
from .errors import AudioError

AudioSource = Union[str, os.PathLike, bytes, np.ndarray, "Audio", tuple]


class AudioTooLongWarning(UserWarning):
    """The clip is longer than AF3's 10 minutes; only the first 600 s are used."""


# what the longest-reading model (Audio Flamingo Next: 60 windows) takes: for reading a clip before the
# model is known, quietly; the model then cuts it to its own limit and says so (model=None: no warning)
LONGEST = {"limit": 60 * MAX_SAMPLES // 20, "model": None}

MAX_CHANNELS = 32  # a 2-D array is [samples, channels] or, when its first axis is this small, [channels, samples]


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples at 16 kHz, plus where they came from."""

    samples: np.ndarray  # [n] float32
    source_rate: int
    source_channels: int
    name: str = "<array>"
    source_seconds: float | None = None  # the whole source's length (a file is read only up to the limit)
    limit: int = MAX_SAMPLES  # samples the model reads (AF3: 600 s; Music Flamingo 1200 s, AF-Next 1800 s)

    @property
    def truncated(self) -> bool:
        return self.source_seconds is not None and self.source_seconds > self.limit / SAMPLE_RATE + 1e-9

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE


def _check_finite(x: np.ndarray, name: str) -> None:
    if x.size == 0:
        raise AudioError(f"{name}: the audio has no samples")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise AudioError(f"{name}: the audio holds {bad} NaN or infinite sample(s); clean it first")


def samples_first(x: np.ndarray, name: str = "<array>") -> np.ndarray:
    """A 2-D array as [samples, channels]: [n, c] with few channels as it is, [c, n] (channels
    first, as torchaudio and librosa give them) transposed; anything else is refused."""
    if x.ndim != 2:
        return x
    a, b = x.shape
    if b <= MAX_CHANNELS and a > b:
        return x
    if a <= MAX_CHANNELS and b > a:
        return x.T
    raise AudioError(
        f"{name}: cannot tell samples from channels in an array of shape {tuple(x.shape)}; "
        f"pass [samples] or [samples, channels] with at most {MAX_CHANNELS} channels"
    )


def to_mono(x: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] -> [n]: channels are averaged, as librosa and transformers do."""
    if x.ndim == 1:
        return x
    if x.ndim == 2:
        return x.mean(axis=1)
    raise AudioError(f"expected [samples] or [samples, channels], got shape {tuple(x.shape)}")


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (HQ), trimmed/padded to ceil(n * target / rate)."""
    if rate == target:
        return x
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    import soxr

    y = soxr.resample(np.ascontiguousarray(x, dtype=np.float64), rate, target, quality="soxr_hq")
    n = math.ceil(x.shape[0] * target / rate)
    if y.shape[0] > n:
        y = y[:n]
    elif y.shape[0] < n:
        y = np.pad(y, (0, n - y.shape[0]))
    return y


def _check_riff(head: bytes, total: int, name: str) -> None:
    """A WAV whose data chunk claims more bytes than the file holds was cut short: say so.

    libsndfile would quietly return the samples that are there; a truncated upload or copy
    should not pass for a shorter clip.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(head):
        cid, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if cid == b"data":
            if size != 0xFFFFFFFF and pos + 8 + size > total:  # 0xFFFFFFFF: streamed, size unknown
                raise AudioError(
                    f"{name}: truncated WAV (the data chunk declares {size} bytes, the file holds "
                    f"{max(0, total - pos - 8)})"
                )
            return
        pos += 8 + size + (size & 1)


def _decode(data, name: str, limit: int = MAX_SAMPLES) -> tuple[np.ndarray, int, int, float | None]:
    """(samples [n, channels] float64, rate, channels, the source's seconds). Only the first `limit`
    samples' worth are read (the model uses no more): a 3-hour file costs what 10 minutes cost."""
    import soundfile as sf

    if isinstance(data, io.BytesIO):
        _check_riff(data.getvalue()[:65536], len(data.getvalue()), name)
    else:
        with open(data, "rb") as f:
            _check_riff(f.read(65536), os.fstat(f.fileno()).st_size, name)

    try:
        with sf.SoundFile(data) as f:
            rate, total = int(f.samplerate), f.frames
            keep = math.ceil(limit / SAMPLE_RATE * rate) if rate > 0 else -1
            x = f.read(frames=keep if 0 < keep < total else -1, dtype="float64", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:  # LibsndfileError covers most
        if isinstance(data, io.BytesIO):
            data.seek(0)
        why = _reason(e)
        decoded = _decode_av(data, name, why, limit)  # m4a / mp4 / webm / opus ... through FFmpeg (extra `av`)
        if decoded is None:
            raise AudioError(
                f"{name}: not a readable audio file ({why}); for m4a, mp4, webm or opus install the av "
                "extra: pip install 'edge-af3[av]'"
            ) from e
        return decoded
    seconds = total / rate if rate > 0 and total > 0 else None
    return x, rate, int(x.shape[1]), seconds


def _reason(e: BaseException) -> str:
    """libsndfile's own words, without the opened object's repr ("Error opening <_io.BytesIO
    object at 0x...>: ...") that means nothing to the person who sent the audio."""
    why = getattr(e, "error_string", None) or str(e)
    return re.sub(r"^Error opening .*?: ", "", why).strip() or type(e).__name__


def _decode_av(
    data, name: str, first_error, limit: int = MAX_SAMPLES
) -> tuple[np.ndarray, int, int, float | None] | None:
    """What libsndfile cannot read, through PyAV (FFmpeg); None when PyAV is not installed."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(data) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError(f"{name}: the file has no audio stream")
            rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            if rate <= 0:
                raise AudioError(f"{name}: the audio stream has no sample rate")
            keep = math.ceil(limit / SAMPLE_RATE * rate)
            resampler = av.AudioResampler(format="flt", rate=rate)  # packed float32, the stream's layout
            chunks, n = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(-1, len(out.layout.channels))
                    chunks.append(arr)
                    n += arr.shape[0]
                if n >= keep:
                    break
            seconds = float(stream.duration * stream.time_base) if stream.duration else None
    except av.error.FFmpegError as e:
        raise AudioError(f"{name}: not a readable audio file ({first_error}; FFmpeg: {e})") from None
    if not chunks:
        raise AudioError(f"{name}: the audio stream decodes to no samples")
    x = np.concatenate(chunks)[:keep].astype(np.float64)
    return x, rate, int(x.shape[1]), seconds


def _warn_long(label: str, seconds: float, limit: int, model: str | None) -> None:
    if model is None:  # read ahead of the model (LONGEST): the model's own cut warns
        return
    warnings.warn(
        f"{label}: {seconds:.1f} s is longer than {model}'s {limit // SAMPLE_RATE} s; only the "
        f"first {limit // SAMPLE_RATE} s are used",
        AudioTooLongWarning,
        stacklevel=3,
    )


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    *,
    name: str | None = None,
    limit: int = MAX_SAMPLES,
    model: str | None = "AF3",
) -> Audio:
    """Turn a path, raw file bytes, an array (+ its rate) or an `Audio` into 16 kHz mono float32.

    Arrays are [n] or [n, channels]; integer arrays are scaled by their type's full range. Audio
    past `limit` samples (what `model` reads) is cut, with an `AudioTooLongWarning`.
    Raises `AudioError` (a `ValueError`) with the reason for anything unusable.
    """
    if isinstance(source, Audio):  # as it is, cut to `limit` (what it lost to a lower limit stays lost)
        if source.samples.shape[0] > limit:
            _warn_long(source.name, source.source_seconds or source.seconds, limit, model)
            return replace(source, samples=source.samples[:limit], limit=limit)
        return source if source.limit <= limit else replace(source, limit=limit)
    if isinstance(source, tuple) and len(source) == 2:
        source, sample_rate = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise AudioError(f"{label}: no such file")
        if not path.is_file():
            raise AudioError(f"{label}: not a file")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: the file is empty (0 bytes)")
        x, rate, channels, seconds = _decode(str(path), label, limit)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(source) == 0:
            raise AudioError(f"{label}: empty byte string")
        x, rate, channels, seconds = _decode(io.BytesIO(bytes(source)), label, limit)
    elif isinstance(source, np.ndarray):
        label = name or "<array>"
        if sample_rate is None:
            raise AudioError(f"{label}: an array needs its sample rate, e.g. (array, 16000)")
        x = source
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            x = (x.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
        elif not np.issubdtype(x.dtype, np.floating):
            raise AudioError(f"{label}: unsupported sample type {x.dtype}")
        rate = int(sample_rate)
        x = samples_first(x, label)
        channels = 1 if x.ndim == 1 else int(x.shape[1])
        seconds = x.shape[0] / rate if rate > 0 else None
    else:
        raise AudioError(f"unsupported audio input of type {type(source).__name__}")

    x = np.asarray(x)
    _check_finite(x, label)
    mono = x[:, 0] if x.ndim == 2 and x.shape[1] == 1 else to_mono(x)  # one channel: a view, no copy
    del x
    if rate < 1000:
        raise AudioError(f"{label}: sample rate {rate} Hz is not a real audio rate")
    if seconds is not None and seconds * SAMPLE_RATE > limit:
        _warn_long(label, seconds, limit, model)
        mono = mono[: math.ceil(limit / SAMPLE_RATE * rate)]
    out = resample(mono, rate)
    del mono
    out = out.astype(np.float32)[:limit]
    _check_finite(out, label)
    return Audio(
        samples=out, source_rate=rate, source_channels=channels, name=label, source_seconds=seconds, limit=limit
    )


def stream_file(path: str | os.PathLike, block: int = 16000) -> Iterator[np.ndarray]:
    """A file as 16 kHz mono float32 blocks of about `block` samples, decoded and resampled
    incrementally (soxr's streaming resampler): memory stays flat whatever the file's length."""
    import soundfile as sf
    import soxr

    label = str(path)
    if not Path(path).is_file():
        raise AudioError(f"{label}: no such file")
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{label}: not a readable audio file ({e})") from e
    with f:
        rate = int(f.samplerate)
        if rate < 1000:
            raise AudioError(f"{label}: sample rate {rate} Hz is not a real audio rate")
        rs = (
            soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float64", quality="soxr_hq")
            if rate != SAMPLE_RATE
            else None
        )
        n_in = max(1, math.ceil(block * rate / SAMPLE_RATE))
        while True:
            x = f.read(frames=n_in, dtype="float64", always_2d=True)
            last = x.shape[0] < n_in
            _check_finite(x, label) if x.size else None
            mono = x.mean(axis=1)
            y = rs.resample_chunk(mono, last=last) if rs is not None else mono
            if y.size:
                yield y.astype(np.float32)
            if last:
                return
