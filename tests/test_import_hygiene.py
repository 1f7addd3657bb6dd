"""The core imports no framework, imports fast, and nothing imports through ``backends.``."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import peftcore

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = sorted(
    m.name for m in pkgutil.walk_packages(peftcore.__path__, prefix="peftcore.") if m.name != "peftcore.testing"
)


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip()


def test_every_core_module_imports_without_frameworks():
    assert "peftcore.methods.lora.config" in CORE_MODULES
    code = (
        "import importlib, sys\n"
        f"for name in {CORE_MODULES!r}: importlib.import_module(name)\n"
        "print(' '.join(m for m in ('torch', 'jax', 'jaxlib', 'tensorflow') if m in sys.modules))"
    )
    assert _run(code) == ""


def test_import_peftcore_is_fast():
    code = ("import time; t0 = time.perf_counter(); import numpy; t1 = time.perf_counter(); import peftcore; "
            "t2 = time.perf_counter(); print(t2 - t0, t2 - t1)")
    # best of three: the first run may pay for cold disk caches. peftcore's own share (after NumPy, which
    # any array user has loaded anyway) is bounded tightly; the total loosely, as a loaded machine slows both
    runs = [tuple(map(float, _run(code).split())) for _ in range(3)]
    assert min(total for total, _ in runs) < 1.0
    assert min(own for _, own in runs) < 0.3


def test_no_source_file_imports_framework_in_core_or_through_backends_package():
    framework_import = re.compile(r"^\s*(import|from)\s+(torch|jax|jaxlib)\b", re.M)
    for path in (ROOT / "peftcore").rglob("*.py"):
        text = path.read_text()
        # a framework may only be imported inside a delegation branch (indented, after an is_*_namespace check)
        for match in framework_import.finditer(text):
            line = text[match.start() : text.index("\n", match.start())]
            assert line.startswith((" ", "\t")), f"{path}: module-level framework import {line.strip()!r}"
    for path in [*ROOT.glob("peftcore/**/*.py"), *ROOT.glob("backends/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        assert not re.search(r"^\s*(from|import)\s+backends\b", path.read_text(), re.M), f"{path} imports via backends."


def test_backends_never_shadow_frameworks():
    names = {p.name for p in (ROOT / "backends").iterdir()}
    assert not names & {"torch", "jax", "numpy"}, names
