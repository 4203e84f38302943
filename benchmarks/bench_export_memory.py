"""Export memory, stage by stage: peak RSS (and its anonymous part) of each step of `export`.

    python -m benchmarks.bench_export_memory [--shape full] [--quant q4_k_m] [--label after]
        [--limit-gb 12] [--no-verify] [--work DIR] [--out STEM]

The export runs in a child process; this process watches it from outside (/proc/PID/status every
20 ms, so a stage's figures are the child's own whatever the child's threads do):
- `peak_rss_mb`: the kernel's exact high-water mark (VmHWM), reset at each stage (/proc/PID/clear_refs);
  it counts file pages the child maps (llama.cpp's quantizer maps its whole F16 input), which the
  kernel can drop under pressure,
- `peak_anon_mb`: the largest anonymous part seen (RssAnon: what cannot be dropped without swap),
- `seconds`: wall time of the stage (a stage lasts until the export's next progress message).

`--limit-gb N` also runs the child in a memory cgroup capped at N GiB (cgroup v1 or v2, where this
user may make one): the proof that the export completes on a machine of that size, page cache
counted. Runs are kept by `--label` in STEM.json (before/after side by side), rendered as STEM.md.
The checkpoint is made once in --work and reused (`full`: 16.5 GB, plus a 15 GB F16 intermediate and
an 8.6 GB bundle: ~42 GB free needed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .common import RESULTS, write_report

_CHILD = r"""
import json, sys
from pathlib import Path
src, out, quant, verify = sys.argv[1:5]
from edge_af3.export import export
def note(msg):
    print(json.dumps({"stage": msg}), flush=True)
