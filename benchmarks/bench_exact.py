"""What the fast defaults cost against exact mode: top-1 agreement and KL vs transformers.

For each probe (no audio, and 5, 30 and 47 s clips: noise and espeak speech) transformers
generates 32 greedy tokens (its checkpoint's repetition penalty on); then the prompt plus that
answer is scored teacher-forced by transformers and by edge-af3 twice, in exact mode (f32 KV,
flash attention off) and with the defaults (f16 KV, llama.cpp's automatic flash attention), and
the next-token distributions are compared at every answer position. The same edge-af3 runs also
generate greedily, and the first position where their tokens leave transformers' is reported.

    python -m benchmarks.bench_exact [--shape tiny] [--quant f32]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .common import save

QUESTION = "What do you hear? Describe it."
N_NEW = 32


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def probes(tmp: Path) -> dict:
    rng = np.random.default_rng(7)
    out = {"text only": None}
    for s in (5, 30, 47):
        out[f"noise {s} s"] = (0.1 * rng.standard_normal(s * 16000)).astype(np.float32)
    wav = tmp / "speech.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), "The kettle whistles while somebody reads the news aloud. " * 4], check=True
    )
    from edge_af3.audio import load_audio

    out["speech"] = load_audio(wav).samples
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--quant", default="f32")
    args = ap.parse_args(argv)

    import torch

    from edge_af3 import AF3, GenerationOptions
    from edge_af3.export import export
    from edge_af3.reference.loader import load_reference
    from edge_af3.reference.tiny import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-exact-"))
    try:
        ckpt = make_checkpoint(tmp / "ckpt", shape=args.shape, seed=0)
        bundle = export(ckpt, tmp / "bundle", quant=args.quant, verify=False)
        ref = load_reference(ckpt)
        greedy = GenerationOptions(temperature=0, max_new_tokens=N_NEW)
        clips = probes(tmp)
        models = {"exact": AF3.load(bundle, exact=True, options=greedy), "defaults": AF3.load(bundle, options=greedy)}
        rows = []
        for name, x in clips.items():
            conv = [
                {
                    "role": "user",
                    "content": ([{"type": "audio", "audio": x}] if x is not None else [])
                    + [{"type": "text", "text": QUESTION}],
                }
            ]
            want = ref.generate(conv, max_new_tokens=N_NEW)
            batch = ref.inputs(conv)
            n_prompt = batch["input_ids"].shape[1]
            full = dict(batch, input_ids=torch.cat([batch["input_ids"], torch.tensor([want[:-1]])], 1))
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            with torch.inference_mode():
                ref_logits = ref.model(**full).logits[0, n_prompt - 1 :].float().numpy()  # [N_NEW, vocab]
            p = _softmax(ref_logits)
            for mode, m in models.items():
                m.forget()
                chat = m.chat()
                first = chat.logits(QUESTION, None if x is None else (x, 16000))
                rest = m.llm.decode_tokens(want[:-1], logits="all")
                ours = np.concatenate([first[None], rest])
                q = _softmax(ours)
                kl = np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), -1)
                got = list(m.ask(QUESTION, None if x is None else (x, 16000)).tokens)
                diverge = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                rows.append(
                    {
                        "probe": name,
                        "mode": mode,
                        "top1": float(np.mean(ours.argmax(-1) == ref_logits.argmax(-1))),
                        "kl_mean": float(kl.mean()),
                        "kl_max": float(kl.max()),
                        "greedy_identical": got == [t for t in want if t not in m.eos_ids][: len(got)]
                        and diverge is None,
                        "first_divergent_token": diverge,
                    }
                )
                print(
                    f"{name:12s} {mode:8s} top1 {rows[-1]['top1']:.3f}  KL mean {rows[-1]['kl_mean']:.2e} "
                    f"max {rows[-1]['kl_max']:.2e}  "
                    f"greedy {'identical' if diverge is None else f'diverges at token {diverge}'}"
                )
        for m in models.values():
            m.close()
        summary = {
            mode: {
                "top1": float(np.mean([r["top1"] for r in rows if r["mode"] == mode])),
                "kl_mean": float(np.mean([r["kl_mean"] for r in rows if r["mode"] == mode])),
                "greedy_identical": sum(r["greedy_identical"] for r in rows if r["mode"] == mode),
                "probes": sum(r["mode"] == mode for r in rows),
            }
            for mode in models
        }
        print(summary)
        print(
            save(
                f"exact-{args.shape}-{args.quant}",
                {"shape": args.shape, "quant": args.quant, "new_tokens": N_NEW, "rows": rows, "summary": summary},
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
