"""Adapters <-> peft's adapter folders, through the core's key grammar and file I/O, for every method.

Keys are exactly peft's for the same model: ``base_model.model.<module path>.<container>[.<param>]``
(``peftcore.naming.checkpoint_key``); which containers a module has is its method's (the method table's
``state_dict`` / ``from_state_dict``): LoRA's ``lora_A``/``lora_B`` (``.weight``, ``lora_B.bias`` with
``lora_bias``), ``lora_embedding_A``/``_B`` and DoRA's ``lora_magnitude_vector`` are here, (IA)³'s ``ia3_l`` and
AdaLoRA's ``lora_A``/``lora_E``/``lora_B`` in ``peftcore_jax.ia3`` / ``.adalora``. Loading checks every key
against the modules the config targets in the parameter tree: a missing or unexpected key raises
``IncompatibleKeysError`` naming it, a wrongly shaped array ``ShapeMismatchError`` naming the key and both
shapes; nothing is ever zero-filled.

Base weights in a folder: peft's ``save_embedding_layers`` ("auto" when an embedding layer is targeted, or
after resizing the vocabulary) also writes the base embedding weights, ``<m>.base_layer.weight`` for a targeted
module and ``<m>.weight`` for an untargeted one, which ``from_pretrained`` loads into the base model.
``with_base_weights=True`` does the same to the parameter tree and returns ``(params', adapters)``. The same
holds for the trained copies of ``modules_to_save`` (saved as ``<m>.<leaf>``, e.g. a classification head) and
for the biases of ``bias="all"``/``"lora_only"`` (``<m>[.base_layer].bias``): they are base weights of the tree.
``save_adapter`` refuses such configs, since ``Adapters`` hold no copy of those weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftcore import LoraConfig
from peftcore import io as core_io
from peftcore.config import PeftConfig
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore.matching import resolve_rank_alpha
from peftcore.methods.lora import ops
from peftcore.naming import BASE_MODEL_PREFIX, DEFAULT_ADAPTER_NAME, checkpoint_key
from peftcore_jax.layout import Layout, from_core, get_layout, to_core
from peftcore_jax.lora import target_modules
from peftcore_jax.methods import get_method
from peftcore_jax.params import Adapters, LoraAdapters, LoraParams
from peftcore_jax.tree import Module, find_modules, leaf_paths, replace_leaves

__all__ = ["adapters_from_state_dict", "adapter_state_dict", "load_adapter", "load_modules", "lora_state_dict",
           "save_adapter"]


def _containers(kind: str) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")


def adapter_state_dict(adapters: Adapters, /) -> dict[str, jax.Array]:
    """``{peft checkpoint key: array}`` of ``adapters`` (what peft's ``get_peft_model_state_dict`` returns).

    AdaLoRA adapters whose config holds a ``rank_pattern`` come back pruned to their kept triplets, as in peft.
    """
    state, _ = get_method(adapters.peft_type).state_dict(adapters)
    return state


def lora_state_dict(adapters: LoraAdapters, /) -> tuple[dict[str, jax.Array], LoraConfig]:
    """LoRA/DoRA's ``(state dict, config)`` to save (the method table's entry)."""
    state = {}
    for path, lora in adapters.params.items():
        name_A, name_B = _containers(lora.kind)
        state[checkpoint_key(path, name_A)] = lora.lora_A
        state[checkpoint_key(path, name_B)] = lora.lora_B
        if lora.lora_B_bias is not None:
            state[checkpoint_key(path, "lora_B", "bias")] = lora.lora_B_bias
        if lora.lora_magnitude_vector is not None:
            state[checkpoint_key(path, "lora_magnitude_vector")] = lora.lora_magnitude_vector
    return state, adapters.config


def save_adapter(directory: str | os.PathLike, adapters: Adapters, /, *,
                 adapter_name: str | None = None) -> Path:
    """Write ``adapters`` as peft's ``save_pretrained`` does; returns the folder (``directory[/<adapter_name>]``)."""
    name = adapters.adapter_name if adapter_name is None else adapter_name
    config = adapters.config
    modules_to_save, bias = getattr(config, "modules_to_save", None), getattr(config, "bias", "none")
    if modules_to_save or bias != "none":
        raise ConfigError(
            f"adapter {name!r} has modules_to_save={modules_to_save!r}, bias={bias!r}: peft would "
            "expect their trained weights in the folder, which live in the parameter tree, not in the adapters; "
            "save a copy of the config without them (and keep those weights with the model)"
        )
    state, config = get_method(adapters.peft_type).state_dict(adapters)
    return core_io.save_adapter(directory, config, state, adapter_name=name)


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


