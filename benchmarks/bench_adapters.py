"""Adapters: what think mode costs at run time, and how fast the reference trainer runs.

On a bench-small checkpoint given a think/ adapter at AF3's own rank (r 64, alpha 16, every LLM
linear layer) and exported as Q4_K_M: the cost of switching adapters on the loaded context, decode
tokens/s and TTFT (5 s clip) with the think adapter vs without (same prompt, greedy, ignore_eos),
the extra RSS of the think encoder (the same encoder.onnx with the adapter's projector), then the
trainer's steps/s on tiny and bench-small. One process, nothing else running; medians of repeats.

    python -m benchmarks.bench_adapters [--shape bench-small] [--repeats 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, machine, peak_rss_mb, rss_mb


def think_bundle(shape: str, work: Path) -> Path:
    from edge_af3.export import export
    from edge_af3.reference.adapters import write_think

    from .suite import prepare

    ckpt, _ = prepare(shape, "q4_k_m", work, mmproj=False, verify=False, encoder_precision="fp32")
    tckpt = work / f"{shape}-seed0-think"
    if not (tckpt / "think" / "adapter_config.json").is_file():
        shutil.rmtree(tckpt, ignore_errors=True)
        shutil.copytree(ckpt, tckpt)
        write_think(tckpt, r=64, alpha=16)
    bundle = work / f"{shape}-seed0-think-q4_k_m-bundle"
    if not (bundle / "manifest.json").is_file():
        export(tckpt, bundle, quant="q4_k_m", verify=False, force=True)
    return bundle


def runtime(bundle: Path, repeats: int, new_tokens: int, clip: np.ndarray) -> dict:
    from edge_af3 import AF3
    from edge_af3.export.adapters import write_lora_gguf

    out: dict = {}
    cfg = json.loads(
        (Path(json.loads((bundle / "manifest.json").read_text())["source"]["path"]) / "config.json").read_text()
    )
    with AF3.load(bundle, n_ctx=2048) as model:
        llm = model.llm
        before = rss_mb()
        model._encoder_for("think")  # the adapter's encoder: a second ONNX Runtime session
        out["think_encoder_extra_rss_mb"] = rss_mb() - before
        src = Path(json.loads((bundle / "manifest.json").read_text())["source"]["path"]) / "think"
        for dtype in ("f32", "q8_0"):  # the same LoRA in other tensor types, beside the bundle's f16
            path = bundle.parent / f"{bundle.name}-think-{dtype}.gguf"
            if not path.is_file():
                write_lora_gguf(src, cfg, path, dtype)
            llm.load_adapter(f"think-{dtype}", path)
            model.adapters[f"think-{dtype}"] = {**model.adapters["think"], "lora": {"file": str(path), "type": dtype}}
        opts = dict(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
        model.ask("warm up", max_new_tokens=4, think=True)
        model.ask("warm up", max_new_tokens=4)
        # switching: set the adapter, then one decode (the graph may be rebuilt) vs the same decode without a switch
        switch, steady = [], []
        for i in range(repeats * 4):
            llm.truncate(0)
            llm.decode_tokens(llm.tokenize("<|im_start|>user\nhello"), logits="none")
            t0 = time.perf_counter()
            llm.activate("think" if i % 2 == 0 else None)
            llm.decode_tokens([13], logits="last")
            switch.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            llm.decode_tokens([13], logits="last")
            steady.append((time.perf_counter() - t0) * 1000)
        out["switch_decode_ms"] = statistics.median(switch)
        out["steady_decode_ms"] = statistics.median(steady)
        modes = {"base": None, "think": "think", "think-f32": "think-f32", "think-q8_0": "think-q8_0"}
        for mode, adapter in modes.items():
            rates, ttft = [], []
            for r in range(repeats):
                model.forget()
                a = model.ask("Write a long story.", adapter=adapter, **opts)
                rates.append(a.timings.decode_tokens_per_s)
                if mode in ("base", "think"):
                    x = np.roll(clip, 997 * (r + 1))  # a new clip each time: encoded, not cached
                    b = model.ask("Describe the audio.", (x, 16000), adapter=adapter, max_new_tokens=2, temperature=0)
                    ttft.append(b.timings.first_token_ms)
            out[mode] = {"decode_tok_s": statistics.median(rates)} | (
                {"ttft_5s_ms": statistics.median(ttft)} if ttft else {}
            )
    for mode in modes:
        out[mode]["slowdown"] = out["base"]["decode_tok_s"] / out[mode]["decode_tok_s"] - 1
    out["think_decode_slowdown"] = out["think"]["slowdown"]
    return out


def trainer(shape: str, work: Path, steps: int) -> dict:
    import soundfile as sf

    from edge_af3.train import TrainConfig, train

    from .suite import prepare

    ckpt, _ = (
        prepare(shape, "q4_k_m", work, mmproj=False, verify=False, encoder_precision="fp32")
        if shape != "tiny"
        else (None, None)
    )
    if shape == "tiny":
        from edge_af3.reference.tiny import make_checkpoint

        ckpt = work / "tiny-seed0"
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, shape="tiny", seed=0, force=True)
    data = work / "train-data"
    data.mkdir(exist_ok=True)
    lines = []
    for i, (freq, label) in enumerate([(300, "low"), (1200, "high")] * 4):
        t = np.arange(32000) / 16000
        sf.write(data / f"t{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t + i)).astype(np.float32), 16000)
        lines.append(json.dumps({"audio": f"t{i}.wav", "prompt": "High or low?", "answer": label}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = work / f"train-{shape}"
    shutil.rmtree(out, ignore_errors=True)
    res = train(
        ckpt,
        data / "train.jsonl",
        out,
        TrainConfig(r=16, alpha=32, lr=1e-3, max_steps=steps, epochs=100, save_every=10_000),
    )
    return {
        "steps": res["steps"],
        "steps_per_s": res["steps_per_s"],
        "first_loss": res["losses"][0],
        "last_loss": res["losses"][-1],
        "clip_seconds": 2.0,
        "r": 16,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bench-small")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from edge_af3.reference.vocab import cache_dir

    work = args.work or cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    bundle = think_bundle(args.shape, work)
    clip = (0.1 * np.random.default_rng(5).standard_normal(5 * 16000)).astype(np.float32)
    report = {
        "shape": args.shape,
        "bundle": str(bundle),
        "lora": json.loads((bundle / "manifest.json").read_text())["adapters"]["think"]["lora"],
        "runtime": runtime(bundle, args.repeats, args.new_tokens, clip),
    }
    report["trainer"] = {s: trainer(s, work, args.train_steps) for s in dict.fromkeys(["tiny", args.shape])}
    report["peak_rss_mb"] = peak_rss_mb()
    slow = report["runtime"]["think_decode_slowdown"]
    report["goals"] = [
        {"goal": "decode with the think adapter (f16) <= 15% slower", "value": slow, "met": slow <= 0.15}
    ]
    name = f"adapters-{args.shape}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine(), **report}, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    rt = r["runtime"]
    lines = [
        f"# Adapters, {r['shape']} (think LoRA r {r['lora']['r']}, alpha {r['lora']['alpha']:g}, "
        f"{r['lora']['pairs']} layers), CPU",
        "",
        "| | base | think (f16 LoRA, the export default) | think, f32 LoRA | think, q8_0 LoRA |",
        "|---|---|---|---|---|",
        "| decode tok/s | "
        + " | ".join(f"{rt[m]['decode_tok_s']:.1f}" for m in ("base", "think", "think-f32", "think-q8_0"))
        + " |",
        "| vs base | - | "
        + " | ".join(f"{rt[m]['slowdown'] * 100:+.1f}%" for m in ("think", "think-f32", "think-q8_0"))
        + " |",
        f"| TTFT, 5 s clip | {rt['base']['ttft_5s_ms']:.0f} ms | {rt['think']['ttft_5s_ms']:.0f} ms | | |",
        "",
        f"Adapter switch + one decode: {rt['switch_decode_ms']:.2f} ms (the same decode without a switch: "
        f"{rt['steady_decode_ms']:.2f} ms). Think encoder (ONNX Runtime session with the adapter's projector): "
        f"+{rt['think_encoder_extra_rss_mb']:.0f} MB RSS.",
        "",
        "| trainer | steps/s | loss first -> last |",
        "|---|---|---|",
    ]
    for shape, t in r["trainer"].items():
        lines.append(
            f"| {shape} ({t['steps']} steps, 2 s clips, r {t['r']}) | {t['steps_per_s']:.2f} | "
            f"{t['first_loss']:.3f} -> {t['last_loss']:.3f} |"
        )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value'] * 100:+.1f}% | {'yes' if g['met'] else 'no'} |" for g in r["goals"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
