"""AdaLoRA for parameter trees: SVD-form adapters ``ΔW = s·B·diag(E)·A`` whose rank a budget allocator prunes.

``init_adalora`` gives every targeted Linear / GPT-2 ``Conv1D`` / Conv2d a triplet at rank ``init_r`` (peft's
init: ``A, B ~ N(0, 0.02²)``, ``E = 0``), ``s = lora_alpha / (init_r + 1e-5)``. The layers add the branch;
``orth_regularizer(adapters)`` is the term peft adds to the loss (times ``orth_reg_weight``). The allocator is
the core's (``peftcore.methods.adalora.allocator``) on the adapters flattened to peft's parameter names
(``<module>.lora_A`` ...), as pure functions that run inside a jitted train step::

    schedule = allocator_schedule(adapters)          # static, hashable
    state = allocator_init(adapters)                 # zero EMAs, all-True masks: a fixed pytree
    for step in range(total_step):
        plan = allocator_plan(step, schedule=schedule)   # host side: 0-d arrays, a traced jit argument
        adapters, opt_state, state = train_step(adapters, opt_state, state, batch, plan, schedule=schedule)
        # inside: grads = jax.grad(loss)(adapters); adapters = optimizer update;
        #         state, adapters = allocator_step(state, adapters, grads, plan, schedule=schedule)
    adapters = with_rank_pattern(adapters, state)          # the masks into config.rank_pattern, for saving

The step enters only through ``allocator_plan`` (the core's ``step_plan``: whether to update the EMAs, to mask
and how many triplets, to reset, to re-apply the final mask), arrays the step selects with, so a train step
jitted with only ``schedule`` static compiles once for the whole schedule. ``save_adapter`` prunes each layer
to its kept triplets and writes ``rank_pattern`` (peft's ``resize_state_dict_by_rank_pattern``);
``load_adapter`` rebuilds each layer at its kept rank.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.adalora import AdaLoraConfig
from peftcore.methods.adalora import allocator as core_allocator
from peftcore.methods.adalora import ops
from peftcore.methods.lora.init import adapter_dtype
from peftcore.naming import BASE_MODEL_PREFIX, DEFAULT_ADAPTER_NAME, checkpoint_key
from peftcore_jax import methods
from peftcore_jax.io import load_modules, take_keys
from peftcore_jax.layers import base_conv, base_linear, dropout_keys, dropped
from peftcore_jax.layout import Layout, LeafSpec, from_core, get_layout, to_core
from peftcore_jax.lora import JaxSampler, _module_of, module_key, target_modules
from peftcore_jax.params import Adapters, AdaLoraParams
from peftcore_jax.tree import Module, find_modules, leaf_paths, replace_leaves

__all__ = [
    "ADALORA",
    "AllocatorState",
    "StepPlan",
    "allocator_init",
    "allocator_plan",
    "allocator_schedule",
    "allocator_step",
    "init_adalora",
    "orth_regularizer",
    "with_rank_pattern",
]

_CONTAINERS = ("lora_A", "lora_E", "lora_B")
AllocatorState = core_allocator.AllocatorState
StepPlan = core_allocator.StepPlan


def _spec(module: Module, layout: Layout, config: AdaLoraConfig) -> LeafSpec:
    spec = layout.with_fan_in_fan_out(module.spec, config.fan_in_fan_out)
    if spec.kind == "embedding":
        raise UnsupportedLayerError(
            f"Target module {module.path!r} is not supported: AdaLoRA adapts Linear, Conv1D and Conv2d only (as peft)"
        )
    return spec


def _core_weight(stored: jax.Array, spec: LeafSpec) -> jax.Array:
    return stored if spec.kind == "linear" else to_core(stored, spec)


def _in_out(weight: jax.Array, spec: LeafSpec) -> tuple[int, int]:
    """``(in, out)`` of the factors: a Conv2d's ``in`` is ``in_channels·kh·kw`` (peft's ``SVDConv2d``)."""
    if spec.kind == "linear":
        out_f, in_f = weight.shape[::-1] if spec.fan_in_fan_out else weight.shape
        return int(in_f), int(out_f)
    if weight.ndim != 4:
        raise UnsupportedLayerError(f"AdaLoRA adapts Conv2d only (as peft), got a conv weight {tuple(weight.shape)}")
    in_f = 1
    for d in weight.shape[1:]:
        in_f *= int(d)
    return in_f, int(weight.shape[0])


def _check_config(config: Any) -> AdaLoraConfig:
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"init_adalora needs an AdaLoraConfig, got {type(config).__name__}")
    return config


def init_adalora(params: Any, config: AdaLoraConfig, key: jax.Array, /, *,
                 adapter_name: str = DEFAULT_ADAPTER_NAME, layout: str | Layout = "torch",
                 model_type: str | None = None, output_embedding_name: str | None = None) -> Adapters:
    """AdaLoRA adapters at rank ``init_r`` for every module ``config`` targets (peft's ``get_peft_model``).

    Factors from ``peftcore.methods.adalora.ops.init_svd`` drawn from ``module_key(key, path)`` in the base
    weight's dtype (half bases get float32 adapters, peft's autocast); ``scaling = α / (init_r + 1e-5)``.
    """
    layout = get_layout(layout)
    config = _check_config(config)
    targets = target_modules(params, config, layout=layout, model_type=model_type,
                             output_embedding_name=output_embedding_name)
    leaves = leaf_paths(params)
    r = int(config.init_r)
    scaling = ops.scaling(r, config.lora_alpha)
    adapters: dict[str, AdaLoraParams] = {}
    for path, module in targets.items():
        spec = _spec(module, layout, config)
        weight = _core_weight(leaves[module.weight_path], spec)
        in_f, out_f = _in_out(weight, spec)
        made = ops.init_svd(in_f, out_f, r=r, init_lora_weights=config.init_lora_weights,
                            sampler=JaxSampler(module_key(key, path)), dtype=adapter_dtype(weight.dtype, xp=jnp))
        adapters[path] = AdaLoraParams(made.lora_A, made.lora_E, made.lora_B, kind=spec.kind, scaling=scaling,
                                       fan_in_fan_out=spec.fan_in_fan_out, dropout=float(config.lora_dropout))
    return Adapters.create(adapters, config, adapter_name=adapter_name, layout=layout)


# --- layers ----------------------------------------------------------------------------------------


def adalora_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None, mods: tuple[AdaLoraParams, ...], *,
                   fan_in_fan_out: bool, key: jax.Array | None = None) -> jax.Array:
    """``x Wᵀ + b + Σ s·(x (A⊙E)ᵀ) Bᵀ`` (peft's ``SVDLinear.forward``; dropout on ``x`` when ``key`` is given)."""
    result = base_linear(x, weight, bias, fan_in_fan_out=fan_in_fan_out)
    updates = [ops.linear_update(dropped(x, m, k)[0], m.lora_A, m.lora_E, m.lora_B, scaling=m.scaling)
               for m, k in zip(mods, dropout_keys(key, len(mods)))]
    return ops.accumulate(result, *updates)


def adalora_conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None, mods: tuple[AdaLoraParams, ...], *,
                 stride: Any, padding: Any, dilation: Any, groups: int, key: jax.Array | None = None) -> jax.Array:
    """Base Conv2d plus ``conv(x, s·B(A⊙E))`` with the base's stride/padding/dilation/groups (``SVDConv2d``)."""
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    result = base_conv(x, weight, bias, **options)
    updates = [ops.conv_update(dropped(x, m, k)[0], m.lora_A, m.lora_E, m.lora_B, scaling=m.scaling,
                               weight_shape=weight.shape, **options)
               for m, k in zip(mods, dropout_keys(key, len(mods)))]
    return ops.accumulate(result, *updates)


