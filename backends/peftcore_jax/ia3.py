"""(IA)³ for parameter trees: learned vectors that rescale a layer's input (feed-forward) or its output.

``init_ia3`` gives every targeted Linear / GPT-2 ``Conv1D`` / ConvNd its ``ia3_l`` (ones, peft's default);
the layers (``peftcore_jax.dense`` / ``convolve`` ...) scale the input of feed-forward modules and the output of
the others, several active adapters multiplying (peft's ``ia3_scaling *= l``); ``merge`` scales the weight's
columns (feed-forward) or rows and bias. Files use peft's key ``base_model.model.<module>.ia3_l``. The math is
``peftcore.methods.ia3.ops``; this module registers (IA)³ in the method table.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftcore.errors import ConfigError, MergeError, ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.ia3 import IA3Config
from peftcore.methods.ia3 import ops
from peftcore.methods.lora.init import adapter_dtype
from peftcore.naming import DEFAULT_ADAPTER_NAME, checkpoint_key
from peftcore_jax import methods
from peftcore_jax.io import load_modules
from peftcore_jax.layers import base_conv, base_linear
from peftcore_jax.layout import Layout, LeafSpec, from_core, get_layout, to_core
from peftcore_jax.lora import JaxSampler, _module_of, module_key, target_modules
from peftcore_jax.params import Adapters, IA3Params
from peftcore_jax.tree import Module, find_modules, leaf_paths, replace_leaves

__all__ = ["IA3", "init_ia3", "resolve_ia3_config"]

_KINDS = ("linear", "conv")


def resolve_ia3_config(config: IA3Config, /, *, model_type: str | None = None) -> IA3Config:
    """``config`` with ``None`` ``target_modules`` / ``feedforward_modules`` filled by peft's defaults for
    ``model_type`` (``IA3Model._prepare_adapter_config``); ``ConfigError`` when one is needed but not given."""
    if not isinstance(config, IA3Config):
        raise ConfigError(f"init_ia3 needs an IA3Config, got {type(config).__name__}")
    if config.target_modules is not None and config.feedforward_modules is not None:
        return config
    if model_type is None:
        missing = [n for n in ("target_modules", "feedforward_modules") if getattr(config, n) is None]
        raise ConfigError(f"IA3Config.{' and '.join(missing)} is None: pass model_type= for peft's defaults, "
                          "or set them in the config")
    return config.with_model_defaults(model_type)


def _spec(module: Module, layout: Layout, config: IA3Config) -> LeafSpec:
    spec = layout.with_fan_in_fan_out(module.spec, config.fan_in_fan_out)
    if spec.kind not in _KINDS:
        raise UnsupportedLayerError(
            f"Target module {module.path!r} is a {spec.kind} layer; (IA)³ adapts Linear, Conv1D and ConvNd "
            "layers only (as peft)"
        )
    return spec


def _core_weight(stored: jax.Array, spec: LeafSpec) -> jax.Array:
    """The weight in the core's orientation; a Linear stays as stored (``fan_in_fan_out`` says which)."""
    return stored if spec.kind == "linear" else to_core(stored, spec)


