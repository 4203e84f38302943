"""LLM quantization vs the transformers reference: top-1 agreement, KL divergence, greedy agreement.

Probes: three text prompts and one audio prompt (10 s of noise; the reference's own projected
audio rows are fed to llama.cpp, so only the LLM's quantization is measured). Every GGUF is
made by our converter (F32, or F16 for the 7B) and llama.cpp's quantizer from the same checkpoint.
KV cache f32 and flash attention off, llama.cpp's most exact CPU path.

    python -m benchmarks.bench_quality [--shape bench-small] [--quants f16 q8_0 q4_k_m iq4_nl q4_0]

Also the other lossy defaults: each encoder precision's rows against PyTorch fp32 (cosine, on a
noise and a tone window and a 45 s two-window clip), and llama.cpp's default attention settings
(KV f16, flash attention as llama.cpp picks) against exact mode (KV f32, flash attention off) on
the same GGUF.

Random weights make the logits flat, so these numbers are a lower bound on what a trained model
keeps (its logit margins are much larger); they are a regression gauge, not a quality claim.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np

from .common import cosine, save

PROBES = [
    "Describe the sound in one sentence.",
    "Transcribe the input speech. Then list every instrument you can hear, in order of loudness.",
    "Ünïcödé, 数字 42, emoji 🦙 and code `x = f(y)`: what is unusual here?",
]
GREEDY = 16


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_side(ckpt: Path, dtype: str) -> list[dict]:
    """Prompt ids, audio rows (if any), logits and greedy continuation of every probe."""
    import torch

    from edge_af3.reference.loader import load_reference

    ref = load_reference(ckpt, dtype=dtype)
    audio = (0.1 * np.random.default_rng(10).standard_normal(10 * 16000)).astype(np.float32)
    convs = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in PROBES]
    convs.append(
        [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": PROBES[0]}]}]
    )
    out = []
    for conv in convs:
        batch = ref.inputs(conv)
        ids = batch["input_ids"][0].tolist()
        rows = None
        if "input_features" in batch:
            with torch.inference_mode():
                feats = batch["input_features"].to(ref.model.dtype)
                rows = ref.model.get_audio_features(feats, batch["input_features_mask"]).pooler_output.float().numpy()
        out.append(
            {"ids": ids, "rows": rows, "logits": ref.logits(conv), "greedy": ref.generate(conv, max_new_tokens=GREEDY)}
        )
    del ref
    gc.collect()
    return out


def llama_side(gguf: Path, probes: list[dict], *, exact: bool = True, penalty: float = 1.0) -> list[dict]:
    """Prompt logits and the greedy continuation, with the reference's repetition penalty (its
    generate applies the checkpoint's generation_config) over the prompt ids and the answer."""
    from edge_af3.constants import SOUND_TOKEN_ID
    from edge_af3.engines.llamacpp import LlamaEngine, SamplerOptions

    res = []
    kw = {"kv_type": "f32", "flash_attn": False} if exact else {"kv_type": "f16", "flash_attn": None}
    with LlamaEngine(gguf, n_ctx=2048, n_batch=512, **kw) as eng:
        for p in probes:
            eng.reset()
            ids = p["ids"]
            if p["rows"] is None:
                logits = eng.decode_tokens(ids, logits="all")
            else:
                a = ids.index(SOUND_TOKEN_ID)
                b = a + p["rows"].shape[0]
                logits = np.concatenate(
                    [
                        eng.decode_tokens(ids[:a], logits="all"),
                        eng.decode_embeddings(p["rows"], logits="all"),
                        eng.decode_tokens(ids[b:], logits="all"),
                    ]
                )
            sampler = eng.make_sampler(SamplerOptions(repetition_penalty=penalty))
            eng.accept(sampler, ids)  # transformers' penalty counts every prompt id, <sound> included
            greedy = []
            for _ in range(GREEDY):
                tok = eng.sample(sampler)
                greedy.append(tok)
                eng.decode_next(tok)
            eng.free_sampler(sampler)
            res.append({"logits": logits, "greedy": greedy})
    return res


def encoder_side(ckpt: Path, precisions: list[str], work: Path) -> dict:
    """Rows cosine of each exported encoder precision against the PyTorch fp32 wrapper."""
    import onnxruntime as ort
    import torch

    from edge_af3.export.onnx_encoder import export_encoder, load_encoder
    from edge_af3.features import extract_features
    from edge_af3.quants import resolve_encoder_attention  # each graph laid out as an export here would

    wrapper = load_encoder(ckpt)
    t = np.arange(45 * 16000) / 16000
    rng = np.random.default_rng(7)
    clips = {
        "noise 30 s": 0.1 * rng.standard_normal(30 * 16000),
        "tone 30 s": 0.15 * np.sin(2 * np.pi * 330 * t[: 30 * 16000]) * (1 + np.sin(2 * np.pi * 3 * t[: 30 * 16000])),
        "noise 45 s (2 windows)": 0.1 * rng.standard_normal(45 * 16000),
    }
    feats = {k: extract_features((x.astype(np.float32), 16000)) for k, x in clips.items()}
    want = {}
    with torch.inference_mode():
        for k, f in feats.items():
            out = wrapper(torch.from_numpy(f.features), torch.from_numpy(f.mask)).numpy()
            want[k] = np.concatenate([out[w, :n] for w, n in enumerate(f.rows_per_window)])
    res = {}
    for prec in ["fp32"] + [p for p in precisions if p != "fp32"]:
        path = work / f"quality-encoder-{prec}.onnx"
        export_encoder(wrapper, path, precision=prec, per_head=resolve_encoder_attention("auto", prec) == "per-head")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        res[prec] = {}
        for k, f in feats.items():
            out = sess.run(None, {"input_features": f.features, "input_features_mask": f.mask})[0]
            got = np.concatenate([out[w, :n] for w, n in enumerate(f.rows_per_window)])
            res[prec][k] = round(cosine(got, want[k]), 7)
        print(f"encoder {prec:6s} rows cosine vs PyTorch fp32: {res[prec]}", flush=True)
        del sess
        path.unlink()
    return res


