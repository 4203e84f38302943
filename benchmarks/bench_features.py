"""Feature extraction: edge-af3 (numpy) vs the reference (transformers' WhisperFeatureExtractor
as AF3's processor calls it), on the same 30 s and 600 s clips. Goal: not slower.

    python -m benchmarks.bench_features [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np

from edge_af3.constants import N_SAMPLES
from edge_af3.features import extract_features

from .common import measure, save


def reference_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    fe = reference_extractor()
    rows = {}
    print(f"{'clip':>6} {'edge-af3 ms':>14} {'reference ms':>14} {'ratio (ref/ours)':>17}")
    for seconds in (30, 600):
        x = (0.1 * np.random.default_rng(seconds).standard_normal(seconds * 16000)).astype(np.float32)
        chunks = [x[i : i + N_SAMPLES] for i in range(0, len(x), N_SAMPLES)]  # what the AF3 processor hands over

        def ref():
            return fe(chunks, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")

        ours = measure(lambda: extract_features((x, 16000)), repeats=args.repeats)
        theirs = measure(ref, repeats=args.repeats)
        ratio = theirs.median_ms / ours.median_ms
        rows[f"{seconds}s"] = {"edge_af3": ours, "reference": theirs, "speedup": round(ratio, 2)}
        print(
            f"{seconds:>5}s {ours.median_ms:>8.1f} ±{(ours.max_ms - ours.min_ms) / 2:<5.1f}"
            f"{theirs.median_ms:>8.1f} ±{(theirs.max_ms - theirs.min_ms) / 2:<5.1f} {ratio:>16.2f}x"
        )
    path = save("features", {"benchmark": "features", "results": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
