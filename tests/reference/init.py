"""Float64 NumPy reference for the deterministic LoRA initialisations, written from the formulas.

Self-contained: never imports peftcore. Orientation follows torch: ``A (r, in)``, ``B (out, r)``,
Linear ``W (out, in)`` or ``(in, out)`` when ``fan_in_fan_out``; ``W'`` is the ``(out, in)`` view.

* PiSSA (Meng et al. 2024):  ``W' = U S Vh``, ``A = √(S_r/s) Vh_r``, ``B = U_r √(S_r/s)``, ``W ← W − s·B A``.
* OLoRA (Büyükakyüz 2024):   ``W' = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``, ``W ← W − s·B A``.
* Orthogonal (Datta 2024):   ``Q`` from QR of an ``(r, r)`` Gaussian ``X``, ``A = (G_A Q[0::2])ᵀ/10``,
  ``B = G_Bᵀ Q[1::2]/10``.

Plus the statistics the tests use: Kolmogorov-Smirnov distances (no scipy) and Eckart-Young.
"""

from __future__ import annotations

import math

import numpy as np


def _oriented(weight, fan_in_fan_out):
    return weight.T if fan_in_fan_out else weight


def pissa(weight, r, scaling, *, fan_in_fan_out=False):
    """``(A, B, W_residual)`` of exact PiSSA, the residual in the stored orientation."""
    w = _oriented(np.asarray(weight, dtype=np.float64), fan_in_fan_out)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:r] / scaling)
    lora_A = root[:, None] * vh[:r]
    lora_B = u[:, :r] * root[None, :]
    return lora_A, lora_B, _oriented(w - scaling * lora_B @ lora_A, fan_in_fan_out)


def olora(weight, r, scaling, *, fan_in_fan_out=False):
    """``(A, B, W_residual)`` of OLoRA, the residual in the stored orientation."""
    w = _oriented(np.asarray(weight, dtype=np.float64), fan_in_fan_out)
    q, upper = np.linalg.qr(w)
    lora_A, lora_B = upper[:r], q[:, :r]
    return lora_A, lora_B, _oriented(w - scaling * lora_B @ lora_A, fan_in_fan_out)


def orthogonal(square_draws, draws_A, draws_B):
    """``(A, B)`` of the orthogonal init from its Gaussian draws ``X (r, r)``, ``G_A (in, r/2)``, ``G_B (r/2, out)``."""
    q, _ = np.linalg.qr(np.asarray(square_draws, dtype=np.float64))
    lora_A = (np.asarray(draws_A, dtype=np.float64) @ q[0::2]).T / 10.0
    lora_B = np.asarray(draws_B, dtype=np.float64).T @ q[1::2] / 10.0
    return lora_A, lora_B


def best_rank(weight, r):
    """Eckart-Young: the best rank-``r`` approximation of ``weight`` and the Frobenius error left over."""
    u, s, vh = np.linalg.svd(np.asarray(weight, dtype=np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float(np.sqrt(np.sum(s[r:] ** 2)))


def with_spectrum(rng, rows, cols, singular_values):
    """``U diag(σ) Vᵀ`` with Haar-random orthonormal ``U (rows, k)``, ``V (cols, k)``, ``k = len(σ)``."""
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * np.asarray(singular_values, dtype=np.float64)) @ v.T


def kaiming_bound(fan_in):
    """Bound of torch's ``kaiming_uniform_(a=√5)``: ``gain·√(3/fan_in)`` with ``gain = √(2/(1+a²))``."""
    gain = math.sqrt(2.0 / (1.0 + 5.0))
    return gain * math.sqrt(3.0 / fan_in)


def ks_uniform(samples, low, high):
    """One-sample KS distance ``sup |F_n − F|`` to U[low, high]."""
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    return _ks_one(x, np.clip((x - low) / (high - low), 0.0, 1.0))


def ks_normal(samples, std):
    """One-sample KS distance to N(0, std²)."""
    x = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / (std * math.sqrt(2.0))))
    return _ks_one(x, cdf)


def ks_two_sample(first, second):
    """Two-sample KS distance ``sup |F_n − G_m|``."""
    a = np.sort(np.asarray(first, dtype=np.float64).ravel())
    b = np.sort(np.asarray(second, dtype=np.float64).ravel())
    grid = np.concatenate([a, b])
    gap = np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size
    return float(np.max(np.abs(gap)))


def ks_critical(n, m=None, *, alpha=1e-3):
    """Asymptotic KS critical value ``c(α)·√((n+m)/(n m))`` (one-sample when ``m`` is None)."""
    c = math.sqrt(-0.5 * math.log(alpha / 2.0))
    return c / math.sqrt(n) if m is None else c * math.sqrt((n + m) / (n * m))


def _ks_one(sorted_samples, cdf):
    n = sorted_samples.size
    above = np.arange(1, n + 1) / n - cdf
    below = cdf - np.arange(0, n) / n
    return float(max(above.max(), below.max()))
