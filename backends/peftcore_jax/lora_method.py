"""LoRA's (and DoRA's) entry in the method table: the functions of ``lora``, ``layers`` and ``io``."""

from __future__ import annotations

import functools

from peftcore import LoraConfig
from peftcore_jax import methods
from peftcore_jax.io import load_modules, lora_module, lora_state_dict
from peftcore_jax.layers import lora_conv, lora_embedding, lora_linear
from peftcore_jax.lora import lora_merge, lora_unmerge
from peftcore_jax.params import LoraParams

__all__ = ["LORA"]

# axis names of each adapter array, per kind, in the core's (torch) order; "r" and "1" are never sharded
_SHARD_AXES = {
    "linear": {"lora_A": "r in", "lora_B": "out r", "lora_B_bias": "out", "lora_magnitude_vector": "out"},
    "embedding": {"lora_A": "r num", "lora_B": "dim r", "lora_B_bias": "dim", "lora_magnitude_vector": "dim"},
    "conv": {"lora_A": "r in *k", "lora_B": "out r *1", "lora_B_bias": "out", "lora_magnitude_vector": "1 out *1"},
}

LORA = methods.register(methods.JaxMethod(
    peft_type="LORA",
    config_cls=LoraConfig,
    params_cls=LoraParams,
    merge=lora_merge,
    unmerge=lora_unmerge,
    state_dict=lora_state_dict,
    from_state_dict=functools.partial(load_modules, build=lora_module),
    shard_axes=lambda lora: _SHARD_AXES[lora.kind],
    linear=lora_linear,
    conv=lora_conv,
    embedding=lora_embedding,
))