def init_ia3(params: Any, config: IA3Config, key: jax.Array | None = None, /, *,
             adapter_name: str = DEFAULT_ADAPTER_NAME, layout: str | Layout = "torch", model_type: str | None = None,
             output_embedding_name: str | None = None) -> Adapters:
    """(IA)³ adapters for every module ``config`` targets in ``params`` (peft's ``get_peft_model`` with IA3).

    ``None`` targets / feed-forward modules take peft's defaults for ``model_type``. Each ``ia3_l`` is ones
    (``init_ia3_weights=True``) or ``N(0, 1)`` draws from ``module_key(key, path)`` (``False``; ``key`` needed),
    in the base weight's dtype (float32 for a half-precision base: peft's ``autocast_adapter_dtype``); feed-forward
    membership is peft's suffix/regex rule. A Conv's ``groups`` is
    taken as 1 (the tree does not record it).
    """
    layout = get_layout(layout)
    config = resolve_ia3_config(config, model_type=model_type)
    targets = target_modules(params, config, layout=layout, model_type=model_type,
                             output_embedding_name=output_embedding_name)
    if not config.init_ia3_weights and key is None:
        raise ConfigError("init_ia3_weights=False draws the (IA)³ vectors at random: pass a jax.random key")
    leaves = leaf_paths(params)
    adapters: dict[str, IA3Params] = {}
    for path, module in targets.items():
        spec = _spec(module, layout, config)
        feedforward = ops.is_feedforward(config, path)
        sampler = None if key is None else JaxSampler(module_key(key, path))
        weight = _core_weight(leaves[module.weight_path], spec)
        # on a sharded weight the vector stays on the default device until shard_adapters places it
        ia3_l = ops.init_ia3(weight, feedforward=feedforward, kind=spec.kind,
                             init_ia3_weights=config.init_ia3_weights, sampler=sampler,
                             fan_in_fan_out=spec.fan_in_fan_out, dtype=adapter_dtype(weight.dtype, xp=jnp))
        adapters[path] = IA3Params(ia3_l, kind=spec.kind, feedforward=feedforward,
                                   fan_in_fan_out=spec.fan_in_fan_out)
    return Adapters.create(adapters, config, adapter_name=adapter_name, layout=layout)


# --- layers ----------------------------------------------------------------------------------------


def _combined(mods: tuple[IA3Params, ...]) -> tuple[jax.Array, bool]:
    """``(Π l_i, feedforward)`` of one layer's active adapters (they must agree on the side they scale)."""
    sides = {m.feedforward for m in mods}
    if len(sides) > 1:
        raise ShapeMismatchError("active (IA)³ adapters of one layer disagree on whether it is feed-forward")
    return ops.combine(*(m.ia3_l for m in mods)), sides.pop()


def ia3_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None, mods: tuple[IA3Params, ...], *,
               fan_in_fan_out: bool, key: jax.Array | None = None) -> jax.Array:
    """``base(x ⊙ l)`` (feed-forward) or ``base(x) ⊙ l`` (peft's ``ia3.Linear.forward``); ``key`` is unused."""
    l, feedforward = _combined(mods)
    if feedforward:
        return base_linear(ops.scale_input(x, l), weight, bias, fan_in_fan_out=fan_in_fan_out)
    return ops.scale_output(base_linear(x, weight, bias, fan_in_fan_out=fan_in_fan_out), l)


def ia3_conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None, mods: tuple[IA3Params, ...], *,
             stride: Any, padding: Any, dilation: Any, groups: int, key: jax.Array | None = None) -> jax.Array:
    """Input channels scaled (cast to the weight's dtype) or output channels scaled (peft's ``_ConvNd.forward``)."""
    l, feedforward = _combined(mods)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if feedforward:
        return base_conv(ops.scale_input(x, l, dtype=weight.dtype), weight, bias, **options)
    return ops.scale_output(base_conv(x, weight, bias, **options), l)


# --- merge -----------------------------------------------------------------------------------------


def _rescaled(params: Any, adapters: Adapters, *, merging: bool, safe: bool = False) -> Any:
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    replacements = {}
    weight_fn = ops.merge_weight if merging else ops.unmerge_weight
    bias_fn = ops.merge_bias if merging else ops.unmerge_bias
    for path, mod in adapters.params.items():
        module = _module_of(path, modules, adapters.layout)
        spec = adapters.layout.with_fan_in_fan_out(module.spec, mod.fan_in_fan_out)
        if spec.kind != mod.kind:
            raise UnsupportedLayerError(
                f"the {mod.kind!r} (IA)³ adapter of {path!r} does not fit its {spec.kind} weight")
        weight = weight_fn(_core_weight(leaves[module.weight_path], spec), mod.ia3_l, feedforward=mod.feedforward,
                           kind=mod.kind, fan_in_fan_out=mod.fan_in_fan_out, groups=mod.groups)
        if safe and not bool(np.all(np.isfinite(np.asarray(weight)))):
            raise MergeError(f"NaNs detected in the merged weights. The adapter {path} seems to be broken")
        replacements[module.weight_path] = weight if mod.kind == "linear" else from_core(weight, spec)
        if module.bias_path is not None and not mod.feedforward:
            replacements[module.bias_path] = bias_fn(leaves[module.bias_path], mod.ia3_l, feedforward=False)
    return replace_leaves(params, replacements)


