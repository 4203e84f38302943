"""Encoder engines side by side: ms per window at 1 and 20 windows, rows against the reference.

Peers on the same checkpoint and bundle, in one process:
  transformers        the checkpoint's AudioFlamingo3Encoder + projector, its own forward
                      (bf16 eager on CUDA, fp32 on CPU), and on CUDA the same module captured in a
                      torch CUDA graph (the best a PyTorch user gets without TensorRT)
  edge-af3 engines    onnxruntime-cpu, torch-cpu on CPU; torch-cuda (fp16, CUDA graphs),
                      onnxruntime-cuda and tensorrt on CUDA where installed

Parity: each engine's rows for a 45 s clip (a full and a partial window) against the reference in
fp32 (cosine, max abs). Timing: full windows of random features, one warm-up (and capture), then
`--repeats` runs; median ms per run and per window; peak device memory per engine on CUDA.

    python -m benchmarks.bench_encoder --shape bench-small                 # CPU
    python -m benchmarks.bench_encoder --shape full --device cuda          # GPU (scripts/gpu_checks.sh)

Writes benchmarks/results/encoder-<shape>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, cosine, machine

CPU_ENGINES = ("onnxruntime-cpu", "torch-cpu")
CUDA_ENGINES = ("torch-cuda", "onnxruntime-cuda", "tensorrt")


def _time(fn, repeats: int, sync=lambda: None) -> dict:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}


def _reference(ckpt: Path, device: str):
    """(fp32 rows function for parity, timed module call, its dtype name) from the checkpoint."""
    import torch

    from edge_af3.export.onnx_encoder import load_encoder

    wrapper = load_encoder(ckpt).to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timed = load_encoder(ckpt).to(device, dtype) if device == "cuda" else wrapper

    def rows_fp32(feats, mask):
        with torch.inference_mode():
            out = wrapper(torch.from_numpy(feats).to(device), torch.from_numpy(mask).to(device))
        return out.float().cpu().numpy()

    def module(feats_t, mask_t):  # transformers' own forward of the tower, then the projector
        out = timed.tower(feats_t.to(dtype), input_features_mask=mask_t)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return timed.projector(hidden)

    return rows_fp32, module, str(dtype).removeprefix("torch.")


def run(
    shape: str,
    device: str,
    windows: list[int],
    repeats: int,
    work: Path,
    engines: list[str] | None,
    verify: bool = True,
) -> dict:
    import torch

    from edge_af3.bundle import open_bundle
    from edge_af3.engines.select import _build
    from edge_af3.features import extract_features

    from .suite import prepare

    ckpt, bundle_path = prepare(shape, "q4_k_m", work, verify=verify, mmproj=False, encoder_precision="fp32")
    bundle = open_bundle(bundle_path, check_hashes=False)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows_fp32, module, ref_dtype = _reference(ckpt, device)
    feats45 = extract_features(
        ((0.1 * np.random.default_rng(45).standard_normal(45 * 16000)).astype(np.float32), 16000)
    )
    want = rows_fp32(feats45.features, feats45.mask)
    rng = np.random.default_rng(0)
    inputs = {
        w: (rng.standard_normal((w, 128, 3000)).astype(np.float32), np.ones((w, 3000), np.int64)) for w in windows
    }
    report: dict = {
        "benchmark": "encoder",
        "shape": shape,
        "device": device,
        "repeats": repeats,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d"),
        "peers": {},
    }
    if cuda:
        report["gpu"] = torch.cuda.get_device_name()

    # the reference: transformers' forward, eager (and a torch CUDA graph of it on a GPU)
    ref = {}
    for w in windows:
        f, m = (torch.from_numpy(a).to(device) for a in inputs[w])
        with torch.inference_mode():
            ref[f"eager_{w}"] = _time(lambda: module(f, m), repeats, sync)
            if cuda:
                try:  # transformers' mask helpers may sync with the host, which a capture refuses
                    g = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        module(f, m)
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(g):
                        module(f, m)
                    ref[f"graph_{w}"] = _time(g.replay, repeats, sync)
                    del g
                except Exception as e:  # noqa: BLE001 - reported, the eager figure stands
                    ref[f"graph_{w}_error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.synchronize()
    report["peers"][f"transformers {ref_dtype}"] = {"timing": ref}

    for name in engines or (CUDA_ENGINES if cuda else CPU_ENGINES):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            enc = _build(name, bundle, None)
        except Exception as e:  # noqa: BLE001 - an engine that is not installed is reported, not fatal
            report["peers"][name] = {"skipped": f"{type(e).__name__}: {e}"}
            print(f"[{name}] skipped: {e}", flush=True)
            continue
        got = enc.encode(feats45.features, feats45.mask)
        valid = [(w, n) for w, n in enumerate(feats45.rows_per_window)]
        g = np.concatenate([got[w, :n] for w, n in valid])
        r = np.concatenate([want[w, :n] for w, n in valid])
        entry = {"cosine": cosine(g, r), "max_abs": float(np.abs(g - r).max()), "timing": {}}
        for w in windows:
            f, m = inputs[w]
            entry["timing"][str(w)] = _time(lambda e=enc, f=f, m=m: e.encode(f, m), repeats)
        if cuda:
            entry["torch_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        report["peers"][name] = entry
        print(
            f"[{name}] cosine {entry['cosine']:.6f}; "
            + ", ".join(f"{w} win: {entry['timing'][str(w)]['median_ms'] / w:.1f} ms/window" for w in windows),
            flush=True,
        )
        close = getattr(enc, "close", None)
        if close:
            close()
        del enc
    return report


def markdown(report: dict, windows: list[int]) -> str:
    dev = report.get("gpu") or f"{report['machine']['cores']} CPU cores"
    lines = [
        f"### encoder engines, {report['shape']} shape on {report['device']} ({dev}; {report['when']})",
        "",
        "| peer | " + " | ".join(f"ms/window at {w}" for w in windows) + " | cosine vs fp32 reference | max abs |",
        "|---|" + "---|" * (len(windows) + 2),
    ]
    for name, p in report["peers"].items():
        if "skipped" in p:
            lines.append(f"| {name} | skipped: {p['skipped'][:80]} |")
            continue
        t = p["timing"]
        if name.startswith("transformers"):
            for kind in ("eager", "graph"):
                if any(f"{kind}_{w}" in t for w in windows):
                    cells = " | ".join(
                        f"{t[f'{kind}_{w}']['median_ms'] / w:.1f}" if f"{kind}_{w}" in t else "—" for w in windows
                    )
                    lines.append(f"| {name} {kind} | {cells} | (reference) | |")
            continue
        cells = " | ".join(f"{t[str(w)]['median_ms'] / w:.1f}" for w in windows)
        lines.append(f"| {name} | {cells} | {p['cosine']:.6f} | {p['max_abs']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small", choices=["tiny", "bench-small", "full"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 20])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", nargs="+", default=None, choices=CPU_ENGINES + CUDA_ENGINES)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-verify", action="store_true", help="export the bundle without its parity checks")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from edge_af3.reference.vocab import cache_dir

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    report = run(args.shape, args.device, args.windows, args.repeats, work, args.engines, verify=not args.no_verify)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"encoder-{args.shape}-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report, args.windows)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
