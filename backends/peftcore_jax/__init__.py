"""peftcore for JAX parameter trees: pure functions that work under ``jit``, ``grad`` and ``vmap``.

Adapters are a pytree kept apart from the base parameters (``LoraAdapters``: module path -> ``LoraParams``),
so the base stays frozen by construction and an optimizer sees only adapter leaves::

    params, adapters = init_lora(params, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), jax.random.key(0))
    y = dense(x, params["model"]["layers"][0]["self_attn"]["q_proj"], adapters.get("model.layers.0.self_attn.q_proj"))
    save_adapter("out", adapters)                      # peft's files and keys
    adapters = load_adapter("out", params)             # validated against the tree
    merged = merge(params, adapters)                   # plain parameters for inference
    both = ActiveAdapters((adapters, other))           # two adapters active at once, as peft's set_adapter([...])

The same functions serve (IA)³ (``init_ia3``: ``ia3_l`` vectors) and AdaLoRA (``init_adalora``: SVD triplets,
``orth_regularizer``, the jit-able rank allocator ``allocator_step``); each method registers its pieces in one
table keyed by ``peft_type`` (``peftcore_jax.methods``).

Module paths are the tree's key paths joined with dots (``model.layers.0.self_attn.q_proj``); matching is the
core's (peft's rules). ``layout`` ("torch" or "flax", see ``peftcore_jax.layout``) says where a module keeps
its weight and in which orientation. All adapter math is ``peftcore``'s.
"""

from peftcore_jax import lora_method  # noqa: F401  (registers LoRA in the method table)
from peftcore_jax.adalora import (
    AllocatorState,
    StepPlan,
    allocator_init,
    allocator_plan,
    allocator_schedule,
    allocator_step,
    init_adalora,
    orth_regularizer,
    with_rank_pattern,
)
from peftcore_jax.ia3 import init_ia3
from peftcore_jax.io import adapter_state_dict, adapters_from_state_dict, load_adapter, save_adapter
from peftcore_jax.layers import conv, convolve, dense, embed, embedding, linear
from peftcore_jax.layout import FLAX, LAYOUTS, TORCH, Layout, LeafSpec, get_layout
from peftcore_jax.lora import JaxSampler, dora_weight_norms, init_lora, module_key, target_modules
from peftcore_jax.merging import merge, unmerge
from peftcore_jax.params import ActiveAdapters, AdaLoraParams, Adapters, IA3Params, LoraAdapters, LoraParams
from peftcore_jax.partition import combine, partition, trainable_mask
from peftcore_jax.sharding import adapter_shardings, shard_adapters
from peftcore_jax.tree import find_modules, leaf_paths, module_names, replace_leaves
from peftcore_jax.weighted import add_weighted_adapter

__all__ = [
    "FLAX",
    "LAYOUTS",
    "TORCH",
    "ActiveAdapters",
    "AdaLoraParams",
    "Adapters",
    "AllocatorState",
    "IA3Params",
    "JaxSampler",
    "Layout",
    "LeafSpec",
    "LoraAdapters",
    "LoraParams",
    "StepPlan",
    "add_weighted_adapter",
    "adapter_shardings",
    "adapter_state_dict",
    "adapters_from_state_dict",
    "allocator_init",
    "allocator_plan",
    "allocator_schedule",
    "allocator_step",
    "combine",
    "conv",
    "convolve",
    "dense",
    "dora_weight_norms",
    "embed",
    "embedding",
    "find_modules",
    "get_layout",
    "init_adalora",
    "init_ia3",
    "init_lora",
    "leaf_paths",
    "linear",
    "load_adapter",
    "merge",
    "module_key",
    "module_names",
    "orth_regularizer",
    "partition",
    "replace_leaves",
    "save_adapter",
    "shard_adapters",
    "target_modules",
    "trainable_mask",
    "unmerge",
    "with_rank_pattern",
]
