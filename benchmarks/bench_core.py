"""The runtime core before and after a change, in one run: two source trees of edge-af3 (say, the
commit before a refactor and the working tree) measured alternately on the same bundle, clips and
machine, each in a process of its own.

Per tree: the in-process API's TTFT on a new 5 s and 30 s clip (medians of `--repeats`; the
system prompt's KV kept, the clip's rows not cached), its decode rate over `--new-tokens`
tokens, and `edge-af3 serve --parallel 4` under 1, 4 and 16 concurrent streaming clients (each
with its own 5 s clip): TTFT p50/p95 and aggregate decode rate.

    python -m benchmarks.bench_core --before ../before --after . [--shape bench-small] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, json_child, machine

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from benchmarks.bench_server import PROMPT, _clients, _clip, _messages, _port, _start, _stop, in_process_once
bundle, work, new_tokens, repeats = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from edge_af3 import AF3
out = {"in_process": {}, "server": {}}
with AF3.load(bundle) as m:
    m.ask("warm-up", None, max_new_tokens=2)
    seed = 0
    for seconds in (5.0, 30.0):
        runs = []
        for _ in range(repeats):
            seed += 1
            runs.append(in_process_once(m, _clip(work, 500 + seed, seconds), 8))
        out["in_process"][f"ttft_{seconds:g}s_ms"] = float(np.median([(r["first"] - r["t0"]) * 1000 for r in runs]))
    r = in_process_once(m, _clip(work, 999, 5.0), new_tokens)
    out["in_process"]["decode_tok_s"] = (r["tokens"] - 1) / (r["last"] - r["first"])
port = _port()
url = f"http://127.0.0.1:{port}"
proc = _start([sys.executable, "-m", "edge_af3", "serve", "-m", str(bundle), "--port", str(port), "--parallel", "4",
               "--max-queue", "32"], url + "/health", work / f"core-serve-{port}.log")
try:
    for n in (1, 4, 16):
        reqs = [{"model": "edge-af3", "messages": _messages(_clip(work, 100 * n + i, 5.0), PROMPT)} for i in range(n)]
        s = _clients(url + "/v1", reqs, new_tokens, {"ignore_eos": True})
        out["server"][f"clients_{n}"] = {k: s[k] for k in ("ttft_ms_p50", "ttft_ms_p95", "aggregate_decode_tok_s")}
finally:
    _stop(proc)
print(json.dumps(out))
"""


def run_tree(tree: Path, bundle: Path, work: Path, new_tokens: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    args = [str(bundle), str(work), str(new_tokens), str(repeats)]
    return json_child(CHILD, args, env=env, cwd=tree, what=str(tree))


def _median(rounds: list[dict]) -> dict:
    first = rounds[0]
    return {
        part: {
            k: (
                float(np.median([r[part][k] for r in rounds]))
                if not isinstance(v, dict)
                else {kk: float(np.median([r[part][k][kk] for r in rounds])) for kk in v}
            )
            for k, v in first[part].items()
        }
        for part in first
    }


def markdown(report: dict) -> str:
    b, a = report["before"], report["after"]
    lines = [
        f"### Runtime core before / after, {report['shape']} ({report['machine']['cores']} cores of "
        f"{report['machine']['cpu']}; {report['when']}; medians of {report['rounds']} alternating rounds)",
        "",
        "| measure | before | after | after / before |",
        "|---|---|---|---|",
    ]
    for k in b["in_process"]:
        x, y = b["in_process"][k], a["in_process"][k]
        lines.append(f"| in-process {k} | {x:.1f} | {y:.1f} | {y / x:.3f} |")
    for n in b["server"]:
        for k in b["server"][n]:
            x, y = b["server"][n][k], a["server"][n][k]
            lines.append(f"| server {n} {k} | {x:.1f} | {y:.1f} | {y / x:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="source tree of the baseline")
    ap.add_argument("--after", type=Path, default=Path("."), help="source tree of the change")
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from edge_af3.reference.vocab import cache_dir

    from .suite import prepare

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    _, bundle = prepare(args.shape, "auto", work, verify=False, mmproj=False, encoder_precision="auto")
    got: dict[str, list] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            print(f"round {r + 1}: {name}", flush=True)
            got[name].append(run_tree(getattr(args, name), bundle, work, args.new_tokens, args.repeats))
    report = {
        "benchmark": "core-before-after",
        "shape": args.shape,
        "when": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "rounds": args.rounds,
        "before": _median(got["before"]),
        "after": _median(got["after"]),
        "raw": got,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"core-before-after-{args.shape}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