# --- merge -----------------------------------------------------------------------------------------


def _delta(mod: AdaLoraParams, weight: jax.Array) -> jax.Array:
    if mod.kind == "linear":
        return ops.delta_weight(mod.lora_A, mod.lora_E, mod.lora_B, scaling=mod.scaling,
                                fan_in_fan_out=mod.fan_in_fan_out)
    return ops.conv_delta_weight(mod.lora_A, mod.lora_E, mod.lora_B, scaling=mod.scaling, weight_shape=weight.shape)


def _apply_deltas(params: Any, adapters: Adapters, combine) -> Any:
    modules = find_modules(params, layout=adapters.layout)
    leaves = leaf_paths(params)
    replacements = {}
    for path, mod in adapters.params.items():
        module = _module_of(path, modules, adapters.layout)
        spec = adapters.layout.with_fan_in_fan_out(module.spec, mod.fan_in_fan_out)
        if spec.kind != mod.kind:
            raise UnsupportedLayerError(f"the {mod.kind!r} AdaLoRA adapter of {path!r} does not fit its {spec.kind} "
                                        "weight")
        weight = _core_weight(leaves[module.weight_path], spec)
        merged = combine(weight, _delta(mod, weight), path)
        replacements[module.weight_path] = merged if mod.kind == "linear" else from_core(merged, spec)
    return replace_leaves(params, replacements)


