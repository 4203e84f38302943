"""Spoken answers beside the LLM, on this machine: each voice speaking a streamed answer while the
model writes it (the two share the CPU, as they do on a device).

The LLM runs for real (bench-small by default: random weights at a small real shape; speed does
not depend on weight values), but random weights write random tokens, so each token the stream
gives is replaced by the next word of a fixed English answer: the voice speaks real sentences at
the pace and CPU load of real generation. Per voice:

- first token -> first audio sample (ms): the goal is 300 ms;
- a 5 s spoken question handed over -> the first spoken sample (ms), and the first token;
- synthesis real-time factor while the LLM decodes, and alone;
- gaps a real-time listener hears between sentences (count, longest; the goal is none);
- barge-in -> silence: `Player.stop()` until PortAudio is silent, on a PulseAudio null sink.

    python -m benchmarks.bench_voice [--shape bench-small] [--voices piper espeak-ng] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, machine

ANSWER = (
    "The clip opens with a man speaking in a calm voice. He asks for the time, and a woman answers "
    "that it is half past three. Behind them, a kettle starts to whistle. A door closes at the end, "
    "and the room goes quiet. The speech is clear, the accent is American, and the recording sounds "
    "like it was made indoors on a phone."
).split()


def question_clip(seconds: float = 5.0) -> tuple[np.ndarray, int]:
    """A spoken question of about `seconds` (espeak-ng), padded or cut to that length at 16 kHz."""
    from edge_af3.audio import load_audio

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "q.wav"
        text = "Could you listen to this recording and tell me what is going on in the room, please?"
        subprocess.run(["espeak-ng", "-w", str(wav), "-s", "150", text], check=True)
        x = load_audio(str(wav)).samples
    n = int(seconds * 16000)
    return np.pad(x, (0, max(0, n - x.shape[0])))[:n], 16000


def spoken_run(model, voice, clip, new_tokens: int) -> dict:
    from edge_af3.voice import Speaker

    speaker = Speaker(voice)
    words = iter(ANSWER * 4)
    t0 = time.perf_counter()
    stream = model.stream("What is going on?", clip, max_new_tokens=new_tokens, ignore_eos=True, temperature=0)
    t_first_token = None
    chunks = []
    done = threading.Event()

    def drain():
        for c in speaker:
            chunks.append(c)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    for _piece in stream:
        if t_first_token is None:
            t_first_token = time.perf_counter()
        speaker.feed(next(words) + " ")
    speaker.finish()
    done.wait()
    s = speaker.stats()
    return {
        "question_to_first_token_ms": (t_first_token - t0) * 1000,
        "question_to_first_audio_ms": (speaker.t_first_audio - t0) * 1000,
        "first_token_to_first_audio_ms": (speaker.t_first_audio - t_first_token) * 1000,
        "rtf_beside_llm": s["real_time_factor"],
        "audio_s": s["audio_s"],
        "sentences": s["sentences"],
        "gaps": len(s["gaps_s"]),
        "longest_gap_s": max(s["gaps_s"], default=0.0),
        "decode_tok_s": stream.answer.timings.decode_tokens_per_s,
    }


def alone_rtf(voice) -> float:
    t0, audio = time.perf_counter(), 0.0
    from edge_af3.voice.sentences import split_sentences

    for sentence in split_sentences(" ".join(ANSWER)):
        for samples, rate in voice.speak(sentence):
            audio += samples.shape[0] / rate
    return (time.perf_counter() - t0) / audio


def barge_in_ms(runs: int = 5) -> dict | str:
    """Player.stop() during playback -> play() returned with the stream aborted, on a private
    PulseAudio null sink (what a real card's driver does after abort is its own latency)."""
    exe = shutil.which("pulseaudio")
    if not exe:
        return "pulseaudio not installed"
    runtime = Path(tempfile.mkdtemp(prefix="bench-voice-xdg-"))
    runtime.chmod(0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    daemon = [exe, "--daemonize=yes", "--exit-idle-time=-1", "-n", "--load=module-null-sink sink_name=bench"]
    subprocess.run([*daemon, "--load=module-native-protocol-unix"], env=env, check=True, capture_output=True)
    code = r"""
import json, sys, threading, time
import numpy as np
from edge_af3.voice import Chunk
from edge_af3.voice.output import Player
out = []
for _ in range(int(sys.argv[1])):
    p = Player("pulse")
    chunk = Chunk((0.1 * np.sin(np.arange(22050 * 5) / 10)).astype(np.float32), 22050, "", time.perf_counter())
    t = threading.Thread(target=p.play, args=([chunk],))
    t.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    p.stop()
    t.join()
    out.append((time.perf_counter() - t0) * 1000)
print(json.dumps(out))
"""
    try:
        res = subprocess.run([sys.executable, "-c", code, str(runs)], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            return f"failed: {res.stderr.strip()[-300:]}"
        ms = json.loads(res.stdout.strip().splitlines()[-1])
        return {"median_ms": float(np.median(ms)), "max_ms": float(np.max(ms)), "runs": len(ms)}
    finally:
        subprocess.run([exe, "--kill"], env=env, capture_output=True)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"### Spoken answers, {report['shape']} LLM ({m['cores']} cores of {m['cpu']}; {report['when']}; "
        f"medians of {report['runs']} answers of {report['new_tokens']} tokens)",
        "",
        "| voice | first token -> first audio (ms) | 5 s question -> first token (ms) | -> first audio (ms) "
        "| RTF beside the LLM | RTF alone | gaps (longest s) | decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["voices"].items():
        lines.append(
            f"| {name} | {v['first_token_to_first_audio_ms']:.0f} | {v['question_to_first_token_ms']:.0f} "
            f"| {v['question_to_first_audio_ms']:.0f} | {v['rtf_beside_llm']:.3f} | {v['rtf_alone']:.3f} "
            f"| {v['gaps']:.0f} ({v['longest_gap_s']:.2f}) | {v['decode_tok_s']:.1f} |"
        )
    b = report["barge_in"]
    lines += [
        "",
        "Barge-in -> silence (Player.stop() until the PortAudio stream is aborted, PulseAudio null sink): "
        + (f"median {b['median_ms']:.1f} ms, max {b['max_ms']:.1f} ms over {b['runs']}" if isinstance(b, dict) else b),
        "",
        "Goal: first token -> first audio <= 300 ms; no gaps. The LLM's tokens are replaced by the words of a fixed "
        "English answer (random weights write random tokens); the LLM still decodes for real beside the voice.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--voices", nargs="+", default=["piper", "espeak-ng"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from edge_af3 import AF3
    from edge_af3.reference.vocab import cache_dir
    from edge_af3.voice import open_voice

    from .suite import prepare

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    _, bundle = prepare(args.shape, "auto", work, verify=False, mmproj=False, encoder_precision="auto")
    clip = question_clip()
    voices = {}
    with AF3.load(bundle) as model:
        model.ask("warm-up", None, max_new_tokens=2)
        for spec in args.voices:
            voice = open_voice(spec)
            try:
                list(voice.speak("Ready."))  # the engine's start-up, as the CLI pays it while the model loads
                runs = []
                for i in range(args.runs):
                    model.forget()  # each question's clip is new to the caches
                    x = clip[0] + np.float32(1e-4 * (i + 1))
                    runs.append(spoken_run(model, voice, (x, clip[1]), args.new_tokens))
                    print(spec, json.dumps(runs[-1]), flush=True)
                med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
                med["rtf_alone"] = alone_rtf(voice)
                voices[voice.name] = med | {"raw": runs}
            finally:
                voice.close()
    report = {
        "benchmark": "voice",
        "shape": args.shape,
        "when": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "voices": voices,
        "barge_in": barge_in_ms(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"voice-{args.shape}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
