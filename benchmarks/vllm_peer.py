"""bench_server's vLLM peer: vLLM's CPU build (deploy/vllm/serve-cpu.sh, its venv from
scripts/setup_vllm.sh) on the same checkpoint, clips and prompts as edge-af3's runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .bench_server import PROMPT, _clients, _messages, _port, _series, _start, _stop


def vllm_settings(log: str) -> str:
    """What vLLM says it runs, from its own start-up log: version, compilation, dtype, threads."""
    version = re.search(r"LLM engine \(v([^)]+)\)", log)
    dtype = re.search(r" dtype=([\w.]+)", log)
    threads = re.search(r"Reducing Torch threads from \d+ to (\d+)", log)
    mode = "eager" if "Enforce eager set" in log else "torch.compile"
    return (
        f"vllm {version[1] if version else '?'}, {mode}, dtype {dtype[1] if dtype else '?'}, "
        f"torch threads {threads[1] if threads else 'all'}"
    )


def vllm_runs(report: dict, ckpt: Path, args, work: Path, run) -> None:
    """vLLM's CPU build on the same checkpoint (its default dtype and compilation), the same
    clips and text prompts; its KV space and context as small as the runs need."""
    port = _port()
    url = f"http://127.0.0.1:{port}"
    serve = Path(__file__).resolve().parents[1] / "deploy" / "vllm" / "serve-cpu.sh"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    cmd = [str(serve), str(ckpt), "--port", str(port), "--served-model-name", "af3", "--max-model-len", str(args.n_ctx)]
    cmd += ["--enforce-eager"] if args.vllm_eager else []
    try:
        proc = _start(cmd, url + "/v1/models", work / "vllm.log", env=env, wait_s=1800)  # compiles at start
    except Exception as e:  # noqa: BLE001 - the other peers' figures are kept, the reason recorded
        report["vllm_error"] = f"{e} (its venv: scripts/setup_vllm.sh)"
        return
    try:
        report["vllm"] = vllm_settings((work / "vllm.log").read_text(errors="replace"))
        _clients(url + "/v1", [{"model": "af3", "messages": _messages(run.clip(), PROMPT)}], 4, {})
        for n in args.clients:
            _series(report, url, "af3", ("vLLM (CPU)", "-"), n, True, {"ignore_eos": True}, run)
        for n in (1, 4):
            _series(report, url, "af3", ("vLLM (CPU)", "-"), n, False, {"ignore_eos": True}, run)
    finally:
        _stop(proc)
