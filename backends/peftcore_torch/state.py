"""Adapter state dicts in peft's on-disk naming (``get_peft_model_state_dict`` / ``set_peft_model_state_dict``).

Any method of ``peftcore_torch.methods``; its hooks cut AdaLoRA's saved triplets to the kept ranks and
rebuild its layers at those ranks before a load.

In memory keys carry the adapter name (``...q_proj.lora_A.default.weight``); checkpoints drop it
(``...q_proj.lora_A.weight``). The key grammar is ``peftcore.naming``; this file only knows which
torch modules hold which adapter.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from peftcore.constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND
from peftcore.errors import IncompatibleKeysError, ShapeMismatchError
from peftcore.naming import BASE_MODEL_PREFIX, insert_adapter_name, remove_adapter_name
from peftcore_torch.layers import ModulesToSaveWrapper, TunerLayer
from peftcore_torch.methods import torch_method

__all__ = ["LoadReport", "get_peft_model_state_dict", "set_peft_model_state_dict"]

class LoadReport(NamedTuple):
    """What ``set_peft_model_state_dict(strict=False)`` could not load.

    ``mismatched_keys`` holds ``(key, checkpoint_shape, model_shape)``; empty lists mean a full load.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def complete(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _adapter_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """In-memory keys of ``adapter_name``'s adapter tensors, found structurally (never by substring)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, TunerLayer) and adapter_name in module.adapter_names:
            for param_name, _ in module.named_parameters():
                container, _, rest = param_name.partition(".")
                if container in module.adapter_containers and rest.partition(".")[0] == adapter_name:
                    keys.append(_join(name, param_name))
    return keys


def _modules_to_save_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """``{checkpoint key: in-memory key}`` of the ``modules_to_save`` copies of ``adapter_name``."""
    mapping = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key in module.modules_to_save[adapter_name].state_dict():
                mapping[_join(name, key)] = _join(name, f"modules_to_save.{adapter_name}.{key}")
    return mapping


def _embedding_is_targeted(model: nn.Module, config: Any) -> bool:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) and targets != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return any(
            re.fullmatch(targets, key) for key, _ in base.named_modules()
            if any(re.match(rf"(.*\.)?{name}$", key) for name in EMBEDDING_LAYER_NAMES)
        )
    return bool(targets) and not isinstance(targets, str) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _embedding_state(model: nn.Module, state_dict: Mapping[str, Any], *, targeted: bool) -> dict[str, Any]:
    # peft saves the embedding base weights (input and output embeddings) next to the adapter
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        return {}
    found = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        valid_base = isinstance(getattr(layer, "base_layer", None), (nn.Linear, nn.Embedding))
        if targeted and not valid_base:
            continue
        base = getattr(layer, "base_layer", None)
        name = next((n for n, m in model.named_modules() if (not targeted and m is layer) or m is base), None)
        if name:
            found.update({k: v for k, v in state_dict.items() if k.startswith(f"{name}.")})
    return found


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    *,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors of ``adapter_name`` (peft's ``get_peft_model_state_dict``).

    Adapter tensors (LoRA factors and DoRA magnitudes renamed as peft does, (IA)³ vectors, AdaLoRA
    triplets cut to their kept ranks), biases per ``bias``, ``modules_to_save``
    copies (saved under the wrapped module's own name) and, for ``save_embedding_layers`` (``"auto"``:
    an ``EMBEDDING_LAYER_NAMES`` entry is targeted), the embedding base weights.
    """
    config = _config_of(model, adapter_name)
    method = torch_method(config)
    state_dict = model.state_dict() if state_dict is None else state_dict
    selected = {key: state_dict[key] for key in _adapter_keys(model, adapter_name)}
    if method.saved_state is not None:
        selected = method.saved_state(model, config, adapter_name, selected)

    bias = getattr(config, "bias", "none")
    if bias == "all":
        selected.update({k: v for k, v in state_dict.items() if k == "bias" or k.endswith(".bias")})
    elif bias == "lora_only":
        for name, module in model.named_modules():
            if isinstance(module, TunerLayer) and adapter_name in module.adapter_names:
                key = _join(name, "base_layer.bias")
                if key in state_dict:
                    selected[key] = state_dict[key]

    extras = {ckpt: state_dict[mem] for ckpt, mem in _modules_to_save_keys(model, adapter_name).items()}

    targeted = _embedding_is_targeted(model, config)
    uses_tokens = getattr(config, "trainable_token_indices", None) is not None
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted and not uses_tokens
        if save_embedding_layers:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
    if save_embedding_layers:
        selected.update(_embedding_state(model, state_dict, targeted=targeted))

    renamed = {remove_adapter_name(k, adapter_name, peft_type=method.peft_type): v for k, v in selected.items()}
    renamed.update(extras)
    return renamed


def _config_of(model: nn.Module, adapter_name: str) -> Any:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, Mapping) else []
        raise IncompatibleKeysError(f"model has no adapter {adapter_name!r}; known adapters: {known}")
    return configs[adapter_name]


