"""Shared fixtures: one tiny AF3 checkpoint and its transformers reference per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_SDIST = ROOT / ".cache" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
if _SDIST.exists():  # scripts/setup.sh keeps the sdist it built llama-cpp-python from
    os.environ.setdefault("EDGE_AF3_LLAMA_SDIST", str(_SDIST))

REAL_CLIP = Path("/usr/share/sounds/alsa/Front_Center.wav")  # a real recording (alsa-utils), 48 kHz


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from edge_af3.reference.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "af3-tiny", shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint exported with an F32 LLM (no verification: test_export checks exports)."""
    from edge_af3.export import export

    return export(
        tiny_ckpt, tmp_path_factory.mktemp("bundle") / "f32", quant="f32", encoder_precision="fp32", verify=False
    )


def compile_native(name: str, out: Path, *flags: str) -> Path:
    """Compile tests/native/NAME with the system's C compiler into `out`."""
    src = Path(__file__).parent / "native" / name
    proc = subprocess.run(["cc", "-O2", *flags, "-o", str(out), str(src), "-ldl"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def amx_emulator(tmp_path_factory) -> Path:
    """tests/native/amx_emu.c as a library for LD_PRELOAD (AMX on CPUs without it)."""
    return compile_native("amx_emu.c", tmp_path_factory.mktemp("amx") / "libamx_emu.so", "-shared", "-fPIC")


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    from edge_af3.reference.loader import load_reference

    return load_reference(tiny_ckpt)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """Synthetic speech from espeak-ng (22.05 kHz mono WAV)."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is required (scripts/setup.sh installs it)"
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([exe, "-w", str(path), "Transcribe the input speech, then describe the sounds."], check=True)
    return path


@pytest.fixture(scope="session")
def real_clip() -> Path:
    assert REAL_CLIP.exists(), "alsa-utils' recorded clips are required (scripts/setup.sh installs alsa-utils)"
    return REAL_CLIP


def noise(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(round(seconds * rate)))).astype(np.float32)


def sweep(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    f0, f1 = 50.0, 7900.0
    phase = 2 * np.pi * f0 * seconds / np.log(f1 / f0) * (np.exp(t / seconds * np.log(f1 / f0)) - 1)
    return (0.5 * np.sin(phase)).astype(np.float32)


def free_port() -> int:
    """A localhost TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(proc: subprocess.Popen, url: str, seconds: float, tail, what: str = "the server") -> None:
    """Until GET url answers 200: a deadline guard on a server's start-up, not a timing assertion;
    its log's tail (`tail()`) in the failure."""
    import httpx2 as httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"{what} exited ({proc.returncode}): {tail()}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not come up: {tail()}"
        time.sleep(0.2)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """`edge-af3 ARGS` in a real subprocess (the installed console script's module)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "edge_af3", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


def start_pulse(runtime: Path, sink: str) -> dict:
    """Start a private PulseAudio daemon whose only sink is a null sink `sink`; its monitor is the
    default source, so what `paplay -d SINK` plays is what PortAudio's `pulse` input device records.
    Returns the environment that reaches it."""
    exe = shutil.which("pulseaudio")
    assert exe and shutil.which("paplay"), "pulseaudio and paplay are required (scripts/setup.sh installs them)"
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    subprocess.run(
        [
            exe,
            "--daemonize=yes",
            "--exit-idle-time=-1",
            "-n",
            f"--load=module-null-sink sink_name={sink}",
            "--load=module-native-protocol-unix",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(["pactl", "set-default-source", f"{sink}.monitor"], env=env, check=True)
    return env


def stop_pulse(env: dict) -> None:
    subprocess.run([shutil.which("pulseaudio"), "--kill"], env=env, capture_output=True)


@pytest.fixture(scope="session")
def pulse(tmp_path_factory):
    """A real capture path for the mic tests: PulseAudio null sink -> monitor -> PortAudio."""
    env = start_pulse(tmp_path_factory.mktemp("xdg"), "edgeaf3")
    yield env
    stop_pulse(env)


@pytest.fixture(scope="session")
def think_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with a think/ folder as AF3 ships it (make-tiny --think)."""
    from edge_af3.reference.adapters import write_think

    path = tmp_path_factory.mktemp("think") / "af3-tiny-think"
    shutil.copytree(tiny_ckpt, path)
    write_think(path, seed=0)
    return path


@pytest.fixture(scope="session")
def think_bundle(think_ckpt, tmp_path_factory) -> Path:
    from edge_af3.export import export

    return export(
        think_ckpt,
        tmp_path_factory.mktemp("think-bundle") / "f32",
        quant="f32",
        encoder_precision="fp32",
        verify=False,
        adapter_type="f32",
    )  # f32 LoRA tensors: the exact parity tests compare with PEFT's float32
