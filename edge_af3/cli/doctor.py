"""`edge-af3 doctor`: what this machine has for edge-af3, and how to install what it lacks."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# (distribution, import name, needed for, install command)
PACKAGES = [
    ("numpy", "numpy", "runtime", "pip install edge-af3"),
    ("onnxruntime", "onnxruntime", "runtime (CPU encoder)", "pip install edge-af3"),
    ("llama-cpp-python", "llama_cpp", "runtime (LLM)", "pip install edge-af3"),
    ("soundfile", "soundfile", "runtime (audio files)", "pip install edge-af3  (+ apt-get install libsndfile1)"),
    ("soxr", "soxr", "runtime (resampling)", "pip install edge-af3"),
    ("huggingface-hub", "huggingface_hub", "runtime (Hub ids)", "pip install edge-af3"),
    ("torch", "torch", "export / reference / torch encoder engine", "pip install 'edge-af3[export]'"),
    ("transformers", "transformers", "export / reference", "pip install 'edge-af3[export]'"),
    ("onnx", "onnx", "export / torch + TensorRT engines", "pip install 'edge-af3[export]'"),
    ("gguf", "gguf", "export", "pip install 'edge-af3[export]'"),
    ("fastapi", "fastapi", "serve", "pip install 'edge-af3[server]'"),
    ("uvicorn", "uvicorn", "serve", "pip install 'edge-af3[server]'"),
    ("openai", "openai", "AF3.connect / --base-url", "pip install 'edge-af3[client]'"),
    ("peft", "peft", "train / think reference", "pip install 'edge-af3[train]'"),
    (
        "sounddevice",
        "sounddevice",
        "listen --mic, --speak",
        "pip install 'edge-af3[mic]'  (+ apt-get install libportaudio2)",
    ),
    ("piper-tts", None, "--speak with Piper voices (a separate program)", "pip install 'edge-af3[voice]'"),
    ("onnxruntime-gpu", None, "CUDA encoder (ONNX Runtime)", "pip install 'edge-af3[gpu]'"),
    ("cuda-python", None, "CUDA graphs (TensorRT engine)", "pip install 'edge-af3[gpu]'"),
    ("tensorrt", None, "TensorRT encoder", "pip install 'edge-af3[trt]'"),
]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _probe(fn):
    try:
        return fn()
    except Exception as e:  # a doctor reports, it does not crash
        return f"error: {type(e).__name__}: {e}"


def _ort_providers():
    import onnxruntime as ort

    return ort.get_available_providers()


def _cuda():
    if not shutil.which("nvidia-smi"):
        return None
    res = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return [line.strip() for line in res.stdout.splitlines() if line.strip()] or None


def _llama_system_info() -> str:
    """llama.cpp's system info, read in a child process: a build for another CPU dies there
    (Illegal instruction), and doctor reports it instead of dying with it."""
    import signal

    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode(errors='replace'))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        sigill = res.returncode == -signal.SIGILL
        how = f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0 else f"exit {res.returncode}"
        raise RuntimeError(f"loading llama-cpp-python: {how}" + (" (built for another CPU)" if sigill else ""))
    return res.stdout.strip().splitlines()[-1]


def _audio_inputs():
    import sounddevice as sd

    return [
        {"index": i, "name": d["name"], "channels": d["max_input_channels"], "rate": d["default_samplerate"]}
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


def _audio_outputs():
    from ..voice.output import output_devices

    return output_devices()


def _voices():
    from ..voice import find_voices

    return find_voices()


def cpu_report(system_info: str | None) -> dict:
    """The CPU's instruction sets that matter to llama.cpp and ONNX Runtime, llama.cpp's own
    system info, and where the build and the CPU disagree (docs/cpu.md)."""
    from .. import cpu_features as cf

    cpu = cf.read_cpu()
    report = {
        "name": cpu.name,
        "machine": cpu.machine,
        "features": {o: cpu.supports(o) for o in cf.GGML_X86_OPTIONS} if cpu.is_x86 else {},
        "llama_cpp_system_info": system_info,
        "build_tag_for_this_cpu": cf.build_tag(cpu),
        "build_uses_missing": [],
        "build_leaves_unused": [],
        "amx_path": False,
        "amx_fixed": cpu.has_amx and cf.amx_fixed_in_use(),  # the AMX buffer exists only on an AMX CPU
    }
    if system_info and not system_info.startswith("error:"):
        info = cf.parse_system_info(system_info)
        missing, unused, amx = cf.build_mismatch(cpu, info, amx_fixed=report["amx_fixed"])
        report.update(build_uses_missing=missing, build_leaves_unused=unused, amx_path=amx)
    return report


def _cpu_hints(cpu: dict) -> list[str]:
    hints = []
    info = cpu["llama_cpp_system_info"] or ""
    if info.startswith("error:"):
        hints.append(f"llama-cpp-python does not load here ({info[7:].strip()}): rebuild it with scripts/setup.sh")
    if cpu["build_uses_missing"]:
        hints.append(
            f"llama-cpp-python was built for another CPU: it uses {', '.join(cpu['build_uses_missing'])}, which "
            "this CPU lacks (it will die with 'Illegal instruction'): rebuild it here with scripts/setup.sh"
        )
    if cpu["amx_path"]:
        hints.append(
            "llama-cpp-python was built with llama.cpp's AMX path, which crashes (llama.cpp #20824): edge-af3 "
            "loads models without weight repacking on it (slower); rebuild with scripts/setup.sh (AMX off)"
        )
    if cpu.get("amx_fixed"):
        hints.append(
            "llama.cpp's AMX path with edge-af3's fix is in use (LLAMA_CPP_LIB_PATH, edge_af3/llama_amx.py): "
            "correct in tests, its speed not yet measured against AVX-512 on an AMX CPU (docs/cpu.md)"
        )
    if cpu["build_leaves_unused"]:
        hints.append(
            f"llama-cpp-python leaves {', '.join(cpu['build_leaves_unused'])} of this CPU unused (slower than it "
            "could be): rebuild it here with scripts/setup.sh"
        )
    return hints


def model_description(spec: str) -> dict:
    """What `-m SPEC` names, as every command reads it: a bundle (described from its manifest),
    an AF3 checkpoint folder or a Hub id (its bundle from the cache when exported, else what the
    first use will do); ModelNotFoundError / CheckpointError when it is none of them."""
    from ..checkpoint import read_config
    from ..errors import ModelNotFoundError
    from ..quants import resolve_encoder_precision
    from ..runtime.locate import cached_bundle_path, first_use

    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return bundle_report(path)
    if path.is_dir():
        read_config(path)  # refuses a folder that is not an AF3 checkpoint, naming why
        bundle = cached_bundle_path(path.resolve(), "auto", resolve_encoder_precision("auto"))
        if (bundle / "manifest.json").is_file():
            return bundle_report(bundle) | {"checkpoint": str(path)}
        need = first_use(path)
        return {"checkpoint": str(path), "bundle": None, "first_use": need}
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{spec}: no such bundle or checkpoint folder (and not a Hub id ORG/NAME)")
    return {"hub_id": spec, "bundle": None, "first_use": first_use(spec)}


def bundle_report(path) -> dict:
    """A bundle's model and adapters, from its manifest (nothing loaded)."""
    from ..bundle import read_manifest
    from ..family import Family

    m = read_manifest(path)
    family = Family.from_manifest(m)
    adapters = {
        name: {
            "rank": a["lora"]["r"],
            "alpha": a["lora"]["alpha"],
            "type": a["lora"].get("type", "f32"),
            "encoder_weights": bool(a.get("encoder")),
            "prompt_suffix": bool(a.get("prompt_suffix")),
        }
        for name, a in (m.get("adapters") or {}).items()
    }
    return {
        "bundle": str(path),
        "source": (m.get("source") or {}).get("id"),
        "architecture": {
            "model_type": family.model_type,
            "name": family.name,
            "max_seconds": family.max_seconds,
            "time_embedding": family.time_embedding,
        },
        "llm": m["llm"]["quant"],
        "encoder": m["encoder"]["precision"],
        "adapters": adapters,
        "think": "think adapter + suffix" if "think" in adapters else "suffix only (no think/ in the checkpoint)",
    }


