"""Memory planned vs measured for one bundle at one context length.

Loads the bundle (`AF3.load(n_ctx=..., device=...)`), asks about a 30 s clip (32 new tokens) and
reports what the process then holds: device memory from nvidia-smi on CUDA (CUDA context,
llama.cpp weights + KV + buffers, the encoder engine's weights and graph pool), peak RSS on CPU;
next to `edge-af3 plan`'s budget for the same bundle, context, KV type and encoder precision.

    python -m benchmarks.bench_memory --bundle ./af3 --n-ctx 8192 --device cuda

Writes benchmarks/results/memory-<bundle>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, gpu_process_mb, machine, peak_rss_mb

GIB = 1 << 30


def measure(bundle: Path, n_ctx: int, device: str, kv_type: str) -> dict:
    from edge_af3 import AF3
    from edge_af3.plan import plan

    clip = ((0.1 * np.random.default_rng(30).standard_normal(30 * 16000)).astype(np.float32), 16000)
    t0 = time.perf_counter()
    with AF3.load(bundle, n_ctx=n_ctx, device=device, kv_type=kv_type, check_hashes=False) as model:
        load_s = time.perf_counter() - t0
        ans = model.ask("Describe it.", clip, max_new_tokens=32, ignore_eos=True)
        measured = gpu_process_mb() if device == "cuda" else None
        engine = model.encoder.name
        precision = getattr(model.encoder, "precision", None)
        windows_per_run = model.windows_per_run
    stored = json.loads((Path(bundle) / "manifest.json").read_text())["encoder"]["precision"]
    # the torch engine says what it runs; ONNX Runtime on the CPU runs the stored precision
    run_as = precision or ("fp16" if engine == "tensorrt" else stored)
    p = plan(bundle, n_ctx=n_ctx, kv_type=kv_type, encoder_precision=run_as, windows_per_run=windows_per_run)
    return {
        "bundle": str(bundle),
        "device": device,
        "n_ctx": n_ctx,
        "kv_type": kv_type,
        "engine": engine,
        "planned_bytes": p["total"],
        "planned_items": p["items"],
        "measured_gpu_mb": measured,
        "peak_rss_mb": peak_rss_mb(),
        "load_s": load_s,
        "ttft_ms": ans.timings.first_token_ms,
        "machine": machine(),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    res = measure(args.bundle, args.n_ctx, args.device, args.kv_type)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory-{args.bundle.name}-{args.device}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    held = res["measured_gpu_mb"] if res["measured_gpu_mb"] is not None else res["peak_rss_mb"]
    what = "GPU memory held" if res["measured_gpu_mb"] is not None else "peak RSS"
    print(
        f"{args.bundle.name} at n_ctx {args.n_ctx}, KV {args.kv_type}, encoder {res['engine']}: "
        f"planned {res['planned_bytes'] / GIB:.2f} GiB ({res['planned_bytes'] / 1e9:.2f} GB), "
        f"{what} {held / 1024:.2f} GiB ({held * 2**20 / 1e9:.2f} GB)"
    )
    return res


if __name__ == "__main__":
    main()
