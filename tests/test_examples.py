"""The example scripts run as a user runs them (a fresh interpreter, no hub) and say what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "backends")])}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo_shows_every_backend_agreeing(tmp_path):
    out = _run("demo.py", tmp_path)
    for backend in ("numpy", "array-api-strict", "torch", "jax", "jax.jit", "peft (torch)"):
        assert re.search(rf"^\s*{re.escape(backend)} \|", out, re.M), backend
    assert "the same adapter, the same numbers" in out


@pytest.mark.oracle
def test_adalora_example_prunes_to_the_target_budget_on_both_backends(tmp_path):
    out = _run("adalora_budget.py", tmp_path)
    assert "compiled 1 time(s)" in out
    budgets = re.findall(r"^budget \(total\)\s*\|(.*)$", out, re.M)
    assert len(budgets) == 2  # JAX and torch tables
    for row in budgets:
        totals = [int(v) for v in row.split()]
        assert totals[0] == 48 and totals[-1] == 16 and totals == sorted(totals, reverse=True)
