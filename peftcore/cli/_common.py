"""Shared pieces of the ``peftcore`` commands: an adapter folder read lazily, names, JSON output.

The weight file is read through ``peftcore._safetensors.SafetensorsFile``: its header now, each
tensor when asked for, so a command's memory is bounded by its largest tensor.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcore._safetensors import SafetensorsFile
from peftcore.config import PeftConfig, UnknownConfigFieldsWarning
from peftcore.errors import AdapterNotFoundError, IncompatibleKeysError
from peftcore.io import _adapter_files
from peftcore.naming import BASE_MODEL_PREFIX, parse_checkpoint_key


@dataclass
class AdapterLayout:
    """An adapter folder read lazily: config, the weight file's header, keys grouped by module."""

    folder: Path
    config: PeftConfig
    weights: SafetensorsFile
    modules: dict[str, dict[str, str]]  # module path -> {"lora_A.weight": key, "lora_magnitude_vector": key, ...}
    other_keys: list[str]  # keys that fit no adapter container (modules_to_save copies, ...)
    config_warnings: list[str]
    config_bytes: int


def open_adapter(directory: str | os.PathLike) -> AdapterLayout:
    """Read ``adapter_config.json`` and the header of ``adapter_model.safetensors`` (no tensor data)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter directory {folder} does not exist")
    config_file, weights_file = _adapter_files(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnknownConfigFieldsWarning)
        config = PeftConfig.from_pretrained(config_file)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownConfigFieldsWarning)]
    weights = SafetensorsFile.open(weights_file)
    modules: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in sorted(weights.tensors):
        try:
            module, container, param = parse_checkpoint_key(key, peft_type=config.peft_type)
        except IncompatibleKeysError:
            other.append(key)
            continue
        modules.setdefault(module, {})[container if param is None else f"{container}.{param}"] = key
    return AdapterLayout(folder, config, weights, modules, other, messages, config_file.stat().st_size)


def peft_type_name(config: PeftConfig) -> str:
    value = config.peft_type
    return str(getattr(value, "value", value))


def task_type_name(config: PeftConfig) -> str | None:
    value = config.task_type
    return None if value is None else str(getattr(value, "value", value))


def base_key(module_path: str, param: str = "weight") -> str:
    """The base checkpoint's name of ``module_path``'s ``param`` (adapter keys carry ``base_model.model.``)."""
    return f"{module_path}.{param}"


def strip_prefix(key: str) -> str:
    return key[len(BASE_MODEL_PREFIX):] if key.startswith(BASE_MODEL_PREFIX) else key


def to_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False)
