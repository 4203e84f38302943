"""The parity gate: an export whose verification figures fall below its type's floor is refused.

The floors sit below what this project measured for each type (docs/cpu.md's quality table:
random-weight checkpoints, whose flat logits flip top-1 far more easily than a trained model's;
a trained model only does better) and far above what a broken quantizer or encoder graph gives
(top-1 near 0 on a 151 672-token vocabulary; rows cosine near 0). Torch-free.
"""

from __future__ import annotations

from ..errors import ParityError  # noqa: F401 - what export() raises, importable from here

# LLM types: (top-1 agreement floor, KL ceiling) on the export's probe against transformers.
# Measured (top-1 / KL): F32 1.000 / 0.0000; Q8_0 0.923 / 0.0045 (bench-small); Q4_K_M 0.602 /
# 0.146 (bench-small, Q5_0 fallbacks); IQ4_NL 0.347 / 0.405; Q4_0 0.260 / 0.652.
LLM_FLOORS: dict[str, tuple[float, float]] = {
    "f32": (0.99, 1e-3),
    "f16": (0.95, 1e-2),
    "q8_0": (0.70, 0.05),
    "q4_k_m": (0.30, 0.50),
    "iq4_nl": (0.15, 1.00),
    "q4_0": (0.10, 1.50),
}
# Encoder precisions: rows cosine floor against PyTorch fp32, run by ONNX Runtime on the exporting
# CPU. Measured: fp32 1.0000000, fp16 1.0000000; with an int8 dot product (Zen 4, AVX-512 VNNI)
# mixed 0.99993, int8 0.99924; without (Zen 3, AVX2: saturating int16 pair sums) mixed 0.99984
# (tiny, noise), 0.99988 (bench-small), 0.99958 (tiny with the think adapter's projector, speech),
# int8 0.99960 (tiny). `auto` takes mixed only where the CPU has the int8 dot product.
ENCODER_FLOORS: dict[str, float] = {"fp32": 0.99999, "fp16": 0.9999, "mixed": 0.9999, "int8": 0.998}
ENCODER_FLOORS_NO_INT8_DOT: dict[str, float] = {**ENCODER_FLOORS, "mixed": 0.9995}


def encoder_floor(precision: str) -> float:
    """The rows cosine an encoder graph of `precision` must keep on this machine's CPU."""
    from ..cpu_features import read_cpu

    return (ENCODER_FLOORS if read_cpu().has_int8_dot else ENCODER_FLOORS_NO_INT8_DOT)[precision]


MMPROJ_FLOOR = 0.999  # llama.cpp's mtmd on our mmproj against PyTorch (f16 projector weights)


def failures(checks: dict, quant: str, encoder_precision: str) -> list[str]:
    """What in `checks` (the export's verification figures) is below its floor."""
    out = []
    enc = checks.get("encoder")
    if enc and enc["cosine"] < encoder_floor(encoder_precision):
        out.append(
            f"encoder ({encoder_precision}): rows cosine {enc['cosine']:.6f} < {encoder_floor(encoder_precision)}"
        )
    mm = checks.get("mmproj")
    if mm and mm["cosine"] < MMPROJ_FLOOR:
        out.append(f"mmproj: rows cosine {mm['cosine']:.6f} < {MMPROJ_FLOOR}")
    top1_floor, kl_ceiling = LLM_FLOORS[quant]
    for name, fig in checks.items():
        if name != "llm" and not name.startswith("adapter:"):
            continue
        what = "LLM" if name == "llm" else f"adapter {name.split(':', 1)[1]}"
        if not fig.get("tokenization_identical", True):
            out.append(f"{what}: llama.cpp tokenizes the probe differently from transformers")
        if fig["top1_agreement"] < top1_floor:
            out.append(f"{what} ({quant}): top-1 agreement {fig['top1_agreement']:.3f} < {top1_floor}")
        if fig["kl_divergence"] > kl_ceiling:
            out.append(f"{what} ({quant}): KL {fig['kl_divergence']:.4f} > {kl_ceiling}")
    return out


def gate(checks: dict, quant: str, encoder_precision: str, *, verified: bool, accept: bool) -> dict:
    """The manifest's record of the gate; raises ParityError when a figure fails and `accept` is
    not given."""
    if not verified:
        return {"verified": False, "passed": None, "accepted": False, "failures": []}
    found = failures(checks, quant, encoder_precision)
    if found and not accept:
        raise ParityError(
            "the export's parity checks failed, so no bundle was written:\n  - "
            + "\n  - ".join(found)
            + "\n(`edge-af3 export --accept` writes it anyway and records the failures in its manifest; "
            "--no-verify skips the checks)"
        )
    return {"verified": True, "passed": not found, "accepted": bool(found and accept), "failures": found}
