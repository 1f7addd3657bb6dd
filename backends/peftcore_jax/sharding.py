"""Shardings for adapters that follow their base weights: ``lora_A`` takes the base's input-dim sharding,
``lora_B`` (and its bias, and DoRA's magnitude) the output-dim sharding, the rank dim stays replicated; an
(IA)³ vector follows the dim it scales. Each method names its arrays' axes in the method table (``shard_axes``).

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
from peftcore_jax.methods import get_method
from peftcore_jax.params import Adapters
from peftcore_jax.tree import find_modules, leaf_paths

__all__ = ["adapter_shardings", "shard_adapters"]

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


def adapter_shardings(params: Any, adapters: Adapters, /) -> Adapters:
    """A tree shaped like ``adapters`` holding each array's ``jax.sharding.Sharding`` (None where absent).

    Base weights must carry a ``NamedSharding`` (or be fully replicated, which the adapters then copy).
    """
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    method = get_method(adapters.peft_type)
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
        axes = method.shard_axes(lora)
        result[path] = _map_arrays(
            lora, lambda name, x: NamedSharding(sharding.mesh, _spec_for(axes[name], by_name, x.ndim)))
    return Adapters(result, adapters.config_json, adapters.adapter_name, adapters.layout)


def _map_arrays(mod: Any, fn) -> Any:
    """``mod`` with each array field ``name`` replaced by ``fn(name, array)`` (``None`` fields kept)."""
    fields = [f.name for f in dataclasses.fields(mod) if hasattr(getattr(mod, f.name), "shape")]
    return dataclasses.replace(mod, **{name: fn(name, getattr(mod, name)) for name in fields})


def shard_adapters(params: Any, adapters: Adapters, /) -> Adapters:
    """``adapters`` placed with ``adapter_shardings(params, adapters)`` (``jax.device_put``)."""
    return jax.device_put(adapters, adapter_shardings(params, adapters))
