"""One declarative map from a parameter-naming convention to the torch orientation the core uses.

A module of a parameter tree is a subtree holding a weight leaf. A ``Layout`` says, per layer kind, which
leaf name holds that weight and in which axis order it is stored, written as axis names:

======== ===================== ================================ =====================
kind     torch (``nn.Module``)  flax (``nn.Dense/Embed/Conv``)   core (torch) order
======== ===================== ================================ =====================
linear   ``weight`` "out in"    ``kernel`` "in out"               "out in"
embedding ``weight`` "num dim"  ``embedding`` "num dim"           "num dim"
conv     ``weight`` "out in *k" ``kernel`` "*k in out"            "out in *k"
======== ===================== ================================ =====================

Every conversion goes through :func:`to_core` / :func:`from_core`, which derive the permutation from these
names; a Linear stored "in out" is handed to the core as is with ``fan_in_fan_out=True`` (peft's GPT-2
``Conv1D`` convention), so no transpose happens at all. The torch convention cannot tell an ``nn.Embedding``
from an ``nn.Linear`` by its leaves, so it recognises embeddings by module name (``embedding_names``);
flax can (``embedding`` vs ``kernel``).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from peftcore.errors import ConfigError, ShapeMismatchError

__all__ = ["FLAX", "LAYOUTS", "TORCH", "LeafSpec", "Layout", "from_core", "get_layout", "to_core"]

CORE_AXES = {"linear": "out in", "embedding": "num dim", "conv": "out in *k"}


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Where a layer kind keeps its weight: leaf name, stored axis order, and (torch only) a module-name regex."""

    kind: str
    leaf: str
    axes: str
    module_regex: str | None = None

    @property
    def fan_in_fan_out(self) -> bool:
        """True when a Linear weight is stored ``(in, out)`` (the core's ``fan_in_fan_out``)."""
        return self.kind == "linear" and self.axes == "in out"

    def accepts(self, module_path: str, ndim: int) -> bool:
        rank_ok = ndim >= 3 if self.kind == "conv" else ndim == 2
        name_ok = self.module_regex is None or re.fullmatch(self.module_regex, module_path) is not None
        return rank_ok and name_ok


# transformers' names of nn.Embedding modules (last path component)
_TORCH_EMBEDDING_NAMES = (
    r"(.*\.)?(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings"
    r"|tok_embeddings|shared)"
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A naming convention: ordered ``LeafSpec``s (the first that accepts a leaf wins) and the bias leaf name.

    ``honours_fan_in_fan_out``: a torch tree cannot tell GPT-2 ``Conv1D`` from ``nn.Linear``, so there
    ``LoraConfig.fan_in_fan_out=True`` declares Linear weights as stored ``(in, out)``, as peft's flag does.
    """

    name: str
    specs: tuple[LeafSpec, ...]
    bias_leaf: str = "bias"
    honours_fan_in_fan_out: bool = False

    def weight_leaves(self) -> frozenset[str]:
        return frozenset(spec.leaf for spec in self.specs)

    def spec_for(self, module_path: str, leaf: str, ndim: int) -> LeafSpec | None:
        """The spec describing leaf ``leaf`` (rank ``ndim``) of module ``module_path``, if any."""
        for spec in self.specs:
            if spec.leaf == leaf and spec.accepts(module_path, ndim):
                return spec
        return None

    def with_fan_in_fan_out(self, spec: LeafSpec, fan_in_fan_out: bool) -> LeafSpec:
        """``spec`` as peft reads it under ``LoraConfig.fan_in_fan_out`` (only where the layout honours it)."""
        if self.honours_fan_in_fan_out and fan_in_fan_out and spec.kind == "linear":
            return dataclasses.replace(spec, axes="in out")
        return spec


TORCH = Layout(
    name="torch",
    specs=(
        LeafSpec("embedding", "weight", "num dim", module_regex=_TORCH_EMBEDDING_NAMES),
        LeafSpec("linear", "weight", "out in"),
        LeafSpec("conv", "weight", "out in *k"),
    ),
    honours_fan_in_fan_out=True,
)
FLAX = Layout(
    name="flax",
    specs=(
        LeafSpec("embedding", "embedding", "num dim"),
        LeafSpec("linear", "kernel", "in out"),
        LeafSpec("conv", "kernel", "*k in out"),
    ),
)
LAYOUTS = {"torch": TORCH, "flax": FLAX}


def get_layout(layout: str | Layout) -> Layout:
    """``Layout`` for a name in ``LAYOUTS`` (or ``layout`` itself)."""
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ConfigError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)} or a peftcore_jax.Layout") from None


def _expand(axes: str, ndim: int) -> list[str]:
    names = axes.split()
    if "*k" in names:
        spatial = ndim - (len(names) - 1)
        at = names.index("*k")
        names = names[:at] + [f"k{i}" for i in range(spatial)] + names[at + 1:]
    if len(names) != ndim:
        raise ShapeMismatchError(f"a weight of rank {ndim} cannot be stored as {axes!r}")
    return names


def _permutation(source: str, target: str, ndim: int) -> tuple[int, ...]:
    src, dst = _expand(source, ndim), _expand(target, ndim)
    return tuple(src.index(name) for name in dst)


def to_core(weight, spec: LeafSpec):
    """``weight`` stored as ``spec.axes`` in the core's (torch) order for ``spec.kind``."""
    perm = _permutation(spec.axes, CORE_AXES[spec.kind], weight.ndim)
    return weight if perm == tuple(range(weight.ndim)) else jnp.transpose(weight, perm)


def from_core(weight, spec: LeafSpec):
    """Inverse of :func:`to_core`: a core-ordered weight back in ``spec.axes``."""
    perm = _permutation(CORE_AXES[spec.kind], spec.axes, weight.ndim)
    return weight if perm == tuple(range(weight.ndim)) else jnp.transpose(weight, perm)