def checks() -> dict:
    from ..engines.llamacpp import supports_gpu_offload
    from ..reference.vocab import cache_dir

    pkgs = []
    for dist, _mod, purpose, cmd in PACKAGES:
        v = _version(dist)
        pkgs.append({"package": dist, "version": v, "for": purpose, "install": None if v else cmd})
    have = {p["package"] for p in pkgs if p["version"]}
    system_info = _probe(_llama_system_info) if "llama-cpp-python" in have else None
    llama_loads = bool(system_info) and not system_info.startswith("error:")
    report = {
        "python": {
            "version": platform.python_version(),
            "ok": sys.version_info >= (3, 10),
            "executable": sys.executable,
        },
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": pkgs,
        "onnxruntime_providers": _probe(_ort_providers) if "onnxruntime" in have else None,
        "llama_cpp_gpu_offload": _probe(supports_gpu_offload) if llama_loads else None,
        "cuda_gpus": _probe(_cuda),
        "cpu": cpu_report(system_info),
        "audio_inputs": _probe(_audio_inputs) if "sounddevice" in have else None,
        "audio_outputs": _probe(_audio_outputs) if "sounddevice" in have else None,
        "voices": _probe(_voices),
        "cache": str(cache_dir()),
    }
    from ..engines.select import choose_encoder

    choice = _probe(lambda: choose_encoder("auto"))
    report["encoder_engine"] = choice.explain() if hasattr(choice, "explain") else choice
    missing = [p for p in pkgs if not p["version"] and p["for"].startswith(("runtime", "export", "listen"))]
    hints = sorted({p["install"] for p in missing})
    if report["cuda_gpus"] and report["llama_cpp_gpu_offload"] is False:
        hints.append(  # this CPU's options as setup.sh builds them (AMX off), plus CUDA
            'CMAKE_ARGS="-DGGML_CUDA=on $(python -m edge_af3.cpu_features --cmake-args)" pip install --force-reinstall '
            "--no-cache-dir --no-binary llama-cpp-python llama-cpp-python  "
            "(or: CMAKE_ARGS=-DGGML_CUDA=on scripts/setup.sh)"
        )
    hints += _cpu_hints(report["cpu"])
    if isinstance(report["audio_inputs"], list) and not report["audio_inputs"]:
        hints.append("no audio input device: plug a microphone in, or check PulseAudio/ALSA (pactl list sources short)")
    report["hints"] = hints
    report["ok"] = (
        report["python"]["ok"]
        and not any(p["for"].startswith("runtime") for p in missing)
        and not report["cpu"]["build_uses_missing"]
    )
    return report


