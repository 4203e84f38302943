"""llama.cpp's attention on this CPU: flash attention on vs off as the KV cache fills.

The audio memory asks short questions over up to 15 000 remembered positions, so a question's
cost is no longer the weights alone: each of its ~15 tokens attends to every position. This
fills one sequence with random rows (bench-small by default) and, at each step, times

- prefill of the next 512 rows (what a window's prefill costs at that depth),
- a 15-token question prefilled at the end and removed again (the memory's question),
- one decode step after it (the answer's tokens),

for flash attention on and off, each in a fresh process (RSS after the context is made shows
the compute buffer each needs). Random weights: speed does not depend on their values.

    python -m benchmarks.bench_attention [--shape bench-small] [--fill 15360] [--kv f16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, peak_rss_mb, rss_mb, write_report

QUESTION = "<|im_start|>user\nWhat happened in the last minute?<|im_end|>\n<|im_start|>assistant\n"


def one(gguf: str, flash: bool, fill: int, kv: str, every: int) -> dict:
    """One configuration, in this process."""
    from edge_af3.engines.llamacpp import LlamaEngine

    rss0 = rss_mb()
    llm = LlamaEngine(gguf, n_ctx=fill + 512, n_batch=512, flash_attn=flash, kv_type=kv)
    out: dict = {"flash_attn": flash, "rss_context_mb": rss_mb() - rss0, "points": []}
    question = llm.tokenize(QUESTION)
    rng = np.random.default_rng(0)

    def timed_question() -> tuple[float, float]:
        n0 = llm.n_past
        t0 = time.perf_counter()
        llm.decode_tokens(question)
        t1 = time.perf_counter()
        llm.decode_next(100)
        t2 = time.perf_counter()
        llm.truncate(n0)
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    def point(prefill_ms: float | None) -> None:
        q = [timed_question() for _ in range(3)]
        out["points"].append(
            {
                "kv_positions": llm.n_past,
                "prefill_512_ms": prefill_ms,
                "question_ms": float(np.median([a for a, _ in q])),
                "decode_token_ms": float(np.median([b for _, b in q])),
            }
        )
        print(json.dumps(out["points"][-1]), file=sys.stderr, flush=True)

    point(None)
    while llm.n_past < fill:
        rows = (0.02 * rng.standard_normal((512, llm.n_embd))).astype(np.float32)
        t0 = time.perf_counter()
        llm.decode_embeddings(rows)
        ms = (time.perf_counter() - t0) * 1000
        if llm.n_past % every == 0 or llm.n_past >= fill:
            point(ms)
    out["question_tokens"] = len(question)
    out["peak_rss_mb"] = peak_rss_mb()
    llm.close()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--fill", type=int, default=15360, help="KV positions filled (15 000: a 10-minute memory)")
    ap.add_argument("--every", type=int, default=2560, help="a point every this many positions")
    ap.add_argument("--kv", default="f16", help="the KV cache type of both runs")
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child's configuration
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "epyc-zen3-avx2")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.gguf, args.one == "on", args.fill, args.kv, args.every)))
        return {}

    from edge_af3.bundle import open_bundle
    from edge_af3.reference.vocab import cache_dir

    from .suite import prepare

    work = args.work or cache_dir() / "bench"
    _, bundle_dir = prepare(args.shape, args.quant, work, verify=False, mmproj=False)
    gguf = str(open_bundle(bundle_dir, check_hashes=False).llm)
    report: dict = {"benchmark": "attention", "shape": args.shape, "kv": args.kv, "when": time.strftime("%Y-%m-%d")}
    for flash in ("on", "off"):
        cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--one", flash, "--gguf", gguf]
        cmd += ["--fill", str(args.fill), "--every", str(args.every), "--kv", args.kv]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        report[f"flash_{flash}"] = json.loads(done.stdout.strip().splitlines()[-1])
    return write_report(report, args.out / f"attention-{args.shape}", markdown)


def markdown(r: dict) -> str:
    on, off = r["flash_on"], r["flash_off"]
    lines = [
        f"### llama.cpp attention as the KV fills, {r['shape']} ({r['machine']['cores']} cores of "
        f"{r['machine']['cpu']}; KV {r['kv']}; {r['when']})",
        "",
        f"A {on['question_tokens']}-token question prefilled over the filled positions, one decode step "
        "after it, and the prefill of the next 512 rows; flash attention on vs off (ms).",
        "",
        "| KV positions | question on | question off | decode on | decode off | prefill 512 on | prefill 512 off |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(on["points"], off["points"]):
        pre = [f"{p['prefill_512_ms']:.0f}" if p["prefill_512_ms"] is not None else "-" for p in (a, b)]
        lines.append(
            f"| {a['kv_positions']} | {a['question_ms']:.0f} | {b['question_ms']:.0f} | {a['decode_token_ms']:.1f} "
            f"| {b['decode_token_ms']:.1f} | {pre[0]} | {pre[1]} |"
        )
    lines += [
        "",
        f"- RSS of the context (KV + compute buffers): on {on['rss_context_mb']:.0f} MB, "
        f"off {off['rss_context_mb']:.0f} MB; peak RSS of the run: on {on['peak_rss_mb']:.0f} MB, "
        f"off {off['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