def _model_keys(model: nn.Module, state_dict: Mapping[str, Any], adapter_name: str, *,
                peft_type: str) -> dict[str, Any]:
    """Checkpoint ``state_dict`` mapped to the model's in-memory keys for ``adapter_name``."""
    uses_prefix = any(n.startswith(BASE_MODEL_PREFIX) for n, _ in model.named_parameters())
    wrapper_keys = _modules_to_save_keys(model, adapter_name)
    mapped = {}
    for key, value in state_dict.items():
        if not uses_prefix and key.startswith(BASE_MODEL_PREFIX):
            key = key[len(BASE_MODEL_PREFIX):]
        if key in wrapper_keys:
            mapped[wrapper_keys[key]] = value
        else:
            mapped[insert_adapter_name(key, adapter_name, peft_type=peft_type, strict=False)] = value
    return mapped


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, Any],
    adapter_name: str = "default",
    *,
    strict: bool = True,
) -> LoadReport:
    """Copy a checkpoint-named state dict into adapter ``adapter_name`` (peft's ``set_peft_model_state_dict``).

    Every adapter tensor and ``modules_to_save`` copy of the adapter must be present with its exact shape;
    other keys must name a tensor of the model (peft also stores embedding base weights and biases).
    ``strict=True`` (default) raises before writing anything: ``ShapeMismatchError`` naming each key
    with both shapes, then ``IncompatibleKeysError`` listing missing and unexpected keys. ``strict=False``
    loads what fits, warns, and returns the ``LoadReport`` of the rest. Values are cast to the
    parameter's dtype and device (fp32 adapters on a bf16 base stay fp32).
    """
    config = _config_of(model, adapter_name)
    method = torch_method(config)
    if method.before_load is not None:
        method.before_load(model, config, adapter_name)
    mapped = _model_keys(model, peft_model_state_dict, adapter_name, peft_type=method.peft_type)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    required = _adapter_keys(model, adapter_name) + list(_modules_to_save_keys(model, adapter_name).values())

    missing = [key for key in required if key not in mapped]
    unexpected = sorted(key for key in mapped if key not in targets)
    mismatched = [
        (key, tuple(value.shape), tuple(targets[key].shape))
        for key, value in mapped.items()
        if key in targets and tuple(value.shape) != tuple(targets[key].shape)
    ]
    report = LoadReport(missing, unexpected, mismatched)
    if strict and mismatched:
        lines = "; ".join(f"{key}: checkpoint shape {a}, model shape {b}" for key, a, b in mismatched)
        raise ShapeMismatchError(f"adapter {adapter_name!r}: size mismatch for {len(mismatched)} key(s): {lines}")
    if strict and (missing or unexpected):
        raise IncompatibleKeysError(
            f"adapter {adapter_name!r} does not fit the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    bad = {key for key, _, _ in mismatched}
    with torch.no_grad():
        for key, value in mapped.items():
            if key in targets and key not in bad:
                target = targets[key]
                target.copy_(torch.as_tensor(value).to(device=target.device, dtype=target.dtype))
    if not report.complete:
        warnings.warn(
            f"adapter {adapter_name!r} loaded partially: missing {missing}, unexpected {unexpected}, "
            f"shape-mismatched {[(k, a, b) for k, a, b in mismatched]}; those entries keep their initial values",
            stacklevel=2,
        )
    return report
