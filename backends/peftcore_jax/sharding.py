"""Shardings for adapters that follow their base weights: ``lora_A`` takes the base's input-dim sharding,
``lora_B`` (and its bias, and DoRA's magnitude) the output-dim sharding, the rank dim stays replicated.

The base weight's ``PartitionSpec`` is read by axis name through the module's ``LeafSpec.axes`` (the layout
map), so a torch ``(out, in)`` weight and a flax ``(in, out)`` kernel give the same adapter shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from peftcore.errors import UnsupportedLayerError
from peftcore_jax.layout import LeafSpec
from peftcore_jax.lora import _module_of
from peftcore_jax.params import LoraAdapters, LoraParams
from peftcore_jax.tree import find_modules, leaf_paths

__all__ = ["adapter_shardings", "shard_adapters"]

# axis names of each adapter array, per kind, in the core's (torch) order; "r" and "1" are never sharded
_ADAPTER_AXES = {
    "linear": {"lora_A": "r in", "lora_B": "out r", "lora_B_bias": "out", "lora_magnitude_vector": "out"},
    "embedding": {"lora_A": "r num", "lora_B": "dim r", "lora_B_bias": "dim", "lora_magnitude_vector": "dim"},
    "conv": {"lora_A": "r in *k", "lora_B": "out r *1", "lora_B_bias": "out", "lora_magnitude_vector": "1 out *1"},
}


def _axis_specs(spec: LeafSpec, partition: PartitionSpec, ndim: int) -> dict[str, Any]:
    names = spec.axes.split()
    if "*k" in names:
        at = names.index("*k")
        names = names[:at] + [f"k{i}" for i in range(ndim - len(names) + 1)] + names[at + 1:]
    entries = tuple(partition) + (None,) * (ndim - len(partition))
    return dict(zip(names, entries))


def _spec_for(axes: str, by_name: dict[str, Any], ndim: int) -> PartitionSpec:
    names = axes.split()
    if names[-1] == "*1":
        names = names[:-1] + ["1"] * (ndim - len(names) + 1)
    if "*k" in names:
        at = names.index("*k")
        names = names[:at] + [f"k{i}" for i in range(ndim - len(names) + 1)] + names[at + 1:]
    return PartitionSpec(*(by_name.get(name) for name in names))


def adapter_shardings(params: Any, adapters: LoraAdapters, /) -> LoraAdapters:
    """A tree shaped like ``adapters`` holding each array's ``jax.sharding.Sharding`` (None where absent).

    Base weights must carry a ``NamedSharding`` (or be fully replicated, which the adapters then copy).
    """
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    result = {}
    for path, lora in adapters.params.items():
        module = _module_of(path, modules, adapters.layout)
        weight = leaves[module.weight_path]
        sharding = weight.sharding
        spec = adapters.layout.with_fan_in_fan_out(module.spec, lora.fan_in_fan_out)
        if not isinstance(sharding, NamedSharding):
            if not sharding.is_fully_replicated:
                raise UnsupportedLayerError(
                    f"base weight {module.weight_path!r} has a {type(sharding).__name__}; adapter shardings follow "
                    "NamedSharding specs only"
                )
            result[path] = _map_arrays(lora, lambda name, x: sharding)
            continue
        by_name = _axis_specs(spec, sharding.spec, weight.ndim)
        axes = _ADAPTER_AXES[lora.kind]
        result[path] = _map_arrays(
            lora, lambda name, x: NamedSharding(sharding.mesh, _spec_for(axes[name], by_name, x.ndim)))
    return LoraAdapters(result, adapters.config_json, adapters.adapter_name, adapters.layout)


def _map_arrays(lora: LoraParams, fn) -> LoraParams:
    fields = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector")
    return dataclasses.replace(
        lora, **{name: None if getattr(lora, name) is None else fn(name, getattr(lora, name)) for name in fields})


def shard_adapters(params: Any, adapters: LoraAdapters, /) -> LoraAdapters:
    """``adapters`` placed with ``adapter_shardings(params, adapters)`` (``jax.device_put``)."""
    return jax.device_put(adapters, adapter_shardings(params, adapters))
