"""Combine several LoRA adapters of one layer into one (peft's ``LoraModel.add_weighted_adapter``).

Adapter ``i`` contributes ``ΔW_i = s_i·B_i·A_i`` with user weight ``w_i`` (negative weights subtract).
Factors are in torch orientation (``A (r_i, in[, *k])``, ``B (out, r_i[, 1, ..])``; an Embedding's
``lora_embedding_A/B`` are the same shapes), so no layer kind needs a transpose: peft's
``fan_in_fan_out``/Embedding transposes of ``get_delta_weight`` cancel out. Conv factors are
flattened to ``(r, in·k)`` / ``(out, r)`` and the result is reshaped back.

* ``cat_combination``: ``A = concat(w_i·s_i·A_i)``, ``B = concat(B_i)``: ``B·A = Σ w_i ΔW_i`` exactly.
* ``linear_combination``: ``A = Σ sign(w_i s_i)·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i`` (equal ranks;
  an approximation: cross terms remain).
* ``svd_combination``: the rank-``k`` truncated SVD ``U S Vh`` of ``Σ w_i ΔW_i``, ``B = U·S``, ``A = Vh``,
  optionally clamped to the ``clamp`` quantile of their entries.

Every result is zero-padded to ``rank`` when asked (a layer whose adapters are smaller than the
new config's rank). The combined adapter is meant to be used with scaling 1 (peft's new config
has ``lora_alpha = r``). Weights and scalings are Python numbers (static under ``jax.jit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import NamedTuple

from peftcore._xp import Array, Namespace, array_namespace, compute_dtype, to_device_of
from peftcore.errors import ConfigError, ShapeMismatchError

__all__ = [
    "CombinedFactors",
    "cat_combination",
    "combination",
    "linear_combination",
    "svd_combination",
    "svd_factors",
    "weighted_delta",
]


class CombinedFactors(NamedTuple):
    """The new adapter's ``lora_A`` and ``lora_B``, shaped like the inputs' with the new rank."""

    lora_A: Array
    lora_B: Array


def cat_combination(
    lora_As: Sequence[Array],
    lora_Bs: Sequence[Array],
    /,
    *,
    weights: Sequence[float],
    scalings: Sequence[float],
    rank: int | None = None,
) -> CombinedFactors:
    """``A = concat_i(w_i·s_i·A_i, axis 0)``, ``B = concat_i(B_i, axis 1)``; rank ``Σ r_i`` (or ``rank``, padded).

    peft's ``combination_type="cat"``: ``B·A = Σ w_i s_i B_i A_i`` exactly; computed in the factors' dtype,
    ``A_i·w_i`` rounded before ``·s_i`` as peft does.
    """
    _check_adapters(lora_As, lora_Bs, weights, scalings)
    xp = array_namespace(*lora_As, *lora_Bs)
    _check_ungrouped(lora_As, lora_Bs)
    dtype = _factor_dtype(lora_As, lora_Bs, xp=xp)
    scaled = [_cast(a, dtype, xp=xp) * w * s for a, w, s in zip(lora_As, weights, scalings)]
    lora_A = xp.concat(scaled, axis=0)
    lora_B = xp.concat([_cast(b, dtype, xp=xp) for b in lora_Bs], axis=1)
    return _padded(lora_A, lora_B, rank=rank, xp=xp)


def linear_combination(
    lora_As: Sequence[Array],
    lora_Bs: Sequence[Array],
    /,
    *,
    weights: Sequence[float],
    scalings: Sequence[float],
    rank: int | None = None,
) -> CombinedFactors:
    """``A = Σ sign(w_i s_i)·√|w_i s_i|·A_i``, ``B = Σ √|w_i s_i|·B_i`` (all ``A_i``, ``B_i`` of one shape).

    peft's ``combination_type="linear"`` (the sign goes into ``A`` only, so negative weights subtract);
    sums are formed in float32 for half-precision factors and cast back.
    """
    _check_adapters(lora_As, lora_Bs, weights, scalings)
    xp = array_namespace(*lora_As, *lora_Bs)
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in zip(lora_As, lora_Bs)}
    if len(shapes) > 1:
        raise ShapeMismatchError(
            "a linear combination needs adapters of one rank and shape; got (lora_A, lora_B) shapes "
            f"{[(tuple(a.shape), tuple(b.shape)) for a, b in zip(lora_As, lora_Bs)]}"
        )
    dtype = _factor_dtype(lora_As, lora_Bs, xp=xp)
    magnitudes = [math.sqrt(abs(w * s)) for w, s in zip(weights, scalings)]
    signed = [m if w * s >= 0 else -m for m, w, s in zip(magnitudes, weights, scalings)]
    lora_A = _cast(_weighted_sum(lora_As, signed, xp=xp), dtype, xp=xp)
    lora_B = _cast(_weighted_sum(lora_Bs, magnitudes, xp=xp), dtype, xp=xp)
    return _padded(lora_A, lora_B, rank=rank, xp=xp)


def weighted_delta(
    lora_As: Sequence[Array], lora_Bs: Sequence[Array], /, *, weights: Sequence[float], scalings: Sequence[float]
) -> Array:
    """``Σ_i w_i·s_i·B_i·A_i`` as an ``(out, in·prod(k))`` matrix (peft's task arithmetic of ``get_delta_weight``).

    Each ``s_i·B_i·A_i`` is formed as peft's ``get_delta_weight`` (float32 for half factors, cast back),
    then the weighted sum is taken in float32 or wider.
    """
    _check_adapters(lora_As, lora_Bs, weights, scalings)
    xp = array_namespace(*lora_As, *lora_Bs)
    _check_ungrouped(lora_As, lora_Bs)
    dtype = _factor_dtype(lora_As, lora_Bs, xp=xp)
    work = compute_dtype(dtype, xp=xp)
    deltas = []
    for a, b, s in zip(lora_As, lora_Bs, scalings):
        product = xp.matmul(_cast(_matrix(b, xp=xp), work, xp=xp), _cast(_matrix(a, xp=xp), work, xp=xp)) * s
        deltas.append(_cast(product, dtype, xp=xp))
    return _weighted_sum(deltas, weights, xp=xp)


def svd_factors(
    delta: Array,
    /,
    *,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    svd: Callable[..., tuple[Array, Array, Array]] | None = None,
) -> CombinedFactors:
    """``B = U[:, :k]·diag(S[:k])`` ``(out, rank)``, ``A = Vh[:k]`` ``(rank, in)`` from ``ΔW (out, in) = U S Vh``.

    ``k = min(rank, out, in)``; rows/columns beyond ``k`` are zero. ``clamp`` (a quantile in [0, 1])
    clips both factors to ``±q`` where ``q`` is that quantile (linear interpolation, as
    ``torch.quantile``) of all their entries. ``svd`` replaces ``xp.linalg.svd`` (same call signature),
    e.g. to pass ``driver=`` to torch. peft's ``_svd_generalized_task_arithmetic_weighted_adapter``.
    """
    xp = array_namespace(delta)
    if delta.ndim != 2:
        raise ShapeMismatchError(f"svd_factors needs a matrix ΔW (out, in), got shape {tuple(delta.shape)}")
    _check_rank(rank, what="svd rank")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, Real) or not 0 <= clamp <= 1):
        raise ConfigError(f"svd_clamp is a quantile and must be in [0, 1], got {clamp!r}")
    decompose = xp.linalg.svd if svd is None else svd
    u, s, vh = decompose(delta, full_matrices=full_matrices)
    k = min(rank, s.shape[0])
    lora_B = u[:, :k] * s[:k]
    lora_A = vh[:k, :]
    if clamp is not None:
        entries = xp.concat([xp.reshape(lora_B, (-1,)), xp.reshape(lora_A, (-1,))])
        high = _quantile(entries, clamp, xp=xp)
        lora_B = xp.minimum(xp.maximum(lora_B, -high), high)
        lora_A = xp.minimum(xp.maximum(lora_A, -high), high)
    return _padded(lora_A, lora_B, rank=rank, xp=xp)


def svd_combination(
    lora_As: Sequence[Array],
    lora_Bs: Sequence[Array],
    /,
    *,
    weights: Sequence[float],
    scalings: Sequence[float],
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    svd: Callable[..., tuple[Array, Array, Array]] | None = None,
) -> CombinedFactors:
    """``svd_factors(weighted_delta(...))`` reshaped to the factor layout: ``A (rank, in, *k)``, ``B (out, rank, 1..)``.

    peft's ``combination_type="svd"``; ``B·A`` is the best rank-``rank`` approximation of ``Σ w_i ΔW_i``
    (unclamped). The factors come back in the adapters' dtype (the SVD runs in float32 or wider).
    Conv factors of any dimension are flattened (peft flattens Conv2d only).
    """
    delta = weighted_delta(lora_As, lora_Bs, weights=weights, scalings=scalings)
    xp = array_namespace(*lora_As, *lora_Bs)
    factors = svd_factors(delta, rank=rank, clamp=clamp, full_matrices=full_matrices, svd=svd)
    dtype = _factor_dtype(lora_As, lora_Bs, xp=xp)
    lora_A = xp.reshape(_cast(factors.lora_A, dtype, xp=xp), (rank, *lora_As[0].shape[1:]))
    lora_B = xp.reshape(_cast(factors.lora_B, dtype, xp=xp), (lora_Bs[0].shape[0], rank, *lora_Bs[0].shape[2:]))
    return CombinedFactors(lora_A, lora_B)


# --- helpers --------------------------------------------------------------------------------------


def combination(
    lora_As: Sequence[Array],
    lora_Bs: Sequence[Array],
    /,
    *,
    combination_type: str,
    weights: Sequence[float],
    scalings: Sequence[float],
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    svd: Callable[..., tuple[Array, Array, Array]] | None = None,
    name: str = "",
) -> CombinedFactors:
    """The ``combination_type`` (``"cat"``, ``"linear"``, ``"svd"``) of one layer's adapters; errors name ``name``."""
    options = dict(weights=weights, scalings=scalings, rank=rank)
    try:
        if combination_type == "cat":
            return cat_combination(lora_As, lora_Bs, **options)
        if combination_type == "linear":
            return linear_combination(lora_As, lora_Bs, **options)
        if combination_type == "svd":
            return svd_combination(lora_As, lora_Bs, clamp=clamp, full_matrices=full_matrices, svd=svd, **options)
    except (ConfigError, ShapeMismatchError) as exc:
        raise type(exc)(f"{name}: {exc}" if name else str(exc)) from exc
    raise ConfigError(f"Invalid combination_type: {combination_type!r}; peftcore supports 'svd', 'linear' and 'cat'")


def _cast(x: Array, dtype, *, xp: Namespace) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _factor_dtype(lora_As: Sequence[Array], lora_Bs: Sequence[Array], *, xp: Namespace):
    return xp.result_type(*(a.dtype for a in lora_As), *(b.dtype for b in lora_Bs))


def _matrix(x: Array, *, xp: Namespace) -> Array:
    return x if x.ndim == 2 else xp.reshape(x, (x.shape[0], -1))


def _weighted_sum(arrays: Sequence[Array], weights: Sequence[float], *, xp: Namespace) -> Array:
    """``Σ w_i·a_i`` in float32 or wider, as peft's ``task_arithmetic`` (stack, times a weight vector, sum)."""
    work = compute_dtype(xp.result_type(*(a.dtype for a in arrays)), xp=xp)
    stacked = xp.stack([_cast(a, work, xp=xp) for a in arrays], axis=0)
    coefficients = to_device_of(xp.asarray([float(w) for w in weights], dtype=work), stacked, xp=xp)
    return xp.sum(stacked * xp.reshape(coefficients, (-1,) + (1,) * (stacked.ndim - 1)), axis=0)


def _quantile(values: Array, q: float, *, xp: Namespace) -> Array:
    """``q``-quantile of 1-D ``values`` with linear interpolation (``torch.quantile``'s default), traceable."""
    ordered = xp.sort(values)
    position = q * (ordered.shape[0] - 1)
    below = math.floor(position)
    above = min(below + 1, ordered.shape[0] - 1)
    fraction = position - below
    low, high = ordered[below], ordered[above]
    # torch's lerp: measured from the nearer end point
    if fraction < 0.5:
        return low + fraction * (high - low)
    return high - (high - low) * (1.0 - fraction)


def _padded(lora_A: Array, lora_B: Array, *, rank: int | None, xp: Namespace) -> CombinedFactors:
    if rank is None:
        return CombinedFactors(lora_A, lora_B)
    _check_rank(rank, what="rank")
    have = lora_A.shape[0]
    if rank < have:
        raise ShapeMismatchError(
            f"the combined adapter has rank {have} (lora_A {tuple(lora_A.shape)}), more than the requested rank {rank}"
        )
    if rank == have:
        return CombinedFactors(lora_A, lora_B)
    zeros_A = xp.broadcast_to(xp.zeros_like(lora_A[:1, ...]), (rank - have, *lora_A.shape[1:]))
    zeros_B = xp.broadcast_to(xp.zeros_like(lora_B[:, :1, ...]), (lora_B.shape[0], rank - have, *lora_B.shape[2:]))
    return CombinedFactors(xp.concat([lora_A, zeros_A], axis=0), xp.concat([lora_B, zeros_B], axis=1))


def _check_rank(rank, *, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"the {what} of a combined adapter must be a positive integer, got {rank!r}")


def _check_adapters(lora_As, lora_Bs, weights, scalings) -> None:
    counts = {"lora_As": len(lora_As), "lora_Bs": len(lora_Bs), "weights": len(weights), "scalings": len(scalings)}
    if len(set(counts.values())) != 1 or not lora_As:
        raise ConfigError(f"combining adapters needs one lora_A, lora_B, weight and scaling per adapter; got {counts}")
    for name, numbers in (("weights", weights), ("scalings", scalings)):
        if any(isinstance(v, bool) or not isinstance(v, Real) for v in numbers):
            raise ConfigError(f"{name} must be real numbers (Python scalars), got {list(numbers)!r}")
    first_A, first_B = tuple(lora_As[0].shape), tuple(lora_Bs[0].shape)
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)
        if len(a_shape) < 2 or len(b_shape) != len(a_shape) or any(k != 1 for k in b_shape[2:]):
            raise ShapeMismatchError(
                f"adapter {i}: lora_A must be (r, in[, *k]) and lora_B (out, r[, 1, ..]); got {a_shape} and {b_shape}"
            )
        if a_shape[1:] != first_A[1:] or b_shape[0] != first_B[0]:
            raise ShapeMismatchError(
                f"adapter {i} (lora_A {a_shape}, lora_B {b_shape}) does not adapt the same layer as adapter 0 "
                f"(lora_A {first_A}, lora_B {first_B})"
            )


def _check_ungrouped(lora_As, lora_Bs) -> None:
    for i, (a, b) in enumerate(zip(lora_As, lora_Bs)):
        if b.shape[1] != a.shape[0]:
            raise ShapeMismatchError(
                f"adapter {i}: lora_B {tuple(b.shape)} must have r = {a.shape[0]} columns like lora_A "
                f"{tuple(a.shape)} (grouped conv adapters cannot be combined this way)"
            )
