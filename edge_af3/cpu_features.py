"""The x86 instruction sets that decide how llama.cpp (ggml) is built and how fast it runs.

llama-cpp-python builds ggml with `-march=native` by default, so a wheel holds whatever the
building machine had: the same set-up gives an AMD box a wheel without AMX and an Intel Xeon
with AMX one whose AMX path crashes (llama.cpp issue #20824), and a wheel built on an AVX-512
machine dies with SIGILL on one without. `scripts/setup.sh` therefore builds with
`GGML_NATIVE=OFF` and the ggml options this CPU supports, spelled out, AMX always off, and keeps
the wheel under a name made of those options (`build_tag`): a machine with another instruction
set gets a wheel of its own, never a neighbour's.

Standard library only: `scripts/setup.sh` runs this file by path before edge-af3 is installed
(`python edge_af3/cpu_features.py --cmake-args`), and `doctor` imports it.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# ggml's x86 build options, in the order of ggml's own variants, with the /proc/cpuinfo flags
# each needs (all of them). AMX is listed so that it is reported, and never switched on.
GGML_X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
    "AMX_BF16": ("amx_bf16",),
}
AMX_OPTIONS = ("AMX_TILE", "AMX_INT8", "AMX_BF16")
# Why AMX is off in every build setup.sh makes (docs/cpu.md says more).
AMX_WHY = (
    "llama.cpp's AMX path segfaults at the first batched decode of a repacked quantized tensor (llama.cpp issue #20824)"
)


@dataclass(frozen=True)
class CpuInfo:
    """What this machine's CPU is and which ggml options it supports."""

    name: str
    machine: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset[str]

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "x86")

    def supports(self, option: str) -> bool:
        return all(f in self.flags for f in GGML_X86_OPTIONS[option])

    @property
    def options(self) -> list[str]:
        """The ggml options this CPU supports (AMX included, when it has it)."""
        if not self.is_x86:
            return []
        return [o for o in GGML_X86_OPTIONS if self.supports(o)]

    @property
    def has_amx(self) -> bool:
        return self.is_x86 and self.supports("AMX_INT8")

    @property
    def has_int8_dot(self) -> bool:
        """An int8 dot product that accumulates in int32 (x86 VNNI, ARM dotprod). Without it the
        int8 encoder graphs are measurably less exact on ONNX Runtime (bench-small mixed rows cosine
        0.99988 on an AVX2 Zen 3 vs 0.99993 on an AVX-512 VNNI Zen 4; docs/cpu.md): AVX2's int8
        multiply-add (vpmaddubsw) sums pairs of products in saturating int16."""
        if self.is_x86:
            return self.supports("AVX512_VNNI") or self.supports("AVX_VNNI")
        return "asimddp" in self.flags


