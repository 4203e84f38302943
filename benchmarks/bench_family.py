"""Music Flamingo on this machine next to its peers, one run (bench-small `musicflamingo` shape:
random weights, real shapes of the small benchmark; speed does not depend on weight values):

- edge-af3: the time embedding inside the ONNX encoder graph, `<|sound_bos|>`/`<|sound_eos|>`
  around the rows, llama.cpp for the LLM (the load defaults);
- llama.cpp's own path: libmtmd on an mmproj written as llama.cpp's converter writes AF3's
  (`musicflamingo` projector: llama.cpp has no time embedding, nor the two marker tokens);
- the transformers reference (`MusicFlamingoForConditionalGeneration`, float32).

Per clip (5 s, 47 s): audio token counts (the processor's, ours, libmtmd's), the cosine of the
projected rows against the reference's (what the missing time embedding costs llama.cpp), time
to the first token and decode speed.

    python -m benchmarks.bench_family [--shape bench-small] [--clips 5 47] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, cosine, write_report

RATE = 16000
PROMPT = "Describe the music."


def prepare(shape: str, work: Path) -> tuple[Path, Path, Path]:
    """The checkpoint (seed 0), its bundle and an mmproj of it, each made once."""
    from edge_af3.export import export
    from edge_af3.export.gguf_mmproj import write_mmproj
    from edge_af3.reference.tiny import make_checkpoint

    ckpt = work / f"{shape}-musicflamingo-seed0"
    if not (ckpt / "config.json").is_file():
        print(f"making the {shape} musicflamingo checkpoint in {ckpt}", flush=True)
        make_checkpoint(ckpt, shape=shape, seed=0, arch="musicflamingo", force=True)
    bundle = work / f"{shape}-musicflamingo-seed0-bundle"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting {bundle}", flush=True)
        export(ckpt, bundle, quant="auto", encoder_precision="fp32", verify=False, force=True)
    mmproj = work / f"{shape}-musicflamingo-seed0-mmproj-f16.gguf"
    if not mmproj.is_file():
        write_mmproj(ckpt, mmproj, ftype="f16")
    return ckpt, bundle, mmproj


def reference_peer(ckpt: Path, clips: dict, new_tokens: int) -> dict:
    import torch

    from edge_af3.reference.loader import load_reference

    ref = load_reference(ckpt)
    out = {}
    for sec, x in clips.items():
        conv = [{"role": "user", "content": [{"type": "audio", "audio": x}, {"type": "text", "text": PROMPT}]}]
        batch = ref.inputs(conv)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref.model.generate(**batch, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref.model.generate(**batch, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
        decode = new_tokens / max(1e-9, time.perf_counter() - t0 - ttft)
        ids = batch["input_ids"][0]
        feats, mask = batch["input_features"].numpy(), batch["input_features_mask"].numpy()
        plain = ref.audio_rows(feats, mask)  # tower + projector, the time embedding left out
        valid = [plain[w, : int(n)] for w, n in enumerate(((mask.sum(-1) - 1) // 2 + 1 - 2) // 2 + 1)]
        out[sec] = {
            "rows": ref.clip_rows(x),
            "rows_without_time_embedding": np.concatenate(valid),
            "audio_tokens": int((ids == ref.processor.audio_token_id).sum()),
            "markers": int(((ids == 151670) | (ids == 151671)).sum()),
            "ttft_ms": ttft * 1000,
            "decode_tok_s": decode,
        }
    return out


def edge_peer(bundle: Path, clips: dict, new_tokens: int) -> dict:
    from edge_af3 import AF3, GenerationOptions

    out = {}
    with AF3.load(bundle, options=GenerationOptions(temperature=0, ignore_eos=True)) as model:
        model.ask("warm-up", None, max_new_tokens=2)
        for sec, x in clips.items():
            model.forget()  # cold: nothing cached
            ans = model.ask(PROMPT, (x, RATE), max_new_tokens=new_tokens)
            out[sec] = {
                "rows": model.audio_rows((x, RATE)),
                "audio_tokens": ans.timings.audio_tokens,
                "ttft_ms": ans.timings.first_token_ms,
                "decode_tok_s": ans.timings.decode_tokens_per_s,
                "flash_attn": model.settings.flash_attn,
            }
    return out


def mtmd_peer(bundle: Path, mmproj: Path, clips: dict, new_tokens: int) -> dict:
    from edge_af3.bundle import open_bundle
    from edge_af3.engines.llamacpp import LlamaEngine, SamplerOptions
    from edge_af3.engines.mtmd import MARKER, MtmdAudio

    from .suite import _chatml, _greedy_decode

    out = {}
    with LlamaEngine(open_bundle(bundle, check_hashes=False).llm, n_ctx=4096, release_pages=False) as eng:
        mt = MtmdAudio(mmproj, eng)
        try:
            for sec, x in clips.items():
                eng.reset()
                sampler = eng.make_sampler(SamplerOptions())
                t0 = time.perf_counter()
                info = mt.prefill(_chatml(MARKER + PROMPT), [x])
                eng.sample(sampler)
                ttft = time.perf_counter() - t0
                eng.free_sampler(sampler)
                out[sec] = {
                    "rows": mt.audio_rows(x),
                    "audio_tokens": info["audio_tokens"],
                    "ttft_ms": ttft * 1000,
                    "decode_tok_s": _greedy_decode(eng, new_tokens),
                }
        finally:
            mt.close()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--clips", type=float, nargs="+", default=[5, 47])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "epyc-zen3-avx2")
    args = ap.parse_args(argv)
    from edge_af3.reference.vocab import cache_dir

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, mmproj = prepare(args.shape, work)
    rng = np.random.default_rng(0)
    clips = {f"{s:g}": (0.1 * rng.standard_normal(int(s * RATE))).astype(np.float32) for s in args.clips}
    peers = {
        "edge-af3": edge_peer(bundle, clips, args.new_tokens),
        "llama.cpp mtmd": mtmd_peer(bundle, mmproj, clips, args.new_tokens),
        "transformers": reference_peer(ckpt, clips, args.new_tokens),
    }
    ref = peers["transformers"]
    report: dict = {
        "benchmark": "family",
        "arch": "musicflamingo",
        "shape": args.shape,
        "when": time.strftime("%Y-%m-%d"),
    }
    report["clips"] = {}
    for sec in clips:
        row = {}
        for name, res in peers.items():
            r = res[sec]
            n = min(r["rows"].shape[0], ref[sec]["rows"].shape[0])
            row[name] = {
                "audio_tokens": r["audio_tokens"],
                "rows_cosine_vs_reference": cosine(r["rows"][:n], ref[sec]["rows"][:n]),
                "ttft_ms": r["ttft_ms"],
                "decode_tok_s": r["decode_tok_s"],
            }
        row["transformers"]["markers"] = ref[sec]["markers"]
        row["transformers"]["rows_cosine_without_time_embedding"] = cosine(
            ref[sec]["rows_without_time_embedding"], ref[sec]["rows"]
        )
        report["clips"][sec] = row
    report["edge_flash_attn"] = peers["edge-af3"][next(iter(clips))]["flash_attn"]
    return write_report(report, args.out / f"family-musicflamingo-{args.shape}", markdown)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"### Music Flamingo ({r['shape']} shape, random weights) on {m['cores']} cores of {m['cpu']} ({r['when']})",
        "",
        "| clip | peer | audio tokens | rows cosine vs transformers | TTFT ms | decode tok/s | TTFT vs edge-af3 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for sec, row in r["clips"].items():
        base = row["edge-af3"]["ttft_ms"]
        for name, v in row.items():
            tokens = f"{v['audio_tokens']}" + (f" (+{v['markers']} bos/eos)" if "markers" in v else "")
            lines.append(
                f"| {sec} s | {name} | {tokens} | {v['rows_cosine_vs_reference']:.5f} | {v['ttft_ms']:.0f} "
                f"| {v['decode_tok_s']:.1f} | {v['ttft_ms'] / base:.2f}x |"
            )
    lines.append("")
    for sec, row in r["clips"].items():
        c = row["transformers"]["rows_cosine_without_time_embedding"]
        lines.append(
            f"- {sec} s: transformers' own rows with the time embedding left out (what llama.cpp's projector computes "
            f"at best) have cosine {c:.5f} with the real ones"
        )
    lines += [
        "",
        "- edge-af3 runs the time embedding in its encoder graph and puts `<|sound_bos|>`/`<|sound_eos|>` "
        "around the rows; libmtmd's `musicflamingo` projector has neither (its rows are AF3's: the cosine "
        "shows what the missing embedding changes), and it adds no marker tokens.",
        f"- edge-af3 with its load defaults (flash attention {'on' if r['edge_flash_attn'] else 'off'}, KV f16); "
        "libmtmd and llama.cpp with theirs; transformers in float32. Cold: nothing cached.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