def adapters_from_state_dict(state_dict: Mapping[str, Any], config: PeftConfig, params: Any, /, *,
                             adapter_name: str = DEFAULT_ADAPTER_NAME, layout: str | Layout = "torch",
                             model_type: str | None = None, output_embedding_name: str | None = None,
                             dtype: Any = None, with_base_weights: bool = False) -> Adapters | tuple[Any, Adapters]:
    """``Adapters`` from peft checkpoint keys for ``config``'s method, validated against the modules it targets.

    See ``load_modules`` for the checks and for saved base weights (LoRA's below).
    """
    return get_method(config.peft_type).from_state_dict(
        state_dict, config, params, adapter_name=adapter_name, layout=layout, model_type=model_type,
        output_embedding_name=output_embedding_name, dtype=dtype, with_base_weights=with_base_weights)


def load_modules(state_dict: Mapping[str, Any], config: PeftConfig, params: Any, /, *, build: Callable[..., Any],
                 adapter_name: str = DEFAULT_ADAPTER_NAME, layout: str | Layout = "torch",
                 model_type: str | None = None, output_embedding_name: str | None = None, dtype: Any = None,
                 with_base_weights: bool = False) -> Adapters | tuple[Any, Adapters]:
    """``Adapters`` built module by module by ``build`` (a method's), with the key checks every method shares.

    ``build(path, module, config, leaves, remaining, missing, *, layout, dtype)`` pops its module's keys from
    ``remaining`` (or records absent ones in ``missing``) and returns the module's parameters (or None).

    Every targeted module must have all its keys (LoRA: ``lora_A``/``lora_B`` or ``lora_embedding_*``, plus
    ``lora_B.bias`` with ``lora_bias`` and ``lora_magnitude_vector`` with ``use_dora``) at the shapes its base
    weight and ``r`` (after ``rank_pattern``) imply; every key must belong to a targeted module.

    Saved base weights (see the module docstring) must fit a module of ``params`` at its weight's shape. With
    ``with_base_weights=True`` the result is ``(params', adapters)``, ``params'`` holding them (cast to each
    leaf's dtype, placed with its sharding), as peft's loading puts them into the base model. Otherwise they
    must equal the tree's own weights (peft's "auto" save of a targeted embedding copies the frozen base), and
    a differing one (a resized or trained embedding) raises ``IncompatibleKeysError`` naming its key.
    """
    layout = get_layout(layout)
    targets = target_modules(params, config, layout=layout, model_type=model_type,
                             output_embedding_name=output_embedding_name, loading=True)
    leaves = leaf_paths(params)
    remaining, base_weights = _split_base_weights(state_dict, params, leaves, layout=layout)
    missing: list[str] = []
    adapters: dict[str, Any] = {}
    for path, module in targets.items():
        found = build(path, module, config, leaves, remaining, missing, layout=layout, dtype=dtype)
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
    loaded = Adapters.create(adapters, config, adapter_name=adapter_name, layout=layout)
    if with_base_weights:
        new_params = replace_leaves(params, {path: value for path, (_, value) in base_weights.items()}) \
            if base_weights else params
        return new_params, loaded
    differing = [key for path, (key, value) in base_weights.items() if not _equal(value, leaves[path])]
    if differing:
        raise IncompatibleKeysError(
            f"adapter {adapter_name!r} carries base weights that differ from the parameter tree's: {differing} (peft "
            "loads them into the base model, e.g. a resized or trained embedding); pass with_base_weights=True to "
            "get (params', adapters) with them applied"
        )
    return loaded


