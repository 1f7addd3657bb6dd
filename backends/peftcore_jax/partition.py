"""Split trainable adapter leaves from frozen base leaves, for any optimizer (optax's ``masked`` included).

A leaf is trainable iff it sits inside an ``Adapters`` (alias ``LoraAdapters``; any method's: LoRA factors,
``lora_B`` bias, DoRA magnitude, (IA)³ vectors, AdaLoRA triplets); every other leaf (base weights, norms, ...) is
frozen. ``partition`` / ``combine`` follow equinox's convention:
the two halves keep the full tree structure with ``None`` where the other half has the leaf.
"""

from __future__ import annotations

from typing import Any

import jax

from peftcore_jax.params import Adapters

__all__ = ["combine", "partition", "trainable_mask"]


def _is_adapters(node: Any) -> bool:
    return isinstance(node, Adapters)


def trainable_mask(tree: Any, /) -> Any:
    """A tree of bools shaped like ``tree``: ``True`` for leaves inside an ``Adapters``, ``False`` elsewhere."""

    def mark(node):
        flag = _is_adapters(node)
        return jax.tree_util.tree_map(lambda _: flag, node)

    return jax.tree_util.tree_map(mark, tree, is_leaf=_is_adapters)


def partition(tree: Any, /, mask: Any = None) -> tuple[Any, Any]:
    """``(trainable, frozen)``: ``tree`` with the frozen leaves set to ``None``, and with the trainable ones set so.

    ``mask`` (default ``trainable_mask(tree)``) is a bool tree shaped like ``tree``.
    """
    mask = trainable_mask(tree) if mask is None else mask
    trainable = jax.tree_util.tree_map(lambda leaf, keep: leaf if keep else None, tree, mask)
    frozen = jax.tree_util.tree_map(lambda leaf, keep: None if keep else leaf, tree, mask)
    return trainable, frozen


def combine(*trees: Any) -> Any:
    """Inverse of ``partition``: per position, the first non-``None`` leaf among ``trees``."""

    def first(*leaves):
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree_util.tree_map(first, *trees, is_leaf=lambda x: x is None)
