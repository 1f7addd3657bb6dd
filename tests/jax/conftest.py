"""Every module here runs with JAX's float32 defaults (x64 off); the previous setting is restored afterwards.

The suite's root conftest turns x64 on for the core tests; fp32 parity with torch/peft needs it off. The
fixture is module-scoped and autouse, so no module leaks the change to the modules that follow it.
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def fp32_jax():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)
