"""Serving: `edge-af3 serve` under 1, 4 and 16 concurrent streaming clients, each with its own
5 s clip (so every request encodes), at --parallel 1 and --parallel 4; the in-process API on the
same bundle and requests in the same run; llama-cpp-python's own OpenAI server on the same
GGUF for text-only requests (it has no audio path); and vLLM's CPU build (deploy/vllm/serve-cpu.sh)
on the same checkpoint at its default precision, audio and text, as the scale-out peer.

Reported per run: TTFT p50/p95 (request sent -> first text chunk), aggregate decode rate (decode
tokens of all requests over the time any of them was decoding) and throughput (completion
tokens over the run's wall time). One process at a time owns the cores: the in-process API runs
before any server starts, each server is stopped before the next one starts.

    python -m benchmarks.bench_server [--shape bench-small] [--clients 1 4 16] [--new-tokens 48] [--no-vllm]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .common import RESULTS, machine

PROMPT = "Describe the audio in detail."
TEXT_PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], url: str, log: Path, env: dict | None = None, wait_s: float = 300) -> subprocess.Popen:
    import httpx2 as httpx

    # a process group of its own: vLLM runs its engine in a child process
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not come up")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _clip(work: Path, seed: int, seconds: float) -> Path:
    import soundfile as sf

    path = work / f"serve-clip-{seconds:g}s-{seed}.wav"
    if not path.is_file():
        x = 0.1 * np.random.default_rng(1000 + seed).standard_normal(int(seconds * 16000))
        sf.write(path, x.astype(np.float32), 16000, subtype="FLOAT")
    return path


def _messages(clip: Path | None, text: str) -> list[dict]:
    if clip is None:
        return [{"role": "user", "content": text}]
    data = base64.b64encode(clip.read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _clients(base_url: str, requests: list[dict], new_tokens: int, extra: dict) -> dict:
    """Every request at once (a barrier), streaming; per request: TTFT, tokens, first/last token times."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=1800)
    out: list = [None] * len(requests)
    go = threading.Barrier(len(requests))

    def run(i):
        go.wait()
        t0 = time.perf_counter()
        first = last = None
        n = chunks = 0
        stream = client.chat.completions.create(
            messages=requests[i]["messages"],
            model=requests[i]["model"],
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                chunks += 1
            if ch.usage:
                n = ch.usage.completion_tokens
        out[i] = {"t0": t0, "first": first, "last": last, "tokens": n or chunks}  # llama-cpp-python sends no usage

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(out, time.perf_counter() - t_start)


def _pooled(reps: list[dict]) -> dict:
    """Repeats of one run: TTFT percentiles over every request, rates as the median repeat."""
    ttft = [t for r in reps for t in r["ttft_ms"]]
    med = lambda k: float(np.median([r[k] for r in reps]))  # noqa: E731
    return {
        **reps[0],
        "ttft_ms": ttft,
        "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p95": float(np.percentile(ttft, 95)),
        "aggregate_decode_tok_s": med("aggregate_decode_tok_s"),
        "throughput_tok_s": med("throughput_tok_s"),
        "wall_s": med("wall_s"),
        "repeats": len(reps),
    }


def _summary(runs: list[dict], wall: float) -> dict:
    ttft = [(r["first"] - r["t0"]) * 1000 for r in runs]
    spans = sorted((r["first"], r["last"]) for r in runs)
    busy, end = 0.0, -1e18
    for a, b in spans:  # the union of the decoding intervals
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    decode_tokens = sum(max(0, r["tokens"] - 1) for r in runs)
    return {
        "clients": len(runs),
        "ttft_ms": ttft,
        "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p95": float(np.percentile(ttft, 95)),
        "aggregate_decode_tok_s": decode_tokens / busy if busy > 0 else 0.0,
        "throughput_tok_s": sum(r["tokens"] for r in runs) / wall,
        "completion_tokens": sum(r["tokens"] for r in runs),
        "wall_s": wall,
    }


def in_process_once(model, clip: Path, new_tokens: int) -> dict:
    """One request through `AF3.stream` in this process (a new clip: its rows are not cached; the
    system prompt's KV is kept, as in a server slot)."""
    t0 = time.perf_counter()
    first = last = None
    with model.stream(PROMPT, str(clip), max_new_tokens=new_tokens, temperature=0, ignore_eos=True) as s:
        for _ in s:
            last = time.perf_counter()
            first = first or last
    return {"t0": t0, "first": first, "last": last, "tokens": len(s.answer.tokens)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=8, help="Repeat a run until about this many TTFTs are pooled.")
    ap.add_argument("--quant", default="q4_k_m", help="The bundle's LLM type (export --quant).")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-llama-server", action="store_true", help="Skip llama-cpp-python's server peer.")
    ap.add_argument("--no-vllm", action="store_true", help="Skip vLLM (its CPU venv: scripts/setup_vllm.sh).")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (starts in ~1 min).")
    args = ap.parse_args(argv)
    from edge_af3.reference.vocab import cache_dir

    from .suite import prepare

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = prepare(args.shape, args.quant, work, mmproj=False, verify=False, encoder_precision="fp32")
    gguf = next(bundle.glob("llm-*.gguf"))
    report: dict = {
        "shape": args.shape,
        "quant": args.quant,
        "new_tokens": args.new_tokens,
        "clip_seconds": args.seconds,
        "runs": [],
    }
    seed = iter(range(10_000))
    reps = lambda n: max(1, args.requests // n)  # noqa: E731 - repeats of a run: ~`requests` TTFTs per run
    run = SimpleNamespace(clip=lambda: _clip(work, next(seed), args.seconds), reps=reps, new_tokens=args.new_tokens)
    from edge_af3 import AF3

    model = AF3.load(bundle, n_ctx=args.n_ctx)  # idle (no CPU) while the servers run, except when paired below
    model.ask(PROMPT, str(run.clip()), max_new_tokens=4, temperature=0)  # warm-up
    for parallel in args.parallel:
        port = _port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "edge_af3",
            "serve",
            "-m",
            str(bundle),
            "--port",
            str(port),
            "--parallel",
            str(parallel),
            "--max-queue",
            "64",
            "--n-ctx",
            str(args.n_ctx),
            "--log-level",
            "warning",
        ]
        proc = _start(cmd, url + "/health", work / f"serve-p{parallel}.log")
        try:
            warm = [{"model": "edge-af3", "messages": _messages(run.clip(), PROMPT)}]
            _clients(url + "/v1", warm, 4, {})
            if "in_process" not in report:  # paired: in-process and 1-client server requests taken in turn
                ours, theirs = [], []
                for _ in range(reps(1)):
                    ours.append(in_process_once(model, run.clip(), args.new_tokens))
                    reqs = [{"model": "edge-af3", "messages": _messages(run.clip(), PROMPT)}]
                    theirs.append(_clients(url + "/v1", reqs, args.new_tokens, {"ignore_eos": True}))
                report["in_process"] = _summary(ours, sum(r["last"] - r["t0"] for r in ours))
                served = _pooled(theirs)
                report["paired_ttft_ratio"] = float(
                    np.median([b / a for a, b in zip(report["in_process"]["ttft_ms"], served["ttft_ms"])])
                )
                report["runs"].append({"server": "edge-af3", "parallel": parallel, "audio": True, **served})
                print("in-process", report["in_process"], "\nserver", served, flush=True)
            for n in args.clients:
                if any((r["parallel"], r["clients"], r["audio"]) == (parallel, n, True) for r in report["runs"]):
                    continue  # the paired run above
                _series(report, url, "edge-af3", ("edge-af3", parallel), n, True, {"ignore_eos": True}, run)
            for n in (1, 4):
                _series(report, url, "edge-af3", ("edge-af3", parallel), n, False, {"ignore_eos": True}, run)
        finally:
            _stop(proc)
    model.close()
    if not args.no_llama_server:
        port = _port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--n_ctx",
            str(args.n_ctx),
            "--chat_format",
            "chatml",
            "--n_threads",
            str(os.cpu_count()),
            "--n_threads_batch",
            str(os.cpu_count()),
            "--interrupt_requests",
            "false",
            "--verbose",
            "false",
        ]
        proc = _start(cmd, url + "/v1/models", work / "llama-server.log")
        try:
            _clients(url + "/v1", [{"model": gguf.name, "messages": _messages(None, "warm up")}], 4, {})
            for n in (1, 4):
                _series(report, url, gguf.name, ("llama-cpp-python", 1), n, False, {}, run)
        finally:
            _stop(proc)
    if not args.no_vllm:
        from .vllm_peer import vllm_runs

        vllm_runs(report, ckpt, args, work, run)
    report["goals"] = goals(report)
    report["decode_step_ms"] = decode_steps(gguf)
    name = f"server-{args.shape}-{args.quant}-cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine(), **report}, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return report


