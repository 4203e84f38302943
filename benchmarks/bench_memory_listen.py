"""The audio memory on this machine (bench-small by default: random weights at a small real
shape; speed does not depend on weight values). Noise is fed as fast as the memory takes it and
each window's work is timed, so real time is not needed to know whether it keeps up:

- the tail policy over the first minutes: re-encoded every 10 s vs held until full;
- a 10-minute memory filling up: work per window at minute 1, 2, 5, 10 (each window's prefill
  attends to every window before it), then question TTFT with 10 minutes in memory vs the same
  question with no audio (goal <= 1.2x) vs asking the same 10 minutes cold;
- a synthetic hour on a memory of --hour-memory minutes (2: an hour of a 10-minute memory takes
  ~2 hours on 2 cores): work per window at minute 1, 10, 60 (goal: flat within 10 % once full),
  real-time factor, RSS (goal: flat), and the drift of the shifted KV after 1, 5 and 20
  evictions: top-1 agreement and KL of the next-token distribution at the end of 8 questions,
  memory vs a cold prefill of the same remaining windows (random weights: a measure of the
  mechanism, not of answer quality);
- exact mode: how long a re-prefill after an eviction takes to swap in.

    python -m benchmarks.bench_memory_listen [--shape bench-small] [--minutes 60] [--hour-memory 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, rss_mb, write_report

RATE = 16000
QUESTIONS = [
    "What do you hear?",
    "Is anyone speaking?",
    "Describe the sounds in order.",
    "What happened at the end?",
    "Is there music?",
    "How many people are there?",
    "Where was this recorded?",
    "What is the mood?",
]


def stream_of_noise(seconds: float, seed: int, block_s: float = 1.0):
    rng = np.random.default_rng(seed)
    for _ in range(int(seconds / block_s)):
        yield (0.1 * rng.standard_normal(int(block_s * RATE))).astype(np.float32)


def run_memory(mem, seconds: float, seed: int, on_window=None) -> dict:
    """Feed `seconds` of noise; the work per window index (its tails, the full window, the
    eviction and prefill that came with it) and RSS after each full window."""
    work: dict[int, float] = {}
    rss = []
    for block in stream_of_noise(seconds, seed):
        for heard in mem.windower.push(block):
            t0 = time.perf_counter()
            mem.add(heard)
            work[heard.index] = work.get(heard.index, 0.0) + (time.perf_counter() - t0) * 1000
            if heard.full:
                rss.append(rss_mb())
                if on_window:
                    on_window(heard.index)
    return {"work_ms": work, "rss_mb": rss}


def at_minute(work: dict[int, float], minute: float) -> float:
    """Median work of the 3 windows ending at `minute`."""
    last = int(minute * 2) - 1
    return float(np.median([work[i] for i in range(max(0, last - 2), last + 1) if i in work]))


def drift(mem) -> dict:
    """Memory (shifted KV) vs a cold prefill of the same windows, at the end of each question."""
    lo, hi = mem.span()[0][0], mem.span()[-1][1]
    agree, kls = 0, []
    for q in QUESTIONS:
        a = mem.logits(q).astype(np.float64)
        b = mem.logits(q, at=(lo, hi)).astype(np.float64)
        pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
        pa, pb = pa / pa.sum(), pb / pb.sum()
        agree += int(a.argmax() == b.argmax())
        kls.append(float(np.sum(pb * (np.log(pb + 1e-30) - np.log(pa + 1e-30)))))
    return {"evictions": mem.stats.evicted, "top1_agreement": agree / len(QUESTIONS), "kl_mean": float(np.mean(kls))}


def ttft(fn) -> float:
    return fn().timings.first_token_ms


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--minutes", type=float, default=60, help="the synthetic hour")
    ap.add_argument("--hour-memory", type=float, default=2, help="minutes the hour's memory holds")
    ap.add_argument("--fill-minutes", type=float, default=10, help="the memory filled for the question TTFT")
    ap.add_argument("--exact-minutes", type=float, default=5)
    ap.add_argument("--policy-minutes", type=float, default=2)
    ap.add_argument(
        "--hour-tail-every", type=float, default=0, help="the hour's tail policy (0: held until full, the cheapest)"
    )
    ap.add_argument(
        "--ttft-only", action="store_true", help="only the 10-minute fill and the question TTFT (memory-ttft-SHAPE.md)"
    )
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "epyc-zen3-avx2")
    args = ap.parse_args(argv)

    from edge_af3 import AF3
    from edge_af3.reference.vocab import cache_dir

    from .suite import prepare

    work_dir = args.work or cache_dir() / "bench"
    work_dir.mkdir(parents=True, exist_ok=True)
    _, bundle = prepare(args.shape, "auto", work_dir, verify=False, mmproj=False, encoder_precision="auto")
    report: dict = {"benchmark": "memory-listen", "shape": args.shape, "when": time.strftime("%Y-%m-%d")}
    with AF3.load(bundle, n_seq=3) as model:
        model.ask("warm-up", None, max_new_tokens=2)
        report["settings"] = {"flash_attn": model.settings.flash_attn, "kv": model.settings.kv_type}
        # the tail policy, over the first minutes
        policy = {}
        for name, every in () if args.ttft_only else (("tail every 10 s", 10.0), ("tail held until full", None)):
            with model.memory(600, tail_every=every) as mem:
                t0 = time.perf_counter()
                got = run_memory(mem, args.policy_minutes * 60, seed=1)
                policy[name] = {
                    "work_per_window_ms": float(np.median(list(got["work_ms"].values()))),
                    "real_time_factor": (time.perf_counter() - t0) / (args.policy_minutes * 60),
                }
            print(name, json.dumps(policy[name]), flush=True)
        report["tail_policy"] = policy

        # a 10-minute memory filled: the work per window as it fills, then a question on it
        ttfts = {}
        with model.memory(600, tail_every=None) as mem:
            fill = run_memory(mem, args.fill_minutes * 60, seed=2)
            ttfts["memory_10min"] = [ttft(lambda q=q: mem.ask(q, max_new_tokens=4)) for q in QUESTIONS[:3]]
        ttfts["no_audio"] = [ttft(lambda q=q: model.ask(q, None, max_new_tokens=4)) for q in QUESTIONS[3:6]]
        cold = np.concatenate(list(stream_of_noise(args.fill_minutes * 60, seed=3)))  # new samples: nothing cached
        ttfts["cold_10min"] = [ttft(lambda: model.ask(QUESTIONS[6], (cold, RATE), max_new_tokens=4))]
        report["question_ttft_ms"] = {k: float(np.median(v)) for k, v in ttfts.items()}
        report["fill"] = {
            "minutes": args.fill_minutes,
            "work_per_window_ms": {
                str(m): at_minute(fill["work_ms"], m) for m in (1, 2, 5, 10) if m <= args.fill_minutes
            },
        }
        print("fill", json.dumps(report["fill"]), json.dumps(report["question_ttft_ms"]), flush=True)
        if args.ttft_only:
            return write_report(report, args.out / f"memory-ttft-{args.shape}", ttft_markdown)

        # the hour, on a memory of --hour-memory minutes (steady state once full)
        with model.memory(args.hour_memory * 60, tail_every=args.hour_tail_every or None) as mem:
            drifts = []

            def on_window(index: int) -> None:
                if mem.stats.evicted in (1, 5, 20) and mem.stats.evicted not in [d["evictions"] for d in drifts]:
                    drifts.append(drift(mem))
                    print("drift", json.dumps(drifts[-1]), flush=True)
                if index % 20 == 19:
                    print(f"minute {(index + 1) / 2:g}: rss {rss_mb():.0f} MB", flush=True)

            t0 = time.perf_counter()
            hour = run_memory(mem, args.minutes * 60, seed=4, on_window=on_window)
            loop_s = time.perf_counter() - t0
        work = hour["work_ms"]
        report["hour"] = {
            "minutes": args.minutes,
            "memory_minutes": args.hour_memory,
            "tail_every": args.hour_tail_every or None,
            "work_per_window_ms": {str(m): at_minute(work, m) for m in (1, 10, 60) if m <= args.minutes},
            "real_time_factor": sum(work.values()) / 1000 / (args.minutes * 60),
            "loop_s": loop_s,
            "rss_mb": {str(m): hour["rss_mb"][int(m * 2) - 1] for m in (1, 10, 30, 60) if m <= args.minutes},
            "rss_peak_mb": max(hour["rss_mb"]),
        }
        report["drift"] = drifts

        # exact mode
        if args.exact_minutes:
            with model.memory(args.hour_memory * 60, exact=True, tail_every=None) as mem:
                t0 = time.perf_counter()
                run_memory(mem, args.exact_minutes * 60, seed=5)
                mem.wait_exact(timeout=600)
                report["exact"] = {
                    "minutes": args.exact_minutes,
                    "evictions": mem.stats.evicted,
                    "rebuilds_swapped": mem.stats.rebuilds,
                    "rebuild_ms_median": float(np.median(mem.stats.rebuild_ms)) if mem.stats.rebuild_ms else None,
                    "loop_s": time.perf_counter() - t0,
                }
            print("exact", json.dumps(report["exact"]), flush=True)
    return write_report(report, args.out / f"memory-listen-{args.shape}", markdown)


def _fill_table(r: dict) -> list[str]:
    f = r["fill"]["work_per_window_ms"]
    return [
        "| a 10-minute memory filling: work per window | " + " | ".join(f"minute {k}" for k in f) + " |",
        "|---|" + "---:|" * len(f),
        "| ms | " + " | ".join(f"{v:.0f}" for v in f.values()) + " |",
    ]


def _ttft_line(t: dict) -> str:
    return (
        f"- question TTFT: 10 min in memory {t['memory_10min']:.0f} ms, no audio {t['no_audio']:.0f} ms "
        f"({t['memory_10min'] / t['no_audio']:.2f}x, goal <= 1.2x), the same 10 min cold "
        f"{t['cold_10min']:.0f} ms ({t['cold_10min'] / t['memory_10min']:.0f}x the memory's)"
    )


def ttft_markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    head = (
        f"### Audio memory: question TTFT, {r['shape']} ({m['cores']} cores of {m['cpu']}; "
        f"flash attention {'on' if s['flash_attn'] else 'off'}, KV {s['kv']}; {r['when']})"
    )
    return "\n".join([head, "", *_fill_table(r), "", _ttft_line(r["question_ttft_ms"])]) + "\n"


def markdown(r: dict) -> str:
    m, h, t = r["machine"], r["hour"], r["question_ttft_ms"]
    tail = f"every {h['tail_every']:g} s" if h.get("tail_every") else "held until full"
    w = h["work_per_window_ms"]
    lines = [
        f"### Audio memory, {r['shape']} ({m['cores']} cores of {m['cpu']}; {r['when']})",
        "",
        "| work per 30 s window | " + " | ".join(f"minute {k}" for k in w) + " |",
        "|---|" + "---:|" * len(w),
        "| encode + prefill (+ eviction) ms | " + " | ".join(f"{v:.0f}" for v in w.values()) + " |",
        "",
        f"(a memory of {h['memory_minutes']:g} minutes: full from minute {h['memory_minutes']:g} on)",
        "",
        *_fill_table(r),
        "",
        f"- spread minute 1 -> {list(w)[-1]}: {100 * (max(w.values()) / min(w.values()) - 1):.1f} % (goal 10 %)",
        f"- real-time factor of the memory loop: {h['real_time_factor']:.3f} over {h['minutes']:g} minutes "
        f"(tail {tail})",
        "- RSS MB: "
        + ", ".join(f"minute {k}: {v:.0f}" for k, v in h["rss_mb"].items())
        + f"; peak {h['rss_peak_mb']:.0f}",
        _ttft_line(t),
        "",
        "| tail policy | work per window ms | real-time factor |",
        "|---|---:|---:|",
    ]
    for name, p in r["tail_policy"].items():
        lines.append(f"| {name} | {p['work_per_window_ms']:.0f} | {p['real_time_factor']:.3f} |")
    lines += ["", "| evictions | top-1 agreement | mean KL (cold ‖ memory) |", "|---:|---:|---:|"]
    for d in r["drift"]:
        lines.append(f"| {d['evictions']} | {d['top1_agreement']:.2f} | {d['kl_mean']:.4f} |")
    if "exact" in r:
        e = r["exact"]
        med = "n/a" if e["rebuild_ms_median"] is None else f"{e['rebuild_ms_median']:.0f} ms"
        lines += [
            "",
            f"- exact mode over {e['minutes']:g} minutes: {e['evictions']} evictions, {e['rebuilds_swapped']} "
            f"re-prefills swapped in, each {med} from start to swap",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
