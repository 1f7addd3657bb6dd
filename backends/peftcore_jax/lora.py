"""Create LoRA/DoRA adapters for a parameter tree, and merge them into (or out of) its base weights.

Targets are chosen by the core's matching (``peftcore.matching``) on the tree's module paths, ranks and
alphas by ``resolve_rank_alpha``, factors by ``peftcore.methods.lora.init`` with randomness from an explicit
``jax.random`` key, DoRA magnitudes and merges by ``peftcore.methods.lora.dora`` / ``ops``.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from peftcore import LoraConfig
from peftcore._xp import dtype_name
from peftcore.config import PeftConfig
from peftcore.errors import ConfigError, IncompatibleKeysError, MergeError, UnsupportedLayerError
from peftcore.matching import match_targets, resolve_rank_alpha
from peftcore.methods.lora import dora, init, ops
from peftcore.naming import DEFAULT_ADAPTER_NAME
from peftcore_jax.layout import Layout, LeafSpec, from_core, get_layout, to_core
from peftcore_jax.methods import get_method
from peftcore_jax.params import ActiveAdapters, LoraAdapters, LoraParams
from peftcore_jax.tree import Module, find_modules, leaf_paths, module_names, replace_leaves

__all__ = ["JaxSampler", "dora_weight_norms", "init_lora", "lora_merge", "lora_unmerge", "module_key",
           "target_modules"]

# config fields whose peft behaviour touches more than the adapted modules' factors
_UNSUPPORTED_FIELDS = ("trainable_token_indices", "layer_replication", "target_parameters")
# saved as full copies of base modules: loadable as base weights, not trained here
_BASE_WEIGHT_FIELDS = ("modules_to_save",)


class JaxSampler:
    """``peftcore.random.Sampler`` drawing from ``jax.random``; each draw consumes a fresh split of ``key``."""

    def __init__(self, key: jax.Array, /) -> None:
        self._key = key

    def _next(self) -> jax.Array:
        self._key, sub = jax.random.split(self._key)
        return sub

    def uniform(self, shape: tuple[int, ...], *, low: float, high: float, dtype: Any) -> jax.Array:
        return jax.random.uniform(self._next(), tuple(shape), dtype=jnp.dtype(dtype_name(dtype)),
                                  minval=low, maxval=high)

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: Any) -> jax.Array:
        return std * jax.random.normal(self._next(), tuple(shape), dtype=jnp.dtype(dtype_name(dtype)))


def module_key(key: jax.Array, module_path: str, /) -> jax.Array:
    """The key a module's initialisation draws from: ``key`` folded with a hash of its path (order-independent)."""
    return jax.random.fold_in(key, zlib.crc32(module_path.encode("utf-8")))


def _check_supported(config: PeftConfig, *, loading: bool = False) -> None:
    """Refuse what peftcore_jax cannot do with ``config``.

    Loading accepts ``modules_to_save`` and ``bias`` != "none": their saved weights are base weights
    (``load_adapter(..., with_base_weights=True)``); creating adapters that train them is not supported.
    """
    method = get_method(getattr(config, "peft_type", None) or type(config).__name__)
    if not isinstance(config, method.config_cls):
        raise ConfigError(f"peftcore_jax adapts with a {method.config_cls.__name__}, got {type(config).__name__}")
    kind = type(config).__name__
    for name in _UNSUPPORTED_FIELDS + (() if loading else _BASE_WEIGHT_FIELDS):
        if getattr(config, name, None):
            raise ConfigError(f"{kind}.{name}={getattr(config, name)!r} is not supported by peftcore_jax yet")
    if not loading and getattr(config, "bias", "none") != "none":
        raise ConfigError(f"{kind}.bias={config.bias!r} (training base biases) is not supported by peftcore_jax; "
                          "adapters saved with it load with load_adapter(..., with_base_weights=True)")


def target_modules(params: Any, config: PeftConfig, /, *, layout: str | Layout = "torch",
                   model_type: str | None = None, output_embedding_name: str | None = None,
                   loading: bool = False) -> dict[str, Module]:
    """``{path: Module}`` that ``config`` (any method's) adapts in ``params``, in tree order (core matching).

    ``output_embedding_name`` (excluded from ``"all-linear"``) defaults to ``"lm_head"`` when the tree has one.
    Raises ``NoMatchingModuleError`` when nothing matches and ``UnsupportedLayerError`` for a matched path
    that holds no weight the layout recognises (peft: "Target module ... is not supported"). ``loading``:
    for a saved adapter, whose ``modules_to_save`` and trained biases are base weights (``_check_supported``).
    """
    _check_supported(config, loading=loading)
    config = get_method(config.peft_type).matching_config(config)
    layout = get_layout(layout)
    modules = find_modules(params, layout=layout)
    if output_embedding_name is None and "lm_head" in modules:
        output_embedding_name = "lm_head"
    match = match_targets(
        config,
        module_names(params),
        model_type=model_type,
        linear_module_names=[path for path, m in modules.items() if m.kind == "linear"],
        output_embedding_name=output_embedding_name,
    )
    for message in match.warnings():
        warnings.warn(message, UserWarning, stacklevel=3)
    unsupported = [path for path in match.matched if path not in modules]
    if unsupported:
        raise UnsupportedLayerError(
            f"Target module(s) {unsupported} are not supported: they hold no weight leaf "
            f"{sorted(layout.weight_leaves())} of the {layout.name!r} layout (only Linear, Embedding and Conv "
            "modules can be adapted)"
        )
    return {path: modules[path] for path in match.matched}


