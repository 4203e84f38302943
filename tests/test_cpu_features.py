"""The llama.cpp build follows the CPU, never the AMX path: set-up's build options, the installed
wheel's own system info, doctor's report, and the load-time guard for a wheel built elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_af3 import cpu_features as cf
from tests.conftest import run_cli

# /proc/cpuinfo flag lines of the three CPU kinds this project's machines have had.
SAPPHIRE_RAPIDS = (
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 avx_vnni "
    "avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16 avx512_fp16 "
    "amx_bf16 amx_tile amx_int8\n"
)
ZEN4 = (
    "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512cd avx512vl "
    "avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16\n"
)
ZEN3 = "model name\t: AMD EPYC 7R13\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 sha_ni\n"


def test_build_options_follow_the_cpu_and_never_take_amx():
    spr = cf.read_cpu(SAPPHIRE_RAPIDS, "x86_64")
    assert spr.has_amx and {"AMX_INT8", "AVX512_VNNI", "AVX_VNNI"} <= set(spr.options)
    args = cf.cmake_args(spr)
    assert "-DGGML_NATIVE=OFF" in args  # -march=native would compile AMX in on this CPU
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"} <= set(args)

    zen3 = cf.read_cpu(ZEN3, "x86_64")
    assert "-DGGML_AVX2=ON" in cf.cmake_args(zen3) and "-DGGML_AVX512=OFF" in cf.cmake_args(zen3)
    # each instruction-set kind gets a wheel of its own; a CUDA build is not the CPU build
    tags = {cf.build_tag(c) for c in (spr, cf.read_cpu(ZEN4, "x86_64"), zen3)}
    assert len(tags) == 3 and all("amx" not in t for t in tags)
    assert cf.build_tag(zen3, "-DGGML_CUDA=on") != cf.build_tag(zen3)
    assert cf.cmake_args(cf.read_cpu(ZEN3, "aarch64")) == []  # Jetson: scripts/build_jetson.sh decides


def test_mismatch_names_what_crashes_and_what_is_slow():
    zen3 = cf.read_cpu(ZEN3, "x86_64")
    built_on_zen4 = cf.parse_system_info(
        "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
        "AVX512 = 1 | AVX512_VNNI = 1 | LLAMAFILE = 1 | REPACK = 1 |"
    )
    missing, unused, amx = cf.build_mismatch(zen3, built_on_zen4)
    assert missing == ["AVX512", "AVX512_VNNI"] and unused == [] and not amx
    spr = cf.read_cpu(SAPPHIRE_RAPIDS, "x86_64")
    native_on_spr = cf.parse_system_info(
        "CPU : SSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
        "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    )
    assert cf.build_mismatch(spr, native_on_spr) == ([], [], True)
    assert cf.build_mismatch(zen3, native_on_spr)[2] is False  # no AMX on the CPU: the path never runs
    avx2_only = cf.parse_system_info("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 |")
    assert cf.build_mismatch(spr, avx2_only)[1] == ["AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]


def test_the_installed_llama_cpp_is_the_build_setup_made_for_this_cpu():
    cpu = cf.read_cpu()
    info = cf.parse_system_info(cf.llama_system_info())
    assert not info.get("AMX_INT8"), "the AMX path is compiled in (llama.cpp #20824 crashes there)"
    missing, unused, amx = cf.build_mismatch(cpu, info)
    assert (missing, unused, amx) == ([], [], False), f"build vs {cpu.name}: lacks {missing}, leaves {unused} unused"
    # scripts/setup.sh records which build it installed in the venv it made
    marker = Path(sys.prefix) / "llama-cpp-build.txt"  # (+ a hash when the user added CMAKE_ARGS: CUDA)
    assert marker.read_text().strip().startswith(cf.build_tag(cpu))


def test_an_amx_build_loads_without_extra_buffer_types(monkeypatch, tiny_bundle):
    """A llama.cpp with the AMX path on an AMX CPU (a native build made elsewhere): the guard
    loads without extra buffer types, says so once, and the model still decodes."""
    from edge_af3.engines import llamacpp

    monkeypatch.setattr(llamacpp, "amx_path_would_run", lambda: True)
    monkeypatch.setitem(llamacpp._LOG, "amx_warned", False)
    with pytest.warns(RuntimeWarning, match="AMX"):
        mp = llamacpp.model_params()
    assert mp.use_extra_bufts is False
    assert llamacpp.model_params(repack=True).use_extra_bufts is False  # warned once, still guarded
    with llamacpp.LlamaEngine(tiny_bundle / "llm-f32.gguf", n_ctx=128, n_batch=16) as eng:
        logits = eng.decode_tokens(list(range(100, 140)), logits="last")
    assert logits.shape == (eng.n_vocab,) and np.isfinite(logits).all()
    monkeypatch.setattr(llamacpp, "amx_path_would_run", lambda: False)
    assert llamacpp.model_params().use_extra_bufts is True


def test_doctor_reports_the_cpu_and_the_build():
    res = run_cli("doctor", "--json")
    report = json.loads(res.stdout)
    cpu = report["cpu"]
    assert cpu["name"] == cf.read_cpu().name
    assert cpu["features"]["AVX2"] is cf.read_cpu().supports("AVX2") and "AMX_INT8" in cpu["features"]
    assert "AVX2 = " in cpu["llama_cpp_system_info"]
    assert cpu["build_uses_missing"] == [] and cpu["amx_path"] is False
    text = run_cli("doctor").stdout
    assert "llama.cpp system info" in text and "build vs this CPU:    agree" in text


def test_doctor_hints_for_a_foreign_build():
    from edge_af3.cli.doctor import _cpu_hints

    report = {"build_uses_missing": ["AVX512"], "build_leaves_unused": ["AVX_VNNI"], "amx_path": True}
    hints = _cpu_hints(report | {"llama_cpp_system_info": "CPU : AVX2 = 1 | AVX512 = 1 |"})
    assert len(hints) == 3
    assert "Illegal instruction" in hints[0] and "#20824" in hints[1] and "AVX_VNNI" in hints[2]
    crashed = _cpu_hints(
        {"build_uses_missing": [], "build_leaves_unused": [], "amx_path": False}
        | {"llama_cpp_system_info": "error: RuntimeError: loading llama-cpp-python: killed by SIGILL"}
    )
    assert len(crashed) == 1 and "SIGILL" in crashed[0] and "scripts/setup.sh" in crashed[0]


def test_the_native_library_holds_no_instruction_this_cpu_lacks_and_no_amx():
    """Read llama.cpp's CPU backend as machine code: no AMX tile instruction (whatever the CPU),
    and no AVX-512 register use where the CPU has no AVX-512 (the library would die with SIGILL)."""
    import shutil
    import subprocess

    import llama_cpp

    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is required"
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    asm = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    assert asm.count("\n") > 10_000  # the disassembly is really there
    amx = [m for m in ("ldtilecfg", "tileloadd", "tdpbssd", "tdpbf16ps") if m in asm]
    assert not amx, f"AMX instructions in {lib.name}: {amx}"
    if not cf.read_cpu().supports("AVX512"):
        assert "%zmm" not in asm, "AVX-512 code in a build for a CPU without AVX-512"


def test_auto_encoder_precision_follows_the_gpu_and_the_cpus_int8_dot_product(monkeypatch):
    """`auto`: fp32 with a CUDA GPU, mixed on a CPU with VNNI, fp32 on AVX2 alone; exact: fp32 only."""
    from edge_af3.engines import select
    from edge_af3.quants import resolve_encoder_precision

    real = cf.read_cpu
    monkeypatch.setattr(select, "gpu_name", lambda: None)
    for cpuinfo, want in ((ZEN4, "mixed"), (SAPPHIRE_RAPIDS, "mixed"), (ZEN3, "fp32")):
        monkeypatch.setattr(cf, "read_cpu", lambda text=cpuinfo: real(text, "x86_64"))
        assert resolve_encoder_precision("auto") == want
    monkeypatch.setattr(select, "gpu_name", lambda: "NVIDIA H100")
    assert resolve_encoder_precision("auto") == "fp32"
    assert resolve_encoder_precision("auto", exact=True) == resolve_encoder_precision("fp32", exact=True) == "fp32"
    assert resolve_encoder_precision("int8") == "int8"
    with pytest.raises(ValueError, match="exact mode computes the encoder in fp32"):
        resolve_encoder_precision("mixed", exact=True)
