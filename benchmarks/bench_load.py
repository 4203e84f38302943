"""Load time of a bundle: first load (every file hashed, then remembered) vs the next ones
(hashes remembered by path, size, mtime and inode) vs `--verify` (hash again).

Each load runs in a fresh process so no page cache effect is hidden in one process; the files
are in the page cache for all of them (the first load is timed after a warm-up read of the files,
so the difference is hashing, not disk).

    python -m benchmarks.bench_load [--shape bench-small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import save

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from edge_af3 import AF3
m = AF3.load(sys.argv[1], n_ctx=2048, check_hashes={"first": None, "next": None, "verify": True}[sys.argv[2]])
t1 = time.perf_counter()
m.close()
print(json.dumps({"load_s": t1 - t0}))
"""


def _load(bundle: Path, mode: str, env: dict) -> float:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["load_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from edge_af3.export import export
    from edge_af3.reference.tiny import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        bundle = export(make_checkpoint(tmp / "ckpt", shape=args.shape), tmp / "bundle", quant="q4_k_m", verify=False)
        size = sum(f.stat().st_size for f in bundle.iterdir())
        for f in bundle.iterdir():
            f.read_bytes()  # into the page cache: what is timed is hashing
        firsts, nexts, verifies = [], [], []
        for i in range(args.repeats):
            env = dict(os.environ, EDGE_AF3_CACHE=str(tmp / f"cache{i}"))  # a cache that has seen nothing
            firsts.append(_load(bundle, "first", env))
            nexts.append(_load(bundle, "next", env))
            verifies.append(_load(bundle, "verify", env))
        row = {
            "bundle_mb": round(size / 2**20, 1),
            "first_load_s": statistics.median(firsts),
            "next_load_s": statistics.median(nexts),
            "verify_load_s": statistics.median(verifies),
            "runs": {"first": firsts, "next": nexts, "verify": verifies},
        }
        print(
            f"{args.shape} bundle {row['bundle_mb']} MB: first load {row['first_load_s']:.2f} s, next "
            f"{row['next_load_s']:.2f} s, --verify {row['verify_load_s']:.2f} s (medians of {args.repeats})"
        )
        print(save(f"load-{args.shape}", {"shape": args.shape, **row}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