def _spec(module: Module, layout: Layout, config: LoraConfig) -> LeafSpec:
    return layout.with_fan_in_fan_out(module.spec, config.fan_in_fan_out)


def init_lora(params: Any, config: LoraConfig, key: jax.Array, /, *, adapter_name: str = DEFAULT_ADAPTER_NAME,
              layout: str | Layout = "torch", model_type: str | None = None,
              output_embedding_name: str | None = None) -> tuple[Any, LoraAdapters]:
    """``(params', adapters)``: new adapters for every module ``config`` targets in ``params``.

    Mirrors ``get_peft_model`` / ``LoraModel.inject_adapter``: each module gets ``r``/``lora_alpha`` from the
    rank/alpha patterns, factors from ``config.init_lora_weights`` drawn from ``module_key(key, path)``, and a
    DoRA magnitude ``‖W' + sBA‖`` when ``use_dora``. ``params'`` is ``params`` itself unless the initialisation
    rewrites base weights (PiSSA, OLoRA), in which case it is a new tree with those weights replaced.
    """
    layout = get_layout(layout)
    targets = target_modules(params, config, layout=layout, model_type=model_type,
                             output_embedding_name=output_embedding_name)
    leaves = leaf_paths(params)
    adapters: dict[str, LoraParams] = {}
    rewritten: dict[str, Any] = {}
    for path, module in targets.items():
        r, alpha = resolve_rank_alpha(config, path)
        scaling = ops.scaling(r, alpha, use_rslora=config.use_rslora)
        spec = _spec(module, layout, config)
        sampler = JaxSampler(module_key(key, path))
        weight = to_core(leaves[module.weight_path], spec) if spec.kind != "linear" else leaves[module.weight_path]
        options = dict(r=r, init_lora_weights=config.init_lora_weights, sampler=sampler, scaling=scaling)
        magnitude = None
        if spec.kind == "linear":
            made = init.init_linear(weight, fan_in_fan_out=spec.fan_in_fan_out, lora_bias=config.lora_bias, **options)
            if config.use_dora:
                magnitude = dora.magnitude_init(made.weight, made.lora_A, made.lora_B, scaling=scaling,
                                                fan_in_fan_out=spec.fan_in_fan_out)
        elif spec.kind == "embedding":
            made = init.init_embedding(weight, **options)
            if config.use_dora:
                magnitude = dora.embedding_magnitude_init(made.weight, made.lora_A, made.lora_B, scaling=scaling)
        else:
            made = init.init_conv(weight, lora_bias=config.lora_bias, **options)
            if config.use_dora:
                magnitude = dora.conv_magnitude_init(made.weight, made.lora_A, made.lora_B, scaling=scaling)
        if made.weight is not weight:
            stored = made.weight if spec.kind == "linear" else from_core(made.weight, spec)
            rewritten[module.weight_path] = stored
        adapters[path] = LoraParams(made.lora_A, made.lora_B, made.lora_B_bias, magnitude, kind=spec.kind,
                                    scaling=scaling, fan_in_fan_out=spec.fan_in_fan_out,
                                    dropout=float(config.lora_dropout))
    new_params = replace_leaves(params, rewritten) if rewritten else params
    return new_params, LoraAdapters.create(adapters, config, adapter_name=adapter_name, layout=layout)


def _module_of(path: str, modules: dict[str, Module], layout: Layout) -> Module:
    try:
        return modules[path]
    except KeyError:
        raise IncompatibleKeysError(
            f"adapter module {path!r} has no weight leaf in the parameter tree (layout {layout.name!r})"
        ) from None


def _delta(lora: LoraParams, weight: jax.Array) -> jax.Array:
    """``ΔW`` in the core's orientation for ``weight`` (a Linear's stored one, per ``fan_in_fan_out``)."""
    if lora.kind == "linear":
        return ops.delta_weight(lora.lora_A, lora.lora_B, scaling=lora.scaling, fan_in_fan_out=lora.fan_in_fan_out)
    if lora.kind == "embedding":
        return ops.embedding_delta_weight(lora.lora_A, lora.lora_B, scaling=lora.scaling)
    groups = lora.lora_A.shape[0] // lora.lora_B.shape[1]
    return ops.conv_delta_weight(lora.lora_A, lora.lora_B, scaling=lora.scaling, groups=groups)


def _core_weight(leaves: dict, module: Module, lora: LoraParams) -> tuple[jax.Array, LeafSpec]:
    """The module's base weight in the core's orientation (a Linear's stays as stored, see ``fan_in_fan_out``)."""
    if module.spec.kind != lora.kind:
        raise UnsupportedLayerError(
            f"the {lora.kind!r} adapter of {module.path!r} does not fit its {module.spec.kind} weight"
        )
    stored = leaves[module.weight_path]
    return (stored if lora.kind == "linear" else to_core(stored, module.spec)), module.spec