b = export(src, out, quant=quant, mmproj=True, verify=verify == "1", progress=note, force=True, accept=True)
m = json.loads((Path(b) / "manifest.json").read_text())
print(json.dumps({"result": {"verification": m["verification"], "parity_gate": m["parity_gate"]}}), flush=True)
print(json.dumps({"stage": "done"}), flush=True)
"""


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid` in kB ({} once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to now
    except OSError:
        pass


class Cgroup:
    """A memory cgroup capped at `limit` bytes (v2 where mounted so, else v1), or None where this
    user cannot make one."""

    def __init__(self, limit: int):
        name = f"edge-af3-bench-{os.getpid()}"
        root = Path("/sys/fs/cgroup")
        v2 = (root / "cgroup.controllers").exists()
        if v2 and "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        self.path = root / name if v2 else root / "memory" / name
        self.path.mkdir()
        try:
            (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
            if v2 and (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")  # a cap that swap cannot pass
        except OSError:
            self.path.rmdir()
            raise
        self.peak_file = self.path / ("memory.peak" if v2 else "memory.max_usage_in_bytes")

    @classmethod
    def make(cls, limit: int):
        try:
            return cls(limit)
        except OSError as e:
            print(f"no memory cgroup ({e}): the run is not capped", file=sys.stderr)
            return None

    def join(self) -> None:
        """Move the calling process in (the child, before it execs: all it allocates is counted)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mb(self) -> float | None:
        try:
            return round(int(self.peak_file.read_text()) / 2**20, 1)
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def watch(cmd: list[str], env: dict, cgroup: Cgroup | None, cwd: Path) -> dict:
    """Run the export child, sampling its memory per stage; returns the stages and the exit code."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        preexec_fn=cgroup.join if cgroup else None,
    )
    errors: list[str] = []

    def keep_errors() -> None:  # the child's stderr, echoed, its tail kept for the report
        for line in proc.stderr:
            sys.stderr.write(line)
            errors.append(line)
            del errors[:-20]

    err_thread = threading.Thread(target=keep_errors, daemon=True)
    err_thread.start()
    stages: list[dict] = []
    result: dict = {}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def close_stage() -> None:
        if stages:
            st = stages[-1]
            hwm = _status(proc.pid).get("VmHWM")
            if hwm:
                st["peak_rss_mb"] = max(st["peak_rss_mb"], round(hwm / 1024, 1))
            st["seconds"] = round(time.perf_counter() - st.pop("t"), 2)

    def reader() -> None:
        for line in proc.stdout:
            try:
                doc = json.loads(line)
                if "result" in doc:
                    result.update(doc["result"])
                    continue
                msg = doc["stage"]
            except (ValueError, KeyError, TypeError):
                continue
            with lock:
                close_stage()
                _reset_peak(proc.pid)
                stages.append({"stage": msg, "t": time.perf_counter(), "peak_rss_mb": 0.0, "peak_anon_mb": 0.0})
                print(f"  {time.perf_counter() - t0:8.1f} s  {msg}", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        s = _status(proc.pid)
        with lock:
            if stages and s:
                st = stages[-1]
                st["peak_rss_mb"] = max(st["peak_rss_mb"], round(s.get("VmHWM", 0) / 1024, 1))
                st["peak_anon_mb"] = max(st["peak_anon_mb"], round(s.get("RssAnon", 0) / 1024, 1))
        time.sleep(0.02)
    th.join()
    err_thread.join(timeout=5)
    with lock:
        if stages and "t" in stages[-1]:
            stages[-1]["seconds"] = round(time.perf_counter() - stages[-1].pop("t"), 2)
    out = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "stages": stages} | result
    if proc.returncode:
        out["stderr_tail"] = "".join(errors)[-2000:]
    return out


def summarize(run: dict) -> dict:
    """Peaks over the whole export and over the export without the LLM check (its last stages)."""
    stages = [s for s in run["stages"] if s["stage"] != "done"]
    llm = next((i for i, s in enumerate(stages) if s["stage"].startswith("verifying GGUF logits")), len(stages))
    out = {}
    for key, part in (("all", stages), ("without_llm_check", stages[:llm])):
        out[key] = {
            "peak_rss_mb": max((s["peak_rss_mb"] for s in part), default=0.0),
            "peak_anon_mb": max((s["peak_anon_mb"] for s in part), default=0.0),
        }
    return out


def render(report: dict) -> str:
    runs = report["runs"]
    labels = list(runs)
    lines = [
        f"# Export memory: {report['shape']} shape, {report['quant']}, with verification and mmproj",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores. Peak RSS is the",
        "kernel's high-water mark per stage (file pages llama.cpp maps included); anon is the part that",
        "only swap could free. MB = 2^20 bytes.",
        "",
        "| stage | " + " | ".join(f"{x} RSS / anon MB | {x} s" for x in labels) + " |",
        "|---|" + "---:|---:|" * len(labels),
    ]
    order: list[str] = []
    for run in runs.values():
        for s in run["stages"]:
            if s["stage"] != "done" and s["stage"] not in order:
                order.append(s["stage"])
    for name in order:
        cells = []
        for run in runs.values():
            s = next((x for x in run["stages"] if x["stage"] == name), None)
            cells += [f"{s['peak_rss_mb']:.0f} / {s['peak_anon_mb']:.0f}", f"{s['seconds']:.1f}"] if s else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for label, run in runs.items():
        summ = run["summary"]
        cap = (
            f", capped at {run['limit_gb']} GiB (cgroup peak {run.get('cgroup_peak_mb')} MB)" if run["limit_gb"] else ""
        )
        why = (run.get("stderr_tail") or "").strip().splitlines()[-1:]
        status = "completed" if run["returncode"] == 0 else f"FAILED (exit {run['returncode']}: {''.join(why)})"
        lines.append(
            f"- **{label}** ({run['when']}, {run['commit']}): {status}{cap} in {run['seconds']:.0f} s; peak RSS "
            f"{summ['all']['peak_rss_mb']:.0f} MB (anon {summ['all']['peak_anon_mb']:.0f}); without the LLM check "
            f"{summ['without_llm_check']['peak_rss_mb']:.0f} MB (anon {summ['without_llm_check']['peak_anon_mb']:.0f})"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="full")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--label", default="after", help="name of this run in the report (before, after, ...)")
    ap.add_argument("--limit-gb", type=float, default=None, help="run inside a memory cgroup of this size")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "edge-af3-bench-export")
    ap.add_argument("--out", type=Path, default=None, help="report stem (default results/export-memory-SHAPE-QUANT)")
    ap.add_argument("--tree", type=Path, default=Path.cwd(), help="the edge-af3 source tree whose export runs")
    args = ap.parse_args(argv)
    stem = args.out or RESULTS / f"export-memory-{args.shape}-{args.quant}"
    work = args.work / args.shape
    ckpt, bundle = work / "ckpt", work / "bundle"
    if not (ckpt / "config.json").exists():
        print(f"[{args.shape}] making the random checkpoint in {ckpt} ...", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "edge_af3", "make-tiny", str(ckpt), "--shape", args.shape], check=True, cwd=args.tree
        )
    shutil.rmtree(bundle, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(args.tree.resolve()))
    cgroup = Cgroup.make(int(args.limit_gb * 2**30)) if args.limit_gb else None
    print(f"[{args.shape}] export --quant {args.quant} --mmproj ({args.label}) ...", flush=True)
    try:
        run = watch(
            [sys.executable, "-c", _CHILD, str(ckpt), str(bundle), args.quant, "0" if args.no_verify else "1"],
            env,
            cgroup,
            args.tree.resolve(),  # `python -c` puts its working folder first on sys.path: the tree's code runs
        )
        run["cgroup_peak_mb"] = cgroup.peak_mb() if cgroup else None
    finally:
        if cgroup:
            cgroup.remove()
    commit = subprocess.run(
        ["git", "-C", str(args.tree), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    run |= {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "limit_gb": args.limit_gb if cgroup else None,
        "verify": not args.no_verify,
    }
    run["summary"] = summarize(run)
    shutil.rmtree(bundle, ignore_errors=True)
    old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    report = {
        "benchmark": "export-memory",
        "shape": args.shape,
        "quant": args.quant,
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file()),
        "runs": old.get("runs", {}) | {args.label: run},
    }
    write_report(report, stem, render)
    return report


if __name__ == "__main__":
    main()
