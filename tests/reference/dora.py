"""Float64 NumPy reference for DoRA (weight-decomposed LoRA), written from the formulas.

Never imports peftcore; convolutions come from the plain-LoRA reference (``tests/reference/lora.py``). Orientation follows torch: ``A (r, in)``, ``B (out, r)``,
Linear ``W (out, in)`` (``(in, out)`` when ``fan_in_fan_out``), Embedding ``W (num_emb, dim)``,
``A (r, num_emb)``, ``B (dim, r)``, Conv ``W (out, in/groups, *k)``, ``A (r, in, *k)``,
``B (out, r/groups, 1, ..)``.

DoRA (Liu et al. 2024, as in peft):  ``g = m / ‖W' + sBA‖_row`` with the norm treated as a constant,
``y = g ⊙ (x (W' + sBA)ᵀ) + b``.  ``frozen_norm`` arguments let gradient checks hold the norm fixed.
"""

from __future__ import annotations

import numpy as np

from tests.reference.lora import conv, embedding_update


def _oriented(weight, fan_in_fan_out):
    return weight.T if fan_in_fan_out else weight


# ---------------------------------------------------------------------------------------------- Linear


def linear_norm(weight, lora_A, lora_B, scaling, *, fan_in_fan_out=False):
    """``‖W' + s·B@A‖`` per output row, ``(out,)``."""
    return np.linalg.norm(_oriented(weight, fan_in_fan_out) + scaling * (lora_B @ lora_A), axis=1)


def linear_forward(result, x, lora_A, lora_B, magnitude, weight, bias, scaling, *, fan_in_fan_out=False,
                   recompute_base=False, frozen_norm=None):
    """``result + (g−1)·base + g·s·(x Aᵀ Bᵀ)``, base = result − bias or ``x W'ᵀ`` (recompute)."""
    norm = linear_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out=fan_in_fan_out)
    g = magnitude / (norm if frozen_norm is None else frozen_norm)
    if recompute_base:
        base = x @ _oriented(weight, fan_in_fan_out).T
    else:
        base = result - (0.0 if bias is None else bias)
    return result + (g - 1.0) * base + g * scaling * ((x @ lora_A.T) @ lora_B.T)


def linear_dense(x, lora_A, lora_B, magnitude, weight, bias, scaling, *, fan_in_fan_out=False):
    """DoRA as one dense layer: ``x (g ⊙ (W' + sBA))ᵀ + b`` (what peft's eval forward equals)."""
    w = _oriented(weight, fan_in_fan_out) + scaling * (lora_B @ lora_A)
    g = magnitude / np.linalg.norm(w, axis=1)
    return x @ (g[:, None] * w).T + (0.0 if bias is None else bias)


def merge(weight, delta, magnitude, *, fan_in_fan_out=False, base_weight=None):
    """``(m/‖W₀' + Δ'‖)·(W + Δ)`` in stored orientation, and the norm (taken on ``base_weight``, default W)."""
    base = weight if base_weight is None else base_weight
    norm = np.linalg.norm(_oriented(base + delta, fan_in_fan_out), axis=1)
    factor = magnitude / norm
    factor = factor[None, :] if fan_in_fan_out else factor[:, None]
    return factor * (weight + delta), norm


def unmerge(weight, delta, magnitude, norm, *, fan_in_fan_out=False):
    """``W / (m/norm) − Δ``."""
    factor = magnitude / norm
    factor = factor[None, :] if fan_in_fan_out else factor[:, None]
    return weight / factor - delta


# ------------------------------------------------------------------------------------------- Embedding


def _lookup(indices, table, *, max_norm=None, norm_type=2.0):
    """``table[indices]`` with torch's ``max_norm`` renormalisation (via the plain-LoRA reference)."""
    return embedding_update(indices, table.T, np.eye(table.shape[1]), 1.0, max_norm=max_norm, norm_type=norm_type)


def embedding_norm(weight, lora_A, lora_B, scaling):
    """``‖Wᵀ + s·B@A‖`` per row, ``(dim,)``."""
    return np.linalg.norm(weight.T + scaling * (lora_B @ lora_A), axis=1)


def embedding_forward(result, indices, lora_A, lora_B, magnitude, weight, scaling, *, embed_scale=None,
                      max_norm=None, norm_type=2.0, frozen_norm=None):
    """``g·result + g·s·(Aᵀ[idx] Bᵀ)·embed_scale``."""
    norm = embedding_norm(weight, lora_A, lora_B, scaling)
    g = magnitude / (norm if frozen_norm is None else frozen_norm)
    update = scaling * (_lookup(indices, lora_A.T, max_norm=max_norm, norm_type=norm_type) @ lora_B.T)
    if embed_scale is not None:
        update = update * embed_scale
    return g * result + g * update


