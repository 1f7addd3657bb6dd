"""Float64 NumPy reference for combining LoRA adapters (peft's ``add_weighted_adapter``), never imports peftcore.

Adapter ``i``: ``A_i (r_i, in, *k)``, ``B_i (out, r_i, 1, ..)``, scaling ``s_i``, weight ``w_i``; its update
is ``ΔW_i = s_i·B_i·A_i`` on the flattened factors ``(out, r_i)·(r_i, in·prod(k))``.
"""

from __future__ import annotations

import numpy as np


def flat(factor):
    """``(r, in, *k) -> (r, in·prod(k))`` for A, ``(out, r, 1, ..) -> (out, r)`` for B."""
    factor = np.asarray(factor, dtype=np.float64)
    return factor.reshape(factor.shape[0], -1)


def delta(lora_A, lora_B, scaling):
    """``s·B·A`` as an ``(out, in·prod(k))`` matrix."""
    return scaling * np.einsum("or,ri->oi", flat(lora_B), flat(lora_A))


def weighted_delta(lora_As, lora_Bs, weights, scalings):
    """``Σ w_i s_i B_i A_i``."""
    return sum(w * delta(a, b, s) for a, b, w, s in zip(lora_As, lora_Bs, weights, scalings))


def cat(lora_As, lora_Bs, weights, scalings, rank=None):
    """Stack ``w_i s_i A_i`` as rows and ``B_i`` as columns, zero rows/columns up to ``rank``."""
    blocks_A = [w * s * np.asarray(a, dtype=np.float64) for a, w, s in zip(lora_As, weights, scalings)]
    lora_A = np.concatenate(blocks_A, axis=0)
    lora_B = np.concatenate([np.asarray(b, dtype=np.float64) for b in lora_Bs], axis=1)
    return pad(lora_A, lora_B, rank)


def linear(lora_As, lora_Bs, weights, scalings, rank=None):
    """``A = Σ sign(w s)√|w s| A_i``, ``B = Σ √|w s| B_i``."""
    root = [np.sqrt(abs(w * s)) for w, s in zip(weights, scalings)]
    sign = [1.0 if w * s >= 0 else -1.0 for w, s in zip(weights, scalings)]
    lora_A = sum(g * r * np.asarray(a, dtype=np.float64) for a, g, r in zip(lora_As, sign, root))
    lora_B = sum(r * np.asarray(b, dtype=np.float64) for b, r in zip(lora_Bs, root))
    return pad(lora_A, lora_B, rank)


def pad(lora_A, lora_B, rank):
    if rank is None or rank == lora_A.shape[0]:
        return lora_A, lora_B
    extra = rank - lora_A.shape[0]
    lora_A = np.concatenate([lora_A, np.zeros((extra, *lora_A.shape[1:]))], axis=0)
    lora_B = np.concatenate([lora_B, np.zeros((lora_B.shape[0], extra, *lora_B.shape[2:]))], axis=1)
    return lora_A, lora_B


def best_rank_k(matrix, k):
    """The best rank-``k`` approximation of ``matrix`` (Eckart–Young) and its singular values."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    k = min(k, s.size)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def quantile(values, q):
    """Linearly interpolated quantile (NumPy's default method, torch.quantile's default)."""
    return float(np.quantile(np.asarray(values, dtype=np.float64).ravel(), q))


def clamp(lora_A, lora_B, q):
    """Clip both factors to ``±quantile_q(entries of B and A)``."""
    high = quantile(np.concatenate([np.ravel(lora_B), np.ravel(lora_A)]), q)
    return np.clip(lora_A, -high, high), np.clip(lora_B, -high, high)