def read_cpu(cpuinfo: str | None = None, machine: str | None = None) -> CpuInfo:
    """This machine's CPU (or one described by a /proc/cpuinfo text, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    name = _field(cpuinfo, "model name") or platform.processor() or "unknown CPU"
    flags = frozenset((_field(cpuinfo, "flags") or _field(cpuinfo, "Features") or "").split())
    return CpuInfo(name=name, machine=machine or platform.machine(), flags=flags)


def _field(text: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def build_options(cpu: CpuInfo) -> dict[str, bool]:
    """The ggml options a build for this CPU sets: what it supports, AMX off."""
    return {o: (cpu.supports(o) and o not in AMX_OPTIONS) for o in GGML_X86_OPTIONS}


def cmake_args(cpu: CpuInfo) -> list[str]:
    """CMAKE_ARGS for llama-cpp-python on this CPU. Non-x86 machines (Jetson, Apple) keep ggml's
    native build: `scripts/build_jetson.sh` decides those."""
    if not cpu.is_x86:
        return []
    return ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{o}={'ON' if on else 'OFF'}" for o, on in build_options(cpu).items()]


def build_tag(cpu: CpuInfo, extra_cmake_args: str = "") -> str:
    """A short name for a build: the machine, the options switched on, and a hash of any
    CMAKE_ARGS the user added (a CUDA build is not the CPU build)."""
    if not cpu.is_x86:
        tag = f"{cpu.machine}-native"
    else:
        on = [o.lower().replace("_", "") for o, v in build_options(cpu).items() if v]
        tag = "x86-" + ".".join(on) if on else "x86-baseline"
    if extra_cmake_args.strip():
        tag += "-" + hashlib.sha256(extra_cmake_args.strip().encode()).hexdigest()[:8]
    return tag


def parse_system_info(text: str) -> dict[str, bool]:
    """llama_print_system_info()'s `NAME = 1` pairs: the features compiled into each backend
    (ggml lists only those it has, so an absent name is a feature the build lacks)."""
    return {k: v == "1" for k, v in re.findall(r"([A-Z0-9_]+) = (\w+)", text)}


def llama_system_info() -> str:
    """llama.cpp's own line for this build (loads llama-cpp-python)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def build_mismatch(cpu: CpuInfo, info: dict[str, bool], amx_fixed: bool = False) -> tuple[list[str], list[str], bool]:
    """Compare a build's features with the CPU: (built in but missing on this CPU: SIGILL,
    supported here but not built in: slower, AMX compiled in and present: the crashing path —
    unless the build is one edge_af3/llama_amx.py fixed, `amx_fixed`)."""
    if not cpu.is_x86:
        return [], [], False
    missing, unused = [], []
    for option in GGML_X86_OPTIONS:
        if option in AMX_OPTIONS or option == "SSE42":
            continue  # AMX: below; SSE4.2 is not among the features ggml reports
        built = bool(info.get(option))
        if built and not cpu.supports(option):
            missing.append(option)
        elif not built and cpu.supports(option):
            unused.append(option)
    amx = bool(info.get("AMX_INT8")) and cpu.has_amx and not amx_fixed
    return missing, unused, amx


@functools.lru_cache(maxsize=1)
def amx_path_would_run() -> bool:
    """Whether the llama.cpp in use has llama.cpp's AMX path as shipped (not fixed) compiled in
    and this CPU would take it: the case where models must load without extra buffer types
    (`use_extra_bufts=False`)."""
    cpu, info = read_cpu(), parse_system_info(llama_system_info())
    # the library is read for the fix's mark only where the shipped path would otherwise run
    return build_mismatch(cpu, info)[2] and not amx_fixed_in_use()


def llama_lib_dir(honour_env: bool = True) -> Path | None:
    """The folder llama-cpp-python loads its libraries from (LLAMA_CPP_LIB_PATH unless
    `honour_env` is off, else its own), found without loading it."""
    import importlib.util
    import os

    named = os.environ.get("LLAMA_CPP_LIB_PATH") if honour_env else None
    if named:
        return Path(named)
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent / "lib" if spec and spec.origin else None


# Exported by a libggml-cpu that edge_af3/llama_amx.py built with its AMX fix.
AMX_FIX_SYMBOL = "edge_af3_amx_tile_fix"


def amx_fixed_in_use(lib_dir: Path | None = None) -> bool:
    """Whether the libggml-cpu llama-cpp-python loads is one with edge-af3's AMX fix (its dynamic
    symbols name AMX_FIX_SYMBOL); read as bytes, without loading it."""
    lib_dir = lib_dir or llama_lib_dir()
    try:
        return lib_dir is not None and AMX_FIX_SYMBOL.encode() in (lib_dir / "libggml-cpu.so").read_bytes()
    except OSError:
        return False


def main(argv: list[str]) -> int:
    cpu = read_cpu()
    if argv[:1] == ["--cmake-args"]:
        print(" ".join(cmake_args(cpu)))
    elif argv[:1] == ["--tag"]:
        print(build_tag(cpu, argv[1] if len(argv) > 1 else ""))
    else:
        print(f"{cpu.name} ({cpu.machine}): {' '.join(cpu.options) or 'no x86 options'}")
        print(f"build: {' '.join(cmake_args(cpu)) or '(native)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
