"""N-dimensional convolution with torch's semantics, for any Array API namespace.

``conv_nd`` delegates to ``torch.nn.functional.conv{1,2,3}d`` or
``jax.lax.conv_general_dilated`` when the arrays belong to those frameworks (the
framework is already loaded then), and otherwise runs an im2col convolution
written with standard calls only: zero padding by concatenation, one strided
slice per kernel offset, and a batched matmul per channel group.
"""

from __future__ import annotations

import itertools
import math

from peftcore._xp import Array, Namespace, array_namespace, is_jax_namespace, is_torch_namespace
from peftcore.errors import ConfigError, ShapeMismatchError

__all__ = ["conv_nd"]

_JAX_SPATIAL = {1: "H", 2: "HW", 3: "DHW"}


def conv_nd(
    x: Array,
    weight: Array,
    /,
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> Array:
    """Cross-correlation ``y = conv(x, weight)`` as ``torch.nn.functional.conv{N}d`` computes it (no bias).

    ``x (batch, C, *spatial)`` or unbatched ``(C, *spatial)``; ``weight (O, C // groups, *kernel)``,
    ``N = weight.ndim - 2``. ``stride``/``padding``/``dilation`` are an int or one int per spatial
    dim; ``padding`` may also be ``"same"`` (stride 1 only; odd total padding puts the extra zero
    at the end, as torch does) or ``"valid"``. Returns ``(batch, O, *out)`` with
    ``out = (size + pad_lo + pad_hi - dilation·(k − 1) − 1) // stride + 1``.
    """
    xp = array_namespace(x, weight)
    return _conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups, xp=xp, native=True)


def _conv_nd_generic(
    x: Array,
    weight: Array,
    /,
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> Array:
    """``conv_nd`` forced onto the standard-only im2col path (tested on every namespace)."""
    xp = array_namespace(x, weight)
    return _conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups, xp=xp, native=False)


def _conv(x, weight, *, stride, padding, dilation, groups, xp: Namespace, native: bool) -> Array:
    n = weight.ndim - 2
    if n < 1:
        raise ShapeMismatchError(f"conv weight must be (out, in // groups, *kernel), got shape {tuple(weight.shape)}")
    if x.ndim not in (n + 1, n + 2):
        raise ShapeMismatchError(
            f"conv input x {tuple(x.shape)} must be (batch, C, *spatial) or (C, *spatial) with {n} spatial dims "
            f"to match weight {tuple(weight.shape)}"
        )
    unbatched = x.ndim == n + 1
    if unbatched:
        x = xp.expand_dims(x, axis=0)
    stride = _per_dim(stride, n, "stride", minimum=1)
    dilation = _per_dim(dilation, n, "dilation", minimum=1)
    kernel = tuple(weight.shape[2:])
    pads = _padding_pairs(padding, kernel=kernel, stride=stride, dilation=dilation)
    _check_channels(x, weight, groups=groups)
    _output_sizes(x.shape[2:], pads, kernel=kernel, stride=stride, dilation=dilation, x=x, weight=weight)

    common = xp.result_type(x.dtype, weight.dtype)
    x = x if x.dtype == common else xp.astype(x, common)
    weight = weight if weight.dtype == common else xp.astype(weight, common)

    if native and is_torch_namespace(xp) and n <= 3:
        y = _torch_conv(x, weight, stride=stride, pads=pads, dilation=dilation, groups=groups)
    elif native and is_jax_namespace(xp) and n <= 3:
        y = _jax_conv(x, weight, stride=stride, pads=pads, dilation=dilation, groups=groups)
    else:
        y = _im2col_conv(x, weight, stride=stride, pads=pads, dilation=dilation, groups=groups, xp=xp)
    return y[0, ...] if unbatched else y


