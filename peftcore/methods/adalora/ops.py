"""AdaLoRA arithmetic: the SVD-form update ``ΔW = s·B·diag(E)·A`` for Linear / GPT-2 Conv1D / Conv2d.

Mirrors ``peft.tuners.adalora.layer`` (``SVDLinear``, ``SVDConv2d``: ``forward``, ``get_delta_weight``,
``merge``, ``unmerge``, ``reset_lora_parameters``), the orthogonal regulariser of
``AdaLoraModel.forward`` and the pruning of ``resize_state_dict_by_rank_pattern`` /
``resize_modules_by_rank_pattern``. Shapes (torch orientation): ``lora_A (r, in)`` (Conv2d:
``(r, in·kh·kw)``), ``lora_E (r, 1)``, ``lora_B (out, r)``; ``s = α / (ranknum + 1e-5)``.

Since ``B·diag(E)·A = B·(A⊙E)``, the Linear branch is LoRA's with ``A⊙E`` for ``A``
(:mod:`peftcore.methods.lora.ops`), including its dtype rule. Everything is jit-safe except
``merge(safe=True)`` and the host-side helpers on ``rank_pattern`` (Python lists of bools).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import array_api_compat

from peftcore._conv import conv_nd
from peftcore._xp import Array, Namespace, array_namespace
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore.methods.lora import ops as lora_ops
from peftcore.methods.lora.ops import accumulate, merge, unmerge

__all__ = [
    "RANKNUM_EPS",
    "SvdInit",
    "accumulate",
    "conv_delta_weight",
    "conv_forward",
    "conv_update",
    "delta_weight",
    "init_svd",
    "kept_ranks",
    "linear_forward",
    "linear_update",
    "merge",
    "orth_regularizer",
    "prune_state_dict",
    "prune_triplet",
    "scaling",
    "unmerge",
]

#: peft divides by ``ranknum + 1e-5``
RANKNUM_EPS = 1e-5
_CONTAINERS = ("lora_A", "lora_E", "lora_B")


def scaling(ranknum: int, lora_alpha: float, *, r: int | None = None) -> float:
    """``(α if α > 0 else r) / (ranknum + 1e-5)``; ``ranknum`` is ``init_r``, kept through pruning.

    peft stores ``scaling = lora_alpha if lora_alpha > 0 else float(r)`` (``r`` the layer's
    current rank, ``ranknum`` by default) and divides by the float32 ``ranknum + 1e-5`` in every
    forward/delta; here the quotient is formed once in float64.
    """
    if isinstance(ranknum, bool) or not isinstance(ranknum, (int, float)) or ranknum < 0:
        raise ConfigError(f"AdaLoRA ranknum must be a non-negative number (init_r), got {ranknum!r}")
    numerator = lora_alpha if lora_alpha > 0 else float(ranknum if r is None else r)
    return numerator / (ranknum + RANKNUM_EPS)


# --- Linear / GPT-2 Conv1D --------------------------------------------------------------------------


def linear_update(x: Array, lora_A: Array, lora_E: Array, lora_B: Array, /, *, scaling: float) -> Array:
    """``s·(x·(A⊙E)ᵀ)·Bᵀ`` with ``x`` cast to ``A.dtype``: ``(..., in) -> (..., out)`` (``SVDLinear``'s branch).

    ``x`` is the already dropped-out input; Conv1D uses the same factors (``fan_in_fan_out`` only
    affects the delta weight).
    """
    xp = array_namespace(x, lora_A, lora_E, lora_B)
    return lora_ops.linear_update(x, _scaled_A(lora_A, lora_E, lora_B, xp=xp), lora_B, scaling=scaling)


def linear_forward(
    result: Array, x: Array, lora_A: Array, lora_E: Array, lora_B: Array, /, *, scaling: float
) -> Array:
    """``result + linear_update(x, ...)`` in ``result.dtype`` (peft ``SVDLinear.forward``)."""
    xp = array_namespace(result, x, lora_A, lora_E, lora_B)
    scaled = _scaled_A(lora_A, lora_E, lora_B, xp=xp)
    return lora_ops.linear_forward(result, x, scaled, lora_B, scaling=scaling)


def delta_weight(
    lora_A: Array, lora_E: Array, lora_B: Array, /, *, scaling: float, fan_in_fan_out: bool = False
) -> Array:
    """``ΔW = s·B·(A⊙E)`` ``(out, in)``, transposed to ``(in, out)`` for Conv1D (``SVDLinear.get_delta_weight``).

    Half-precision factors are multiplied in float32 and cast back (LoRA's rule; peft multiplies
    in the factor dtype, which differs only by half-precision rounding).
    """
    xp = array_namespace(lora_A, lora_E, lora_B)
    scaled = _scaled_A(lora_A, lora_E, lora_B, xp=xp)
    return lora_ops.delta_weight(scaled, lora_B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


# --- Conv2d ---------------------------------------------------------------------------------------


def conv_delta_weight(
    lora_A: Array, lora_E: Array, lora_B: Array, /, *, scaling: float, weight_shape: Sequence[int]
) -> Array:
    """``s·B·(A⊙E)`` ``(out, in·kh·kw)`` reshaped to the conv weight ``(out, in, kh, kw)`` (``SVDConv2d``).

    peft reshapes to the base weight's shape, so only ``groups == 1`` convolutions fit.
    """
    xp = array_namespace(lora_A, lora_E, lora_B)
    shape = tuple(int(d) for d in weight_shape)
    flat = delta_weight(lora_A, lora_E, lora_B, scaling=scaling)
    size = 1
    for d in shape:
        size *= d
    if len(shape) < 3 or shape[0] != flat.shape[0] or size != flat.shape[0] * flat.shape[1]:
        raise ShapeMismatchError(
            f"AdaLoRA conv factors give ΔW {tuple(flat.shape)} (out, in·k), which cannot be reshaped to the "
            f"conv weight {shape} (out, in // groups, *kernel); peft's SVDConv2d needs groups == 1"
        )
    return xp.reshape(flat, shape)


def conv_update(
    x: Array,
    lora_A: Array,
    lora_E: Array,
    lora_B: Array,
    /,
    *,
    scaling: float,
    weight_shape: Sequence[int],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> Array:
    """``conv(x, ΔW)`` with the base layer's stride/padding/dilation/groups, ``x`` cast to ``A.dtype``.

    peft ``SVDConv2d.forward`` builds ``ΔW`` (:func:`conv_delta_weight`) and convolves the
    dropped-out input with it: ``(batch, in, H, W) -> (batch, out, H', W')``.
    """
    xp = array_namespace(x, lora_A, lora_E, lora_B)
    delta = conv_delta_weight(lora_A, lora_E, lora_B, scaling=scaling, weight_shape=weight_shape)
    x = x if x.dtype == delta.dtype else xp.astype(x, delta.dtype)
    return conv_nd(x, delta, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_forward(
    result: Array,
    x: Array,
    lora_A: Array,
    lora_E: Array,
    lora_B: Array,
    /,
    *,
    scaling: float,
    weight_shape: Sequence[int],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> Array:
    """``result + conv_update(x, ...)`` in ``result.dtype`` (peft ``SVDConv2d.forward``)."""
    update = conv_update(
        x, lora_A, lora_E, lora_B, scaling=scaling, weight_shape=weight_shape, stride=stride, padding=padding,
        dilation=dilation, groups=groups,
    )
    return accumulate(result, update)


# --- initialisation -------------------------------------------------------------------------------


class SvdInit(NamedTuple):
    lora_A: Array
    lora_E: Array
    lora_B: Array


def init_svd(
    in_features: int, out_features: int, /, *, r: int, init_lora_weights: Any, sampler: Any, dtype: Any
) -> SvdInit:
    """Fresh factors ``A (r, in)``, ``E (r, 1)``, ``B (out, r)`` (Conv2d: ``in = in_channels·kh·kw``).

    peft ``AdaLoraLayer.update_layer``: a truthy ``init_lora_weights`` gives ``E = 0`` and
    ``A, B ~ N(0, 0.02²)`` (``reset_lora_parameters``); ``False`` leaves all three ``N(0, 1)``.
    Draws come from ``sampler`` (a :class:`peftcore.random.Sampler`), in the order A, E, B.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError(f"`r` should be a positive integer or 0, but the value passed is {r!r}")
    std = 0.02 if init_lora_weights else 1.0
    lora_A = sampler.normal((r, int(in_features)), std=std, dtype=dtype)
    lora_E = sampler.normal((r, 1), std=1.0, dtype=dtype)
    lora_B = sampler.normal((int(out_features), r), std=std, dtype=dtype)
    if init_lora_weights:
        lora_E = lora_E * 0
    return SvdInit(lora_A, lora_E, lora_B)


# --- orthogonal regulariser -----------------------------------------------------------------------


def orth_regularizer(params: Mapping[str, Array], /, *, adapter_name: str | None = None) -> Array | float:
    """``mean_P ‖P Pᵀ − I‖_F`` over every ``lora_A`` (``A Aᵀ``, r×r) and ``lora_B`` (``Bᵀ B``, r×r) in ``params``.

    ``params`` maps parameter names (``<module>.lora_A[.<adapter>]``, ...) to arrays; names with
    neither container are ignored, and with ``adapter_name`` only that adapter's are used.
    peft ``AdaLoraModel.forward`` adds ``orth_reg_weight`` times this to the loss; with no
    factors it adds ``0`` (returned here as ``0.0``).
    """
    factors = []
    for name, p in params.items():
        parts = name.split(".")
        if adapter_name is not None and adapter_name not in parts:
            continue
        if "lora_A" in parts:
            factors.append((p, False))
        elif "lora_B" in parts:
            factors.append((p, True))
    if not factors:
        return 0.0
    xp = array_namespace(*(p for p, _ in factors))
    total = None
    for p, is_B in factors:
        if p.ndim != 2:
            raise ShapeMismatchError(f"AdaLoRA factor of shape {tuple(p.shape)} must be 2-D")
        gram = xp.matrix_transpose(p) @ p if is_B else p @ xp.matrix_transpose(p)
        residual = gram - xp.eye(gram.shape[0], dtype=gram.dtype, device=array_api_compat.device(gram))
        norm = xp.sqrt(xp.sum(residual * residual))
        total = norm if total is None else total + norm
    return total / len(factors)


# --- pruning by rank_pattern (save / load) ----------------------------------------------------------


def prune_triplet(lora_A: Array, lora_E: Array, lora_B: Array, /, *, keep: Sequence[bool]) -> SvdInit:
    """Rows of ``A``/``E`` and columns of ``B`` whose ``keep`` flag is set: rank ``r -> sum(keep)``.

    peft's ``resize_*_by_rank_pattern`` slice; ``keep`` is static (a list of bools).
    """
    xp = array_namespace(lora_A, lora_E, lora_B)
    _check_triplet(lora_A, lora_E, lora_B)
    keep = [bool(k) for k in keep]
    if len(keep) != lora_A.shape[0]:
        raise ShapeMismatchError(f"rank_pattern mask of length {len(keep)} does not match rank {lora_A.shape[0]}")
    if all(keep):
        return SvdInit(lora_A, lora_E, lora_B)
    kept = [i for i, k in enumerate(keep) if k]
    if not kept:
        return SvdInit(lora_A[:0, ...], lora_E[:0, ...], lora_B[:, :0])
    # the default index dtype: int32 under JAX without x64, where an int64 request warns
    index = xp.asarray(kept, device=array_api_compat.device(lora_A))
    return SvdInit(
        xp.take(lora_A, index, axis=0), xp.take(lora_E, index, axis=0), xp.take(lora_B, index, axis=1)
    )


def kept_ranks(
    rank_pattern: Mapping[str, Sequence[bool]], /, *, adapter_name: str | None = None
) -> dict[str, int]:
    """``{module name: number of kept triplets}`` from ``rank_pattern`` (keys ``<module>.lora_E[.<adapter>]``).

    The ranks peft's loader rebuilds each layer at (``resize_modules_by_rank_pattern``); the
    layer's ``ranknum`` stays ``init_r`` (when the kept rank is > 0).
    """
    return {
        _module_of(key, adapter_name=adapter_name): sum(bool(k) for k in mask) for key, mask in rank_pattern.items()
    }


def prune_state_dict(
    state_dict: Mapping[str, Array],
    /,
    *,
    rank_pattern: Mapping[str, Sequence[bool]],
    adapter_name: str | None = None,
    prefix: str = "",
) -> dict[str, Array]:
    """A copy of ``state_dict`` with each layer's ``lora_A``/``lora_E``/``lora_B`` cut to its kept triplets.

    peft ``AdaLoraModel.resize_state_dict_by_rank_pattern`` at save time: for every
    ``rank_pattern`` key ``<module>.lora_E[.<adapter>]`` the entries
    ``<prefix><module>.<container>[.<adapter>]`` are sliced (rows of A/E, columns of B).
    A layer listed in ``rank_pattern`` but missing from ``state_dict`` raises ``IncompatibleKeysError``.
    """
    pruned = dict(state_dict)
    suffix = "" if adapter_name is None else f".{adapter_name}"
    for key, mask in rank_pattern.items():
        module = _module_of(key, adapter_name=adapter_name)
        names = [f"{prefix}{module}.{container}{suffix}" for container in _CONTAINERS]
        missing = [n for n in names if n not in pruned]
        if missing:
            raise IncompatibleKeysError(f"rank_pattern names {key!r} but the state dict has no {missing}")
        lora_A, lora_E, lora_B = prune_triplet(*(pruned[n] for n in names), keep=mask)
        pruned.update(zip(names, (lora_A, lora_E, lora_B)))
    return pruned


# --- helpers --------------------------------------------------------------------------------------


def _module_of(key: str, *, adapter_name: str | None) -> str:
    parts = key.split(".")
    if adapter_name is not None and parts[-1] == adapter_name:
        parts = parts[:-1]
    if len(parts) < 2 or parts[-1] != "lora_E":
        raise ConfigError(f"AdaLoRA rank_pattern key {key!r} must read '<module>.lora_E[.<adapter>]'")
    return ".".join(parts[:-1])


def _scaled_A(lora_A: Array, lora_E: Array, lora_B: Array, *, xp: Namespace) -> Array:
    _check_triplet(lora_A, lora_E, lora_B)
    return lora_A * lora_E


def _check_triplet(lora_A: Array, lora_E: Array, lora_B: Array) -> None:
    if lora_A.ndim != 2 or lora_E.ndim != 2 or lora_B.ndim != 2:
        raise ShapeMismatchError(
            f"AdaLoRA factors must be 2-D: lora_A {tuple(lora_A.shape)} (r, in), lora_E {tuple(lora_E.shape)} "
            f"(r, 1), lora_B {tuple(lora_B.shape)} (out, r)"
        )
    r = lora_A.shape[0]
    if tuple(lora_E.shape) != (r, 1) or lora_B.shape[1] != r:
        raise ShapeMismatchError(
            f"AdaLoRA factors disagree on the rank: lora_A {tuple(lora_A.shape)} (r, in), "
            f"lora_E {tuple(lora_E.shape)} (r, 1), lora_B {tuple(lora_B.shape)} (out, r)"
        )
