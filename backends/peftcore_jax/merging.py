"""Merge adapters into (or out of) a parameter tree, whatever their method (the method table's ``merge``).

peft's ``merge_and_unload`` / ``unmerge_adapter`` on parameters: LoRA ``W + ΔW`` (DoRA rescaled), AdaLoRA
``W + s·B(A⊙E)``, (IA)³ ``W ⊙ l`` (rows, or columns for feed-forward layers). ``ActiveAdapters`` merge one
after the other, in order, and unmerge in reverse, as peft does for several active adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from peftcore.errors import MergeError
from peftcore_jax.methods import get_method
from peftcore_jax.params import ActiveAdapters, Adapters

__all__ = ["merge", "unmerge"]


def merge(params: Any, adapters: Adapters | ActiveAdapters, /, *, safe: bool = False,
          base_params: Any = None) -> Any:
    """New ``params`` with every adapter merged into its base weights (and biases, where the method scales them).

    DoRA norms are taken on ``base_params`` (default ``params``): the weights before any adapter was merged, as
    peft's ``_unmerged_base_weight`` (pass them when merging into already-merged parameters). ``safe=True``
    raises ``MergeError`` naming the module when a merged weight is not finite (reads values: not jit-able);
    otherwise pure and jit-able.
    """
    base_params = params if base_params is None else base_params
    if isinstance(adapters, ActiveAdapters):
        for one in adapters.adapters:
            params = merge(params, one, safe=safe, base_params=base_params)
        return params
    return get_method(adapters.peft_type).merge(params, adapters, safe=safe, base_params=base_params)


def unmerge(params: Any, adapters: Adapters | ActiveAdapters, /, *,
            weight_norms: dict[str, jax.Array] | Sequence[dict[str, jax.Array] | None] | None = None) -> Any:
    """Inverse of ``merge`` (``ActiveAdapters`` in reverse order).

    DoRA needs ``weight_norms`` (``dora_weight_norms`` before merging; for ``ActiveAdapters`` one entry per
    adapter); (IA)³ divides by ``l + 1e-8`` and warns as peft does.
    """
    if isinstance(adapters, ActiveAdapters):
        norms = [None] * len(adapters) if weight_norms is None else list(weight_norms)
        if len(norms) != len(adapters):
            raise MergeError(f"weight_norms has {len(norms)} entries for {len(adapters)} active adapters")
        for one, one_norms in zip(reversed(adapters.adapters), reversed(norms)):
            params = unmerge(params, one, weight_norms=one_norms)
        return params
    return get_method(adapters.peft_type).unmerge(params, adapters, weight_norms=weight_norms)
