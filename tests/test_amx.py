"""llama.cpp's AMX path (issue #22): the crash reproduced, its cause shown, the fix checked.

On an AMX CPU the AMX instructions run on the CPU; elsewhere `tests/native/amx_emu.c` carries them
out in software (a SIGILL handler), so the same tests run on the AMD boxes too. Two builds of
ggml's CPU backend with AMX are made from the sdist setup.sh keeps (edge_af3/llama_amx.py, about
a minute each, kept in the cache): as llama.cpp ships it, and with edge-af3's fix. The shipped one
must fail the way #22 reported, with the unconfigured tiles the emulator names; the fixed one must
decode every GGUF type the exporter writes as llama.cpp without AMX does (the same logits), agree
with transformers, and run the AMX instructions while doing so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_af3 import cpu_features as cf
from edge_af3.quants import QUANTS
from tests.conftest import compile_native, run_cli
from tests.test_gguf_types import (
    CHILD,
    FLOORS,
    _ids,
    agreement,
    child_result,
    decode_process,
    make_ggufs,
    reference_logits,
)

CPU = cf.read_cpu()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CPU.supports("AVX512_VNNI"),
        reason=f"{CPU.name} lacks AVX-512 VNNI, which llama.cpp's AMX kernels need (emulated or not)",
    ),
]
EMULATED = not CPU.has_amx
# What llama.cpp's AMX buffer does with each type the exporter writes (ggml-cpu/amx/amx.cpp's
# supports_op), and how far the logits may then be from the same build without AMX:
# - int8 tiles (Q4_0, Q8_0, Q4_K; Q4_K_M at the tiny widths falls back to Q5_0/Q8_0 tensors):
#   the same integer products, measured bit-equal for Q4_0/Q8_0 and within 6e-6 for Q4_K;
# - F16 is taken by the AMX buffer but multiplied with AVX-512 in fp32 (no tiles), where the
#   build without AMX rounds the activations to f16 first: measured 0.0087 apart (and nearer to
#   transformers: max |diff| 0.0111 against 0.0124);
# - F32 and IQ4_NL stay off the AMX buffer: bit-equal.
AMX_TAKES = {"q4_0": "tiles", "q8_0": "tiles", "q4_k_m": "tiles", "f16": "avx512", "f32": None, "iq4_nl": None}
TOLERANCE = {"q4_0": 0.0, "q8_0": 0.0, "q4_k_m": 1e-3, "f16": 0.02, "f32": 0.0, "iq4_nl": 0.0}


@pytest.fixture(scope="module")
def amx_builds(tmp_path_factory) -> dict[str, Path]:
    """{"fixed": lib dir, "shipped": lib dir, "control": lib dir}, each for LLAMA_CPP_LIB_PATH;
    the control is the same compiler run without AMX (the installed wheel is a build apart: its F16
    logits differ from any of these by up to 0.009)."""
    from edge_af3.llama_amx import build
    from edge_af3.paths import cache_dir

    root = cache_dir() / "llama-amx" / cf.build_tag(CPU)
    return {
        "fixed": build(root / "fixed", fixed=True, progress=lambda _: None),
        "shipped": build(root / "shipped", fixed=False, progress=lambda _: None),
        "control": build(root / "control", amx=False, progress=lambda _: None),
    }


def amx_env(amx_emulator: Path, lib_dir: Path | None, **extra: str) -> dict:
    env = dict(os.environ, AMX_EMU_STATS="1", **extra)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if lib_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    if EMULATED:
        env["LD_PRELOAD"] = str(amx_emulator)
    return env


def emulated_counts(stderr: str) -> dict[str, int]:
    m = re.search(r"amx_emu: emulated (.*)", stderr)
    assert m, f"the emulator's counts are missing: {stderr[-1000:]}"
    return {k: int(v) for k, v in re.findall(r"(\S+)=(\d+)", m.group(1))}


def decode(gguf: Path, ids: list[int], env: dict, adapter: Path | str = "", guard: bool = True):
    """test_gguf_types' child (batched ids, batched rows, greedy tokens), llama.cpp's log on;
    `guard=False`: without edge-af3's load-time guard (which keeps a shipped AMX path off AMX)."""
    child = CHILD.replace("flash_attn=False)", "flash_attn=False, verbose=True)")
    assert child != CHILD
    if not guard:
        child = "import edge_af3.engines.llamacpp as L\nL.amx_path_would_run = lambda: False\n" + child
    return decode_process(gguf, ids, adapter, child=child, env=env)