def ia3_merge(params: Any, adapters: Adapters, /, *, safe: bool = False, base_params: Any = None) -> Any:
    """``W ⊙ L`` (columns for feed-forward modules, rows and bias otherwise), peft's ``IA3Layer.merge``."""
    return _rescaled(params, adapters, merging=True, safe=safe)


def ia3_unmerge(params: Any, adapters: Adapters, /, *, weight_norms: Any = None) -> Any:
    """``W / (L + 1e-8)`` (and bias), peft's ``unmerge``; warns ``IA3UnmergeWarning`` as peft does."""
    return _rescaled(params, adapters, merging=False)


# --- files -----------------------------------------------------------------------------------------


def ia3_state_dict(adapters: Adapters, /) -> tuple[dict[str, jax.Array], IA3Config]:
    """``{base_model.model.<module>.ia3_l: l}`` and the config to save."""
    state = {checkpoint_key(path, "ia3_l", peft_type="IA3"): mod.ia3_l for path, mod in adapters.params.items()}
    return state, adapters.config


def _ia3_module(path: str, module: Module, config: IA3Config, leaves: dict, remaining: dict, missing: list[str], *,
                layout: Layout, dtype: Any) -> IA3Params | None:
    spec = _spec(module, layout, config)
    key = checkpoint_key(path, "ia3_l", peft_type="IA3")
    if key not in remaining:
        missing.append(key)
        return None
    value = jnp.asarray(remaining.pop(key), dtype=dtype)
    feedforward = ops.is_feedforward(config, path)
    weight_shape = tuple(_core_weight(leaves[module.weight_path], spec).shape)
    groups = 1
    if spec.kind == "conv" and feedforward and value.ndim == len(weight_shape) and weight_shape[1]:
        groups = max(int(value.shape[1]) // weight_shape[1], 1)  # torch keeps `groups` outside the state dict
    expected = ops.ia3_shape(weight_shape, feedforward=feedforward, kind=spec.kind,
                             fan_in_fan_out=spec.fan_in_fan_out, groups=groups)
    if tuple(value.shape) != expected:
        raise ShapeMismatchError(
            f"{key}: shape {tuple(value.shape)} in the adapter, but module {path!r} (base weight "
            f"{tuple(leaves[module.weight_path].shape)}, {'feed-forward' if feedforward else 'output-scaled'}) "
            f"needs {expected}"
        )
    return IA3Params(value, kind=spec.kind, feedforward=feedforward, fan_in_fan_out=spec.fan_in_fan_out,
                     groups=groups)


def _shard_axes(mod: IA3Params) -> dict[str, str]:
    side = "in" if mod.feedforward else "out"
    if mod.kind == "linear":
        return {"ia3_l": f"1 {side}" if mod.feedforward else f"{side} 1"}
    return {"ia3_l": f"1 {side} *1"}


IA3 = methods.register(methods.JaxMethod(
    peft_type="IA3",
    config_cls=IA3Config,
    params_cls=IA3Params,
    merge=ia3_merge,
    unmerge=ia3_unmerge,
    state_dict=ia3_state_dict,
    from_state_dict=functools.partial(load_modules, build=_ia3_module),
    shard_axes=_shard_axes,
    linear=ia3_linear,
    conv=ia3_conv,
))
