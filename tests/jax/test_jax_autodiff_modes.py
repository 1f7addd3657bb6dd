"""LoRA layers under every JAX transformation users compose them with: jvp, vjp, hessian, vmap, jit.

The core hides ``Bᵀ`` behind ``optimization_barrier`` for XLA's sake (``peftcore._xp.factor_transpose``);
these tests pin that the layer stays an ordinary differentiable function: forward-mode and reverse-mode
derivatives agree with the closed forms of ``y = x Wᵀ + s (x Aᵀ) Bᵀ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import peftcore_jax as pj

S = 2.0
rng = np.random.default_rng(0)
X = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
W = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
A = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
B = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)


def _layer(x, a, b):
    return pj.linear(x, W, None, pj.LoraParams(a, b, scaling=S))


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_forward_mode_matches_the_closed_form():
    tangent = jnp.asarray(rng.standard_normal(B.shape), jnp.float32)
    _, jvp = jax.jvp(lambda b: _layer(X, A, b), (B,), (tangent,))
    _close(jvp, S * (X @ A.T) @ tangent.T)


def test_reverse_mode_matches_the_closed_form():
    g = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    _, vjp = jax.vjp(_layer, X, A, B)
    dx, da, db = jax.jit(vjp)(g)
    _close(db, S * g.T @ (X @ A.T))
    _close(da, S * (g @ B).T @ X)
    _close(dx, g @ W + S * (g @ B) @ A)


def test_hessian_of_a_quadratic_loss_in_B():
    # L = ½‖y‖²: ∂²L/∂B∂B = s² (hᵀh ⊗ I), with h = x Aᵀ
    hessian = jax.hessian(lambda b: 0.5 * jnp.sum(_layer(X, A, b) ** 2))(B)
    h = X @ A.T
    expected = S**2 * jnp.einsum("ik,jl->ijkl", jnp.eye(4), h.T @ h)  # [o, r, o2, r2] = δ(o, o2) (hᵀh)[r, r2]
    _close(hessian, expected)


def test_vmap_over_adapters():
    stacked_B = jnp.stack([B, 2 * B, -B])
    ys = jax.vmap(lambda b: _layer(X, A, b))(stacked_B)
    for y, b in zip(ys, stacked_B):
        _close(y, X @ W.T + S * (X @ A.T) @ b.T)
