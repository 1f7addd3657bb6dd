"""(IA)³ arithmetic: learned vectors that rescale a layer's input (feed-forward) or output (the others).

Mirrors ``peft.tuners.ia3.layer`` (``Linear``, ``_ConvNd``: ``update_layer``, ``forward``, ``merge``,
``unmerge``) and ``IA3Model.add_weighted_adapter`` / ``_check_target_module_feedforward``.

Shapes (torch orientation). ``kind="linear"`` (``nn.Linear``, weight ``(out, in)``; GPT-2 Conv1D,
weight ``(in, out)`` with ``fan_in_fan_out=True``): ``ia3_l (out, 1)``, feed-forward ``(1, in)``.
``kind="conv"`` (Conv2d/Conv3d, weight ``(out, in // groups, *k)``): ``ia3_l (1, C, 1, ..)`` with
``C = out``, feed-forward ``C = in``. Inputs ``x (..., in)`` / ``(batch, C, *spatial)``.

Everything is jit-safe; nothing branches on array values. ``unmerge_weight`` warns, as peft does,
that dividing by ``l + 1e-8`` is inexact.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

from peftcore._xp import Array, Namespace, array_namespace, to_device_of
from peftcore.errors import ConfigError, ShapeMismatchError

__all__ = [
    "UNMERGE_EPS",
    "UNMERGE_WARNING",
    "IA3UnmergeWarning",
    "combine",
    "ia3_shape",
    "init_ia3",
    "is_feedforward",
    "merge_bias",
    "merge_weight",
    "scale_input",
    "scale_output",
    "unmerge_bias",
    "unmerge_weight",
    "weighted_combination",
]

#: peft adds this to ``l`` before dividing, so that a zero entry does not give inf
UNMERGE_EPS = 1e-8
#: peft's warning text on every (IA)³ unmerge
UNMERGE_WARNING = "Unmerge result can be inaccurate for (IA)^3."
_KINDS = ("linear", "conv")


class IA3UnmergeWarning(UserWarning):
    """Unmerging (IA)³ divides by ``l + 1e-8``: inexact, and lossy where ``l`` is near zero."""


# --- which layers are feed-forward ------------------------------------------------------------------


def is_feedforward(config_or_ff_modules: Any, key: str) -> bool:
    """Whether module ``key`` is a feed-forward (input-scaled) layer.

    ``config_or_ff_modules``: an ``IA3Config`` or its ``feedforward_modules``. A string is a regex
    that must ``fullmatch`` ``key``; a collection matches when ``key.endswith(name)`` for some name,
    with no dot boundary (``"xfc"`` ends with ``"fc"``), exactly peft's
    ``_check_target_module_feedforward``.
    """
    modules = getattr(config_or_ff_modules, "feedforward_modules", config_or_ff_modules)
    if isinstance(modules, str):
        return re.fullmatch(modules, key) is not None
    if modules is None:
        raise ConfigError(
            f"feedforward_modules is None, so whether {key!r} is feed-forward is unknown; fill peft's default "
            "with IA3Config.with_model_defaults(model_type) or list them in the config"
        )
    return any(key.endswith(name) for name in modules)


# --- shapes and initialisation ----------------------------------------------------------------------


def ia3_shape(
    weight_shape: Sequence[int], /, *, feedforward: bool, kind: str = "linear", fan_in_fan_out: bool = False,
    groups: int = 1,
) -> tuple[int, ...]:
    """Shape of ``ia3_l`` for a base weight of ``weight_shape`` (peft's ``update_layer``).

    linear: ``(out, 1)``, feed-forward ``(1, in)`` (``(in, out)`` storage when ``fan_in_fan_out``);
    conv: ``(1, out, 1, ..)``, feed-forward ``(1, in_channels, 1, ..)`` with ``in_channels =
    weight_shape[1]·groups``.
    """
    shape = tuple(int(d) for d in weight_shape)
    _check_kind(kind)
    if kind == "linear":
        if len(shape) != 2:
            raise ShapeMismatchError(f"(IA)³ linear base weight must be 2-d (out, in) or (in, out), got {shape}")
        fan_out, fan_in = (shape[1], shape[0]) if fan_in_fan_out else shape
        return (1, fan_in) if feedforward else (fan_out, 1)
    if len(shape) < 3:
        raise ShapeMismatchError(f"(IA)³ conv base weight must be (out, in // groups, *kernel), got {shape}")
    if groups < 1 or shape[0] % groups:
        raise ShapeMismatchError(f"(IA)³ conv weight {shape}: out channels are not divisible by groups={groups}")
    channels = shape[1] * groups if feedforward else shape[0]
    return (1, channels) + (1,) * (len(shape) - 2)


def init_ia3(
    weight: Array,
    /,
    *,
    feedforward: bool,
    kind: str = "linear",
    init_ia3_weights: bool = True,
    sampler: Any = None,
    fan_in_fan_out: bool = False,
    groups: int = 1,
    dtype: Any = None,
) -> Array:
    """A new ``ia3_l`` for base ``weight``: ones, or ``N(0, 1)`` draws when ``init_ia3_weights=False``.

    peft's ``update_layer`` (``torch.randn``, then ``reset_ia3_parameters`` -> ones). Shape from
    :func:`ia3_shape`; namespace/device of ``weight``; ``dtype`` defaults to ``weight.dtype`` (peft
    moves adapters to the base dtype; ``lora.init.adapter_dtype`` gives the half -> float32 autocast).
    Draws come from ``sampler.normal`` (``peftcore.random.Sampler``), which is required then.
    """
    xp = array_namespace(weight)
    shape = ia3_shape(weight.shape, feedforward=feedforward, kind=kind, fan_in_fan_out=fan_in_fan_out, groups=groups)
    dtype = weight.dtype if dtype is None else dtype
    if not isinstance(init_ia3_weights, bool):
        raise ConfigError(f"init_ia3_weights must be True or False, got {init_ia3_weights!r}")
    if init_ia3_weights:
        return to_device_of(xp.ones(shape, dtype=dtype), weight, xp=xp)
    if sampler is None:
        raise ConfigError("init_ia3_weights=False draws the (IA)³ vector at random: pass sampler=")
    draws = xp.asarray(sampler.normal(shape, std=1.0, dtype=dtype))
    return to_device_of(xp.astype(draws, dtype), weight, xp=xp)


# --- forward ------------------------------------------------------------------------------------------


def combine(*ia3_ls: Array) -> Array:
    """``Π_i l_i``: one vector for several active adapters of a layer (peft's ``ia3_scaling *= l``).

    All ``l_i`` share one shape; the product is taken in their promoted dtype, in order. (peft
    casts ``x`` to the *last* adapter's dtype; the same whenever a layer's adapters share a dtype.)
    """
    if not ia3_ls:
        raise ConfigError("combine needs at least one (IA)³ vector")
    xp = array_namespace(*ia3_ls)
    _check_same_shapes(ia3_ls, what="combine")
    dtype = xp.result_type(*ia3_ls)
    product = xp.astype(ia3_ls[0], dtype)
    for l in ia3_ls[1:]:
        product = product * xp.astype(l, dtype)
    return product


def scale_input(x: Array, ia3_l: Array, /, *, dtype: Any = None) -> Array:
    """Feed-forward layers: ``(x.astype(l.dtype) ⊙ l)`` cast to ``dtype`` (default ``x.dtype``), fed to the base.

    linear ``l (1, in)`` scales the last axis of ``x (..., in)``; conv ``l (1, in, 1, ..)`` scales
    the channels of ``x (batch, in, *spatial)``. peft casts back to ``x.dtype`` for Linear and to
    the base weight's dtype for Conv (pass ``dtype=weight.dtype`` there).
    """
    xp = array_namespace(x, ia3_l)
    vector = _broadcastable(ia3_l, x, feedforward=True, xp=xp)
    target = x.dtype if dtype is None else dtype
    # copy=False: the standard's astype copies even to the same dtype, a full pass over x per forward
    scaled = xp.astype(x, ia3_l.dtype, copy=False) * vector
    return xp.astype(scaled, target, copy=False)


def scale_output(result: Array, ia3_l: Array, /) -> Array:
    """Other layers: ``base(x) ⊙ l`` in ``result.dtype`` (the bias is scaled with it).

    linear ``l (out, 1)`` scales the last axis of ``result (..., out)`` in the promoted dtype of
    both (peft's Linear); conv ``l (1, out, 1, ..)`` scales the channels, ``result`` first cast to
    ``l.dtype`` (peft's ``_ConvNd``).
    """
    xp = array_namespace(result, ia3_l)
    vector = _broadcastable(ia3_l, result, feedforward=False, xp=xp)
    if ia3_l.ndim == 2:
        dtype = xp.result_type(result, ia3_l)
        scaled = xp.astype(result, dtype, copy=False) * xp.astype(vector, dtype, copy=False)
    else:
        scaled = xp.astype(result, ia3_l.dtype, copy=False) * vector
    return xp.astype(scaled, result.dtype, copy=False)


# --- merge / unmerge ----------------------------------------------------------------------------------


def merge_weight(
    weight: Array, ia3_l: Array, /, *, feedforward: bool, kind: str = "linear", fan_in_fan_out: bool = False,
    groups: int = 1,
) -> Array:
    """``W ⊙ L`` in ``W.dtype``: rows (output channels) scaled by ``l``, or columns (input channels) if feed-forward.

    ``L`` is ``transpose(l, fan_in_fan_out)`` for linear layers, so Conv1D's ``(in, out)`` storage
    is scaled along the same logical axis; conv: ``l`` moved to ``(out, 1, ..)``, or for a grouped
    feed-forward conv spread over the groups (peft's ``_get_ia3_scaling_for_weight``).
    """
    xp = array_namespace(weight, ia3_l)
    factor = _weight_factor(weight, ia3_l, feedforward=feedforward, kind=kind, fan_in_fan_out=fan_in_fan_out,
                            groups=groups, xp=xp)
    dtype = xp.result_type(weight, factor)
    return xp.astype(xp.astype(weight, dtype, copy=False) * xp.astype(factor, dtype, copy=False), weight.dtype,
                     copy=False)


def unmerge_weight(
    weight: Array, ia3_l: Array, /, *, feedforward: bool, kind: str = "linear", fan_in_fan_out: bool = False,
    groups: int = 1,
) -> Array:
    """``W / (L + 1e-8)`` in ``W.dtype``, the inverse of :func:`merge_weight` up to the ``1e-8``.

    Warns ``IA3UnmergeWarning`` ("Unmerge result can be inaccurate for (IA)^3.") as peft's
    ``unmerge`` does: entries of ``l`` near zero do not come back.
    """
    xp = array_namespace(weight, ia3_l)
    warnings.warn(UNMERGE_WARNING, IA3UnmergeWarning, stacklevel=2)
    factor = _weight_factor(weight, ia3_l, feedforward=feedforward, kind=kind, fan_in_fan_out=fan_in_fan_out,
                            groups=groups, xp=xp)
    dtype = xp.result_type(weight, factor)
    return xp.astype(xp.astype(weight, dtype, copy=False) / (xp.astype(factor, dtype, copy=False) + UNMERGE_EPS),
                     weight.dtype, copy=False)


def merge_bias(bias: Array, ia3_l: Array, /, *, feedforward: bool) -> Array:
    """``b ⊙ l`` in ``b.dtype`` for output-scaled layers; feed-forward layers keep ``b`` (peft's ``merge``)."""
    xp = array_namespace(bias, ia3_l)
    if feedforward:
        return bias
    vector = _bias_factor(bias, ia3_l, xp=xp)
    dtype = xp.result_type(bias, vector)
    return xp.astype(xp.astype(bias, dtype, copy=False) * xp.astype(vector, dtype, copy=False), bias.dtype, copy=False)


def unmerge_bias(bias: Array, ia3_l: Array, /, *, feedforward: bool) -> Array:
    """``b / (l + 1e-8)`` in ``b.dtype`` for output-scaled layers; feed-forward layers keep ``b``."""
    xp = array_namespace(bias, ia3_l)
    if feedforward:
        return bias
    vector = _bias_factor(bias, ia3_l, xp=xp)
    dtype = xp.result_type(bias, vector)
    return xp.astype(xp.astype(bias, dtype, copy=False) / (xp.astype(vector, dtype, copy=False) + UNMERGE_EPS),
                     bias.dtype, copy=False)


# --- add_weighted_adapter -----------------------------------------------------------------------------


def weighted_combination(ia3_ls: Sequence[Array], /, *, weights: Sequence[float]) -> Array:
    """``l_new = Σ_i w_i·l_i`` (peft's ``IA3Model.add_weighted_adapter``; no normalisation, any sign).

    All ``l_i`` share one shape (a layer's adapters); the sum runs in their promoted dtype, in
    order. Weights are Python numbers (static under ``jax.jit``). The new config is
    :func:`peftcore.methods.ia3.config.weighted_adapter_config`.
    """
    ia3_ls = tuple(ia3_ls)
    weights = tuple(weights)
    if not ia3_ls:
        raise ConfigError("add_weighted_adapter needs at least one (IA)³ vector")
    if len(weights) != len(ia3_ls):
        raise ConfigError(f"add_weighted_adapter got {len(ia3_ls)} (IA)³ vectors but {len(weights)} weights")
    xp = array_namespace(*ia3_ls)
    _check_same_shapes(ia3_ls, what="add_weighted_adapter")
    dtype = xp.result_type(*ia3_ls)
    total = xp.zeros_like(xp.astype(ia3_ls[0], dtype))
    for l, w in zip(ia3_ls, weights):
        total = total + xp.astype(l, dtype) * float(w)
    return total


# --- helpers ------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ConfigError(f"(IA)³ layer kind must be one of {list(_KINDS)}, got {kind!r}")


def _check_same_shapes(ia3_ls: Sequence[Array], *, what: str) -> None:
    shapes = [tuple(l.shape) for l in ia3_ls]
    if len(set(shapes)) > 1:
        raise ShapeMismatchError(f"{what}: (IA)³ vectors of one layer must share a shape, got {shapes}")


def _broadcastable(ia3_l: Array, x: Array, *, feedforward: bool, xp: Namespace) -> Array:
    """``l`` shaped to broadcast against ``x``: last axis (linear) or channel axis 1 (conv)."""
    shape = tuple(ia3_l.shape)
    side = "input" if feedforward else "output"
    if ia3_l.ndim == 2:
        size = shape[1] if feedforward else shape[0]
        if shape != ((1, size) if feedforward else (size, 1)) or x.ndim < 1 or x.shape[-1] != size:
            expected = "(1, in)" if feedforward else "(out, 1)"
            raise ShapeMismatchError(
                f"(IA)³ linear {side} scaling: ia3_l {shape} must be {expected} matching the last axis of "
                f"{tuple(x.shape)}"
            )
        return xp.reshape(ia3_l, (size,))
    if ia3_l.ndim < 3 or shape[0] != 1 or any(d != 1 for d in shape[2:]) or x.ndim != ia3_l.ndim \
            or x.shape[1] != shape[1]:
        raise ShapeMismatchError(
            f"(IA)³ conv {side} scaling: ia3_l {shape} must be (1, C, 1, ..) with C the channels (axis 1) of "
            f"{tuple(x.shape)} and the same rank"
        )
    return ia3_l


def _weight_factor(
    weight: Array, ia3_l: Array, *, feedforward: bool, kind: str, fan_in_fan_out: bool, groups: int, xp: Namespace
) -> Array:
    """``l`` laid out to multiply ``weight`` elementwise (broadcasting)."""
    expected = ia3_shape(weight.shape, feedforward=feedforward, kind=kind, fan_in_fan_out=fan_in_fan_out,
                         groups=groups)
    if tuple(ia3_l.shape) != expected:
        role = "feed-forward" if feedforward else "output-scaled"
        raise ShapeMismatchError(
            f"(IA)³ {role} {kind} layer with weight {tuple(weight.shape)} needs ia3_l {expected}, got "
            f"{tuple(ia3_l.shape)}"
        )
    if kind == "linear":
        return xp.permute_dims(ia3_l, (1, 0)) if fan_in_fan_out else ia3_l
    spatial = (1,) * (weight.ndim - 2)
    if not feedforward:
        return xp.reshape(ia3_l, (weight.shape[0], 1, *spatial))
    if groups == 1:
        return ia3_l
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    per_group = xp.reshape(ia3_l, (groups, 1, in_per_group))
    spread = xp.broadcast_to(per_group, (groups, out_channels // groups, in_per_group))
    return xp.reshape(spread, (out_channels, in_per_group, *spatial))


def _bias_factor(bias: Array, ia3_l: Array, *, xp: Namespace) -> Array:
    size = 1
    for d in ia3_l.shape:
        size *= d
    if bias.ndim != 1 or bias.shape[0] != size:
        raise ShapeMismatchError(
            f"(IA)³ bias scaling: bias {tuple(bias.shape)} must be (out,) with out = the size of ia3_l "
            f"{tuple(ia3_l.shape)}"
        )
    return xp.reshape(ia3_l, tuple(bias.shape))