def _split_base_weights(state_dict: Mapping[str, Any], params: Any, leaves: dict, *,
                        layout: Layout) -> tuple[dict, dict[str, tuple[str, jax.Array]]]:
    """``(adapter keys, {leaf path: (key, array as the tree stores it)})``: peft's saved base weights pulled out.

    ``<m>.base_layer.<leaf>`` (a targeted module) or ``<m>.<leaf>`` (an untargeted one) for a weight-holding
    module ``m`` of ``params``; peft saves them as the torch module holds them, converted here through the
    layout (a torch tree stores that orientation already).
    """
    modules = find_modules(params, layout=layout)
    rest: dict = {}
    found: dict[str, tuple[str, jax.Array]] = {}
    for key, value in state_dict.items():
        body = key[len(BASE_MODEL_PREFIX):] if key.startswith(BASE_MODEL_PREFIX) else key
        head, _, leaf_name = body.rpartition(".")
        module_path = head[: -len(".base_layer")] if head.endswith(".base_layer") else head
        module = modules.get(module_path)
        if module is None or leaf_name not in ("weight", "bias"):
            rest[key] = value
            continue
        is_weight = leaf_name == "weight"
        path = module.weight_path if is_weight else module.bias_path
        if path is None:
            raise IncompatibleKeysError(f"{key}: module {module_path!r} of the parameter tree has no bias leaf")
        stored = leaves[path]
        array = jnp.asarray(value)
        if array.ndim == stored.ndim and is_weight:
            array = from_core(array, module.spec)
        if tuple(array.shape) != tuple(stored.shape):
            raise ShapeMismatchError(
                f"{key}: base weight of shape {tuple(jnp.shape(value))} in the adapter, but the parameter tree's "
                f"{path!r} is {tuple(stored.shape)} (a resized embedding needs a tree of the new size)"
            )
        array = array.astype(stored.dtype)
        if isinstance(stored, jax.Array):
            array = jax.device_put(array, stored.sharding)
        found[path] = (key, array)
    return rest, found


def _equal(loaded: jax.Array, stored: Any) -> bool:
    return bool(np.array_equal(np.asarray(loaded), np.asarray(stored)))


def take_keys(keys: Mapping[str, str], remaining: dict, missing: list[str]) -> dict[str, Any] | None:
    """``{role: array}`` popped from ``remaining`` for a module's ``{role: checkpoint key}``, or None with the
    absent keys appended to ``missing`` (and the module's other keys dropped: they are not "unexpected")."""
    absent = [key for key in keys.values() if key not in remaining]
    if absent:
        missing.extend(absent)
        for key in keys.values():
            remaining.pop(key, None)
        return None
    return {role: remaining.pop(key) for role, key in keys.items()}


def lora_module(path: str, module: Module, config: LoraConfig, leaves: dict, remaining: dict,
                missing: list[str], *, layout: Layout, dtype: Any) -> LoraParams | None:
    """One LoRA/DoRA module from the checkpoint keys (``load_modules``' ``build``)."""
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
    arrays = take_keys(keys, remaining, missing)
    if arrays is None:
        return None
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
                 output_embedding_name: str | None = None, dtype: Any = None,
                 with_base_weights: bool = False) -> Adapters | tuple[Any, Adapters]:
    """Read a peft adapter folder (``directory``, or ``directory/<adapter_name>``) for the tree ``params``.

    peft's ``PeftModel.from_pretrained`` / ``load_adapter`` for a parameter tree, any method the config names;
    see ``load_modules`` for the checks and for saved base weights (``with_base_weights=True``
    returns ``(params', adapters)`` with them applied). ``dtype`` casts the adapter arrays (default: as stored).
    """
    loaded = core_io.load_adapter(directory, adapter_name=adapter_name, xp=jnp)
    return adapters_from_state_dict(loaded.state_dict, loaded.config, params, adapter_name=adapter_name,
                                    layout=layout, model_type=model_type,
                                    output_embedding_name=output_embedding_name, dtype=dtype,
                                    with_base_weights=with_base_weights)
