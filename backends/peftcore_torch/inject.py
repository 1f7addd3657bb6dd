"""Put adapters into any ``nn.Module`` (``peft.inject_adapter_in_model`` and ``BaseTuner.inject_adapter``).

Which modules get an adapter is decided by ``peftcore.matching`` on the module names; which layer
class wraps them comes from the method table (``peftcore_torch.methods``). This file only walks the
torch module tree, swaps modules for adapter layers, wraps ``modules_to_save`` and sets
``requires_grad`` as peft does.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from peftcore.config import PeftConfig
from peftcore.errors import ConfigError
from peftcore.matching import match_targets
from peftcore.random import Sampler
from peftcore_torch.layers import ModulesToSaveWrapper, TunerLayer, layer_kind
from peftcore_torch.methods import peft_type_of, torch_method
from peftcore_torch.sampler import TorchSampler

__all__ = [
    "adapter_layers",
    "inject_adapter",
    "inject_adapter_in_model",
    "mark_only_adapters_as_trainable",
    "set_active_adapters",
]

_LINEAR_KINDS = ("linear", "conv1d_gpt2")


def inject_adapter_in_model(
    config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
    sampler: Sampler | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and return it (``peft.inject_adapter_in_model``).

    The adapter is active, everything else is frozen, and ``model.peft_config`` records the config
    (as peft does) so ``get_peft_model_state_dict(model)`` works on the plain model.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        configs = {}
    inject_adapter(model, config, adapter_name, active_adapters=[adapter_name], configs=configs,
                   autocast_adapter_dtype=autocast_adapter_dtype, sampler=sampler)
    model.peft_config = configs
    return model


def adapter_layers(model: nn.Module) -> list[tuple[str, TunerLayer | ModulesToSaveWrapper]]:
    """``(name, module)`` of every adapter layer (``TunerLayer``) and ``ModulesToSaveWrapper`` in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (TunerLayer, ModulesToSaveWrapper))]


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type`` (``None`` for models without a transformers config)."""
    model_config = getattr(model, "config", None)
    if isinstance(model_config, dict):
        return model_config.get("model_type")
    return getattr(model_config, "model_type", None)


def _output_embedding_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        layer = getter()
    except (AttributeError, NotImplementedError):
        return None
    if layer is None:
        return None
    return next((name for name, m in model.named_modules() if m is layer), None)


def _linear_names(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        kind = layer_kind(module.base_layer if isinstance(module, TunerLayer) else module)
        if kind in _LINEAR_KINDS:
            names.append(name)
    return names


def _replace(model: nn.Module, key: str, new: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapter(
    model: nn.Module,
    config: PeftConfig,
    adapter_name: str,
    *,
    active_adapters: list[str],
    configs: dict[str, Any],
    autocast_adapter_dtype: bool = True,
    sampler: Sampler | None = None,
) -> list[str]:
    """Add ``adapter_name`` to every module ``config`` targets; return the adapted module names.

    The layer class is ``config.peft_type``'s (``peftcore_torch.methods``); one model holds adapters
    of one method. ``configs`` (adapter -> config) receives the config; ``active_adapters`` stay the
    active ones afterwards (peft re-activates them so a new adapter on new layers does not become active).
    """
    method = torch_method(config)
    if adapter_name in configs:
        raise ConfigError(f"adapter {adapter_name!r} already exists; known adapters: {sorted(configs)}")
    other_types = sorted({peft_type_of(c) for c in configs.values()} - {method.peft_type})
    if other_types:
        raise ConfigError(f"cannot add a {method.peft_type} adapter to a model holding {other_types} adapters; "
                          "one model holds adapters of one method")
    sampler = TorchSampler() if sampler is None else sampler
    if method.prepare_config is not None:
        method.prepare_config(config, model)
    layer_cls = method.layer_cls
    module_names = [name for name, _ in model.named_modules()]
    match = match_targets(
        config,
        module_names,
        model_type=model_type_of(model),
        peft_type=method.peft_type,
        linear_module_names=_linear_names(model),
        output_embedding_name=_output_embedding_name(model),
        is_transformers_model=_is_transformers_model(model),
        tuner_layer_names=[name for name, _ in adapter_layers(model)],
    )
    for message in match.warnings():
        category = RuntimeWarning if "did not match any targeted module" in message else UserWarning
        warnings.warn(message, category, stacklevel=3)
    if config.target_modules is None or isinstance(config.target_modules, str) and \
            config.target_modules.lower() == "all-linear":
        # peft stores the resolved targets in the config it saves
        config.target_modules = match.target_modules

    configs[adapter_name] = config
    options = dict(config=config, sampler=sampler, autocast_adapter_dtype=autocast_adapter_dtype)
    try:
        for key in match.matched:
            target = model.get_submodule(key)
            if isinstance(target, layer_cls):
                target.add_adapter(adapter_name, key=key, **options)
            else:
                layer = layer_cls.wrap(target, key=key, config=config)
                layer.add_adapter(adapter_name, key=key, **options)
                _replace(model, key, layer)
    except Exception:
        configs.pop(adapter_name, None)
        raise

    inference_mode = bool(config.inference_mode)
    set_active_adapters(model, active_adapters, inference_mode=inference_mode, wrappers=False)
    mark_only_adapters_as_trainable(model, [configs[name] for name in active_adapters if name in configs])
    if config.modules_to_save:
        _wrap_modules_to_save(model, adapter_name, config.modules_to_save,
                              activate=adapter_name in active_adapters, inference_mode=inference_mode)
    return match.matched


def set_active_adapters(model: nn.Module, adapter_names: list[str], *, inference_mode: bool = False,
                        wrappers: bool = True) -> None:
    """Activate ``adapter_names`` on every adapter layer (and, with ``wrappers``, on ``modules_to_save``)."""
    for _, module in adapter_layers(model):
        if isinstance(module, TunerLayer):
            module.set_adapter(adapter_names, inference_mode=inference_mode)
        elif wrappers:
            module.set_adapter([name for name in adapter_names if name in module.modules_to_save][:1],
                               inference_mode=inference_mode)


def mark_only_adapters_as_trainable(model: nn.Module, active_configs: list[Any]) -> None:
    """Freeze every non-adapter parameter, then unfreeze biases per ``bias`` (peft's rule).

    ``"all"``: every parameter named ``bias``; ``"lora_only"``: the base biases of adapted layers.
    Adapter parameters and ``modules_to_save`` copies keep the state their layer gave them.
    """
    keep: set[int] = set()
    for _, module in adapter_layers(model):
        if isinstance(module, TunerLayer):
            for adapter in module.adapter_names:
                keep.update(id(p) for p in module._adapter_parameters(adapter))
        else:
            keep.update(id(p) for p in module.modules_to_save.parameters())
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)
    for config in active_configs:
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, param in model.named_parameters():
                if name == "bias" or name.endswith(".bias"):
                    param.requires_grad_(True)
        elif bias == "lora_only":
            for _, module in adapter_layers(model):
                if isinstance(module, TunerLayer) and module.bias is not None:
                    module.bias.requires_grad_(True)


def _wrap_modules_to_save(model: nn.Module, adapter_name: str, module_names: list[str], *, activate: bool,
                          inference_mode: bool) -> None:
    # peft's _set_trainable: a plain string suffix test on every module name, taken before any wrapping
    for key in [name for name, _ in model.named_modules(remove_duplicate=False)]:
        if not key or not any(key.endswith(target) for target in module_names):
            continue
        try:
            target = model.get_submodule(key)
        except AttributeError:
            continue  # inside a module that an earlier match already wrapped
        parent_name = key.rpartition(".")[0]
        grandparent_name = parent_name.rpartition(".")[0]
        grandparent = model.get_submodule(grandparent_name) if parent_name else None
        if isinstance(grandparent, TunerLayer):
            raise ValueError(
                f"modules_to_save entry matches {key!r}, a child of an adapter layer; make sure the adapter name "
                f"{adapter_name!r} does not clash with a module name"
            )
        if isinstance(target, ModulesToSaveWrapper):
            target.update(adapter_name)
            target.set_adapter(target.active_adapters, inference_mode=inference_mode)
            continue
        if isinstance(target, TunerLayer):
            raise ConfigError(f"module {key!r} is both targeted by the adapter and listed in modules_to_save")
        wrapper = ModulesToSaveWrapper(target, adapter_name)
        wrapper.set_adapter([adapter_name] if activate else [], inference_mode=inference_mode)
        _replace(model, key, wrapper)
