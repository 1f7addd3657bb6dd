"""The one dispatch table of peftcore_torch: ``peft_type`` -> layer class, tuner model class and hooks.

peft's ``PEFT_TYPE_TO_TUNER_MAPPING`` for this backend. Each method's module registers its entry
(``model.py`` for LoRA, ``ia3.py``, ``adalora.py``); injection, the model classes and the state-dict
functions look the method up here and never branch on ``peft_type`` themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from peftcore.errors import ConfigError

__all__ = ["TorchMethod", "peft_type_of", "register_torch_method", "supported_peft_types", "torch_method"]


@dataclasses.dataclass(frozen=True)
class TorchMethod:
    """How peftcore_torch runs one method.

    ``layer_cls``: the ``TunerLayer`` subclass (``wrap(target, key=, config=)`` + ``add_adapter``);
    ``tuner_cls``: the model class ``PeftModel.base_model`` becomes (peft's ``LoraModel``, ``IA3Model``, ...);
    ``prepare_config(config, model)``: fills model-dependent defaults in place before matching;
    ``saved_state(model, config, adapter_name, state)``: edits the in-memory-keyed adapter state before
    it is renamed for disk; ``before_load(model, config, adapter_name)``: reshapes the adapter's
    parameters to what the checkpoint holds.
    """

    peft_type: str
    layer_cls: type
    tuner_cls: type
    prepare_config: Callable[[Any, nn.Module], None] | None = None
    saved_state: Callable[[nn.Module, Any, str, dict[str, Any]], dict[str, Any]] | None = None
    before_load: Callable[[nn.Module, Any, str], None] | None = None


_TABLE: dict[str, TorchMethod] = {}


def peft_type_of(config: Any) -> str:
    """``config.peft_type`` as a plain upper-case string (``"LORA"``)."""
    value = getattr(config, "peft_type", None)
    value = getattr(value, "value", value)
    return value.upper() if isinstance(value, str) else repr(value)


def register_torch_method(method: TorchMethod) -> TorchMethod:
    _TABLE[method.peft_type] = method
    return method


def supported_peft_types() -> tuple[str, ...]:
    return tuple(sorted(_TABLE))


def torch_method(config_or_peft_type: Any) -> TorchMethod:
    """The entry for a config (or a ``peft_type``); ``ConfigError`` naming the type when there is none."""
    peft_type = config_or_peft_type if isinstance(config_or_peft_type, str) else peft_type_of(config_or_peft_type)
    method = _TABLE.get(peft_type.upper())
    if method is None:
        raise ConfigError(f"peftcore_torch supports {list(supported_peft_types())} adapters; got peft_type "
                          f"{peft_type!r}")
    return method


def methods_table() -> Mapping[str, TorchMethod]:
    return dict(_TABLE)
