"""Prefix tuning's encoder: the optional two-layer projection of ``peft``'s ``PrefixEncoder``.

Without projection the key/value prefix is the embedding table itself, ``(T, 2·L·D)``.
"""

from __future__ import annotations

from peftcore._xp import Array, array_namespace
from peftcore.errors import ShapeMismatchError

__all__ = ["prefix_projection"]


def prefix_projection(embedding: Array, w1: Array, b1: Array, w2: Array, b2: Array, /) -> Array:
    """``tanh(E·W1ᵀ + b1)·W2ᵀ + b2``: ``(..., D)`` -> ``(..., 2·L·D)``.

    ``W1 (E_h, D)``, ``W2 (2·L·D, E_h)`` in torch orientation: ``peft``'s ``transform`` =
    ``Sequential(Linear(D, E_h), Tanh(), Linear(E_h, 2·L·D))``, saved as ``transform.0.*`` / ``transform.2.*``.
    """
    xp = array_namespace(embedding, w1, b1, w2, b2)
    if w1.shape[-1] != embedding.shape[-1] or w2.shape[-1] != w1.shape[0]:
        raise ShapeMismatchError(
            f"prefix_projection: embedding {tuple(embedding.shape)}, transform.0.weight {tuple(w1.shape)} and "
            f"transform.2.weight {tuple(w2.shape)} do not chain"
        )
    hidden = xp.tanh(xp.matmul(embedding, xp.matrix_transpose(w1)) + b1)
    return xp.matmul(hidden, xp.matrix_transpose(w2)) + b2