def render(report: dict, out) -> None:
    from rich.table import Table

    out.print(f"Python {report['python']['version']} on {report['platform']} ({report['python']['executable']})")
    t = Table(show_header=True, header_style="bold")
    for col in ("package", "version", "needed for"):
        t.add_column(col)
    for p in report["packages"]:
        t.add_row(p["package"], p["version"] or "[yellow]missing[/]", p["for"])
    out.print(t)
    cpu = report["cpu"]
    have = [o for o, ok in cpu["features"].items() if ok]
    lacks = [o for o, ok in cpu["features"].items() if not ok]
    out.print(f"CPU:                    {cpu['name']} ({cpu['machine']})", markup=False)
    if cpu["features"]:
        out.print(f"  has:                  {' '.join(have) or 'none of them'}", markup=False)
        out.print(f"  lacks:                {' '.join(lacks) or 'none of them'}", markup=False)
    out.print(f"llama.cpp system info:  {cpu['llama_cpp_system_info']}", markup=False)
    agree = not (cpu["build_uses_missing"] or cpu["build_leaves_unused"] or cpu["amx_path"])
    out.print(f"  build vs this CPU:    {'agree' if agree else '[yellow]disagree (see the fixes below)[/]'}")
    out.print(f"ONNX Runtime providers: {report['onnxruntime_providers']}")
    out.print(f"llama.cpp GPU offload:  {report['llama_cpp_gpu_offload']}")
    out.print(f"CUDA GPUs:              {report['cuda_gpus'] or 'none found (nvidia-smi)'}")
    inputs = report["audio_inputs"]
    if isinstance(inputs, list):
        out.print(f"audio inputs:           {len(inputs)}")
        for d in inputs:
            out.print(f"  [{d['index']}] {d['name']} ({d['channels']} ch, {d['rate']:.0f} Hz)", markup=False)
    else:
        out.print(f"audio inputs:           {inputs or 'sounddevice not installed'}")
    outputs = report["audio_outputs"]
    n_out = len(outputs) if isinstance(outputs, list) else outputs or "sounddevice not installed"
    out.print(f"audio outputs:          {n_out}")
    voices = report["voices"]
    if isinstance(voices, dict):
        for engine in ("piper", "espeak-ng", "kokoro"):
            v = voices[engine]
            found = ", ".join(v.get("voices") or {}) if engine == "piper" else (v.get("path") or "")
            state = f"[green]found[/] {found}".rstrip() if v["found"] else f"[yellow]none[/] ({v['why']})"
            out.print(f"voice {engine + ':':<17} {state}", highlight=False)
        out.print(f"  --voice auto speaks with: {voices['default'] or 'nothing (install a voice engine)'}")
    out.print(f"encoder:                {report['encoder_engine']}")
    out.print(f"cache:                  {report['cache']}")
    m = report.get("model")
    if m and m.get("bundle") is None:  # a checkpoint or Hub id not exported yet
        what = m.get("checkpoint") or m.get("hub_id")
        need = m.get("first_use")
        ahead = f"{need['download_gb']:.1f} GB of weights to export" if need else "exported at first use"
        out.print(f"model:                  {what}: not exported yet ({ahead}; `edge-af3 models pull {what}`)")
    elif m:
        names = (
            ", ".join(
                f"{n} (r {a['rank']}, {a['type']}{', encoder weights' if a['encoder_weights'] else ''})"
                for n, a in m["adapters"].items()
            )
            or "none"
        )
        out.print(f"model:                  {m['bundle']} ({m['llm']}, encoder {m['encoder']})", markup=False)
        arch = m["architecture"]
        extra = ", rotary time embedding" if arch["time_embedding"] else ""
        out.print(
            f"architecture:           {arch['name']} ({arch['model_type']}, {arch['max_seconds']} s per clip{extra})",
            markup=False,
        )
        out.print(f"adapters:               {names}; think mode: {m['think']}", markup=False)
    for h in report["hints"]:
        out.print(f"[yellow]fix:[/] {h}")
    out.print("[green]ready[/]" if report["ok"] else "[red]not ready: see the fixes above[/]")