def _stored(weight: jax.Array, spec: LeafSpec, lora: LoraParams) -> jax.Array:
    return weight if lora.kind == "linear" else from_core(weight, spec)


def dora_weight_norms(params: Any, adapters: LoraAdapters | ActiveAdapters, /) -> Any:
    """``{path: ‖W + ΔW‖}`` of each DoRA module of unmerged ``params`` (peft's ``<adapter>-weight_norm`` cache).

    Compute it before ``merge``; ``unmerge`` of a DoRA adapter needs it. For ``ActiveAdapters``, a list with
    one such dict per adapter (all on the unmerged ``params``, where peft takes every DoRA norm).
    """
    if isinstance(adapters, ActiveAdapters):
        return [dora_weight_norms(params, one) for one in adapters.adapters]
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    norms = {}
    for path, lora in adapters.params.items():
        if not lora.use_dora:
            continue
        weight, _ = _core_weight(leaves, _module_of(path, modules, adapters.layout), lora)
        if lora.kind == "linear":
            norms[path] = dora.magnitude_init(weight, lora.lora_A, lora.lora_B, scaling=lora.scaling,
                                              fan_in_fan_out=lora.fan_in_fan_out)
        elif lora.kind == "embedding":
            norms[path] = dora.embedding_magnitude_init(weight, lora.lora_A, lora.lora_B, scaling=lora.scaling)
        else:
            norms[path] = dora.conv_magnitude_init(weight, lora.lora_A, lora.lora_B, scaling=lora.scaling)
    return norms


def lora_merge(params: Any, adapters: LoraAdapters, /, *, safe: bool = False, base_params: Any = None) -> Any:
    """LoRA/DoRA's ``merge`` for one adapter (the method table's entry): ``W + ΔW`` (DoRA ``m/‖W₀+ΔW‖·(W+ΔW)``),
    biases ``b + s·b_B``; DoRA norms are taken on ``base_params`` (peft's ``_unmerged_base_weight``)."""
    base_params = params if base_params is None else base_params
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    base_leaves = leaves if base_params is params else leaf_paths(base_params)
    replacements = {}
    for path, lora in adapters.params.items():
        module = _module_of(path, modules, adapters.layout)
        weight, spec = _core_weight(leaves, module, lora)
        delta = _delta(lora, weight)
        if not lora.use_dora:
            merged = ops.merge(weight, delta, safe=safe, name=path)
        else:
            base, _ = _core_weight(base_leaves, module, lora)
            m = lora.lora_magnitude_vector
            if lora.kind == "linear":
                merged, _ = dora.merge(weight, delta, m, base, safe=safe, name=path, fan_in_fan_out=lora.fan_in_fan_out)
            elif lora.kind == "embedding":
                merged, _ = dora.embedding_merge(weight, delta, m, base, safe=safe, name=path)
            else:
                merged, _ = dora.conv_merge(weight, delta, m, base, safe=safe, name=path)
        replacements[module.weight_path] = _stored(merged, spec, lora)
        if lora.lora_B_bias is not None:
            bias = leaves[module.bias_path] if module.bias_path else None
            merged_bias = ops.merge_bias(bias, lora.lora_B_bias, scaling=lora.scaling, safe=safe, name=path)
            replacements[module.bias_path] = merged_bias
    return replace_leaves(params, replacements)


def lora_unmerge(params: Any, adapters: LoraAdapters, /, *, weight_norms: dict[str, jax.Array] | None = None) -> Any:
    """LoRA/DoRA's ``unmerge`` for one adapter: ``W − ΔW`` (DoRA: ``W·‖W₀+ΔW‖/m − ΔW``, norms from
    ``dora_weight_norms``)."""
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    replacements = {}
    for path, lora in adapters.params.items():
        module = _module_of(path, modules, adapters.layout)
        weight, spec = _core_weight(leaves, module, lora)
        delta = _delta(lora, weight)
        if not lora.use_dora:
            restored = ops.unmerge(weight, delta)
        else:
            if weight_norms is None or path not in weight_norms:
                raise MergeError(
                    f"cannot unmerge the DoRA adapter of {path!r} without its weight norm: pass "
                    "weight_norms=dora_weight_norms(params, adapters) computed before merging"
                )
            norm = weight_norms[path]
            m = lora.lora_magnitude_vector
            if lora.kind == "linear":
                restored = dora.unmerge(weight, delta, m, norm, fan_in_fan_out=lora.fan_in_fan_out)
            elif lora.kind == "embedding":
                restored = dora.embedding_unmerge(weight, delta, m, norm)
            else:
                restored = dora.conv_unmerge(weight, delta, m, norm)
        replacements[module.weight_path] = _stored(restored, spec, lora)
        if lora.lora_B_bias is not None and module.bias_path is not None:
            replacements[module.bias_path] = ops.unmerge_bias(leaves[module.bias_path], lora.lora_B_bias,
                                                              scaling=lora.scaling)
    return replace_leaves(params, replacements)
