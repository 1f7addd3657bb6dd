"""The README's quick-start code runs as written (the blocks run in order, in one temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_quick_starts():
    assert len(BLOCKS) >= 3


def test_readme_quick_starts_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    monkeypatch.chdir(tmp_path)
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