def adalora_merge(params: Any, adapters: Adapters, /, *, safe: bool = False, base_params: Any = None) -> Any:
    """``W + s·B(A⊙E)`` per module (peft's ``SVDLinear.merge`` / ``SVDConv2d.merge``)."""
    return _apply_deltas(params, adapters, lambda w, d, path: ops.merge(w, d, safe=safe, name=path))


def adalora_unmerge(params: Any, adapters: Adapters, /, *, weight_norms: Any = None) -> Any:
    """``W − s·B(A⊙E)`` per module (peft's ``unmerge``)."""
    return _apply_deltas(params, adapters, lambda w, d, path: ops.unmerge(w, d))


# --- orthogonal regulariser and the rank allocator ---------------------------------------------------


def _flat(adapters: Adapters) -> dict[str, jax.Array]:
    """``{<module>.lora_A: A, <module>.lora_E: E, <module>.lora_B: B}``: peft's parameter names (no adapter part)."""
    flat = {}
    for path, mod in adapters.params.items():
        for container in _CONTAINERS:
            flat[f"{path}.{container}"] = getattr(mod, container)
    return flat


def _with_E(adapters: Adapters, flat: dict[str, jax.Array]) -> Adapters:
    params = {path: dataclasses.replace(mod, lora_E=flat[f"{path}.lora_E"]) for path, mod in adapters.params.items()}
    return Adapters(params, adapters.config_json, adapters.adapter_name, adapters.layout)


def orth_regularizer(adapters: Adapters, /) -> jax.Array:
    """``mean_P ‖P Pᵀ − I‖_F`` over every ``lora_A`` (``A Aᵀ``) and ``lora_B`` (``Bᵀ B``): peft's ``regu_loss``.

    peft adds ``orth_reg_weight ·`` this to the loss in ``AdaLoraModel.forward``. Differentiable and jit-able.
    """
    value = ops.orth_regularizer(_flat(adapters))
    return jnp.asarray(value, dtype=jnp.float32) if isinstance(value, float) else value


def allocator_schedule(adapters: Adapters, /) -> core_allocator.Schedule:
    """The allocator's static schedule for ``adapters`` and their config (peft's ``RankAllocator.__init__``)."""
    return core_allocator.make_schedule(_flat(adapters), config=adapters.config)


def allocator_init(adapters: Adapters, /) -> core_allocator.AllocatorState:
    """Zero importance EMAs for every factor and all-True masks (a pytree of fixed structure: carry it through
    the train step)."""
    return core_allocator.init_state(_flat(adapters), masks=True)


def allocator_plan(step: int, /, *, schedule: core_allocator.Schedule) -> core_allocator.StepPlan:
    """What the allocator does at Python int ``step``, as 0-d arrays (the core's ``step_plan``, on the host).

    ``update``: importance EMAs (``step < total_step − tfinal``); ``mask``: mask ``k`` triplets now (a scheduled
    budget, or the final ``target_bgt``); ``reset``: zero the EMAs (the final step); ``reapply``: re-apply the
    final mask (later steps). Pass it to the jitted step as an ordinary (traced) argument.
    """
    return core_allocator.step_plan(step, schedule=schedule, xp=jnp)


def allocator_step(state: core_allocator.AllocatorState, adapters: Adapters, grads: Adapters,
                   plan: core_allocator.StepPlan, /, *,
                   schedule: core_allocator.Schedule) -> tuple[core_allocator.AllocatorState, Adapters]:
    """One ``AdaLoraModel.update_and_allocate(step)``: ``(state', adapters')``, masked ``lora_E`` in ``adapters'``.

    Call it after the optimiser update with that step's ``grads`` (``jax.grad`` w.r.t. ``adapters``: the same
    tree; read only while ``plan.update``) and ``plan = allocator_plan(step, schedule=schedule)``. Only
    ``schedule`` is static under ``jax.jit``, so one compilation serves every step. ``state'.rank_pattern``
    holds the last masks (``<module>.lora_E`` -> bool ``(init_r,)``); ``with_rank_pattern`` puts them in the
    config for saving.
    """
    if grads is None:
        raise IncompatibleKeysError("allocator_step needs the step's gradients (a tree like `adapters`) at every "
                                    "step; they are read only before total_step - tfinal")
    state, flat = core_allocator.allocate(state, _flat(adapters), _flat(grads), plan, schedule=schedule)
    return state, _with_E(adapters, flat)