def embedding_dense(indices, lora_A, lora_B, magnitude, weight, scaling):
    """Embedding DoRA as one table lookup: ``(g ⊙ (W + s(BA)ᵀ))[idx]`` (columns scaled by g)."""
    table = weight + scaling * (lora_B @ lora_A).T
    g = magnitude / np.linalg.norm(table, axis=0)
    return (table * g[None, :])[indices]


# ------------------------------------------------------------------------------------------------ Conv


def conv_lora_weight(weight_shape, lora_A, lora_B):
    """peft's DoRA ``lora_weight``: ``B.reshape(-1, r) @ A.reshape(r, -1)`` laid out as ``weight_shape``.

    For ``groups == 1`` this is ``ΔW/s``; for ``groups > 1`` it is peft's reshaped product, not the grouped ΔW.
    """
    r = lora_A.shape[0]
    return (lora_B.reshape(-1, r) @ lora_A.reshape(r, -1)).reshape(weight_shape)


def conv_delta(lora_A, lora_B, scaling):
    """Grouped-free conv ΔW ``s·Σ_r B[o,r] A[r,i,*k]`` (``groups == 1``), ``(out, in, *k)``."""
    return scaling * np.tensordot(lora_B.reshape(lora_B.shape[0], -1), lora_A, axes=(1, 0))


def conv_norm(weight, lora_A, lora_B, scaling):
    """``‖W + s·lora_weight‖`` over all dims but out-channels, shaped ``(1, out, 1, ..)``."""
    total = weight + scaling * conv_lora_weight(weight.shape, lora_A, lora_B)
    norm = np.sqrt(np.sum(total**2, axis=tuple(range(1, weight.ndim))))
    return norm.reshape((1, -1) + (1,) * (weight.ndim - 2))


def conv_forward(result, x, lora_A, lora_B, magnitude, weight, bias, scaling, *, stride, padding, dilation=1,
                 groups=1, recompute_base=False, frozen_norm=None):
    """``result + (g−1)·base + g·s·convB(convA(x))``; convA: A's kernel, base stride/padding, dilation 1."""
    norm = conv_norm(weight, lora_A, lora_B, scaling)
    g = magnitude / (norm if frozen_norm is None else frozen_norm)
    spatial = (1,) * (x.ndim - 2)
    if recompute_base:
        base = conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    else:
        base = result - (0.0 if bias is None else bias.reshape((1, -1) + spatial))
    lora = conv(conv(x, lora_A, stride=stride, padding=padding), lora_B, groups=groups)
    return result + (g - 1.0) * base + g * scaling * lora


def conv_merge(weight, delta, magnitude, *, base_weight=None):
    """``(m/‖W₀ + Δ‖)·(W + Δ)`` with the ``(1, out, 1, ..)`` norm."""
    base = weight if base_weight is None else base_weight
    total = base + delta
    norm = np.sqrt(np.sum(total**2, axis=tuple(range(1, weight.ndim))))
    factor = (magnitude.reshape(-1) / norm).reshape((-1,) + (1,) * (weight.ndim - 1))
    return factor * (weight + delta), norm.reshape((1, -1) + (1,) * (weight.ndim - 2))


def conv_unmerge(weight, delta, magnitude, norm):
    """``W / (m/norm) − Δ``."""
    factor = (magnitude.reshape(-1) / norm.reshape(-1)).reshape((-1,) + (1,) * (weight.ndim - 1))
    return weight / factor - delta


# ----------------------------------------------------------------------------------------- Gradients


def numeric_gradient(fn, params, cotangent, *, eps=1e-6):
    """Central-difference gradient of ``Σ cotangent ⊙ fn(*params)`` wrt every array in ``params``."""
    grads = []
    for k, p in enumerate(params):
        grad = np.zeros_like(p)
        for idx in np.ndindex(*p.shape):
            values = []
            for sign in (1.0, -1.0):
                shifted = [q.copy() for q in params]
                shifted[k][idx] += sign * eps
                values.append(np.sum(cotangent * fn(*shifted)))
            grad[idx] = (values[0] - values[1]) / (2 * eps)
        grads.append(grad)
    return grads
