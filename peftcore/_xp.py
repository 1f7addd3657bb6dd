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
    "add_lora_product",
    "add_product",
    "factor_transpose",
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


_NAMESPACES: dict[tuple[type, ...], Namespace] = {}


def array_namespace(*arrays: Array | None) -> Namespace:
    """The standard namespace shared by ``arrays`` (``None`` entries are ignored).

    The namespace depends only on the array types, so it is cached per tuple of argument types
    (``NoneType`` included: building the key stays one C call): the lookup runs on every adapter
    layer call of an eager model.
    """
    key = tuple(map(type, arrays))
    try:
        return _NAMESPACES[key]
    except KeyError:
        pass
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("cannot infer an array namespace: no array arguments were given")
    xp = array_api_compat.array_namespace(*present)
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
    """``x`` on the device of ``like`` (a no-op where both already agree).

    A JAX array sharded over several devices reports its sharding as its device; that sharding
    fits ``like``'s shape only, so ``x`` stays where the framework put it (JAX moves it on use).
    """
    device = array_api_compat.device(like)
    if len(getattr(device, "device_set", ())) > 1:
        return x
    return array_api_compat.to_device(x, device)


def factor_transpose(factor: Array, *, xp: Namespace) -> Array:
    """``factor.T`` of a 2-d LoRA factor, for the right-hand side of a product (``h @ Bᵀ``).

    JAX delegation point: the transpose sits behind ``jax.lax.optimization_barrier``, so XLA cannot
    fold it into the dot of ``B``'s gradient. Folded, that gradient is ``gᵀ·h`` contracting over the
    tokens, which XLA:CPU runs 2.5× slower than the same-size ``hᵀ·g`` it computes behind the barrier
    (a jitted LoRA Linear step: 1.22 -> ~1.1 of the plain layer, 1024 tokens, d=1024, r=16). The
    barrier is an identity in value and differentiable in both modes (``jvp``, ``vmap``, ``hessian``).
    """
    if is_jax_namespace(xp):
        import jax  # already imported: factor is a JAX array

        return jax.lax.optimization_barrier(factor.T)
    return factor.T


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


def add_lora_product(c: Array, x: Array, a: Array, b: Array, /, *, alpha: float, xp: Namespace,
                     donate_c: bool = False) -> Array:
    """``c + alpha·(x·aᵀ)·bᵀ``: ``c (..., n)``, ``x (..., k)`` (``c``'s leading dims), ``a (r, k)``, ``b (n, r)``.

    The thin ``(tokens, r)`` product ``x·aᵀ`` is formed with tokens flattened (one ``linear`` on
    torch) and handed to :func:`add_product`.
    """
    if is_torch_namespace(xp) and x.dtype == a.dtype:
        import torch  # already imported: x is a torch tensor

        hidden = torch.nn.functional.linear(x if x.ndim == 2 else x.reshape(-1, x.shape[-1]), a)
    else:
        hidden = (x if x.ndim == 2 else xp.reshape(x, (-1, x.shape[-1]))) @ a.T
    return add_product(c, hidden, b, alpha=alpha, xp=xp, donate_c=donate_c)


def add_product(c: Array, hidden: Array, b: Array, /, *, alpha: float, xp: Namespace,
                donate_c: bool = False) -> Array:
    """``c + alpha·hidden·bᵀ``: ``c (..., n)``, ``hidden (tokens, r)`` with ``tokens`` the product of
    ``c``'s leading dims, ``b (n, r)``.

    Torch delegation point: with one dtype throughout, a single ``addmm`` on a 2-d view of ``c``,
    so the product is accumulated inside the GEMM instead of two extra full-size passes (scale,
    then add). ``c`` is left untouched unless ``donate_c``: the caller hands ``c``'s buffer over (it
    never reads ``c`` again, as with ``jax.jit``'s ``donate_argnums``) and, where autograd records
    nothing, torch accumulates into it in place (``addmm_``), saving the copy of ``c`` that an
    out-of-place ``addmm`` makes (with autograd recording, an in-place write through the 2-d view
    costs more in backward than the copy). Elsewhere, for mixed dtypes and where ``torch.autocast``
    formed ``hidden`` in a lower precision than ``c``, the standard expression, with ``alpha`` on
    the thin ``hidden`` and ``bᵀ`` from :func:`factor_transpose`.
    """
    if is_torch_namespace(xp) and c.dtype == hidden.dtype == b.dtype:
        import torch  # already imported: c is a torch tensor

        if donate_c and c.is_contiguous() and not (
            torch.is_grad_enabled() and (c.requires_grad or hidden.requires_grad or b.requires_grad)
        ):
            # the 2-d view shares c's buffer, so c itself is the result (no view back)
            (c if c.ndim == 2 else c.view(-1, c.shape[-1])).addmm_(hidden, b.t(), alpha=alpha)
            return c
        if c.ndim == 2:
            return torch.addmm(c, hidden, b.t(), alpha=alpha)
        flat = torch.addmm(c.reshape(-1, c.shape[-1]), hidden, b.t(), alpha=alpha)
        return flat.view(*c.shape)  # unpacked: view(Size) parses slower
    product = (hidden * alpha) @ factor_transpose(b, xp=xp)
    return c + (product if c.ndim == 2 else xp.reshape(product, tuple(c.shape)))
