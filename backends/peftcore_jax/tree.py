"""Parameter pytrees seen as modules: dotted module paths, weight-holding modules, pure leaf replacement.

A leaf's path is its ``jax.tree_util`` key path joined with dots (dict keys, list indices and dataclass
attribute names alike), so ``{"model": {"layers": [{"self_attn": {"q_proj": {"weight": w}}}]}}`` has the leaf
``model.layers.0.self_attn.q_proj.weight`` in module ``model.layers.0.self_attn.q_proj``, the name peft gives
the same torch module. A module is a subtree holding a weight leaf that the ``Layout`` recognises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from peftcore.errors import IncompatibleKeysError
from peftcore_jax.layout import Layout, LeafSpec, get_layout

__all__ = ["Module", "find_modules", "leaf_paths", "module_names", "path_str", "replace_leaves"]


def _key_str(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def path_str(key_path: tuple) -> str:
    """Dotted name of a ``jax.tree_util`` key path (``model.layers.0.q_proj.weight``)."""
    return ".".join(_key_str(entry) for entry in key_path)


def leaf_paths(tree: Any, /) -> dict[str, Any]:
    """``{dotted leaf path: leaf}`` of ``tree`` in flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(path): leaf for path, leaf in leaves}


def module_names(tree: Any, /) -> list[str]:
    """Every module name of ``tree`` as ``named_modules()`` lists them: ``""``, then each leaf's ancestors."""
    names = {"": None}
    for path in leaf_paths(tree):
        parts = path.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            names.setdefault(".".join(parts[:i]), None)
    return list(names)


@dataclasses.dataclass(frozen=True)
class Module:
    """A weight-holding module: its path, the weight leaf's path and layout spec, and the bias leaf's path."""

    path: str
    spec: LeafSpec
    weight_path: str
    bias_path: str | None

    @property
    def kind(self) -> str:
        return self.spec.kind


def find_modules(tree: Any, /, *, layout: str | Layout = "torch") -> dict[str, Module]:
    """``{module path: Module}`` for every subtree of ``tree`` holding a weight leaf ``layout`` recognises."""
    layout = get_layout(layout)
    leaves = leaf_paths(tree)
    modules: dict[str, Module] = {}
    for path, leaf in leaves.items():
        module_path, _, leaf_name = path.rpartition(".")
        if leaf_name not in layout.weight_leaves() or not hasattr(leaf, "ndim"):
            continue
        spec = layout.spec_for(module_path, leaf_name, leaf.ndim)
        if spec is None:
            continue
        bias_path = f"{module_path}.{layout.bias_leaf}" if module_path else layout.bias_leaf
        modules[module_path] = Module(module_path, spec, path, bias_path if bias_path in leaves else None)
    return modules


def replace_leaves(tree: Any, replacements: Mapping[str, Any], /) -> Any:
    """A new tree equal to ``tree`` except the leaves at the dotted paths in ``replacements`` (inputs untouched)."""
    remaining = set(replacements)

    def swap(key_path, leaf):
        path = path_str(key_path)
        if path in replacements:
            remaining.discard(path)
            return replacements[path]
        return leaf

    new_tree = jax.tree_util.tree_map_with_path(swap, tree)
    if remaining:
        raise IncompatibleKeysError(f"no leaf at path(s) {sorted(remaining)} in the parameter tree")
    return new_tree
