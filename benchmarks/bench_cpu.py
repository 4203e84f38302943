"""The CPU levers of issue #17, each measured in one run on the same checkpoint, rows and clips.

Sections (each in a fresh child process, so threads, arenas and peak memory are its own):
  llm       prefill rows/s and decode tok/s per GGUF type (q4_k_m, iq4_nl, q4_0, q8_0), on the
            bench shape and on a shape whose widths are multiples of 256 (as the real 7B's are:
            K-quants keep their blocks there, on bench-small they fall back to Q5_0/Q8_0)
  amx       on an AMX CPU: llama.cpp's AMX path with edge-af3's fix vs the same build without AMX,
            per GGUF type (prefill rows/s, decode tok/s); elsewhere it says so and times nothing
  settings  on `--quant auto`'s type: flash attention on/off x KV f16/bf16/q8_0 at 750 and 3000
            rows, n_ubatch 512/1024/2048, 1 vs 2 threads (`--long`: FA on/off at 15000 rows)
  encoder   ms per full window and rows cosine vs fp32 for: fp32, ORT's transformer fusions, int8
            dynamic (per tensor, per channel), int8 static QDQ (per-channel, MinMax calibration),
            mixed (int8 fc1 only), fc1 + late fc2, spinning on, arena off
  overlap   TTFT of a 120 s clip with the encoder on a thread beside the prefill, vs in line
  memory    RSS after each stage of a 30 s question (imports, encoder session, encode, LLM
            load, context, prefill), with the encoder arena shrunk after each run or not

    python -m benchmarks.bench_cpu [--shape bench-small] [--sections llm settings encoder overlap memory] [--long]

Writes benchmarks/results/cpu-levers-<shape>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, cosine, json_child, machine, peak_rss_mb, rss_mb

QUANTS = ("q4_k_m", "iq4_nl", "q4_0", "q8_0")
K256 = dict(
    enc_layers=4,
    enc_hidden=128,
    enc_heads=2,
    enc_ffn=256,
    llm_layers=8,
    llm_hidden=1024,
    llm_heads=16,
    llm_kv_heads=2,
    llm_ffn=4096,
)


def _rows(n: int, width: int) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((n, width)) * 0.02).astype(np.float32)


def _prefill(gguf: Path, n: int, *, repeats: int = 2, decode: int = 0, **kw) -> dict:
    """Median seconds to prefill n rows (one warm-up), and decode tok/s after it."""
    from edge_af3.engines.llamacpp import LlamaEngine

    with LlamaEngine(gguf, n_ctx=max(2048, n + 128), **kw) as eng:
        rows = _rows(n, eng.n_embd)
        times = []
        for _ in range(repeats + (1 if repeats > 1 else 0)):
            eng.reset()
            t0 = time.perf_counter()
            eng.decode_embeddings(rows, logits="last")
            times.append(time.perf_counter() - t0)
        times = times[1:] if len(times) > 1 else times
        out = {"rows": n, "prefill_s": statistics.median(times), "rows_per_s": n / statistics.median(times)}
        if decode:
            t0 = time.perf_counter()
            for _ in range(decode):
                eng.decode_next(9707)
            out["decode_tok_s"] = decode / (time.perf_counter() - t0)
    return out


def _gguf(ckpt: Path, quant: str, work: Path) -> Path:
    from edge_af3.export.gguf_llm import quantize, write_gguf

    out = work / f"{ckpt.name}-{quant}.gguf"
    base = work / f"{ckpt.name}-f16.gguf"
    if not base.is_file():
        write_gguf(ckpt, base, ftype="f16")
    if quant == "f16":
        return base
    if not out.is_file():
        quantize(base, out, quant)
    return out


def _k256_checkpoint(work: Path) -> Path:
    from edge_af3.reference import tiny

    ckpt = work / "k256-seed0"
    if not (ckpt / "config.json").is_file():
        tiny.SHAPES["k256"] = tiny.Shape("k256", dtype="bfloat16", **K256)
        tiny.make_checkpoint(ckpt, shape="k256", seed=0, force=True)
    return ckpt


# -- sections -------------------------------------------------------------------------------------
def section_llm(ckpt: Path, work: Path, args) -> dict:
    import gguf as gguf_py

    out = {}
    for label, source in (("bench", ckpt), ("widths of 256", _k256_checkpoint(work))):
        for q in QUANTS:
            path = _gguf(source, q, work)
            types = sorted(
                {t.tensor_type.name for t in gguf_py.GGUFReader(str(path)).tensors if t.name.startswith("blk")}
            )
            r = _prefill(path, 750, decode=64)
            out[f"{label}/{q}"] = r | {"types": [t for t in types if t != "F32"], "mb": path.stat().st_size / 1e6}
            print(
                f"  {label:14s} {q:7s} prefill {r['rows_per_s']:6.0f} rows/s  decode {r['decode_tok_s']:5.1f} tok/s  "
                f"types {out[f'{label}/{q}']['types']}",
                flush=True,
            )
    return out


def section_repack(ckpt: Path, work: Path, args) -> dict:
    """What loading without llama.cpp's extra buffer types costs (edge-af3's guard on a llama.cpp
    built with the crashing AMX path: no AMX, and no CPU repacking either), per GGUF type."""
    out = {}
    for label, source in (("bench", ckpt), ("widths of 256", _k256_checkpoint(work))):
        for q in QUANTS:
            path = _gguf(source, q, work)
            for repack in (True, False):
                r = _prefill(path, 750, decode=64, repack=repack)
                out[f"{label}/{q}/{'repack' if repack else 'no extra bufts'}"] = r
                print(
                    f"  {label:14s} {q:7s} {'repack' if repack else 'plain ':6s} "
                    f"prefill {r['rows_per_s']:6.0f} rows/s  "
                    f"decode {r['decode_tok_s']:5.1f} tok/s",
                    flush=True,
                )
    return out


# One prefill timing in a process of its own, with the llama.cpp libraries of LLAMA_CPP_LIB_PATH.
_PREFILL_CHILD = (
    "import json, sys; from pathlib import Path; from benchmarks.bench_cpu import _prefill; "
    "print(json.dumps(_prefill(Path(sys.argv[1]), 750, decode=64)))"
)


def section_amx(ckpt: Path, work: Path, args) -> dict:
    """llama.cpp's AMX path with edge-af3's fix (edge_af3/llama_amx.py) against the same build
    without AMX, per GGUF type, each load in a process of its own. Needs an AMX CPU: emulated AMX
    (tests/native/amx_emu.c) is a correctness check, its speed means nothing."""
    import os

    from edge_af3.cpu_features import build_tag, read_cpu
    from edge_af3.llama_amx import build
    from edge_af3.paths import cache_dir

    cpu = read_cpu()
    emulator = args.amx_emulator if not cpu.has_amx else None  # real AMX: never emulated
    if not cpu.has_amx and emulator is None:
        print(f"  {cpu.name} has no AMX: nothing to time here", flush=True)
        return {"skipped": f"{cpu.name} has no AMX"}
    root = cache_dir() / "llama-amx" / build_tag(cpu)  # the builds tests/test_amx.py makes
    libs = {"no AMX": build(root / "control", amx=False), "AMX fixed": build(root / "fixed")}
    tree = Path(__file__).resolve().parents[1]
    out = {"emulated": emulator is not None} if emulator else {}
    shapes = (("bench", ckpt),) if emulator else (("bench", ckpt), ("widths of 256", _k256_checkpoint(work)))
    for label, source in shapes:
        for q in args.amx_types:
            path = _gguf(source, q, work)
            for name, lib in libs.items():
                env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib))
                if emulator:  # a run of the code, not a timing
                    env["LD_PRELOAD"] = str(emulator)
                r = json_child(_PREFILL_CHILD, [str(path)], env=env, cwd=tree, what=f"{label} {q} with {name}")
                out[f"{label}/{q}/{name}"] = r
                print(
                    f"  {label:14s} {q:7s} {name:9s} prefill {r['rows_per_s']:6.0f} rows/s  "
                    f"decode {r['decode_tok_s']:5.1f} tok/s",
                    flush=True,
                )
    return out


def section_settings(ckpt: Path, work: Path, args) -> dict:
    from edge_af3.checkpoint import read_config
    from edge_af3.quants import auto_quant

    quant = auto_quant(read_config(ckpt)["text_config"])[0]
    path = _gguf(ckpt, quant, work)
    out = {"quant": quant}
    grid = [
        (n, fa, kv)
        for n in (750, 3000)
        for fa in (False, True)
        for kv in ("f16", "bf16", "q8_0")
        if not (kv == "q8_0" and not fa)
    ]  # llama.cpp quantizes V only with flash attention
    grid += [(15000, fa, "f16") for fa in (False, True)] if args.long else []
    for n, fa, kv in grid:
        r = _prefill(path, n, repeats=1 if n > 750 else 2, decode=32, flash_attn=fa, kv_type=kv)
        out[f"rows {n} / fa {'on' if fa else 'off'} / kv {kv}"] = r
        print(
            f"  {n:5d} rows  FA {'on ' if fa else 'off'} KV {kv:5s} {r['prefill_s']:7.2f} s  "
            f"decode {r['decode_tok_s']:5.1f}",
            flush=True,
        )
    for ub in (512, 1024, 2048):
        r = _prefill(path, 750, n_batch=ub)
        out[f"rows 750 / n_ubatch {ub}"] = r
        print(f"  n_ubatch {ub:4d} {r['prefill_s']:6.2f} s", flush=True)
    for th in (1, 2):
        r = _prefill(path, 750, threads=th, decode=32)
        out[f"rows 750 / threads {th}"] = r
        print(f"  threads {th} {r['prefill_s']:6.2f} s  decode {r['decode_tok_s']:5.1f}", flush=True)
    return out


def _window(seed: int, kind: str):
    from edge_af3.features import extract_features

    rng = np.random.default_rng(seed)
    t = np.arange(30 * 16000) / 16000
    if kind == "noise":
        x = 0.1 * rng.standard_normal(t.size)
    else:  # a tremolo tone over faint noise
        x = 0.15 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    f = extract_features((x.astype(np.float32), 16000))
    return {"input_features": f.features[:1], "input_features_mask": f.mask[:1].astype(np.int64)}


def _encoder_variants(ckpt: Path, work: Path, n_layers: int, hidden: int, heads: int) -> dict[str, Path]:
    import re

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.transformers.optimizer import optimize_model

    from edge_af3.export.onnx_encoder import export_encoder, load_encoder

    out = {}
    wrapper = None

    def exported(tag, precision, per_head=None):
        nonlocal wrapper
        layout = {True: "per-head", False: "batched", None: "default"}[per_head]
        p = work / f"enc-{precision}-{layout}.onnx"
        if not p.is_file():
            wrapper = wrapper or load_encoder(ckpt)
            export_encoder(wrapper, p, precision=precision, per_head=per_head)
        out[tag] = p

    # the baseline, and the graph ORT's own quantizers and optimizer start from: fp32 with batched
    # attention (whatever layout the bundle's own graph has)
    exported("fp32", "fp32", per_head=False)
    src = out["fp32"]
    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]

    def layer(n):
        m = re.search(r"/layers\.(\d+)/", n)
        return int(m.group(1)) if m else -1

    def dyn(tag, nodes=None, per_channel=True):
        p = work / f"enc-{len(out)}.onnx"
        if not p.is_file():
            quantize_dynamic(
                str(src), str(p), weight_type=QuantType.QInt8, per_channel=per_channel, nodes_to_quantize=nodes
            )
        out[tag] = p

    p = work / "enc-fused.onnx"
    if not p.is_file():
        optimize_model(
            str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0
        ).save_model_to_file(str(p))
    out["fp32, ORT transformer optimizer (bert)"] = p
    exported("fp32, attention one head at a time", "fp32", per_head=True)
    dyn("int8 dynamic, per tensor", per_channel=False)
    dyn("int8 dynamic, per channel")
    exported("int8 precision (per tensor, one head at a time)", "int8")
    dyn(
        "int8 fc1 + fc2 of the last half",
        [n for n in names if "/fc1/" in n or ("/fc2/" in n and layer(n) >= n_layers // 2)],
    )
    dyn("int8 fc1 + q/k/v", [n for n in names if re.search(r"/(fc1|q_proj|k_proj|v_proj)/", n)])
    dyn("int8 fc1 only, batched attention", [n for n in names if "/fc1/" in n])
    exported("mixed precision (int8 fc1 only, one head at a time)", "mixed")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = [_window(i, k) for i in range(4) for k in ("noise", "tone")]

        def get_next(self):
            return self.items.pop() if self.items else None

    p = work / "enc-qdq.onnx"
    if not p.is_file():
        quantize_static(
            str(src),
            str(p),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            calibrate_method=CalibrationMethod.MinMax,
        )
    out["int8 static QDQ, per channel, MinMax (8 windows)"] = p
    return out


def _session(path, spin="0", arena=True, prepack=False):  # the runtime's options unless told otherwise
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.add_session_config_entry("session.intra_op.allow_spinning", spin)
    o.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    o.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _encoder_child(path: str, kw: dict, repeats: int, q) -> None:
    """One graph in a fresh process: its RSS growth once loaded, its peak over the runs, ms per
    window of a full window after a warm-up, and its rows for two windows."""
    try:
        tests = [_window(100, "noise"), _window(101, "tone")]
        before = _rss()[0]
        s = _session(path, **kw)
        loaded = _rss()[0]
        s.run(None, tests[0])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.run(None, tests[0])
            times.append((time.perf_counter() - t0) * 1000)
        rows = [s.run(None, t)[0] for t in tests]
        q.put(
            (
                "ok",
                {
                    "ms_per_window": statistics.median(times),
                    "min_ms": min(times),
                    "session_mb": loaded - before,
                    "run_peak_mb": _rss()[1] - before,
                },
                rows,
            )
        )
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", f"{type(e).__name__}: {e}", None))


def section_encoder(bundle: Path, work: Path, args) -> dict:
    from edge_af3.bundle import open_bundle

    m = open_bundle(bundle, check_hashes=False).manifest["model"]
    ckpt = Path(json.loads((bundle / "manifest.json").read_text())["source"]["path"])
    variants = _encoder_variants(ckpt, work, m["encoder_layers"], m["encoder_hidden"], m["encoder_heads"])
    mixed = variants["mixed precision (int8 fc1 only, one head at a time)"]
    runs = [(name, p, {}) for name, p in variants.items()]
    runs += [
        ("fp32, weights pre-packed (ORT's default)", variants["fp32"], {"prepack": True}),
        ("mixed, weights pre-packed (ORT's default)", mixed, {"prepack": True}),
        ("fp32, spinning on", variants["fp32"], {"spin": "1"}),
        ("fp32, arena off", variants["fp32"], {"arena": False}),
    ]
    ctx = mp.get_context("spawn")
    out, base = {}, None
    for name, path, kw in runs:
        q = ctx.Queue()
        p = ctx.Process(target=_encoder_child, args=(str(path), kw, args.repeats, q))
        p.start()
        status, r, rows = q.get()
        p.join()
        if status != "ok":
            raise RuntimeError(f"encoder variant {name}: {r}")
        base = base or rows
        r |= {"mb": path.stat().st_size / 1e6, "cosine_vs_fp32": [cosine(a, b) for a, b in zip(rows, base)]}
        out[name] = r
        print(
            f"  {name:56s} {r['ms_per_window']:7.1f} ms  cos {min(r['cosine_vs_fp32']):.6f}  file {r['mb']:.0f} MB  "
            f"session {r['session_mb']:.0f} MB  peak {r['run_peak_mb']:.0f} MB",
            flush=True,
        )
    return out


def section_overlap(bundle: Path, work: Path, args) -> dict:
    from edge_af3 import AF3

    from .suite import write_clips

    clip = write_clips(work, [120])["120"]
    out = {}
    for overlap in (False, True):
        with AF3.load(bundle, n_ctx=16384, device="cpu", overlap=overlap) as model:
            times = []
            for _ in range(2):
                model.forget()
                times.append(model.ask("Describe what you hear.", clip, max_new_tokens=1).timings.first_token_ms)
            out[f"overlap {'on' if overlap else 'off'}"] = {"ttft_ms": min(times), "all": times}
            print(f"  overlap {'on ' if overlap else 'off'} TTFT {min(times):.0f} ms", flush=True)
    return out


def _rss() -> tuple[float, float]:
    return rss_mb(), peak_rss_mb()


def section_memory(bundle: Path, work: Path, args) -> dict:
    stages = []

    def mark(what):
        now, peak = _rss()
        stages.append({"stage": what, "rss_mb": now, "peak_mb": peak})
        print(f"  {what:44s} RSS {now:7.0f} MB  peak {peak:7.0f} MB", flush=True)

    mark("python + numpy")
    import llama_cpp  # noqa: F401
    import onnxruntime  # noqa: F401

    from edge_af3 import AF3

    from .suite import write_clips

    mark("imports (onnxruntime, llama_cpp, edge_af3)")
    clip = write_clips(work, [30])["30"]
    model = AF3.load(bundle, n_ctx=16384, device="cpu")
    mark("loaded (encoder session, LLM weights, KV)")
    model.audio_rows(clip)
    mark("after one 30 s encode")
    model.ask("Describe what you hear.", clip, max_new_tokens=8)
    mark("after a 30 s question")
    model.close()
    mark("closed")
    llm = {}
    ctx = mp.get_context("spawn")
    for release in (True, False):
        q = ctx.Queue()
        p = ctx.Process(target=_llm_memory_child, args=(str(open_gguf(bundle)), release, q))
        p.start()
        llm["pages released (edge-af3)" if release else "mapping kept (llama.cpp's tools)"] = q.get()
        p.join()
    for k, r in llm.items():
        print(
            f"  LLM alone, {k:34s} after load {r['loaded_mb']:5.0f} MB, "
            f"after 750 rows + 32 tokens {r['rss_mb']:5.0f} MB, "
            f"peak {r['peak_mb']:5.0f} MB",
            flush=True,
        )
    return {"stages": stages, "llm_alone": llm}


def open_gguf(bundle: Path) -> Path:
    from edge_af3.bundle import open_bundle

    return open_bundle(bundle, check_hashes=False).llm


def _llm_memory_child(gguf: str, release: bool, q) -> None:
    from edge_af3.engines.llamacpp import LlamaEngine

    with LlamaEngine(gguf, n_ctx=16384, release_pages=release) as eng:
        loaded = _rss()[0]
        eng.decode_embeddings(_rows(750, eng.n_embd), logits="last")
        for _ in range(32):
            eng.decode_next(9707)
        now, peak = _rss()
    q.put({"loaded_mb": loaded, "rss_mb": now, "peak_mb": peak})


SECTIONS = {
    "llm": section_llm,
    "repack": section_repack,
    "amx": section_amx,
    "settings": section_settings,
    "encoder": section_encoder,
    "overlap": section_overlap,
    "memory": section_memory,
}


def _child(name, ckpt, fp32, bundle, work, args, q):
    try:
        src = ckpt if name in ("llm", "repack", "amx", "settings") else fp32 if name == "encoder" else bundle
        q.put(("ok", SECTIONS[name](Path(src), Path(work), args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))


def markdown(report: dict) -> str:
    lines = [
        f"### CPU levers, {report['shape']} ({report['machine']['cores']} cores of {report['machine']['cpu']}; "
        f"{report['when']})",
        "",
    ]
    s = report["sections"]
    if "llm" in s:
        lines += [
            "| shape | GGUF | prefill rows/s (750 rows) | decode tok/s | MB | block tensor types |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in s["llm"].items():
            shape, q = k.split("/")
            lines.append(
                f"| {shape} | {q} | {r['rows_per_s']:.0f} | {r['decode_tok_s']:.1f} | {r['mb']:.0f} | "
                f"{', '.join(r['types'])} |"
            )
        lines.append("")
    if "repack" in s:
        lines += [
            "llama.cpp's extra buffer types (CPU repacking) on and off: what edge-af3's guard against a build "
            "with the AMX path costs.",
            "",
            "| shape | GGUF | load | prefill rows/s (750 rows) | decode tok/s |",
            "|---|---|---|---|---|",
        ]
        for k, r in s["repack"].items():
            shape, q, how = k.split("/")
            lines.append(f"| {shape} | {q} | {how} | {r['rows_per_s']:.0f} | {r['decode_tok_s']:.1f} |")
        lines.append("")
    if "amx" in s and "skipped" not in s["amx"]:
        lines += [
            "llama.cpp's AMX path with edge-af3's fix (edge_af3/llama_amx.py) against the same build without AMX"
            + (" — EMULATED AMX: these timings mean nothing." if s["amx"].get("emulated") else "."),
            "",
            "| shape | GGUF | build | prefill rows/s (750 rows) | decode tok/s |",
            "|---|---|---|---|---|",
        ]
        for k, r in s["amx"].items():
            if k == "emulated":
                continue
            shape, q, how = k.split("/")
            lines.append(f"| {shape} | {q} | {how} | {r['rows_per_s']:.0f} | {r['decode_tok_s']:.1f} |")
        lines.append("")
    if "settings" in s:
        lines += [
            f"On {s['settings']['quant']}:",
            "",
            "| setting | prefill s | rows/s | decode tok/s |",
            "|---|---|---|---|",
        ]
        for k, r in s["settings"].items():
            if k != "quant":
                d = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "—"
                lines.append(f"| {k} | {r['prefill_s']:.2f} | {r['rows_per_s']:.0f} | {d} |")
        lines.append("")
    if "encoder" in s:
        lines += [
            (
                "Each graph in its own process, its session as the runtime makes it (weights not pre-packed, no "
                "spinning, arena on) unless the row says otherwise; memory: RSS growth once the session is made, and "
                "the peak over the runs, above the process's RSS before the session."
            ),
            "",
            "| encoder graph | ms / window | cosine vs fp32 (noise, tone) | file MB | session MB | peak MB |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in s["encoder"].items():
            cos = ", ".join(f"{c:.6f}" for c in r["cosine_vs_fp32"])
            lines.append(
                f"| {k} | {r['ms_per_window']:.0f} | {cos} | {r['mb']:.0f} | {r['session_mb']:.0f} | "
                f"{r['run_peak_mb']:.0f} |"
            )
        lines.append("")
    if "overlap" in s:
        lines += ["| 120 s clip | TTFT ms |", "|---|---|"] + [
            f"| {k} | {r['ttft_ms']:.0f} |" for k, r in s["overlap"].items()
        ]
        lines.append("")
    if "memory" in s:
        lines += ["| stage | RSS MB | peak MB |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {r['rss_mb']:.0f} | {r['peak_mb']:.0f} |" for r in s["memory"]["stages"]]
        lines += [
            "",
            "The LLM alone (n_ctx 16384, f16 KV): | after load MB | after 750 rows + 32 tokens MB | peak MB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {r['loaded_mb']:.0f} | {r['rss_mb']:.0f} | {r['peak_mb']:.0f} |"
            for k, r in s["memory"].get("llm_alone", {}).items()
        ]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small", choices=["tiny", "bench-small"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="also prefill 15000 rows with flash attention on and off")
    ap.add_argument("--amx-types", nargs="+", default=[*QUANTS, "f16"], help="the amx section's GGUF types")
    ap.add_argument(
        "--amx-emulator",
        type=Path,
        default=None,
        help="run the amx section on a CPU without AMX under tests/native/amx_emu.c built as a .so "
        "(checks the code runs; its timings mean nothing)",
    )
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from edge_af3.reference.vocab import cache_dir

    from .suite import prepare

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, fp32 = prepare(args.shape, "auto", work, verify=False, mmproj=False, encoder_precision="fp32")
    _, bundle = prepare(args.shape, "auto", work, verify=False, mmproj=False, encoder_precision="auto")  # the defaults
    report = {
        "benchmark": "cpu-levers",
        "shape": args.shape,
        "when": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "sections": {},
    }
    ctx = mp.get_context("spawn")
    for name in args.sections:
        print(f"[{name}]", flush=True)
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(name, str(ckpt), str(fp32), str(bundle), str(work), args, q))
        p.start()
        status, payload = q.get()
        p.join()
        if status != "ok":
            raise RuntimeError(f"section {name} failed: {payload}")
        report["sections"][name] = payload
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-levers-{args.shape}"
    if stem.with_suffix(".json").is_file():  # a run of some sections replaces those, keeps the others
        kept = json.loads(stem.with_suffix(".json").read_text())["sections"]
        report["sections"] = {k: report["sections"].get(k, v) for k, v in kept.items()} | report["sections"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, .md")
    return report


if __name__ == "__main__":
    main()
