"""Features, masks and token counts against transformers' AF3 processor (the reference)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from edge_af3.audio import load_audio
from edge_af3.features import AudioTooLongWarning, extract_features, mel_filters, token_count
from edge_af3.reference.loader import reference_features

from .conftest import noise, sweep

TOL = 1e-4  # max abs difference on the normalised log-mel


def compare(reference, samples: np.ndarray):
    ref_feats, ref_mask, ref_tokens = reference_features(reference.processor, samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AudioTooLongWarning)
        ours = extract_features((samples, 16000))
    assert ours.features.shape == ref_feats.shape
    assert np.abs(ours.features - ref_feats).max() <= TOL
    np.testing.assert_array_equal(ours.mask, ref_mask)
    assert ours.n_tokens == ref_tokens
    return ours


# Token counts are the AF3 spec's table (0.5 s -> 12, 45 s -> 1125, >= 600 s -> 15000 ...).
@pytest.mark.parametrize(
    "seconds, windows, tokens",
    [
        (0.3, 1, 7),
        (0.5, 1, 12),
        (1, 1, 25),
        (10, 1, 250),
        (29.99, 1, 750),
        (30, 1, 750),
        (30.01, 2, 750),
        (45, 2, 1125),
        (650, 20, 15000),
    ],
)
def test_noise_matches_reference(reference, seconds, windows, tokens):
    ours = compare(reference, noise(seconds, seed=int(seconds * 100)))
    assert ours.windows == windows
    assert ours.n_tokens == tokens == token_count(int(round(seconds * 16000)))


def test_sine_sweep_matches_reference(reference):
    compare(reference, sweep(10.0))


def test_speech_matches_reference(reference, speech_wav):
    from transformers.audio_utils import load_audio as hf_load_audio

    ref = hf_load_audio(str(speech_wav), sampling_rate=16000, backend="soundfile")
    ours = load_audio(speech_wav)
    assert ours.source_rate == 22050
    assert ours.samples.shape == ref.shape
    np.testing.assert_allclose(ours.samples, ref, atol=1e-6)
    compare(reference, ref.astype(np.float32))


def test_real_recording_matches_reference(reference, real_clip):
    from transformers.audio_utils import load_audio as hf_load_audio

    ref = hf_load_audio(str(real_clip), sampling_rate=16000, backend="soundfile")
    ours = load_audio(real_clip)
    assert ours.source_rate == 48000
    np.testing.assert_allclose(ours.samples, ref, atol=1e-6)
    compare(reference, ref.astype(np.float32))


def test_over_600_s_is_cut_with_a_warning():
    with pytest.warns(AudioTooLongWarning, match="600"):
        ours = extract_features((noise(601, seed=3), 16000))
    assert ours.truncated and ours.windows == 20 and ours.seconds == 600.0


def test_silence_and_tiny_clips_are_finite(reference):
    ours = compare(reference, np.zeros(16000, dtype=np.float32))
    assert np.isfinite(ours.features).all()
    ours = compare(reference, noise(1 / 16000, seed=1))  # one sample: one frame, zero tokens
    assert ours.mask.sum() == 1 and ours.n_tokens == 0


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filters(), ref.astype(np.float32), rtol=1e-5, atol=1e-8)


def test_a_30_minute_clip_is_featurised_in_bounded_memory():
    """feature_groups (what the runtime encodes from): AF-Next's 30 minutes, 60 windows, never
    held as features at once (132 MB at peak); each group equals extract_features' windows bit for bit
    (extract_features is checked against the processor above)."""
    import tracemalloc

    from edge_af3.audio import Audio
    from edge_af3.features import feature_groups

    x = noise(1800, seed=18).astype(np.float32)
    clip = Audio(samples=x, source_rate=16000, source_channels=1, limit=x.size)
    tracemalloc.start()
    seen = []
    for first, f in feature_groups(clip, 8):
        seen.append((first, f.features.shape[0]))
        del f
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == [(w, 8) for w in range(0, 56, 8)] + [(56, 4)]
    assert peak < 65e6, peak  # measured 51 MB: a group's features and STFT scratch; all at once: 132 MB
    short = Audio(samples=x[: 95 * 16000], source_rate=16000, source_channels=1)
    whole = extract_features(short)
    parts = list(feature_groups(short, 2))
    assert [first for first, _ in parts] == [0, 2]
    assert np.array_equal(np.concatenate([f.features for _, f in parts]), whole.features)
    assert np.array_equal(np.concatenate([f.mask for _, f in parts]), whole.mask)
    assert sum((f.rows_per_window for _, f in parts), ()) == whole.rows_per_window