def _series(report: dict, url: str, model: str, who: tuple, n: int, audio: bool, extra: dict, run) -> None:
    """n streaming clients at once, repeated until about --requests TTFTs are pooled: each with a
    new clip of its own (audio), or the same n text prompts each repeat (text)."""

    def requests() -> list[dict]:
        if audio:
            return [{"model": model, "messages": _messages(run.clip(), PROMPT)} for _ in range(n)]
        return [{"model": model, "messages": _messages(None, f"{TEXT_PROMPT} ({i})")} for i in range(n)]

    res = _pooled([_clients(url + "/v1", requests(), run.new_tokens, extra) for _ in range(run.reps(n))])
    report["runs"].append({"server": who[0], "parallel": who[1], "audio": audio, **res})
    print(report["runs"][-1], flush=True)


def decode_steps(gguf: Path, batches=(1, 2, 4), steps: int = 30) -> dict:
    """The floor under batched serving: one llama_decode of B sequences' next tokens (+ sampling
    each) at B = 1, 2, 4, on this GGUF, in this process (no server running)."""
    from edge_af3.engines.llamacpp import LlamaEngine, SamplerOptions

    out = {}
    with LlamaEngine(gguf, n_ctx=512, n_seq=max(batches)) as e:
        for i in range(max(batches)):
            e.seqs[i].decode_tokens(e.tokenize(f"<|im_start|>user\nhello {i}<|im_end|>\n<|im_start|>assistant\n"))
        samplers = [e.make_sampler(SamplerOptions(repetition_penalty=1.05)) for _ in range(max(batches))]
        for b in batches:
            toks = [100] * b
            e.decode_step([(i, toks[i]) for i in range(b)])  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                e.decode_step([(i, toks[i]) for i in range(b)])
                toks = [e.sample(samplers[i], i) for i in range(b)]
            ms = (time.perf_counter() - t0) / steps * 1000
            out[str(b)] = {"step_ms": ms, "tok_s": b / ms * 1000}
        for s in samplers:
            e.free_sampler(s)
    return out


