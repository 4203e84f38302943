"""Every GGUF type the exporter writes loads and decodes, each in a subprocess of its own.

A native crash (llama.cpp's AMX path segfaulted on Q4_0/Q8_0/K-quants: issue #20824) kills the
process that hits it; here it fails the one test of that type, with the type and the signal named,
instead of the whole suite. The child decodes a batch of token ids and a batch of float rows (the
batched paths, where the AMX crash struck; token by token it ran), then greedy tokens; the parent
compares its logits with transformers' on the same ids.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from edge_af3.export.adapters import ADAPTER_TYPES
from edge_af3.quants import QUANTS

# The child: load, batched ids, batched rows, 8 greedy steps; JSON on the last line of stdout.
CHILD = r"""
import json, sys
import numpy as np
from edge_af3.engines.llamacpp import LlamaEngine, SamplerOptions
gguf, ids, adapter = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
with LlamaEngine(gguf, n_ctx=256, n_batch=32, threads=2, kv_type="f32", flash_attn=False) as eng:
    if adapter:
        eng.load_adapter("a", adapter)
        eng.activate("a")
    logits = eng.decode_tokens(ids, logits="all")  # 2 batches of up to 32 ids
    rows = np.random.default_rng(0).standard_normal((40, eng.n_embd)).astype(np.float32) * 0.02
    eng.decode_embeddings(rows, logits="last")  # 2 batches of float rows
    sampler = eng.make_sampler(SamplerOptions())
    out = []
    for _ in range(8):
        tok = eng.sample(sampler)
        out.append(tok)
        eng.decode_next(tok)
    eng.free_sampler(sampler)
print(json.dumps({"logits": np.asarray(logits, dtype=np.float64).tolist(), "greedy": out, "n_vocab": eng.n_vocab}))
"""

TEXT = (
    "Describe the sound of rain on a tin roof, then count from one to twelve in words: one, two, three, "
    "four, five, six, seven, eight, nine, ten, eleven, twelve. Now name three birds by their songs."
)


def decode_process(gguf, ids, adapter="", *, child: str = CHILD, env: dict | None = None):
    """The child run on a GGUF (and adapter), its CompletedProcess whatever its end."""
    return subprocess.run(
        [sys.executable, "-c", child, str(gguf), json.dumps(ids), str(adapter)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def child_result(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The child's JSON; a failed test naming `what` and how the process ended, if it did not end well."""
    if proc.returncode != 0:
        how = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
        pytest.fail(f"{what}: the decode process {how}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(gguf, ids, adapter="") -> dict:
    return child_result(decode_process(gguf, ids, adapter), f"{gguf.name}{' + ' + adapter.name if adapter else ''}")


def reference_logits(model, ids) -> np.ndarray:
    """transformers' logits for token ids (`model`: AF3, or AF3 under PEFT)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy().astype(np.float64)


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean cosine of the logit rows)."""
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    return top1, float(np.mean(cos))


@pytest.fixture(scope="module")
def k256_ckpt(tmp_path_factory):
    from edge_af3.reference.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("k256") / "af3-k256", shape="tiny-k256", seed=0)


def make_ggufs(tiny_ckpt, k256_ckpt, out) -> dict:
    """{(shape, type): path}: the tiny checkpoint in every type, the 256-wide one in Q4_K_M."""
    from edge_af3.export.gguf_llm import quantize, write_gguf

    paths = {}
    for shape, ckpt in (("tiny", tiny_ckpt), ("tiny-k256", k256_ckpt)):
        f32 = write_gguf(ckpt, out / f"{shape}-f32.gguf", ftype="f32")
        paths[(shape, "f32")] = f32
        for q in QUANTS if shape == "tiny" else ("q4_k_m",):
            if q != "f32":
                paths[(shape, q)] = quantize(f32, out / f"{shape}-{q}.gguf", q)
    return paths


@pytest.fixture(scope="module")
def ggufs(tiny_ckpt, k256_ckpt, tmp_path_factory):
    return make_ggufs(tiny_ckpt, k256_ckpt, tmp_path_factory.mktemp("types"))


