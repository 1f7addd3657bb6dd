"""Float64 NumPy reference for plain LoRA, written from the formulas (never imports peftcore).

Torch orientation: Linear ``W (out, in)`` (``(in, out)`` with ``fan_in_fan_out``), ``A (r, in)``,
``B (out, r)``; Embedding ``W (num_emb, dim)``, ``A (r, num_emb)``, ``B (dim, r)``; Conv
``W (out, in/groups, *k)``, ``A (r, in, *k)``, ``B (out, r/groups, 1, ..)``, ``x (batch, C, *spatial)``.

LoRA (Hu et al. 2021, as in peft): ``y = base(x) + s·(B(A x) + b_B)``, ``s = α/r`` (``α/√r`` rsLoRA).
Convolutions here are explicit loops over output positions, independent of ``peftcore._conv``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def scaling(r, lora_alpha, *, use_rslora=False):
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


# ---------------------------------------------------------------------------------------------- Linear


def linear_update(x, lora_A, lora_B, scaling, lora_B_bias=None):
    """``s·(x Aᵀ Bᵀ + b_B)`` for ``x (..., in)``."""
    bias = 0.0 if lora_B_bias is None else lora_B_bias
    return scaling * (np.einsum("...i,ri,or->...o", x, lora_A, lora_B) + bias)


def linear_delta(lora_A, lora_B, scaling, *, fan_in_fan_out=False):
    """``s·B A`` ``(out, in)``, transposed to ``(in, out)`` with ``fan_in_fan_out``."""
    delta = scaling * np.einsum("or,ri->oi", lora_B, lora_A)
    return delta.T if fan_in_fan_out else delta


def linear_dense(x, weight, bias, *, fan_in_fan_out=False):
    """The base layer ``x W'ᵀ + b`` (``W' = Wᵀ`` when ``fan_in_fan_out``)."""
    w = weight.T if fan_in_fan_out else weight
    return np.einsum("...i,oi->...o", x, w) + (0.0 if bias is None else bias)


# ---------------------------------------------------------------------------------------------- Embedding


def embedding_update(indices, lora_A, lora_B, scaling, *, max_norm=None, norm_type=2.0, embed_scale=None):
    """``s·(Aᵀ[idx]) Bᵀ`` with torch's ``max_norm`` row renormalisation, times ``embed_scale``."""
    rows = lora_A.T[np.asarray(indices)]  # (..., r)
    if max_norm is not None:
        norms = np.linalg.norm(rows, ord=norm_type, axis=-1, keepdims=True)
        rows = np.where(norms > max_norm, rows * (max_norm / (norms + 1e-7)), rows)
    out = scaling * np.einsum("...r,dr->...d", rows, lora_B)
    return out if embed_scale is None else out * embed_scale


def embedding_delta(lora_A, lora_B, scaling):
    """``s·(B A)ᵀ`` ``(num_emb, dim)``."""
    return scaling * np.einsum("dr,rn->nd", lora_B, lora_A)


# ---------------------------------------------------------------------------------------------- Conv


def pad_pairs(padding, kernel, dilation=None):
    """Per-dim ``(lo, hi)`` zero padding for an int, a tuple, ``"valid"`` or ``"same"`` (extra at the end)."""
    n = len(kernel)
    dilation = (1,) * n if dilation is None else dilation
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [(t // 2, t - t // 2) for t in totals]
    pads = (padding,) * n if isinstance(padding, int) else padding
    return [(p, p) for p in pads]


def conv(x, weight, *, stride=1, padding=0, dilation=1, groups=1):
    """Naive cross-correlation with torch's conventions: one windowed sum per output position and group."""
    n = weight.ndim - 2
    stride = (stride,) * n if isinstance(stride, int) else tuple(stride)
    dilation = (dilation,) * n if isinstance(dilation, int) else tuple(dilation)
    kernel = weight.shape[2:]
    padded = np.pad(x, [(0, 0), (0, 0), *pad_pairs(padding, kernel, dilation)])
    in_per_group, out_per_group = weight.shape[1], weight.shape[0] // groups
    out_sizes = [(padded.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(n)]
    y = np.zeros((x.shape[0], weight.shape[0], *out_sizes))
    for pos in itertools.product(*(range(m) for m in out_sizes)):
        taps = tuple(
            [p * s + k * d for k in range(kk)] for p, s, kk, d in zip(pos, stride, kernel, dilation)
        )
        window = padded[np.ix_(range(x.shape[0]), range(x.shape[1]), *taps)]  # (batch, C, *kernel)
        for g in range(groups):
            w = weight[g * out_per_group : (g + 1) * out_per_group].reshape(out_per_group, -1)
            patch = window[:, g * in_per_group : (g + 1) * in_per_group].reshape(x.shape[0], -1)
            y[(slice(None), slice(g * out_per_group, (g + 1) * out_per_group), *pos)] = patch @ w.T
    return y


def conv_update(x, lora_A, lora_B, scaling, *, stride=1, padding=0, groups=1, lora_B_bias=None):
    """``s·(convB(convA(x)) + b_B)``: A with base stride/padding (dilation 1), B 1×…×1 with ``groups``."""
    hidden = conv(x, lora_A, stride=stride, padding=padding)
    y = conv(hidden, lora_B, groups=groups)
    if lora_B_bias is not None:
        y = y + lora_B_bias.reshape((-1,) + (1,) * (lora_A.ndim - 2))
    return scaling * y


def conv_delta(lora_A, lora_B, scaling, *, groups=1):
    """Ungrouped equivalent kernel ``(out, in, *k)``: ``s·Σ_j B[o, j] A[group(o)·r/groups + j]``."""
    r, out = lora_A.shape[0], lora_B.shape[0]
    rank_per_group, out_per_group = r // groups, out // groups
    delta = np.zeros((out, *lora_A.shape[1:]))
    for o in range(out):
        g = o // out_per_group
        for j in range(rank_per_group):
            delta[o] += lora_B[(o, j) + (0,) * (lora_A.ndim - 2)] * lora_A[g * rank_per_group + j]
    return scaling * delta


# ---------------------------------------------------------------------------------------------- merge


def merge(weight, delta):
    return weight + delta


def unmerge(weight, delta):
    return weight - delta