def test_the_emulator_follows_the_instruction_set(amx_emulator, tmp_path):
    """The emulated (or, on an AMX CPU, the real) dot products, loads and stores against plain C
    loops; under emulation also the faults the SDM defines, and a deliberately wrong dot product
    caught by the same program."""
    exe = compile_native("amx_selftest.c", tmp_path / "amx_selftest", "-mamx-tile", "-mamx-int8", "-mamx-bf16")
    env = amx_env(amx_emulator, None)
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    if not EMULATED:
        return
    assert emulated_counts(run.stderr)["tdpb*d"] == 4 and emulated_counts(run.stderr)["tdpbf16ps"] == 1
    bad = subprocess.run([str(exe), "badconfig"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == -signal.SIGSEGV and "#GP" in bad.stderr, bad.stderr
    unconfigured = subprocess.run([str(exe), "unconfigured"], capture_output=True, text=True, env=env, timeout=60)
    assert unconfigured.returncode == -signal.SIGILL and "not configured" in unconfigured.stderr
    wrong = subprocess.run([str(exe)], capture_output=True, text=True, env={**env, "AMX_EMU_FAULT": "1"}, timeout=60)
    assert wrong.returncode == 1 and "tdpbssd" in wrong.stdout, wrong.stdout


def test_the_builds_are_told_apart(amx_builds):
    """edge-af3's guard (loading without extra buffer types) is for the shipped AMX path only."""
    from edge_af3.llama_amx import wheel_lib_dir

    assert cf.amx_fixed_in_use(amx_builds["fixed"]) and not cf.amx_fixed_in_use(amx_builds["shipped"])
    assert not cf.amx_fixed_in_use(wheel_lib_dir())  # setup.sh's wheel has no AMX at all
    spr = cf.read_cpu("flags\t: avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni amx_tile amx_int8\n", "x86_64")
    info = {"AVX512": True, "AVX512_VNNI": True, "AMX_INT8": True}
    assert cf.build_mismatch(spr, info)[2] and not cf.build_mismatch(spr, info, amx_fixed=True)[2]


def test_the_shipped_amx_path_fails_as_issue_22_reported(amx_builds, amx_emulator, tiny_ckpt, tmp_path):
    """llama.cpp's AMX path as shipped (edge-af3's guard off), on a Q4_0 GGUF: the process dies at
    the first batched decode; emulated, the emulator names the cause (tiles configured with no
    rows) — with a compiler that drops the configuration's stores, as GCC 12.2 does."""
    from edge_af3.export.gguf_llm import quantize, write_gguf
    from edge_af3.llama_amx import compiler_drops_tile_config

    if not compiler_drops_tile_config():
        pytest.skip("this compiler keeps the tile configuration's stores: llama.cpp's AMX path needs no fix with it")
    gguf = quantize(write_gguf(tiny_ckpt, tmp_path / "f32.gguf", ftype="f32"), tmp_path / "q4_0.gguf", "q4_0")
    proc = decode(gguf, _ids(tiny_ckpt), amx_env(amx_emulator, amx_builds["shipped"]), guard=False)
    crash = (-signal.SIGILL,) if EMULATED else (-signal.SIGSEGV, -signal.SIGILL)
    assert proc.returncode in crash, (proc.returncode, proc.stderr[-2000:])
    assert "AMX model buffer" in proc.stderr  # llama.cpp put the weights in its AMX buffers first
    if EMULATED:
        assert "tileloadd on a tile that is not configured (rows 0" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def ggufs(tiny_ckpt, tmp_path_factory):
    """The files test_gguf_types decodes: ({(shape, type): path}, the 256-wide checkpoint)."""
    from edge_af3.reference.tiny import make_checkpoint

    k256 = make_checkpoint(tmp_path_factory.mktemp("k256") / "af3-k256", shape="tiny-k256", seed=0)
    return make_ggufs(tiny_ckpt, k256, tmp_path_factory.mktemp("types")), k256


@pytest.fixture(scope="module")
def transformers_logits():
    """transformers' fp32 logits for a checkpoint's probe ids, computed once per checkpoint."""
    from edge_af3.reference.loader import load_reference

    cache = {}

    def get(ckpt):
        if ckpt not in cache:
            cache[ckpt] = reference_logits(load_reference(ckpt, dtype="float32").model, _ids(ckpt))
        return cache[ckpt]

    return get


@pytest.mark.parametrize("shape,quant", [("tiny", q) for q in QUANTS] + [("tiny-k256", "q4_k_m")])
def test_the_fixed_amx_path_decodes_every_type(
    shape, quant, ggufs, amx_builds, amx_emulator, tiny_ckpt, transformers_logits
):
    paths, k256 = ggufs
    ckpt = tiny_ckpt if shape == "tiny" else k256
    ids = _ids(ckpt)
    gguf = paths[(shape, quant)]
    amx = decode(gguf, ids, amx_env(amx_emulator, amx_builds["fixed"]))
    got = child_result(amx, f"{shape} {quant} on the fixed AMX path")
    plain = child_result(
        decode(gguf, ids, amx_env(amx_emulator, amx_builds["control"])), f"{shape} {quant} without AMX"
    )
    logits, plain_logits = np.asarray(got["logits"]), np.asarray(plain["logits"])
    takes = AMX_TAKES[quant]
    apart = np.abs(logits - plain_logits).max()
    assert apart <= TOLERANCE[quant] and got["greedy"] == plain["greedy"], f"{shape} {quant}: {apart} from no AMX"
    want = transformers_logits(ckpt)[:, : got["n_vocab"]]
    top1, cos = agreement(logits, want)
    assert top1 >= FLOORS[quant][0] and cos >= FLOORS[quant][1], f"{shape} {quant}: top-1 {top1:.3f}, cos {cos:.5f}"
    assert ("AMX model buffer" in amx.stderr) == (takes is not None), amx.stderr[-2000:]
    if EMULATED:
        assert (emulated_counts(amx.stderr)["tdpb*d"] > 0) == (takes == "tiles"), amx.stderr[-500:]


def test_a_wrong_amx_kernel_would_be_caught(ggufs, amx_builds, amx_emulator, tiny_ckpt):
    """The comparison above can fail: the same decode with every emulated dot product off by one
    is far from llama.cpp without AMX."""
    if not EMULATED:
        pytest.skip("the AMX instructions run on this CPU: no emulator to make them wrong")
    paths, _ = ggufs
    ids = _ids(tiny_ckpt)
    wrong = child_result(
        decode(paths[("tiny", "q8_0")], ids, amx_env(amx_emulator, amx_builds["fixed"], AMX_EMU_FAULT="1")), ""
    )
    plain = child_result(decode(paths[("tiny", "q8_0")], ids, amx_env(amx_emulator, amx_builds["control"])), "")
    assert np.abs(np.asarray(wrong["logits"]) - np.asarray(plain["logits"])).max() > 1e-2


def test_export_and_ask_on_the_fixed_amx_path(amx_builds, amx_emulator, tiny_ckpt, speech_wav, tmp_path):
    """#22's failing commands: `export --quant q4_0` (its check of the GGUF logits against
    transformers) and then `ask`, on the fixed AMX path; the answer is the one the same build
    without AMX gives on the same bundle."""
    env = amx_env(amx_emulator, amx_builds["fixed"])
    res = run_cli("export", str(tiny_ckpt), str(tmp_path / "b"), "--quant", "q4_0", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    gate = manifest["parity_gate"]
    assert gate["verified"] and gate["passed"], gate
    if EMULATED:
        assert emulated_counts(res.stderr).get("tdpb*d", 0) > 0
    question = [str(speech_wav), "What do you hear?", "-m", str(tmp_path / "b"), "-n", "16", "--json"]
    on_amx = run_cli("ask", *question, env=env)
    plain = run_cli("ask", *question, env=amx_env(amx_emulator, amx_builds["control"]))
    assert on_amx.returncode == 0 and plain.returncode == 0, on_amx.stderr[-2000:] + plain.stderr[-2000:]
    assert json.loads(on_amx.stdout)["text"] == json.loads(plain.stdout)["text"]
