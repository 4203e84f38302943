"""Timing helpers shared by the benchmarks: warm-up excluded, median and spread reported."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def measure(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status in MB (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident set now (/proc's VmRSS; NaN where there is no /proc)."""
    now = _status_mb("VmRSS")
    return float("nan") if now is None else now


def peak_rss_mb() -> float:
    """This process's peak RSS. /proc's VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's peak into a spawned child."""
    peak = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak


def gpu_process_mb(pid: int | None = None) -> float | None:
    """Device memory this process holds now, as nvidia-smi reports it (CUDA context, llama.cpp
    buffers, graph pools and all); None when nvidia-smi cannot tell (Jetson: use tegrastats)."""
    import os
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    pid = pid or os.getpid()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def json_child(code: str, args: list[str], *, env: dict, cwd: Path, what: str) -> dict:
    """Run `python -c code ARGS` in `cwd` with `env`; the JSON on its last line of stdout, or a
    RuntimeError naming `what` with the end of its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """The machine a figure belongs to: the CPU by name and by the instruction sets that decide
    llama.cpp's and ONNX Runtime's kernels, and what the installed llama.cpp was built with."""
    import os

    from edge_af3.cpu_features import llama_system_info, read_cpu

    cpu = read_cpu()
    try:
        llama = llama_system_info()
    except Exception as e:  # noqa: BLE001 - a benchmark without llama-cpp-python still reports its machine
        llama = f"unavailable: {e}"
    return {
        "cpu": f"{cpu.name} ({' '.join(cpu.options) or cpu.machine})",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "llama_cpp": llama,
    }


def write_report(report: dict, stem: Path, render: Callable[[dict], str]) -> dict:
    """`report` with its machine as STEM.json, rendered as STEM.md, and printed."""
    report["machine"] = machine()
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return report


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)) + "\n")
    return path
