"""The method registry: ``peft_type`` -> config class, parameter prefix and key containers.

Mirrors ``peft``'s ``PEFT_TYPE_TO_CONFIG_MAPPING`` / ``PEFT_TYPE_TO_PREFIX_MAPPING``.
A method registers itself from its own package (``peftcore/methods/<m>/__init__.py``);
``peftcore.methods`` imports every such package, so adding a method touches no shared code.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from peftcore.errors import ConfigError, UnknownPeftTypeError

if TYPE_CHECKING:
    from peftcore.config import PeftConfig

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "MethodSpec",
    "get_config_class",
    "get_method",
    "get_peft_config",
    "get_prefix",
    "register_method",
    "registered_methods",
]


@dataclass(frozen=True)
class MethodSpec:
    """What the shared code needs to know about one method.

    Attributes
    ----------
    peft_type : ``"LORA"``, ... exactly as written in ``adapter_config.json``.
    config_cls : the method's config dataclass.
    prefix : substring that identifies the method's parameters (``"lora_"``).
    module_containers : containers holding a sub-module per adapter, so keys read
        ``<module>.<container>.<adapter>.<param>`` in memory (``lora_A``, ``lora_B``).
    parameter_containers : containers holding a bare parameter per adapter, so keys
        read ``<module>.<container>.<adapter>`` (``lora_embedding_A``).
    weight_stripped_containers : module containers whose ``.weight`` is dropped on
        disk (DoRA's ``lora_magnitude_vector``).
    """

    peft_type: str
    config_cls: type
    prefix: str
    module_containers: tuple[str, ...] = ()
    parameter_containers: tuple[str, ...] = ()
    weight_stripped_containers: tuple[str, ...] = ()

    @property
    def containers(self) -> tuple[str, ...]:
        return self.module_containers + self.parameter_containers


_REGISTRY: dict[str, MethodSpec] = {}

PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type] = MappingProxyType({})
PEFT_TYPE_TO_PREFIX_MAPPING: Mapping[str, str] = MappingProxyType({})


def _normalise(peft_type: Any) -> str:
    value = getattr(peft_type, "value", peft_type)
    if not isinstance(value, str):
        raise UnknownPeftTypeError(f"peft_type must be a string such as 'LORA', got {peft_type!r}")
    return value.upper()


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a method; registering the same ``peft_type`` twice with another spec is an error."""
    global PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    key = _normalise(spec.peft_type)
    if key in _REGISTRY and _REGISTRY[key] != spec:
        raise ConfigError(f"peft_type {key!r} is already registered by {_REGISTRY[key].config_cls.__name__}")
    _REGISTRY[key] = spec
    PEFT_TYPE_TO_CONFIG_MAPPING = MappingProxyType({k: s.config_cls for k, s in _REGISTRY.items()})
    PEFT_TYPE_TO_PREFIX_MAPPING = MappingProxyType({k: s.prefix for k, s in _REGISTRY.items()})
    return spec


def get_method(peft_type: Any) -> MethodSpec:
    """The registered ``MethodSpec`` for ``peft_type`` (``"LORA"`` or ``"lora"``)."""
    _ensure_methods_loaded()
    key = _normalise(peft_type)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnknownPeftTypeError(
            f"unknown peft_type {peft_type!r}; peftcore knows {sorted(_REGISTRY)}"
        ) from None


def registered_methods() -> tuple[str, ...]:
    _ensure_methods_loaded()
    return tuple(sorted(_REGISTRY))


def get_config_class(peft_type: Any) -> type:
    """Config class registered for ``peft_type`` (``peft``'s ``PEFT_TYPE_TO_CONFIG_MAPPING[...]``)."""
    return get_method(peft_type).config_cls


def get_prefix(peft_type: Any) -> str:
    """Parameter-name prefix of ``peft_type`` (``peft``'s ``PEFT_TYPE_TO_PREFIX_MAPPING[...]``)."""
    return get_method(peft_type).prefix


def get_peft_config(config_dict: Mapping[str, Any]) -> PeftConfig:
    """Build the right config from a dict, dispatching on its ``peft_type`` (``peft.get_peft_config``)."""
    if "peft_type" not in config_dict:
        raise ConfigError("config dict has no 'peft_type' key; cannot tell which method it configures")
    return get_config_class(config_dict["peft_type"]).from_dict(config_dict)


def _ensure_methods_loaded() -> None:
    import peftcore.methods  # noqa: F401  (registers every method package)