def compare(ref: list[dict], got: list[dict]) -> dict:
    top1, kls, lens = [], [], []
    maxdiff = 0.0
    for r, g in zip(ref, got):
        want, have = r["logits"], g["logits"]
        top1.append(np.mean(want.argmax(-1) == have.argmax(-1)))
        p = _softmax(want)
        kls.append(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(_softmax(have) + 1e-30)), -1)))
        maxdiff = max(maxdiff, float(np.abs(want - have).max()))
        same = 0
        for a, b in zip(r["greedy"], g["greedy"]):
            if a != b:
                break
            same += 1
        lens.append(same)
    return {
        "top1_agreement": round(float(np.mean(top1)), 4),
        "kl_divergence": round(float(np.mean(kls)), 5),
        "max_abs_logit_diff": round(maxdiff, 4),
        "greedy_prefix_match": lens,
    }


def main(argv=None) -> dict:
    from edge_af3.export.gguf_llm import quantize, write_gguf
    from edge_af3.reference.tiny import make_checkpoint
    from edge_af3.reference.vocab import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small", choices=["tiny", "bench-small", "full"])
    ap.add_argument("--ckpt", type=Path, default=None, help="an existing checkpoint instead of --shape")
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m", "iq4_nl", "q4_0"])
    ap.add_argument("--encoders", nargs="*", default=["fp16", "int8", "mixed"], help="encoder precisions to compare")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or cache_dir() / "bench"
    ckpt = args.ckpt or work / f"{args.shape}-seed0"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, shape=args.shape, seed=0, force=True)
    big = args.shape == "full"
    dtype = "bfloat16" if big else "float32"
    t0 = time.perf_counter()
    probes = reference_side(ckpt, dtype)
    print(f"reference ({dtype}) on {len(probes)} probes: {time.perf_counter() - t0:.0f} s", flush=True)
    base_type = "f16" if big else "f32"
    base = work / f"quality-{args.shape}-{base_type}.gguf"
    write_gguf(ckpt, base, ftype=base_type)
    from edge_af3.checkpoint import read_config
    from edge_af3.quants import auto_quant

    default_quant = auto_quant(read_config(ckpt)["text_config"])[0]
    from edge_af3.checkpoint import read_generation_config

    penalty = float((read_generation_config(ckpt) or {}).get("repetition_penalty") or 1.0)
    rows, runtime = {}, {}
    print(f"{'quant':8s} {'top-1':>7s} {'KL':>9s} {'max |dlogit|':>13s}  greedy prefix match (of {GREEDY})")
    for q in [base_type] + [q for q in args.quants if q != base_type]:
        path = base if q == base_type else quantize(base, work / f"quality-{args.shape}-{q}.gguf", q)
        r = compare(probes, llama_side(path, probes, penalty=penalty))
        r["bytes"] = path.stat().st_size
        rows[q] = r
        print(
            f"{q:8s} {r['top1_agreement']:7.3f} {r['kl_divergence']:9.5f} {r['max_abs_logit_diff']:13.4f}  "
            f"{r['greedy_prefix_match']}"
        )
        if q == default_quant:  # llama.cpp's default attention settings vs exact mode, same GGUF
            exact = [{"logits": g["logits"], "greedy": g["greedy"]} for g in llama_side(path, probes, penalty=penalty)]
            runtime[q] = compare(exact, llama_side(path, probes, exact=False, penalty=penalty))
            print(
                f"{q:8s} KV f16 + FA auto vs exact mode: top-1 {runtime[q]['top1_agreement']:.3f} "
                f"KL {runtime[q]['kl_divergence']:.6f}",
                flush=True,
            )
        if path != base:
            path.unlink()
    base.unlink()
    encoders = encoder_side(ckpt, args.encoders, work) if args.encoders else {}
    out = save(
        f"quality-{args.shape}",
        {
            "benchmark": "quality",
            "shape": args.shape,
            "reference_dtype": dtype,
            "probes": len(probes),
            "results": rows,
            "default_quant": default_quant,
            "runtime_defaults_vs_exact": runtime,
            "encoder_cosine_vs_fp32": encoders,
        },
    )
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
