"""Test support shared by peftcore's suite and by third-party ports.

``Backend`` lists the array libraries the core is checked on; ``assert_close``
compares any namespace's array with a NumPy expectation, checking namespace,
shape and dtype before values, with tolerances that follow the dtype.
"""

from __future__ import annotations

import enum
import importlib
from typing import Any

import numpy as np

from peftcore._xp import array_namespace, dtype_name

__all__ = ["Backend", "assert_close", "default_tolerance", "to_numpy"]


class Backend(enum.Enum):
    """An array library under test; the value is its id in test names."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    JAX = "jax"
    JAX_JIT = "jax:jit"

    @property
    def module_name(self) -> str:
        return {"jax:jit": "jax.numpy", "jax": "jax.numpy"}.get(self.value, self.value)

    @property
    def framework(self) -> str:
        return self.value.split(":")[0]

    def namespace(self) -> Any:
        """The array-api-compat namespace of this library (imports it)."""
        lib = importlib.import_module(self.module_name)
        return array_namespace(lib.asarray(0.0))


# Relative tolerance against a float64 reference, per dtype of the computed result.
_RTOL = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-2, "bfloat16": 4e-2}


def default_tolerance(dtype: Any) -> float:
    """Relative tolerance for a result of ``dtype`` checked against a float64 reference."""
    return _RTOL[dtype_name(dtype)]


def to_numpy(x: Any) -> np.ndarray:
    """Copy any namespace's array to a NumPy array (half precisions become float32)."""
    xp = array_namespace(x)
    if dtype_name(x.dtype) == "bfloat16":
        x = xp.astype(x, xp.float32)
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):
        return np.from_dlpack(x)


def assert_close(
    actual: Any,
    desired: Any,
    *,
    xp: Any | None = None,
    dtype: Any | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    err_msg: str = "",
) -> None:
    """Assert ``actual`` (any namespace) equals ``desired`` (NumPy, usually float64).

    Checks, in order: ``actual`` belongs to ``xp`` (when given), its shape equals
    ``desired``'s, its dtype is ``dtype`` (when given), then values with
    ``|a - d| <= atol + rtol |d|``. ``atol`` defaults to ``rtol * max|d|`` so that
    entries that cancel to near zero are judged on the scale of the whole array.
    """
    if xp is not None:
        got = array_namespace(actual)
        if got is not xp and got.__name__ != xp.__name__:
            raise AssertionError(f"{err_msg}: result is in namespace {got.__name__}, expected {xp.__name__}")
    desired = np.asarray(desired)
    if tuple(actual.shape) != desired.shape:
        raise AssertionError(f"{err_msg}: shape {tuple(actual.shape)} != expected {desired.shape}")
    if dtype is not None and dtype_name(actual.dtype) != dtype_name(dtype):
        raise AssertionError(f"{err_msg}: dtype {dtype_name(actual.dtype)} != expected {dtype_name(dtype)}")
    if rtol is None:
        rtol = default_tolerance(actual.dtype)
    a = to_numpy(actual).astype(np.float64)
    if atol is None:
        scale = float(np.max(np.abs(desired))) if desired.size else 0.0
        atol = rtol * max(scale, 1e-30)
    np.testing.assert_allclose(a, desired.astype(np.float64), rtol=rtol, atol=atol, err_msg=err_msg)
