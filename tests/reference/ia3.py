"""Float64 NumPy reference for (IA)³, written from the formulas (never imports peftcore).

Liu et al. 2022 as in peft: a vector ``l`` rescales a layer's input channels (feed-forward layers)
or output channels (the others, bias included). Written per channel with explicit loops.
"""

from __future__ import annotations

import re

import numpy as np


def is_feedforward(ff_modules, key):
    if isinstance(ff_modules, str):
        return re.fullmatch(ff_modules, key) is not None
    return any(key[len(key) - len(name):] == name for name in ff_modules if len(name) <= len(key))


def linear(x, weight, bias=None):
    """``x (..., in)``, ``weight (out, in)``."""
    y = np.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


def scale_channels(a, vector, axis):
    """Multiply slice ``c`` of ``a`` along ``axis`` by ``vector[c]``."""
    out = np.array(a, dtype=np.float64, copy=True)
    moved = np.moveaxis(out, axis, 0)
    for c in range(moved.shape[0]):
        moved[c] = moved[c] * vector[c]
    return out


def product(vectors):
    out = np.ones_like(vectors[0])
    for v in vectors:
        out = out * v
    return out


def weighted_sum(vectors, weights):
    out = np.zeros_like(vectors[0])
    for v, w in zip(vectors, weights):
        out = out + w * v
    return out


def merged_linear_weight(weight_out_in, vector, *, feedforward):
    """``W (out, in)``: column ``j`` times ``l[j]`` if feed-forward, else row ``o`` times ``l[o]``."""
    return scale_channels(weight_out_in, vector, 1 if feedforward else 0)


def merged_conv_weight(weight, vector, *, feedforward, groups=1):
    """``W (out, in/g, *k)``: output channel ``o`` times ``l[o]``, or (FF) ``W[o, j]`` times ``l[g(o)·in/g + j]``."""
    out = np.array(weight, dtype=np.float64, copy=True)
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    for o in range(out_channels):
        if not feedforward:
            out[o] *= vector[o]
            continue
        group = o // out_per_group
        for j in range(in_per_group):
            out[o, j] *= vector[group * in_per_group + j]
    return out


def conv(x, weight, bias=None, *, stride=1, padding=0, groups=1):
    """Direct N-d cross-correlation, torch semantics (integer stride/padding)."""
    n = weight.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(padding, padding)] * n)
    batch, _, *spatial = x.shape
    out_channels, in_per_group, *kernel = weight.shape
    out_size = [(s - k) // stride + 1 for s, k in zip(spatial, kernel)]
    y = np.zeros((batch, out_channels, *out_size))
    out_per_group = out_channels // groups
    for o in range(out_channels):
        g = o // out_per_group
        xs = x[:, g * in_per_group:(g + 1) * in_per_group]
        for pos in np.ndindex(*out_size):
            window = xs[(slice(None), slice(None)) + tuple(
                slice(p * stride, p * stride + k) for p, k in zip(pos, kernel))]
            y[(slice(None), o) + pos] = np.sum(window * weight[o], axis=tuple(range(1, n + 2)))
    if bias is not None:
        y += bias.reshape((1, out_channels) + (1,) * n)
    return y
