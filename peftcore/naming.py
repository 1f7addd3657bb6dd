"""State-dict key grammar of peft adapters: in-memory keys, on-disk keys, and the map between them.

In memory every adapter tensor sits under its adapter name (``<m>.lora_A.<adapter>.weight``); on disk
the name is dropped (``base_model.model.<m>.lora_A.weight``). The containers of each method come
from the registry (``peftcore.mapping.get_method``): module containers hold a sub-module per adapter
(adapter name second to last), parameter containers a bare parameter (adapter name last), and
weight-stripped containers (DoRA's ``lora_magnitude_vector``) additionally drop ``.weight`` on disk.
Mirrors ``BaseTuner._remove_adapter_name_from_key`` and LoRA's DoRA renaming in
``LoraModel._get_adapter_state_dict`` / ``_remap_adapter_state_dict_for_load``.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from peftcore.errors import IncompatibleKeysError
from peftcore.mapping import MethodSpec, get_method

__all__ = [
    "BASE_MODEL_PREFIX",
    "DEFAULT_ADAPTER_NAME",
    "ParsedKey",
    "adapter_subfolder",
    "checkpoint_key",
    "insert_adapter_name",
    "model_key",
    "ParsedModelKey",
    "parse_checkpoint_key",
    "parse_model_key",
    "remove_adapter_name",
]

BASE_MODEL_PREFIX = "base_model.model."
DEFAULT_ADAPTER_NAME = "default"
_STRIPPED_PARAM = "weight"


class ParsedKey(NamedTuple):
    """An on-disk adapter key split into its parts; ``param`` is ``None`` for bare-parameter keys."""

    module_path: str
    container: str
    param: str | None


class ParsedModelKey(NamedTuple):
    """An in-memory adapter key split into its parts; ``param`` is ``None`` for bare-parameter keys."""

    module_path: str
    container: str
    adapter_name: str
    param: str | None


def _spec(peft_type: Any) -> MethodSpec:
    return get_method(peft_type)


def _join(*parts: str | None) -> str:
    return ".".join(part for part in parts if part)


def _checked_param(spec: MethodSpec, container: str, param: str | None, *, key_hint: str) -> str | None:
    """The in-memory parameter name under ``container`` (``None`` for a bare parameter)."""
    if container in spec.weight_stripped_containers:
        if param not in (None, _STRIPPED_PARAM):
            raise IncompatibleKeysError(
                f"{key_hint}: container {container!r} of {spec.peft_type} only holds '.weight', got param {param!r}"
            )
        return _STRIPPED_PARAM
    if container in spec.module_containers:
        return _STRIPPED_PARAM if param is None else param
    if container in spec.parameter_containers:
        if param is not None:
            raise IncompatibleKeysError(
                f"{key_hint}: container {container!r} of {spec.peft_type} is a bare parameter; got param {param!r}"
            )
        return None
    raise IncompatibleKeysError(
        f"{key_hint}: {container!r} is not a container of {spec.peft_type}; known: {list(spec.containers)}"
    )


def checkpoint_key(
    module_path: str, container: str, param: str | None = None, *, peft_type: Any = "LORA",
    prefix: str = BASE_MODEL_PREFIX,
) -> str:
    """On-disk key: ``<prefix><module_path>.<container>[.<param>]``.

    ``param`` defaults to ``weight`` for module containers, is absent for parameter containers
    (``lora_embedding_A``) and is dropped for weight-stripped ones (``lora_magnitude_vector``).
    """
    spec = _spec(peft_type)
    param = _checked_param(spec, container, param, key_hint=f"module {module_path!r}")
    if container in spec.weight_stripped_containers:
        param = None
    return prefix + _join(module_path, container, param)


def model_key(
    module_path: str, container: str, adapter_name: str, param: str | None = None, *, peft_type: Any = "LORA",
    prefix: str = BASE_MODEL_PREFIX,
) -> str:
    """In-memory key: ``<prefix><module_path>.<container>.<adapter_name>[.<param>]``.

    Module containers (and DoRA's ``lora_magnitude_vector``, whose param is always ``weight``) put the
    adapter name second to last; parameter containers put it last.
    """
    param = _checked_param(_spec(peft_type), container, param, key_hint=f"module {module_path!r}")
    return prefix + _join(module_path, container, adapter_name, param)


def remove_adapter_name(key: str, adapter_name: str, *, peft_type: Any = "LORA") -> str:
    """The on-disk key of in-memory ``key`` (peft's save-time rename; a pure string function).

    Weight-stripped containers first lose ``.weight`` (``...lora_magnitude_vector.<a>.weight`` ->
    ``...lora_magnitude_vector.<a>``). Then ``.<adapter_name>`` is removed where it is the last
    component, else only where it directly precedes the last component; elsewhere the key is untouched,
    so a base-model module that happens to share the adapter's name keeps it.
    """
    for container in _spec(peft_type).weight_stripped_containers:
        if key.endswith(f"{container}.{adapter_name}.{_STRIPPED_PARAM}"):
            key = key[: -len(f".{_STRIPPED_PARAM}")]
            break
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(f".{adapter_name}")]
    head, _, last = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{last}"


def parse_checkpoint_key(key: str, *, peft_type: Any = "LORA", prefix: str = BASE_MODEL_PREFIX) -> ParsedKey:
    """Split on-disk ``key`` into ``(module_path, container, param)``; ``prefix`` is removed if present.

    ``<m>.<C>`` with ``C`` a parameter or weight-stripped container, or ``<m>.<C>.<param>`` with ``C`` a
    module container. ``<m>.<C>.weight`` for a weight-stripped ``C`` is accepted as an alias of ``<m>.<C>``.
    Raises ``IncompatibleKeysError`` naming the key when it fits no container.
    """
    spec = _spec(peft_type)
    body = key[len(prefix):] if prefix and key.startswith(prefix) else key
    head, _, last = body.rpartition(".")
    if last in spec.parameter_containers or last in spec.weight_stripped_containers:
        return ParsedKey(head, last, None)
    module_path, _, container = head.rpartition(".")
    if container in spec.weight_stripped_containers and last == _STRIPPED_PARAM:
        # peft also writes this unstripped form (an embedding targeted with DoRA and saved with
        # save_embedding_layers) and loads it like the stripped one; read it as the canonical key
        return ParsedKey(module_path, container, None)
    if container in spec.module_containers and container not in spec.weight_stripped_containers and last:
        return ParsedKey(module_path, container, last)
    raise IncompatibleKeysError(
        f"key {key!r} is not a {spec.peft_type} adapter key: expected '<module>.<container>[.<param>]' "
        f"with a container in {list(spec.containers)}"
    )


def parse_model_key(key: str, *, peft_type: Any = "LORA", prefix: str = BASE_MODEL_PREFIX) -> ParsedModelKey:
    """Split in-memory ``key`` into ``(module_path, container, adapter_name, param)``; ``prefix`` removed if present.

    ``<m>.<C>.<adapter>`` with ``C`` a parameter container, or ``<m>.<C>.<adapter>.<param>`` with ``C`` a
    module container. Selecting an adapter's entries by this position (rather than by searching for
    ``.<adapter>.`` anywhere, as peft does) stays exact when an adapter is named like a base module.
    Raises ``IncompatibleKeysError`` naming the key when it fits no container.
    """
    spec = _spec(peft_type)
    body = key[len(prefix):] if prefix and key.startswith(prefix) else key
    parts = body.split(".")
    if len(parts) >= 2 and parts[-2] in spec.parameter_containers and parts[-1]:
        return ParsedModelKey(".".join(parts[:-2]), parts[-2], parts[-1], None)
    if len(parts) >= 3 and parts[-3] in spec.module_containers and parts[-2] and parts[-1]:
        if parts[-3] not in spec.weight_stripped_containers or parts[-1] == _STRIPPED_PARAM:
            return ParsedModelKey(".".join(parts[:-3]), parts[-3], parts[-2], parts[-1])
    raise IncompatibleKeysError(
        f"key {key!r} is not an in-memory {spec.peft_type} adapter key: expected "
        f"'<module>.<container>.<adapter>[.<param>]' with a container in {list(spec.containers)}"
    )


def insert_adapter_name(key: str, adapter_name: str, *, peft_type: Any = "LORA", strict: bool = True) -> str:
    """The in-memory key of on-disk ``key`` for ``adapter_name`` (inverse of ``remove_adapter_name``).

    The name goes right after the container; DoRA's ``lora_magnitude_vector`` gets ``.weight`` back.
    ``strict=False`` returns keys that fit no container unchanged (peft passes such entries, e.g.
    saved biases or embedding weights, through as they are); ``strict=True`` raises
    ``IncompatibleKeysError`` for them.
    """
    try:
        module_path, container, param = parse_checkpoint_key(key, peft_type=peft_type, prefix="")
    except IncompatibleKeysError:
        if strict:
            raise
        return key
    return model_key(module_path, container, adapter_name, param, peft_type=peft_type, prefix="")


def adapter_subfolder(adapter_name: str) -> str:
    """Sub-directory ``save_pretrained`` writes an adapter to: ``""`` for ``"default"``, else the name."""
    return "" if adapter_name == DEFAULT_ADAPTER_NAME else adapter_name
