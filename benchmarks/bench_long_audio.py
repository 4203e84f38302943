"""Peak memory of long inputs: a 3-hour 8 kHz wav through `features`, `ask` and `listen --file`.

AF3 uses the first 600 s; the runtime reads no more of a file than that, and `listen --file`
streams it block by block. Each command runs in its own process; peak RSS is its VmHWM as the
kernel reports it at exit (GNU time's "Maximum resident set size").

    python -m benchmarks.bench_long_audio [--hours 3] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import save


def peak_rss_mb(cmd: list[str]) -> tuple[float, int, str]:
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return kb / 1024, res.returncode, res.stderr[-400:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=3.0)
    ap.add_argument("--bundle", help="a bundle for `ask` (default: a tiny one made here)")
    args = ap.parse_args(argv)
    if not shutil.which("sox") or not Path("/usr/bin/time").exists():
        sys.exit("needs sox and GNU time (apt-get install sox time)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-long-"))
    try:
        wav = tmp / "long.wav"
        subprocess.run(
            [
                "sox",
                "-n",
                "-r",
                "8000",
                "-c",
                "1",
                "-b",
                "16",
                str(wav),
                "synth",
                str(args.hours * 3600),
                "pinknoise",
                "vol",
                "0.3",
            ],
            check=True,
        )
        bundle = args.bundle
        if bundle is None:
            from edge_af3.export import export
            from edge_af3.reference.tiny import make_checkpoint

            bundle = str(export(make_checkpoint(tmp / "ckpt", shape="tiny"), tmp / "bundle", quant="f32", verify=False))
        py = [sys.executable, "-m", "edge_af3"]
        runs = {
            "features": py + ["features", str(wav), "--json"],
            "ask": py + ["ask", str(wav), "What is it?", "-m", bundle, "-n", "4"],
            "python: import edge_af3 (baseline)": [sys.executable, "-c", "import edge_af3, numpy, soundfile, soxr"],
        }
        rows = {}
        for name, cmd in runs.items():
            mb, rc, tail = peak_rss_mb(cmd)
            rows[name] = {"peak_rss_mb": round(mb, 1), "returncode": rc}
            print(f"{name:40s} peak RSS {mb:8.1f} MB  (exit {rc})")
            if rc:
                print(tail)
        print(
            save(
                "long-audio",
                {"hours": args.hours, "rate": 8000, "file_mb": round(wav.stat().st_size / 2**20, 1), "runs": rows},
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
