"""Export cost: wall time per stage and peak RSS of `make-tiny` and `export` for each shape.

Each step runs in its own child process so its peak RSS is its own (os.wait4's ru_maxrss).

    python -m benchmarks.bench_export [--shapes tiny bench-small full] [--quant q4_k_m] [--work DIR]

`full` writes a 16 GB checkpoint and a 15 GB F16 intermediate: it needs ~40 GB free in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import save

_CHILD = r"""
import json, sys, time
from pathlib import Path
step, shape, src, out, quant = sys.argv[1:6]
marks = []
t0 = time.perf_counter()
def note(msg):
    marks.append((round(time.perf_counter() - t0, 2), msg))
if step == "make":
    from edge_af3.reference.tiny import make_checkpoint
    make_checkpoint(out, shape=shape, seed=0)
    info = {}
else:
    from edge_af3.export import export
    b = export(src, out, quant=quant, mmproj=True, progress=note)
    m = json.loads((Path(b) / "manifest.json").read_text())
    info = {"verification": m["verification"], "bytes": {k: v["bytes"] for k, v in m["files"].items()}}
note("done")
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "stages": marks, **info}))
"""


def run_child(*args: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} {args[1]} failed with exit code {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return res


def stage_seconds(marks: list) -> dict:
    """Seconds spent in each progress stage (a stage lasts until the next message)."""
    return {msg: round(marks[i + 1][0] - t, 2) for i, (t, msg) in enumerate(marks[:-1])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "bench-small"])
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "edge-af3-bench-export")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and bundles")
    args = ap.parse_args(argv)
    results = {}
    for shape in args.shapes:
        work = args.work / shape
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        ckpt, bundle = work / "ckpt", work / "bundle"
        print(f"[{shape}] make-tiny ...", flush=True)
        made = run_child("make", shape, "-", str(ckpt), "-")
        print(f"[{shape}] make-tiny {made['seconds']:.1f} s, peak RSS {made['peak_rss_mb']:.0f} MB", flush=True)
        print(f"[{shape}] export --quant {args.quant} --mmproj ...", flush=True)
        exp = run_child("export", shape, str(ckpt), str(bundle), args.quant)
        exp["stages"] = stage_seconds(exp["stages"])
        results[shape] = {
            "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
            "make": {"seconds": made["seconds"], "peak_rss_mb": made["peak_rss_mb"]},
            "export": exp,
        }
        print(f"[{shape}] export {exp['seconds']:.1f} s, peak RSS {exp['peak_rss_mb']:.0f} MB", flush=True)
        for stage, s in exp["stages"].items():
            print(f"    {s:8.1f} s  {stage}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    name = "export" if set(args.shapes) != {"full"} else "export-full"
    path = save(
        name, {"benchmark": "export", "quant": args.quant, "when": time.strftime("%Y-%m-%d"), "results": results}
    )
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
