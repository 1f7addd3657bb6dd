"""Filling a prompt-learning config from the base model's config, as ``peft`` does when it adds the adapter.

Mirrors ``peft.utils.other._prepare_prompt_learning_config`` and the ``num_transformer_submodules``
rule of ``PeftModel._setup_prompt_encoder``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from peftcore.errors import ConfigError
from peftcore.methods.prompt_learning.config import PromptLearningConfig

__all__ = ["prepare_config"]

_NUM_LAYERS_KEYS = ("num_hidden_layers", "num_layers", "n_layer")
_TOKEN_DIM_KEYS = ("hidden_size", "n_embd", "d_model")
_NUM_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
#: methods whose key/value prefix must match the model's key/value heads (peft #1901)
_KV_PREFIX_TYPES = frozenset({"PREFIX_TUNING", "CARTRIDGE"})


def _as_dict(model_config: Any) -> dict[str, Any]:
    if hasattr(model_config, "to_dict"):
        data = model_config.to_dict()
    elif isinstance(model_config, Mapping):
        data = dict(model_config)
    else:
        raise ConfigError(
            f"model_config must be a mapping or a transformers config with to_dict(), got {type(model_config).__name__}"
        )
    text_config = data.get("text_config")
    return dict(text_config) if isinstance(text_config, Mapping) else data


def _first(data: Mapping[str, Any], keys: tuple[str, ...], field: str) -> Any:
    for key in keys:
        if key in data:
            return data[key]
    raise ConfigError(f"Please specify `{field}` in `peft_config` (the model config has none of {list(keys)})")


def _kv_geometry(data: Mapping[str, Any], token_dim: int, num_attention_heads: int) -> tuple[int, int]:
    """``(head_dim, num_key_value_heads)`` of the prefix, provisioned for the widest key/value layer."""
    if data.get("global_head_dim") is not None:
        return data["global_head_dim"], data.get("num_global_key_value_heads") or data["num_key_value_heads"]
    if data.get("per_layer_config") is not None:
        head_dim = data.get("head_dim", token_dim // num_attention_heads)
        num_kv_heads = data["num_key_value_heads"]
        for layer in data["per_layer_config"].values():
            layer_head_dim = layer.get("head_dim", head_dim)
            if layer_head_dim > head_dim:
                head_dim, num_kv_heads = layer_head_dim, layer.get("num_key_value_heads", data["num_key_value_heads"])
        return head_dim, num_kv_heads
    if data.get("head_dim") is not None:
        return data["head_dim"], data["num_key_value_heads"]
    return token_dim // num_attention_heads, data["num_key_value_heads"]


def prepare_config(
    config: PromptLearningConfig, model_config: Any, /, *, task_type: Any = None
) -> PromptLearningConfig:
    """A copy of ``config`` whose unset geometry is read from ``model_config``.

    ``model_config``: a mapping (``PretrainedConfig.to_dict()``) or a transformers config object
    (its ``num_hidden_layers`` attribute is preferred, as ``peft`` does); a ``text_config`` entry
    (vision-language models) is used in its place. Filled when ``None``:
    ``num_layers`` <- num_hidden_layers | num_layers | n_layer; ``token_dim`` <- hidden_size | n_embd |
    d_model; ``num_attention_heads`` <- num_attention_heads | n_head | num_heads | encoder_attention_heads;
    ``encoder_hidden_size`` <- ``token_dim``; ``num_transformer_submodules`` <- 2 for ``SEQ_2_SEQ_LM``
    (``task_type``, else ``config.task_type``), else 1. Prefix tuning on a model with
    ``num_key_value_heads`` always gets ``token_dim = head_dim * kv_heads`` and ``num_attention_heads =
    kv_heads`` (grouped-query attention), overriding given values as ``peft`` does.
    """
    if not isinstance(config, PromptLearningConfig):
        raise ConfigError(f"prepare_config fills prompt-learning configs, got {type(config).__name__}")
    data = _as_dict(model_config)
    changes: dict[str, Any] = {}

    num_layers = config.num_layers
    if num_layers is None:
        attribute = getattr(model_config, "num_hidden_layers", None) if not isinstance(model_config, Mapping) else None
        num_layers = attribute if attribute is not None else _first(data, _NUM_LAYERS_KEYS, "num_layers")
    token_dim = config.token_dim if config.token_dim is not None else _first(data, _TOKEN_DIM_KEYS, "token_dim")
    num_heads = config.num_attention_heads
    if num_heads is None:
        num_heads = _first(data, _NUM_HEADS_KEYS, "num_attention_heads")
    if str(config.peft_type) in _KV_PREFIX_TYPES and "num_key_value_heads" in data:
        if data["num_key_value_heads"] is None:
            raise ConfigError("model config has num_key_value_heads=None; set token_dim and num_attention_heads")
        head_dim, num_kv_heads = _kv_geometry(data, token_dim, num_heads)
        token_dim, num_heads = head_dim * num_kv_heads, num_kv_heads
    changes.update(num_layers=num_layers, token_dim=token_dim, num_attention_heads=num_heads)

    if "encoder_hidden_size" in config.field_names() and getattr(config, "encoder_hidden_size") is None:
        changes["encoder_hidden_size"] = token_dim
    if config.num_transformer_submodules is None:
        task = getattr(task_type, "value", task_type) or getattr(config.task_type, "value", config.task_type)
        changes["num_transformer_submodules"] = 2 if task == "SEQ_2_SEQ_LM" else 1

    prepared = dataclasses.replace(config, **changes)
    prepared.unknown_fields = dict(config.unknown_fields)
    return prepared
