"""The one module that talks to array-api-compat.

Every public core function resolves its namespace here, once, from its array
arguments; private helpers receive ``xp`` as a keyword-only argument. No
framework is imported: array-api-compat recognises torch and JAX arrays from
``sys.modules`` alone.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
from array_api_compat import (
    is_array_api_strict_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = [
    "Array",
    "Namespace",
    "array_namespace",
    "compute_dtype",
    "is_array_api_strict_namespace",
    "is_half",
    "is_jax_namespace",
    "is_numpy_namespace",
    "is_torch_namespace",
    "stop_gradient",
    "to_device_of",
]

Array = Any
Namespace = Any

_HALF_NAMES = ("float16", "bfloat16")


_NAMESPACES: dict[frozenset[type], Namespace] = {}


def array_namespace(*arrays: Array | None) -> Namespace:
    """The standard namespace shared by ``arrays`` (``None`` entries are ignored).

    The namespace depends only on the array types, so it is cached per set of types: the
    lookup runs on every adapter layer call of an eager model.
    """
    key = frozenset(type(a) for a in arrays if a is not None)
    try:
        return _NAMESPACES[key]
    except KeyError:
        pass
    if not key:
        raise TypeError("cannot infer an array namespace: no array arguments were given")
    xp = array_api_compat.array_namespace(*(a for a in arrays if a is not None))
    _NAMESPACES[key] = xp
    return xp


def dtype_name(dtype: Any) -> str:
    """``'float32'``, ``'bfloat16'``, ... for a dtype of any namespace."""
    return str(dtype).rsplit(".", 1)[-1].strip("'<>\" ").replace("dtype(", "").rstrip(")'\"")


def is_half(dtype: Any) -> bool:
    """True for float16 and bfloat16 (bfloat16 is outside the standard, so match by name)."""
    return dtype_name(dtype) in _HALF_NAMES


def compute_dtype(dtype: Any, *, xp: Namespace) -> Any:
    """Dtype used for adapter arithmetic: half precisions are upcast to float32.

    Mirrors ``peft``'s ``get_delta_weight``, which upcasts float16/bfloat16 factors
    to float32 for the product and casts the result back.
    """
    return xp.float32 if is_half(dtype) else dtype


def to_device_of(x: Array, like: Array, *, xp: Namespace) -> Array:
    """``x`` on the device of ``like`` (a no-op where both already agree)."""
    return array_api_compat.to_device(x, array_api_compat.device(like))


def stop_gradient(x: Array, *, xp: Namespace) -> Array:
    """``x`` with gradients blocked (identity in value).

    The standard has no autodiff, so this is the one delegation point: torch's
    ``detach`` and ``jax.lax.stop_gradient``; namespaces without autodiff return
    ``x`` unchanged. ``peft`` detaches DoRA's weight norm this way.
    """
    if is_torch_namespace(xp):
        return x.detach()
    if is_jax_namespace(xp):
        import jax  # already imported: x is a JAX array

        return jax.lax.stop_gradient(x)
    return x