def _run(report, server, parallel, clients, audio=True):
    for r in report["runs"]:
        if (r["server"], r["parallel"], r["clients"], r["audio"]) == (server, parallel, clients, audio):
            return r
    return None


def goals(report: dict) -> list[dict]:
    out = []
    one = _run(report, "edge-af3", 1, 1)
    if one:
        ratio = report.get("paired_ttft_ratio") or one["ttft_ms_p50"] / report["in_process"]["ttft_ms_p50"]
        out.append(
            {
                "goal": "1 client: TTFT <= 1.05x the in-process API (median of paired requests)",
                "value": ratio,
                "met": ratio <= 1.05,
            }
        )
    p1, p4 = _run(report, "edge-af3", 1, 4), _run(report, "edge-af3", 4, 4)
    if p1 and p4:
        ratio = p4["aggregate_decode_tok_s"] / p1["aggregate_decode_tok_s"]
        out.append(
            {
                "goal": "4 clients: --parallel 4 aggregate decode >= 2.5x --parallel 1",
                "value": ratio,
                "met": ratio >= 2.5,
            }
        )
    return out


def markdown(report: dict) -> str:
    ip = report["in_process"]
    lines = [
        f"# Serving, {report['shape']} {report.get('quant', '')}, CPU ({report['clip_seconds']:g} s clips, "
        f"{report['new_tokens']} new tokens)",
        "",
        f"vLLM: {report.get('vllm', 'not run')}.",
        "",
        "| server | --parallel | input | clients | TTFT p50 ms | TTFT p95 ms | aggregate decode tok/s "
        "| throughput tok/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| in-process API (one after another) | - | audio | 1 | {ip['ttft_ms_p50']:.0f} | {ip['ttft_ms_p95']:.0f} | "
        f"{ip['aggregate_decode_tok_s']:.1f} | {ip['throughput_tok_s']:.1f} |",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['server']} | {r['parallel']} | {'audio' if r['audio'] else 'text'} | {r['clients']} | "
            f"{r['ttft_ms_p50']:.0f} | {r['ttft_ms_p95']:.0f} | {r['aggregate_decode_tok_s']:.1f} | "
            f"{r['throughput_tok_s']:.1f} |"
        )
    steps = report.get("decode_step_ms") or {}
    if steps:
        lines += [
            "",
            "| batched decode step (this GGUF) | " + " | ".join(f"B={b}" for b in steps) + " |",
            "|---|" + "---|" * len(steps),
            "| ms per step | " + " | ".join(f"{v['step_ms']:.1f}" for v in steps.values()) + " |",
            "| tokens/s | " + " | ".join(f"{v['tok_s']:.1f}" for v in steps.values()) + " |",
        ]
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']:.2f}x | {'yes' if g['met'] else 'no'} |" for g in report["goals"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