def _per_dim(value, n: int, name: str, *, minimum: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or any(not isinstance(v, int) or v < minimum for v in values):
        raise ConfigError(f"conv {name} must be an int >= {minimum} or {n} such ints, got {value!r}")
    return values


def _padding_pairs(padding, *, kernel, stride, dilation) -> tuple[tuple[int, int], ...]:
    n = len(kernel)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return ((0, 0),) * n
        if mode == "same":
            if any(s != 1 for s in stride):
                raise ConfigError(f"conv padding='same' needs stride 1 (as in torch), got stride {stride}")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ConfigError(f"conv padding must be an int, {n} ints, 'same' or 'valid', got {padding!r}")
    return tuple((p, p) for p in _per_dim(padding, n, "padding", minimum=0))


def _check_channels(x, weight, *, groups: int) -> None:
    if not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"conv groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        raise ShapeMismatchError(
            f"conv weight {tuple(weight.shape)} has {weight.shape[0]} output channels, not divisible by groups={groups}"
        )
    if x.shape[1] != weight.shape[1] * groups:
        raise ShapeMismatchError(
            f"conv input x {tuple(x.shape)} has {x.shape[1]} channels but weight {tuple(weight.shape)} "
            f"with groups={groups} expects {weight.shape[1] * groups}"
        )


def _output_sizes(spatial, pads, *, kernel, stride, dilation, x, weight) -> tuple[int, ...]:
    sizes = tuple(
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, (lo, hi), k, s, d in zip(spatial, pads, kernel, stride, dilation)
    )
    if any(size < 1 for size in sizes):
        raise ShapeMismatchError(
            f"conv input x {tuple(x.shape)} is smaller than the (dilated) kernel of weight {tuple(weight.shape)} "
            f"after padding {pads}"
        )
    return sizes


def _torch_conv(x, weight, *, stride, pads, dilation, groups) -> Array:
    import torch.nn.functional as F  # the arrays are torch tensors: torch is loaded

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.ndim - 2]
    # torch pads symmetrically; the odd extra zero of "same" goes at the end, padded here
    # (torch's own "same" would warn that it copies the input for it)
    extra = [hi - lo for lo, hi in reversed(pads)]
    if any(extra):
        x = F.pad(x, [p for e in extra for p in (0, e)])
    return conv(x, weight, None, stride, tuple(lo for lo, _ in pads), dilation, groups)


def _jax_conv(x, weight, *, stride, pads, dilation, groups) -> Array:
    import jax  # the arrays are JAX arrays: jax is loaded

    spatial = _JAX_SPATIAL[weight.ndim - 2]
    return jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=stride,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=("NC" + spatial, "OI" + spatial, "NC" + spatial),
        feature_group_count=groups,
    )


def _im2col_conv(x, weight, *, stride, pads, dilation, groups, xp: Namespace) -> Array:
    x = _zero_pad(x, pads, xp=xp)
    batch, channels = x.shape[0], x.shape[1]
    out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
    out_sizes = tuple(
        (size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(x.shape[2:], kernel, stride, dilation)
    )
    # One view of x per kernel offset, ordered like weight.reshape(out, in_per_group, prod(kernel)).
    columns = [
        x[(slice(None), slice(None)) + tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s) for o, d, m, s in zip(offset, dilation, out_sizes, stride)
        )]
        for offset in itertools.product(*(range(k) for k in kernel))
    ]
    patch = (channels // groups) * math.prod(kernel)
    columns = xp.reshape(xp.stack(columns, axis=2), (batch, groups, patch, math.prod(out_sizes)))
    columns = xp.permute_dims(columns, (1, 0, 2, 3))
    grouped_weight = xp.reshape(weight, (groups, 1, out_channels // groups, patch))
    y = xp.matmul(grouped_weight, columns)  # (groups, batch, out // groups, positions)
    y = xp.permute_dims(y, (1, 0, 2, 3))
    return xp.reshape(y, (batch, out_channels, *out_sizes))


def _zero_pad(x, pads, *, xp: Namespace) -> Array:
    for axis, (lo, hi) in enumerate(pads, start=2):
        if lo == 0 and hi == 0:
            continue
        # zeros on x's device and dtype without naming a device (JAX tracers have none)
        edge = xp.zeros_like(x[(slice(None),) * axis + (slice(0, 1), ...)])
        parts = [x]
        if lo:
            parts.insert(0, xp.broadcast_to(edge, (*x.shape[:axis], lo, *x.shape[axis + 1 :])))
        if hi:
            parts.append(xp.broadcast_to(edge, (*x.shape[:axis], hi, *x.shape[axis + 1 :])))
        x = xp.concat(parts, axis=axis)
    return x
