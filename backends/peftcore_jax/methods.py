"""The method table: ``peft_type`` -> what ``peftcore_jax`` does for that method, in one place.

Every public entry point that takes adapters (the layers, ``merge``/``unmerge``, ``save``/``load``, target
matching, shardings) looks the adapter's method up here instead of branching on it, so a method is added by
registering one ``JaxMethod`` from its own module (``lora_method``, ``ia3``, ``adalora``); each method has its own
``init_<method>``. The entries only hold parameters and walk trees; their math is the core's
``peftcore.methods.<method>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from peftcore.errors import UnknownPeftTypeError, UnsupportedLayerError

__all__ = ["JaxMethod", "get_method", "method_of_layer", "register"]


@dataclasses.dataclass(frozen=True)
class JaxMethod:
    """One method's backend functions.

    Layer functions ``linear(x, weight, bias, mods, *, fan_in_fan_out, key)``, ``conv(x, weight, bias, mods, *,
    stride, padding, dilation, groups, key)``, ``embedding(indices, weight, mods, **options)`` (``None``: kind not
    adapted), with ``mods`` a non-empty tuple of ``params_cls``; ``merge(params, adapters, *, safe, base_params)``,
    ``unmerge(params, adapters, *, weight_norms)``; ``state_dict(adapters) -> ({key: array}, config)`` (what
    is saved); ``from_state_dict(state, config, params, **options) -> adapters``; ``shard_axes(mod) -> {field:
    axis names}`` (core order, as ``peftcore_jax.sharding`` reads them); ``matching_config(config)``: the config
    target matching sees (AdaLoRA's ``rank_pattern`` holds masks, not rank patterns).
    """

    peft_type: str
    config_cls: type
    params_cls: type
    merge: Callable[..., Any]
    unmerge: Callable[..., Any]
    state_dict: Callable[..., Any]
    from_state_dict: Callable[..., Any]
    shard_axes: Callable[..., dict[str, str]]
    linear: Callable[..., Any] | None = None
    conv: Callable[..., Any] | None = None
    embedding: Callable[..., Any] | None = None
    matching_config: Callable[[Any], Any] = lambda config: config


_METHODS: dict[str, JaxMethod] = {}


def register(method: JaxMethod) -> JaxMethod:
    _METHODS[method.peft_type] = method
    return method


def get_method(peft_type: str) -> JaxMethod:
    """The ``JaxMethod`` of ``peft_type`` (an ``Adapters.peft_type`` or a config's ``peft_type``)."""
    key = str(getattr(peft_type, "value", peft_type)).upper()
    try:
        return _METHODS[key]
    except KeyError:
        raise UnknownPeftTypeError(
            f"peftcore_jax has no backend for peft_type {peft_type!r}; it handles {sorted(_METHODS)}"
        ) from None


def method_of_layer(mods: tuple, kind: str) -> JaxMethod:
    """The method of one layer's active module parameters (all of one class), checked to adapt ``kind``."""
    classes = {type(m) for m in mods}
    if len(classes) > 1:
        raise UnsupportedLayerError(
            f"one layer got adapters of different methods {sorted(c.__name__ for c in classes)}; peft activates "
            "adapters of one method at a time"
        )
    method = get_method(mods[0].peft_type)
    if getattr(method, kind) is None:
        raise UnsupportedLayerError(f"{method.peft_type} adapters cannot be applied to a {kind} layer (nor in peft)")
    return method
