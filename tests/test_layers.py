"""The inference layers never need torch, transformers or onnxscript: a Jetson install looks like
this. A fresh interpreter with those made unimportable loads a bundle and answers, converts the
bundle's encoder to fp16 for TensorRT, imports every engine module, and runs `listen --file`,
`doctor` and `plan` through the CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

BLOCKER = '''
import sys
class _Blocked:
    """Refuse torch, transformers and onnxscript as a Jetson without them would (and Piper: GPL,
    run only as a separate program)."""
    BLOCKED = ("torch", "transformers", "onnxscript", "torchaudio", "peft", "piper")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test (a torch-free install)")
        return None
sys.meta_path.insert(0, _Blocked())
'''

SCRIPT = (
    BLOCKER
    + """
import importlib, json, pkgutil, sys, tempfile
from pathlib import Path
import numpy as np
import edge_af3, edge_af3.engines
from edge_af3 import AF3
bundle = sys.argv[1]
for mod in pkgutil.iter_modules(edge_af3.engines.__path__):
    importlib.import_module(f"edge_af3.engines.{mod.name}")
for name in ("listen", "vad", "plan", "settings", "runtime", "cli.app", "onnx_tools", "checkpoint", "paths",
             "server.app", "server.scheduler", "server.speech", "client", "voice", "voice.output", "cli.speech"):
    importlib.import_module(f"edge_af3.{name}")
from edge_af3.voice import open_voice
voice = open_voice("piper")  # Piper's own CLI in a process of its own: nothing of it imported here
spoken = sum(s.shape[0] for s, _ in voice.speak("Hello there."))
voice.close()
x = (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
with AF3.load(bundle, n_ctx=1024) as m:
    ans = m.ask("What do you hear?", (x, 16000), max_new_tokens=4)
from edge_af3.bundle import open_bundle
from edge_af3.engines.tensorrt import _fp16_onnx
with tempfile.TemporaryDirectory() as tmp:
    half = _fp16_onnx(open_bundle(bundle), Path(tmp))  # what the TensorRT engine does with an fp32 bundle
    converted = half.stat().st_size
print(json.dumps({"tokens": len(ans.tokens), "audio_tokens": ans.timings.audio_tokens, "fp16_bytes": converted,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "spoken": spoken, "piper": "piper" in sys.modules}))
"""
)

CLI = (
    BLOCKER
    + """
from edge_af3.cli import main
sys.argv = ["edge-af3"] + sys.argv[1:]
main()
"""
)


def _run(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_blocker_really_blocks():
    res = _run(BLOCKER + "import torch")
    assert res.returncode != 0 and "blocked in this test" in res.stderr


def test_runtime_engines_and_trt_conversion_without_torch(tiny_bundle):
    res = _run(SCRIPT, str(tiny_bundle))
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["tokens"] == 4 and info["audio_tokens"] == 50 and info["fp16_bytes"] > 0
    assert not info["torch"] and not info["transformers"]
    assert info["spoken"] > 22050 // 2 and not info["piper"]


def test_cli_without_torch(tiny_bundle, speech_wav, tmp_path):
    res = _run(CLI, "doctor", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["ok"] is True
    res = _run(CLI, "plan", str(tiny_bundle), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)
    assert plan["target"]["name"] == "this machine" and plan["settings"]["encoder_engine"] == "onnxruntime-cpu"
    res = _run(CLI, "listen", "--file", str(speech_wav), "-m", str(tiny_bundle), "--every", "2", "-n", "2", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert lines[-1]["summary"]["answered"] >= 1 and all("text" in a for a in lines[:-1])


LAYERS = (
    "runtime",
    "engines",
    "server",
    "voice",
    "listen.py",
    "capture.py",
    "vad.py",
    "plan.py",
    "settings.py",
    "audio.py",
    "features.py",
    "bundle.py",
    "prompt.py",
    "paths.py",
    "checkpoint.py",
    "onnx_tools.py",
    "client.py",
)


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name, []


@pytest.mark.parametrize("layer", LAYERS)
def test_inference_layers_import_no_reference_export_or_private_names(layer):
    pkg = ROOT / "edge_af3"
    files = [pkg / layer] if layer.endswith(".py") else sorted((pkg / layer).rglob("*.py"))
    for f in files:
        for level, module, names in _imports(f):
            mod = module.split(".")
            if f.name == "locate.py" and module == "export" and level == 2:
                continue  # the one door to the exporter: AF3.load(checkpoint) exports it (extra `export`)
            assert "reference" not in mod and "export" not in mod, f"{f.name} imports {module}"
            assert not (level == 0 and mod[0] in ("transformers", "onnxscript", "piper")), f"{f.name} imports {module}"
            private = [n for n in names if n.startswith("_") and n != "__future__"]
            assert not private or module == "__future__", f"{f.name} imports private {private} from {module}"


def test_cli_modules_have_no_import_cycle():
    cli = ROOT / "edge_af3" / "cli"
    graph = {}
    for f in cli.glob("*.py"):
        graph[f.stem] = {m.split(".")[0] for level, m, names in _imports(f) if level == 1 and m} | {
            n for level, m, names in _imports(f) if level == 1 and not m for n in names
        }

    def reach(start, node, seen):
        for nxt in graph.get(node, ()):
            assert nxt != start, f"import cycle through cli/{start}.py"
            if nxt not in seen:
                seen.add(nxt)
                reach(start, nxt, seen)

    for name in graph:
        reach(name, name, set())


def test_no_module_is_longer_than_one_sitting():
    long = {
        str(f.relative_to(ROOT)): n
        for f in (ROOT / "edge_af3").rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 420
    }
    assert not long, long
