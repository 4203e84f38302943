"""Audio input: every format the brief lists decodes to 16 kHz mono; bad input gets a clear error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from edge_af3.audio import AudioError, load_audio
from edge_af3.features import extract_features

from .conftest import sweep


def tone(rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([mono * (1 - 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else mono


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav")


def test_text_file_renamed_wav(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(p)


def test_truncated_wav(tmp_path):
    p = tmp_path / "full.wav"
    sf.write(p, tone(16000, 2.0), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(AudioError, match="truncated"):
        load_audio(cut)
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(p.read_bytes()[:30])
    with pytest.raises(AudioError):
        load_audio(header_only)


def test_zero_samples(tmp_path):
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros(0), 16000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(p)
    with pytest.raises(AudioError, match="no samples"):
        load_audio((np.zeros(0, dtype=np.float32), 16000))
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    x = tone(16000).astype(np.float32)
    x[100] = bad
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio((x, 16000))
    p = tmp_path / "bad.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(p)


def test_array_without_rate_and_odd_types():
    with pytest.raises(AudioError, match="sample rate"):
        load_audio(np.zeros(100, dtype=np.float32))
    with pytest.raises(AudioError, match="unsupported"):
        load_audio(12345)
    with pytest.raises(AudioError, match="sample rate"):
        load_audio((np.zeros(100, dtype=np.float32), 10))


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_wav_sample_formats(tmp_path, subtype):
    x = tone(16000)
    p = tmp_path / f"{subtype}.wav"
    sf.write(p, x, 16000, subtype=subtype)
    got = load_audio(p)
    step = {"PCM_U8": 2 / 256, "PCM_16": 2 / 65536}.get(subtype, 1e-6)
    assert got.samples.dtype == np.float32 and got.samples.shape == x.shape
    assert np.abs(got.samples - x).max() <= step


@pytest.mark.parametrize("channels", [2, 6])
def test_multichannel_is_averaged(tmp_path, channels):
    x = tone(16000, channels=channels)
    p = tmp_path / f"{channels}ch.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    got = load_audio(p)
    assert got.source_channels == channels
    np.testing.assert_allclose(got.samples, x.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_resample_like_transformers(tmp_path, rate):
    from transformers.audio_utils import load_audio as hf_load_audio

    x = tone(rate, seconds=1.3)
    p = tmp_path / f"{rate}.wav"
    sf.write(p, x, rate, subtype="FLOAT")
    got = load_audio(p)
    ref = hf_load_audio(str(p), sampling_rate=16000, backend="soundfile")
    assert got.samples.shape[0] == math.ceil(x.shape[0] * 16000 / rate) == ref.shape[0]
    np.testing.assert_allclose(got.samples, ref, atol=1e-6)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_compressed_formats_and_bytes(tmp_path, fmt):
    x = sweep(2.0)
    p = tmp_path / f"clip.{fmt.lower()}"
    sf.write(p, x, 16000, format=fmt)
    from_path = load_audio(p)
    from_bytes = load_audio(p.read_bytes())
    np.testing.assert_array_equal(from_path.samples, from_bytes.samples)
    assert abs(from_path.seconds - 2.0) < 0.1
    assert extract_features(from_path).windows == 1


def test_integer_arrays_are_scaled():
    x = (tone(16000) * 32767).astype(np.int16)
    got = load_audio((x, 16000))
    np.testing.assert_allclose(got.samples, x / 32768.0, atol=1e-6)


def _encode_with_pyav(path, codec: str, fmt: str, rate: int = 48000, seconds: float = 1.5) -> None:
    from fractions import Fraction

    import av

    t = np.arange(int(rate * seconds)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, layout="stereo")
        step = s.codec_context.frame_size or 1024
        data = np.stack([x, x])
        for i in range(0, data.shape[1], step):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, i : i + step]), format="fltp", layout="stereo")
            f.sample_rate, f.pts, f.time_base = rate, i, Fraction(1, rate)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.mark.parametrize("codec, fmt, ext", [("aac", "mp4", "m4a"), ("libopus", "webm", "webm")])
def test_formats_libsndfile_cannot_read_go_through_pyav(tmp_path, codec, fmt, ext):
    from edge_af3.audio import load_audio

    path = tmp_path / f"tone.{ext}"
    _encode_with_pyav(path, codec, fmt)
    for source in (path, path.read_bytes()):  # a file and the bytes a server receives
        a = load_audio(source)
        assert a.source_rate == 48000 and a.source_channels == 2 and abs(a.seconds - 1.5) < 0.05
        spectrum = np.abs(np.fft.rfft(a.samples))
        assert abs(np.argmax(spectrum) * 16000 / a.samples.size - 440) < 5  # the tone, resampled to 16 kHz


def test_without_pyav_the_error_names_the_extra(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "tone.m4a"
    _encode_with_pyav(path, "aac", "mp4")
    code = (
        "import sys\nclass B:\n    def find_spec(self, n, p=None, t=None):\n"
        "        if n.split('.')[0] == 'av': raise ImportError('no av')\n"
        "sys.meta_path.insert(0, B())\nfrom edge_af3.audio import load_audio\ntry:\n    load_audio(sys.argv[1])\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True).stdout
    assert out.startswith("AudioError") and "pip install 'edge-af3[av]'" in out