def _ids(ckpt) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(ckpt))(TEXT)["input_ids"]
    assert len(ids) > 32, "the probe must span two batched decodes of 32"
    return ids[:48]


def _tensor_types(path) -> set[str]:
    from gguf import GGUFReader

    return {t.tensor_type.name for t in GGUFReader(str(path)).tensors}


# Floors (top-1, mean cosine) on the logits' agreement with transformers fp32, set below what
# was measured at these random-weight shapes (AMD EPYC, AVX2 build; tiny / tiny-k256): f32 and
# f16 1.000 / 1.00000; q8_0 0.947 / 0.99985; q4_k_m 0.895 / 0.99584 and 0.579 / 0.98838 (K-quants);
# iq4_nl 0.684 / 0.98663; q4_0 0.526 / 0.98331. A decode on garbage (a broken repack, a wrong
# kernel) lands far below.
FLOORS = {
    "f32": (1.0, 0.99999),
    "f16": (0.95, 0.9999),
    "q8_0": (0.8, 0.9995),
    "q4_k_m": (0.4, 0.98),
    "iq4_nl": (0.4, 0.975),
    "q4_0": (0.35, 0.975),
}


@pytest.mark.parametrize("shape,quant", [("tiny", q) for q in QUANTS] + [("tiny-k256", "q4_k_m")])
def test_every_llm_type_decodes_in_a_subprocess(shape, quant, ggufs, tiny_ckpt, k256_ckpt):
    from edge_af3.reference.loader import load_reference

    ckpt = tiny_ckpt if shape == "tiny" else k256_ckpt
    ids = _ids(ckpt)
    got = run_child(ggufs[(shape, quant)], ids)
    logits = np.asarray(got["logits"])
    assert logits.shape == (len(ids), got["n_vocab"]) and np.isfinite(logits).all()
    assert len(got["greedy"]) == 8 and all(0 <= t < got["n_vocab"] for t in got["greedy"])
    want = reference_logits(load_reference(ckpt, dtype="float32").model, ids)[:, : got["n_vocab"]]
    top1, cos = agreement(logits, want)
    min_top1, min_cos = FLOORS[quant]
    assert top1 >= min_top1 and cos >= min_cos, f"{shape} {quant}: top-1 {top1:.3f}, cosine {cos:.5f} vs transformers"
    if shape == "tiny-k256":  # the real AF3's case: K-quant tensors, not the 64-wide fallbacks
        assert {"Q4_K", "Q6_K"} <= _tensor_types(ggufs[(shape, quant)])


@pytest.fixture(scope="module")
def think_reference(think_ckpt):
    from edge_af3.reference.adapters import apply_adapter
    from edge_af3.reference.loader import load_reference

    return apply_adapter(load_reference(think_ckpt, dtype="float32").model, think_ckpt, "think")


@pytest.mark.parametrize("adapter_type", ADAPTER_TYPES)
def test_every_adapter_type_decodes_in_a_subprocess(adapter_type, ggufs, think_ckpt, think_reference, tmp_path):
    """The think/ LoRA in each adapter type on the F32 base (vs transformers + PEFT) and on the
    repacked Q4_0 base (LoRA over repacked weights: the AMX crash's buffers)."""
    from edge_af3.checkpoint import read_config
    from edge_af3.export.adapters import write_lora_gguf

    path = tmp_path / f"think-{adapter_type}.gguf"
    write_lora_gguf(think_ckpt / "think", read_config(think_ckpt), path, dtype=adapter_type)
    ids = _ids(think_ckpt)
    want = reference_logits(think_reference, ids)
    for base, floors in (
        ("f32", {"f32": (1.0, 0.99999), "f16": (0.95, 0.9999), "q8_0": (0.9, 0.999)}[adapter_type]),
        ("q4_0", FLOORS["q4_0"]),
    ):
        got = np.asarray(run_child(ggufs[("tiny", base)], ids, adapter=path)["logits"])
        assert np.isfinite(got).all()
        top1, cos = agreement(got, want[:, : got.shape[1]])
        assert top1 >= floors[0] and cos >= floors[1], (
            f"{base} + {adapter_type} LoRA: top-1 {top1:.3f}, cosine {cos:.5f}"
        )
