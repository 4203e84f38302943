"""The benchmark suite: edge-af3 against its peers on the same checkpoint, bundle and clip files.

Peers (each measured in its own child process, so peak RSS is its own):
  edge-af3    numpy features -> ONNX Runtime encoder -> llama.cpp (this project's runtime)
  reference   transformers' AudioFlamingo3ForConditionalGeneration (fp32 on CPU, bf16 on CUDA)
  mtmd        llama.cpp's own AF3 path (libmtmd) on the bundle's mmproj + the same GGUF
  raw         llama.cpp decoding the same GGUF with no audio: the decode ceiling
mtmd and raw load the GGUF as llama.cpp's tools do (mapped, every page kept); every llama.cpp
peer has the same context length (N_CTX).

Per clip: feature ms, encoder ms (and per window), audio tokens, prefill ms, time to first token.
Per peer: decode tokens/s over N new tokens after the 30 s clip, peak RSS (and GPU memory).
Repeats after one warm-up; medians with min/max. Random weights: the answers are noise, the
work (shapes, token counts) is the real model's.

    python -m benchmarks --shape bench-small              # or: edge-af3 bench --shape bench-small
    python -m benchmarks --shape tiny --clips 5 --repeats 1 --new-tokens 8   # smoke run

Writes benchmarks/results/suite-<shape>-<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, gpu_process_mb, machine, peak_rss_mb

PEERS = ("edge-af3", "reference", "mtmd", "raw")
PROMPT = "Describe what you hear in one sentence."
DECODE_CLIP = 30
N_CTX = 16384  # every llama.cpp peer's context (the runtime's default; 600 s takes 15 000-15 750 positions)


# -- helpers -------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


LONG_S = 300  # clips this long run once, without their own warm-up (the peer is warm by then)


def _repeat(fn, repeats: int, seconds: str) -> list[dict]:
    if int(seconds) >= LONG_S:
        return [fn()]
    fn()  # warm-up: first-call allocations and graph setup for this clip's shapes
    return [fn() for _ in range(repeats)]


def _peak_so_far(res: dict) -> float:
    """The process's peak RSS through the clips measured so far. /proc's VmHWM is refreshed
    lazily (dropping mapped pages can show a lower value than an earlier reading), so the readings
    are carried forward."""
    return max([peak_rss_mb()] + [c["peak_rss_mb"] for c in res.values() if "peak_rss_mb" in c])


def _collect(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None]
    out = {k: _stats([r[k] for r in runs]) for k in keys}
    for k, v in runs[0].items():
        if not isinstance(v, (int, float)):
            out[k] = v
    return out


def _chatml(text: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def _load(path: str) -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(path, dtype="float32")
    assert sr == 16000
    return x


# -- peers (each runs in a fresh process) ----------------------------------------------------------
def peer_edge(bundle: str, clips: dict, repeats: int, new_tokens: int, device: str, opts: dict | None = None) -> dict:
    from edge_af3 import AF3

    opts = opts or {}
    model = AF3.load(bundle, n_ctx=N_CTX, device=device, encoder_engine=opts.get("encoder_engine"))
    res = {}
    for sec, path in clips.items():

        def once():
            model.forget()  # cold: no cached rows, an empty KV cache (not even the system prompt)
            t = model.ask(PROMPT, path, max_new_tokens=1).timings
            # a second question about the same clip: the KV cache holds the system prompt and its rows
            f = model.ask("And what else?", path, max_new_tokens=1).timings
            return {
                "features_ms": t.features_ms,
                "encoder_ms": t.encoder_ms,
                "prefill_ms": t.prefill_ms,
                "ttft_ms": t.first_token_ms,
                "audio_tokens": t.audio_tokens,
                "followup_ttft_ms": f.first_token_ms,
            }

        res[sec] = _collect(_repeat(once, repeats, sec)) | {"peak_rss_mb": _peak_so_far(res)}
    decode = []
    for _ in range(repeats):
        model.forget()
        decode.append(
            model.ask(
                PROMPT, clips[_decode_key(clips)], max_new_tokens=new_tokens, ignore_eos=True
            ).timings.decode_tokens_per_s
        )
    engine = (
        f"{model.encoder.name} + llama.cpp ({model.llm.n_gpu_layers} layers on GPU)"
        if device == "cuda"
        else model.encoder.name
    )
    gpu = gpu_process_mb() if device == "cuda" else None
    model.close()
    return {
        "clips": res,
        "decode_tok_s": _stats(decode),
        "peak_rss_mb": _peak_so_far(res),
        "gpu_mb": gpu,
        "engine": engine,
    }


def peer_reference(
    ckpt: str, clips: dict, repeats: int, new_tokens: int, device: str, opts: dict | None = None
) -> dict:
    import torch

    from edge_af3.reference.loader import load_reference

    torch.set_num_threads(os.cpu_count() or 1)
    cuda = device == "cuda"
    ref = load_reference(ckpt, dtype="bfloat16" if cuda else "float32")
    if cuda:
        ref.model.to("cuda")
    dev = ref.model.device

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def conv(x):
        return [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": PROMPT}]}]

    res = {}
    for sec, path in clips.items():
        x = _load(path)

        def once():
            t0 = time.perf_counter()
            batch = ref.inputs(conv(x)).to(dev)
            t1 = time.perf_counter()
            with torch.inference_mode():
                feats = batch["input_features"].to(ref.model.dtype)
                audio = ref.model.get_audio_features(feats, batch["input_features_mask"])
                audio = getattr(audio, "pooler_output", audio)
                sync()
                t2 = time.perf_counter()
                embeds = ref.model.get_input_embeddings()(batch["input_ids"])
                slots = (batch["input_ids"] == ref.model.config.audio_token_id).unsqueeze(-1)
                embeds = embeds.masked_scatter(slots, audio.to(embeds.dtype))
                out = ref.model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
                ref.model.lm_head(out.last_hidden_state[:, -1:])
                sync()
                t3 = time.perf_counter()
            n_audio = int(slots.sum())
            t4 = time.perf_counter()
            with torch.inference_mode():  # the whole call as a user makes it, to the first token
                ref.model.generate(**ref.inputs(conv(x)).to(dev), max_new_tokens=1, do_sample=False)
            sync()
            t5 = time.perf_counter()
            return {
                "features_ms": (t1 - t0) * 1000,
                "encoder_ms": (t2 - t1) * 1000,
                "prefill_ms": (t3 - t2) * 1000,
                "ttft_ms": (t5 - t4) * 1000,
                "audio_tokens": n_audio,
            }

        res[sec] = _collect(_repeat(once, repeats, sec)) | {"peak_rss_mb": _peak_so_far(res)}
    x = _load(clips[_decode_key(clips)])
    batch = ref.inputs(conv(x)).to(dev)
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """Times each new token inside one generate call (its first put() is the prompt)."""

        def __init__(self):
            self.times, self.seen_prompt = [], False

        def put(self, value):
            if self.seen_prompt:
                sync()
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self):
            pass

    decode = []
    for _ in range(repeats):
        stamps = Stamps()
        with torch.inference_mode():
            ref.model.generate(
                **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=stamps
            )
        # first to last token of one call: the prefill is outside it, and it cannot go negative
        decode.append((len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0]))
    gpu = gpu_process_mb() if cuda else None  # the process's device memory (torch's allocator peak is lower)
    return {
        "clips": res,
        "decode_tok_s": _stats(decode),
        "peak_rss_mb": _peak_so_far(res),
        "gpu_mb": gpu,
        "torch_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "engine": f"transformers {'bf16 cuda' if cuda else 'fp32 cpu'}",
    }


def _greedy_decode(eng, n: int) -> float:
    """tokens/s of n greedy sample+decode steps from the current logits."""
    from edge_af3.engines.llamacpp import SamplerOptions

    sampler = eng.make_sampler(SamplerOptions())
    t0 = time.perf_counter()
    for _ in range(n):
        eng.decode_next(eng.sample(sampler))
    dt = time.perf_counter() - t0
    eng.free_sampler(sampler)
    return n / dt


def _gpu_layers(device: str) -> int:
    return 999 if device == "cuda" else 0


def peer_mtmd(bundle: str, clips: dict, repeats: int, new_tokens: int, device: str, opts: dict | None = None) -> dict:
    from edge_af3.bundle import open_bundle
    from edge_af3.engines.llamacpp import LlamaEngine, SamplerOptions
    from edge_af3.engines.mtmd import MARKER, MtmdAudio

    b = open_bundle(bundle, check_hashes=False)
    if b.mmproj is None:
        raise RuntimeError(f"{bundle} has no mmproj (export with --mmproj)")
    eng = LlamaEngine(b.llm, n_ctx=N_CTX, n_gpu_layers=_gpu_layers(device), release_pages=False)
    mt = MtmdAudio(b.mmproj, eng, use_gpu=device == "cuda")
    text = _chatml(MARKER + PROMPT)
    res = {}
    for sec, path in clips.items():
        x = _load(path)

        def once():
            eng.reset()
            sampler = eng.make_sampler(SamplerOptions())
            t0 = time.perf_counter()
            info = mt.prefill(text, [x])  # libmtmd's mel + encoder, then the decodes, as llama-mtmd-cli
            eng.sample(sampler)
            t1 = time.perf_counter()
            eng.free_sampler(sampler)
            return {
                "features_ms": info["features_ms"],
                "encoder_ms": info["encoder_ms"],
                "prefill_ms": info["prefill_ms"],
                "ttft_ms": (t1 - t0) * 1000,
                "audio_tokens": info["audio_tokens"],
                "windows": info["audio_tokens"] // 750,
            }

        res[sec] = _collect(_repeat(once, repeats, sec)) | {"peak_rss_mb": _peak_so_far(res)}
    x = _load(clips[_decode_key(clips)])
    decode = []
    for _ in range(repeats):
        eng.reset()
        mt.prefill(text, [x])
        decode.append(_greedy_decode(eng, new_tokens))
    gpu = gpu_process_mb() if device == "cuda" else None
    mt.close()
    eng.close()
    return {
        "clips": res,
        "decode_tok_s": _stats(decode),
        "peak_rss_mb": _peak_so_far(res),
        "gpu_mb": gpu,
        "engine": "libmtmd",
    }


def peer_raw(bundle: str, clips: dict, repeats: int, new_tokens: int, device: str, opts: dict | None = None) -> dict:
    from edge_af3.bundle import open_bundle
    from edge_af3.engines.llamacpp import LlamaEngine

    b = open_bundle(bundle, check_hashes=False)
    from edge_af3.features import token_count

    eng = LlamaEngine(b.llm, n_ctx=N_CTX, n_gpu_layers=_gpu_layers(device), release_pages=False)
    # the same context length as edge-af3's decode run: its text plus the decode clip's audio rows,
    # here as ordinary text tokens (decode cost depends on positions, not on what fills them)
    ids = eng.tokenize(_chatml(PROMPT))
    seconds = int(_decode_key(clips))
    filler = eng.tokenize(" the")[0]
    ids = ids[:-5] + [filler] * token_count(seconds * 16000) + ids[-5:]
    decode = []
    for i in range(repeats + 1):
        eng.reset()
        eng.decode_tokens(ids)
        rate = _greedy_decode(eng, new_tokens)
        if i:  # the first is the warm-up
            decode.append(rate)
    gpu = gpu_process_mb() if device == "cuda" else None
    eng.close()
    return {
        "clips": {},
        "decode_tok_s": _stats(decode),
        "peak_rss_mb": peak_rss_mb(),
        "gpu_mb": gpu,
        "engine": "llama.cpp",
    }


def _decode_key(clips: dict) -> str:
    return str(DECODE_CLIP) if str(DECODE_CLIP) in clips else next(iter(clips))


_RUNNERS = {"edge-af3": peer_edge, "reference": peer_reference, "mtmd": peer_mtmd, "raw": peer_raw}


def _child(name: str, source: str, clips: dict, repeats: int, new_tokens: int, device: str, opts: dict, q) -> None:
    try:
        q.put(("ok", _RUNNERS[name](source, clips, repeats, new_tokens, device, opts)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def run_peer(
    name: str, source: str, clips: dict, repeats: int, new_tokens: int, device: str, opts: dict | None = None
) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, source, clips, repeats, new_tokens, device, opts or {}, q))
    p.start()
    status, payload = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"peer {name} failed: {payload}")
    return payload


# -- setup --------------------------------------------------------------------------------------
def prepare(
    shape: str,
    quant: str,
    work: Path,
    say=print,
    *,
    verify: bool = True,
    mmproj: bool = True,
    encoder_precision: str = "auto",
) -> tuple[Path, Path]:
    """The checkpoint (made once, seed 0) and its bundle (exported once; with an mmproj for the
    mtmd peer). verify=False skips the export's parity checks (on a GPU box the 7B reference
    on the CPU would take most of the time; bench_encoder and the gpu tests check parity there)."""
    from edge_af3.export import export
    from edge_af3.reference.tiny import make_checkpoint

    ckpt = work / f"{shape}-seed0"
    if not (ckpt / "config.json").is_file():
        import torch

        device = "cuda" if (shape == "full" and torch.cuda.is_available()) else "cpu"  # 7B of random numbers
        say(f"making the {shape} checkpoint in {ckpt} (drawn on {device})")
        make_checkpoint(ckpt, shape=shape, seed=0, force=True, device=device)
    from edge_af3.checkpoint import read_config
    from edge_af3.export import auto_encoder_precision
    from edge_af3.quants import resolve_encoder_attention, resolve_quant

    quant = resolve_quant(quant, read_config(ckpt)["text_config"])  # "auto": the type export picks
    if encoder_precision == "auto":
        encoder_precision = auto_encoder_precision()
    attention = resolve_encoder_attention("auto", encoder_precision)
    enc = "" if encoder_precision == "fp32" else f"-enc-{encoder_precision}"
    bundle = work / f"{shape}-seed0-{quant}{enc}-bundle"
    manifest = bundle / "manifest.json"
    m = json.loads(manifest.read_text()) if manifest.is_file() else None
    # a bundle cached before the encoder's attention layout was chosen per machine is stale: the
    # benchmarks time what an export here writes now
    if m is None or (mmproj and not m.get("mmproj")) or m["encoder"].get("attention") != attention:
        say(f"exporting {bundle} ({quant}{', with mmproj' if mmproj else ''})")
        export(
            ckpt,
            bundle,
            quant=quant,
            mmproj=mmproj,
            force=True,
            verify=verify,
            encoder_precision=encoder_precision,
            progress=lambda m: say("  " + m),
        )
    return ckpt, bundle


def write_clips(work: Path, seconds: list[int]) -> dict:
    """Deterministic noise clips at 16 kHz (content does not matter with random weights)."""
    import soundfile as sf

    out = {}
    for s in seconds:
        path = work / f"clip-{s}s.wav"
        if not path.is_file():
            x = 0.1 * np.random.default_rng(s).standard_normal(s * 16000)
            sf.write(path, x.astype(np.float32), 16000, subtype="FLOAT")
        out[str(s)] = str(path)
    return out


# -- report -------------------------------------------------------------------------------------
GOALS = [  # (description, peer, metric, clip, want ratio peer/ours >=)
    ("encoder per window vs llama.cpp's (>= 1.5x)", "mtmd", "encoder_per_window_ms", "30", 1.5),
    ("TTFT 30 s vs reference (>= 2x)", "reference", "ttft_ms", "30", 2.0),
    ("TTFT 600 s vs reference (>= 1.2x)", "reference", "ttft_ms", "600", 1.2),
    ("TTFT 30 s vs mtmd (>= 3x)", "mtmd", "ttft_ms", "30", 3.0),
    ("TTFT 5 s vs mtmd (>= 3x)", "mtmd", "ttft_ms", "5", 3.0),
    ("peak RSS through 5 s vs mtmd's (<= 1x)", "mtmd", "peak_rss_mb", "5", 1.0),
    ("peak RSS through 30 s vs mtmd's (<= 1x)", "mtmd", "peak_rss_mb", "30", 1.0),
]


def _per_window(peer_res: dict, sec: str) -> float | None:
    c = peer_res["clips"].get(sec)
    if not c or "encoder_ms" not in c:
        return None
    windows = c.get("windows") or max(1, int(np.ceil(int(sec) / 30)))
    if isinstance(windows, dict):
        windows = windows["median"]
    return c["encoder_ms"]["median"] / windows


def metric(res: dict, peer: str, name: str, sec: str | None) -> float | None:
    p = res.get(peer)
    if not p:
        return None
    if name == "encoder_per_window_ms":
        return _per_window(p, sec)
    if name == "decode_tok_s" or (name == "peak_rss_mb" and sec is None):
        v = p[name]
        return v["median"] if isinstance(v, dict) else v
    c = p["clips"].get(sec)
    if not c or name not in c:
        return None
    return c[name]["median"] if isinstance(c[name], dict) else c[name]


def ratios(res: dict) -> list[dict]:
    rows = []
    for desc, peer, name, sec, want in GOALS:
        ours, theirs = metric(res, "edge-af3", name, sec), metric(res, peer, name, sec)
        if ours and theirs:
            r = theirs / ours
            rows.append({"goal": desc, "ratio": r, "want": want, "met": r >= want})
    d_ours, d_raw = metric(res, "edge-af3", "decode_tok_s", None), metric(res, "raw", "decode_tok_s", None)
    if d_ours and d_raw:
        rows.append(
            {
                "goal": "decode vs raw llama.cpp (>= 0.95x)",
                "ratio": d_ours / d_raw,
                "want": 0.95,
                "met": d_ours / d_raw >= 0.95,
            }
        )
    m_ours, m_mtmd = metric(res, "edge-af3", "peak_rss_mb", None), metric(res, "mtmd", "peak_rss_mb", None)
    if m_ours and m_mtmd:
        rows.append(
            {
                "goal": "peak RSS over the whole run vs mtmd's (<= 1x)",
                "ratio": m_mtmd / m_ours,
                "want": 1.0,
                "met": m_ours <= m_mtmd,
            }
        )
    return rows


def markdown(report: dict) -> str:
    res, clips = report["peers"], report["clips"]
    m = report["machine"]
    lines = [
        f"### {report['shape']} on {report['device']} ({m['cores']} cores, {m['cpu']}; {report['when']})",
        "",
        f"LLM {report['quant']}, encoder {report['encoder']}; medians of {report['repeats']} runs after a warm-up "
        f"(clips >= {LONG_S} s: one run, no warm-up of their own). TTFT: from the call to the first token, "
        "including feature extraction, encoder and prefill.",
        "",
        "| clip | peer | audio tokens | features ms | encoder ms/window | prefill ms | TTFT ms "
        "| TTFT ratio peer/edge-af3 | follow-up TTFT ms | peak RSS MB so far |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sec in clips:
        ours = metric(res, "edge-af3", "ttft_ms", sec)
        for peer in PEERS:
            c = res.get(peer, {}).get("clips", {}).get(sec)
            if not c:
                continue

            def f(k, c=c):
                return f"{c[k]['median']:.0f}" if k in c else "—"

            ttft = c["ttft_ms"]["median"]
            pw = _per_window(res[peer], sec)
            ratio = "1.00" if peer == "edge-af3" else (f"{ttft / ours:.2f}x" if ours else "—")
            lines.append(
                f"| {sec} s | {peer} | {int(c['audio_tokens']['median'])} | {f('features_ms')} | "
                f"{pw:.0f} | {f('prefill_ms')} | {ttft:.0f} | {ratio} | {f('followup_ttft_ms')} | "
                f"{c.get('peak_rss_mb', 0):.0f} |"
            )
    lines += ["", "| peer | decode tok/s | peak RSS MB | engine |", "|---|---|---|---|"]
    for peer in PEERS:
        if peer in res:
            p = res[peer]
            gpu = f" (GPU {p['gpu_mb']:.0f} MB)" if p.get("gpu_mb") else ""
            lines.append(
                f"| {peer} | {p['decode_tok_s']['median']:.1f} | {p['peak_rss_mb']:.0f}{gpu} | {p['engine']} |"
            )
    lines += ["", "| goal | ratio | met |", "|---|---|---|"]
    for r in report["goals"]:
        value = f"{r['value']:.6f}" if "value" in r else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['goal']} | {value} | {'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the bench extra; a bare GPU box may not have it
        print("matplotlib is not installed: no plot (pip install 'edge-af3[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, clips = report["peers"], report["clips"]
    peers = [p for p in PEERS if res.get(p, {}).get("clips")]
    fig, axes = plt.subplots(1, len(clips), figsize=(4 * len(clips), 4), squeeze=False)
    colors = {"features": "#8da0cb", "encoder": "#fc8d62", "prefill": "#66c2a5", "other": "#bbbbbb"}
    for ax, sec in zip(axes[0], clips):
        for x, peer in enumerate(peers):
            c = res[peer]["clips"].get(sec)
            if not c:
                continue
            parts = {
                k: c[f"{k}_ms"]["median"] / 1000 if f"{k}_ms" in c else 0.0 for k in ("features", "encoder", "prefill")
            }
            parts["other"] = max(0.0, c["ttft_ms"]["median"] / 1000 - sum(parts.values()))
            bottom = 0.0
            for k, v in parts.items():
                ax.bar(x, v, bottom=bottom, color=colors[k], label=k if x == 0 else None)
                bottom += v
        ax.set_xticks(range(len(peers)), peers, rotation=20)
        ax.set_title(f"{sec} s clip")
        ax.set_ylabel("time to first token (s)")
    axes[0][0].legend()
    fig.suptitle(f"AF3 {report['shape']} on {report['device']}: latency breakdown")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small", choices=["tiny", "bench-small", "full"], help="the model shape")
    ap.add_argument("--clips", type=int, nargs="+", default=[5, 30, 120, 600], help="clip lengths in seconds")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, help="who is measured")
    ap.add_argument("--quant", default="auto", help="the bundle's LLM type (auto: what export picks for the shape)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per clip and peer (after a warm-up)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per answer")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the peers run")
    ap.add_argument("--encoder-engine", default=None, help="force edge-af3's encoder engine (default: the best one)")
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints, bundles and clips live")
    ap.add_argument("--no-verify", action="store_true", help="export the bundle without its parity checks")
    ap.add_argument(
        "--encoder-precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "int8", "mixed"],
        help="the bundle's encoder.onnx (edge-af3 only; the other peers do not use it; auto: export's pick)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the results (json, md, png) go")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)

    from edge_af3.reference.vocab import cache_dir

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = prepare(
        args.shape,
        args.quant,
        work,
        verify=not args.no_verify,
        mmproj="mtmd" in args.peers,
        encoder_precision=args.encoder_precision,
    )
    clips = write_clips(work, sorted(set(args.clips)))
    peers = {}
    for peer in args.peers:
        print(f"[{peer}] running on {len(clips)} clip(s) x {args.repeats} ...", flush=True)
        t0 = time.perf_counter()
        source = str(ckpt) if peer == "reference" else str(bundle)
        peers[peer] = run_peer(
            peer, source, clips, args.repeats, args.new_tokens, args.device, {"encoder_engine": args.encoder_engine}
        )
        print(f"[{peer}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = {
        "benchmark": "suite",
        "shape": args.shape,
        "device": args.device,
        "quant": manifest["llm"]["quant"],
        "encoder": manifest["encoder"]["precision"],
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "when": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "clips": list(clips),
        "peers": peers,
    }
    report["goals"] = ratios(peers)
    enc_check = manifest.get("verification", {}).get("encoder")
    if enc_check:  # the export's check of this bundle's encoder.onnx against PyTorch fp32 (45 s probe)
        report["goals"].insert(
            1,
            {
                "goal": "encoder rows cosine vs fp32 PyTorch (>= 0.9999)",
                "value": enc_check["cosine"],
                "want": 0.9999,
                "met": enc_check["cosine"] >= 0.9999,
            },
        )
    args.out.mkdir(parents=True, exist_ok=True)
    variant = ("" if args.quant == "auto" else f"-{args.quant}") + (
        "" if args.encoder_precision == "auto" else f"-enc-{args.encoder_precision}"
    )
    stem = args.out / f"suite-{args.shape}-{args.device}{variant}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    plot(report, stem.with_suffix(".png"))
    print(table)
    print(f"wrote {stem}.json, .md, .png")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
