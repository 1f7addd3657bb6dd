"""Adapters <-> peft's adapter folders, through the core's key grammar and file I/O.

Keys are exactly peft's for the same model: ``base_model.model.<module path>.<container>[.<param>]`` with
``lora_A``/``lora_B`` (``.weight``, ``lora_B.bias`` with ``lora_bias``), ``lora_embedding_A``/``_B`` and DoRA's
``lora_magnitude_vector`` (``peftcore.naming.checkpoint_key``). Loading checks every key against the
modules the config targets in the parameter tree: a missing or unexpected key raises
``IncompatibleKeysError`` naming it, a wrongly shaped array ``ShapeMismatchError`` naming the key and both
shapes; nothing is ever zero-filled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from peftcore import LoraConfig
from peftcore import io as core_io
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore.matching import resolve_rank_alpha
from peftcore.methods.lora import ops
from peftcore.naming import DEFAULT_ADAPTER_NAME, checkpoint_key
from peftcore_jax.layout import Layout, get_layout, to_core
from peftcore_jax.lora import target_modules
from peftcore_jax.params import LoraAdapters, LoraParams
from peftcore_jax.tree import Module, leaf_paths

__all__ = ["adapters_from_state_dict", "adapter_state_dict", "load_adapter", "save_adapter"]


def _containers(kind: str) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")


def adapter_state_dict(adapters: LoraAdapters, /) -> dict[str, jax.Array]:
    """``{peft checkpoint key: array}`` of ``adapters`` (what peft's ``get_peft_model_state_dict`` returns)."""
    state = {}
    for path, lora in adapters.params.items():
        name_A, name_B = _containers(lora.kind)
        state[checkpoint_key(path, name_A)] = lora.lora_A
        state[checkpoint_key(path, name_B)] = lora.lora_B
        if lora.lora_B_bias is not None:
            state[checkpoint_key(path, "lora_B", "bias")] = lora.lora_B_bias
        if lora.lora_magnitude_vector is not None:
            state[checkpoint_key(path, "lora_magnitude_vector")] = lora.lora_magnitude_vector
    return state


def save_adapter(directory: str | os.PathLike, adapters: LoraAdapters, /, *,
                 adapter_name: str | None = None) -> Path:
    """Write ``adapters`` as peft's ``save_pretrained`` does; returns the folder (``directory[/<adapter_name>]``)."""
    name = adapters.adapter_name if adapter_name is None else adapter_name
    return core_io.save_adapter(directory, adapters.config, adapter_state_dict(adapters), adapter_name=name)


def _expected_shapes(lora_kind: str, weight_shape: tuple[int, ...], *, r: int, a_shape: tuple[int, ...] | None,
                     fan_in_fan_out: bool) -> dict[str, tuple[int, ...]]:
    """``{container[.param]: shape}`` a module of ``weight_shape`` (core orientation) needs at rank ``r``."""
    if lora_kind == "linear":
        out_f, in_f = weight_shape[::-1] if fan_in_fan_out else weight_shape
        return {"A": (r, in_f), "B": (out_f, r), "bias": (out_f,), "m": (out_f,)}
    if lora_kind == "embedding":
        num, dim = weight_shape
        return {"A": (r, num), "B": (dim, r), "bias": (dim,), "m": (dim,)}
    out_c, in_per_group, *kernel = weight_shape
    # torch conv modules keep `groups` outside the state dict: read it off lora_A (r, in, *k)
    in_c = a_shape[1] if a_shape is not None and len(a_shape) == len(weight_shape) else in_per_group
    groups = max(in_c // in_per_group, 1)
    ones = (1,) * len(kernel)
    return {"A": (r, in_c, *kernel), "B": (out_c, r // groups, *ones), "bias": (out_c,),
            "m": (1, out_c, *ones)}


def adapters_from_state_dict(state_dict: Mapping[str, Any], config: LoraConfig, params: Any, /, *,
                             adapter_name: str = DEFAULT_ADAPTER_NAME, layout: str | Layout = "torch",
                             model_type: str | None = None, output_embedding_name: str | None = None,
                             dtype: Any = None) -> LoraAdapters:
    """``LoraAdapters`` from peft checkpoint keys, validated against the modules ``config`` targets in ``params``.

    Every targeted module must have all its keys (``lora_A``/``lora_B`` or ``lora_embedding_*``, plus
    ``lora_B.bias`` with ``lora_bias`` and ``lora_magnitude_vector`` with ``use_dora``) at the shapes its base
    weight and ``r`` (after ``rank_pattern``) imply; every key must belong to a targeted module.
    """
    layout = get_layout(layout)
    targets = target_modules(params, config, layout=layout, model_type=model_type,
                             output_embedding_name=output_embedding_name)
    leaves = leaf_paths(params)
    remaining = dict(state_dict)
    missing: list[str] = []
    adapters: dict[str, LoraParams] = {}
    for path, module in targets.items():
        found = _module_arrays(path, module, config, leaves, remaining, missing, layout=layout, dtype=dtype)
        if found is not None:
            adapters[path] = found
    problems = []
    if missing:
        problems.append(f"missing keys for targeted modules: {missing}")
    if remaining:
        problems.append(
            f"unexpected keys (no targeted module of the parameter tree has them): {sorted(remaining)}"
        )
    if problems:
        raise IncompatibleKeysError(f"adapter {adapter_name!r} does not fit the parameter tree: " + "; ".join(problems))
    return LoraAdapters.create(adapters, config, adapter_name=adapter_name, layout=layout)


def _module_arrays(path: str, module: Module, config: LoraConfig, leaves: dict, remaining: dict,
                   missing: list[str], *, layout: Layout, dtype: Any) -> LoraParams | None:
    spec = layout.with_fan_in_fan_out(module.spec, config.fan_in_fan_out)
    stored = leaves[module.weight_path]
    weight_shape = tuple(stored.shape) if spec.kind == "linear" else tuple(to_core(stored, spec).shape)
    r, alpha = resolve_rank_alpha(config, path)
    name_A, name_B = _containers(spec.kind)
    keys = {"A": checkpoint_key(path, name_A), "B": checkpoint_key(path, name_B)}
    if config.lora_bias and spec.kind != "embedding":
        keys["bias"] = checkpoint_key(path, "lora_B", "bias")
    if config.use_dora:
        keys["m"] = checkpoint_key(path, "lora_magnitude_vector")
    absent = [key for key in keys.values() if key not in remaining]
    if absent:
        missing.extend(absent)
        for key in keys.values():
            remaining.pop(key, None)
        return None
    arrays = {role: remaining.pop(key) for role, key in keys.items()}
    expected = _expected_shapes(spec.kind, weight_shape, r=r, a_shape=tuple(arrays["A"].shape),
                                fan_in_fan_out=spec.fan_in_fan_out)
    for role, key in keys.items():
        got = tuple(arrays[role].shape)
        if got != expected[role]:
            raise ShapeMismatchError(
                f"{key}: shape {got} in the adapter, but module {path!r} (base weight {tuple(stored.shape)}, "
                f"r={r}) needs {expected[role]}"
            )
    converted = {role: jnp.asarray(value, dtype=dtype) for role, value in arrays.items()}
    return LoraParams(converted["A"], converted["B"], converted.get("bias"), converted.get("m"), kind=spec.kind,
                      scaling=ops.scaling(r, alpha, use_rslora=config.use_rslora), fan_in_fan_out=spec.fan_in_fan_out,
                      dropout=float(config.lora_dropout))


def load_adapter(directory: str | os.PathLike, params: Any, /, *, adapter_name: str = DEFAULT_ADAPTER_NAME,
                 layout: str | Layout = "torch", model_type: str | None = None,
                 output_embedding_name: str | None = None, dtype: Any = None) -> LoraAdapters:
    """Read a peft adapter folder (``directory``, or ``directory/<adapter_name>``) for the tree ``params``.

    peft's ``PeftModel.from_pretrained`` / ``load_adapter`` for a parameter tree; see
    ``adapters_from_state_dict`` for the checks. ``dtype`` casts the arrays (default: as stored).
    """
    loaded = core_io.load_adapter(directory, adapter_name=adapter_name, xp=jnp)
    if not isinstance(loaded.config, LoraConfig):
        raise ConfigError(f"{loaded.path}: peft_type {loaded.config.peft_type!r} is not LORA; peftcore_jax loads LoRA")
    return adapters_from_state_dict(loaded.state_dict, loaded.config, params, adapter_name=adapter_name,
                                    layout=layout, model_type=model_type,
                                    output_embedding_name=output_embedding_name, dtype=dtype)
