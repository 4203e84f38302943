"""Layout is `ruff format`'s and the lint is clean (the pinned ruff, the rules in pyproject.toml):
no line is packed by hand, and no format escape keeps a file under a length."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def _ruff() -> str:
    exe = Path(sys.executable).parent / "ruff"
    found = str(exe) if exe.is_file() else shutil.which("ruff")
    assert found, "ruff is required (the dev extra pins it)"
    return found


def test_ruff_format_and_check_are_clean():
    fmt = subprocess.run([_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, check=False)
    assert fmt.returncode == 0, fmt.stdout[-3000:] + fmt.stderr[-1000:]
    lint = subprocess.run([_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-1000:]


def test_no_format_escapes():
    marker = "fmt: " + "skip"  # (spelled so this file does not hold it)
    hits = [
        str(p.relative_to(ROOT))
        for d in ("edge_af3", "tests", "benchmarks", "scripts")
        for p in (ROOT / d).rglob("*.py")
        if marker in p.read_text()
    ]
    assert not hits, hits