def with_rank_pattern(adapters: Adapters, masks: core_allocator.AllocatorState | dict, /) -> Adapters:
    """``adapters`` whose config's ``rank_pattern`` holds ``masks`` (an allocator state's, or ``{<module>.lora_E:
    bool mask}``) as peft's lists; host-side (reads the masks). Saving then prunes each layer to its kept triplets.
    """
    if isinstance(masks, core_allocator.AllocatorState):
        masks = masks.rank_pattern
        # every masking step masks at least one triplet, so all-True masks mean it has not masked yet
        if masks is not None and all(bool(jnp.all(m)) for m in masks.values()):
            masks = None
    if masks is None:
        raise ConfigError("no rank pattern yet: the allocator has not masked (run it past tinit on the deltaT grid)")
    config = copy.deepcopy(adapters.config)
    config.rank_pattern = core_allocator.rank_pattern_to_lists(masks)
    return Adapters(adapters.params, config.to_json_string(), adapters.adapter_name, adapters.layout)


# --- files -----------------------------------------------------------------------------------------


def _key(path: str, container: str) -> str:
    return checkpoint_key(path, container, peft_type="ADALORA")


def adalora_state_dict(adapters: Adapters, /) -> tuple[dict[str, jax.Array], AdaLoraConfig]:
    """``{base_model.model.<module>.lora_A|lora_E|lora_B: array}``, cut to the kept triplets of the config's
    ``rank_pattern`` (layers still at ``init_r``; already-pruned ones stay), and the config to save."""
    config = adapters.config
    state = {_key(path, c): getattr(mod, c) for path, mod in adapters.params.items() for c in _CONTAINERS}
    pattern = config.rank_pattern or {}
    unpruned = {name: mask for name, mask in pattern.items()
                if name.rpartition(".")[0] in adapters.params
                and adapters.params[name.rpartition(".")[0]].r == len(mask)}
    if unpruned:
        state = ops.prune_state_dict(state, rank_pattern=unpruned, prefix=BASE_MODEL_PREFIX)
    return state, config


def _adalora_module(path: str, module: Module, config: AdaLoraConfig, leaves: dict, remaining: dict,
                    missing: list[str], *, layout: Layout, dtype: Any) -> AdaLoraParams | None:
    spec = _spec(module, layout, config)
    keys = {c: _key(path, c) for c in _CONTAINERS}
    taken = take_keys(keys, remaining, missing)
    if taken is None:
        return None
    arrays = {c: jnp.asarray(value, dtype=dtype) for c, value in taken.items()}
    init_r = int(config.init_r)
    kept = ops.kept_ranks(config.rank_pattern or {})
    r = kept.get(path, init_r)
    in_f, out_f = _in_out(_core_weight(leaves[module.weight_path], spec), spec)
    expected = {"lora_A": (r, in_f), "lora_E": (r, 1), "lora_B": (out_f, r)}
    for c, key in keys.items():
        if tuple(arrays[c].shape) != expected[c]:
            raise ShapeMismatchError(
                f"{key}: shape {tuple(arrays[c].shape)} in the adapter, but module {path!r} (base weight "
                f"{tuple(leaves[module.weight_path].shape)}, rank {r}) needs {expected[c]}"
            )
    # peft rebuilds a pruned layer at its kept rank but keeps ranknum = init_r (a fully pruned one gets 0)
    ranknum = init_r if r > 0 else 0
    scaling = ops.scaling(ranknum, config.lora_alpha, r=r)
    return AdaLoraParams(arrays["lora_A"], arrays["lora_E"], arrays["lora_B"], kind=spec.kind, scaling=scaling,
                         fan_in_fan_out=spec.fan_in_fan_out, dropout=float(config.lora_dropout))


def _matching_config(config: AdaLoraConfig) -> AdaLoraConfig:
    """Target matching must not read AdaLoRA's ``rank_pattern`` (bool masks) as LoRA's rank patterns."""
    if not config.rank_pattern:
        return config
    plain = copy.copy(config)
    plain.rank_pattern = None
    return plain


ADALORA = methods.register(methods.JaxMethod(
    peft_type="ADALORA",
    config_cls=AdaLoraConfig,
    params_cls=AdaLoraParams,
    merge=adalora_merge,
    unmerge=adalora_unmerge,
    state_dict=adalora_state_dict,
    from_state_dict=functools.partial(load_modules, build=_adalora_module),
    shard_axes=lambda mod: ({"lora_A": "r in", "lora_E": "r 1", "lora_B": "out r"} if mod.kind == "linear"
                            else {"lora_A": "r 1", "lora_E": "r 1", "lora_B": "out r"}),
    linear=adalora_linear,
    conv=adalora_conv,
    matching_config=_matching_config,
))
