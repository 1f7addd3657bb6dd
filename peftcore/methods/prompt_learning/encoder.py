"""The prompt encoders of the three methods, as functions of peft-named parameters.

``params`` maps the parameter names of ``peft``'s prompt encoder module (``embedding.weight``,
``transform.0.weight``, ``mlp_head.4.bias``, ``lstm_head.weight_ih_l0_reverse``, ...) to arrays, so a
torch ``prompt_encoder.named_parameters()`` and a JAX dict hold the same keys. Mirrors
``PeftModel.get_prompt``, ``get_prompt_embedding_to_save`` and ``BasePromptEncoder._load_adapter_state_dict``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

from peftcore._xp import Array, array_namespace
from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.methods.p_tuning import ops as p_tuning_ops
from peftcore.methods.prefix_tuning import ops as prefix_ops
from peftcore.methods.prompt_learning.config import PromptLearningConfig
from peftcore.methods.prompt_learning.ops import past_key_values_layout

__all__ = [
    "encode_prompt",
    "get_prompt",
    "init_params",
    "load_prompt_embeddings",
    "parameter_shapes",
    "prompt_embeddings_to_save",
]

#: ``peft``'s warning when the MLP encoder is given another ``encoder_num_layers``
MLP_LAYERS_WARNING = (
    "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."
)
_KNOWN = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")


def _peft_type(config: Any) -> str:
    if not isinstance(config, PromptLearningConfig):
        raise ConfigError(f"expected a prompt-learning config, got {type(config).__name__}")
    peft_type = str(config.peft_type)
    if peft_type not in _KNOWN:
        raise ConfigError(f"peftcore's prompt encoders cover {list(_KNOWN)}, not {peft_type}")
    for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers", "num_attention_heads"):
        if getattr(config, name) is None:
            raise ConfigError(
                f"{type(config).__name__}.{name} is None; fill it with prepare_config(config, model_config)"
            )
    if peft_type != "PROMPT_TUNING" and config.encoder_hidden_size is None:
        raise ConfigError(f"{type(config).__name__}.encoder_hidden_size is None; fill it with prepare_config")
    return peft_type


def _is_projected(config: Any) -> bool:
    return bool(config.prefix_projection) and not config.inference_mode


def parameter_shapes(config: PromptLearningConfig, /) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters ``peft`` gives this (prepared) config's prompt encoder.

    ``inference_mode`` configs get only ``embedding.weight``, shaped like ``prompt_embeddings``.
    """
    peft_type = _peft_type(config)
    tokens, dim = config.num_virtual_tokens, config.token_dim
    if peft_type == "PREFIX_TUNING":
        width = 2 * config.num_layers * dim
        if not _is_projected(config):
            return {"embedding.weight": (tokens, width)}
        hidden = config.encoder_hidden_size
        return {
            "embedding.weight": (tokens, dim),
            "transform.0.weight": (hidden, dim), "transform.0.bias": (hidden,),
            "transform.2.weight": (width, hidden), "transform.2.bias": (width,),
        }
    shapes = {"embedding.weight": (config.total_virtual_tokens, dim)}
    if peft_type == "PROMPT_TUNING" or config.inference_mode:
        return shapes
    hidden = config.encoder_hidden_size
    if str(config.encoder_reparameterization_type) == "MLP":
        if config.encoder_num_layers != 2:
            warnings.warn(MLP_LAYERS_WARNING, UserWarning, stacklevel=2)
        for index, (rows, cols) in zip((0, 2, 4), ((hidden, dim), (hidden, hidden), (dim, hidden))):
            shapes[f"mlp_head.{index}.weight"], shapes[f"mlp_head.{index}.bias"] = (rows, cols), (rows,)
        return shapes
    for name in p_tuning_ops.lstm_parameter_names(config.encoder_num_layers):
        layer = int(name.split("_l")[-1].split("_")[0])
        if name.startswith("weight_ih"):
            shape = (4 * hidden, dim if layer == 0 else 2 * hidden)
        elif name.startswith("weight_hh"):
            shape = (4 * hidden, hidden)
        else:
            shape = (4 * hidden,)
        shapes[f"lstm_head.{name}"] = shape
    for index, (rows, cols) in zip((0, 2), ((2 * hidden, 2 * hidden), (dim, 2 * hidden))):
        shapes[f"mlp_head.{index}.weight"], shapes[f"mlp_head.{index}.bias"] = (rows, cols), (rows,)
    return shapes


def init_params(config: PromptLearningConfig, /, *, sampler: Any, dtype: Any) -> dict[str, Array]:
    """Fresh parameters with torch's default initialisation, drawn from ``sampler`` (a ``peftcore.random.Sampler``).

    ``nn.Embedding`` N(0, 1); ``nn.Linear`` weight and bias U(±1/√fan_in); ``nn.LSTM`` every tensor
    U(±1/√E); prefix ``init_weights="zero"``: the last projection layer (or the table) is zero. TEXT and
    SAMPLE_VOCAB prompt tuning then replace ``embedding.weight`` with
    :func:`peftcore.methods.prompt_tuning.embeddings_for_token_ids`.
    """
    shapes = parameter_shapes(config)
    zeroed = set()
    if str(config.peft_type) == "PREFIX_TUNING" and config.init_weights == "zero":
        zeroed = {"transform.2.weight", "transform.2.bias"} if _is_projected(config) else {"embedding.weight"}
    params = {}
    for name, shape in shapes.items():
        if name == "embedding.weight":
            params[name] = sampler.normal(shape, std=1.0, dtype=dtype)
        else:
            if name.startswith("lstm_head."):
                fan_in = config.encoder_hidden_size
            else:
                fan_in = shapes[name.rsplit(".", 1)[0] + ".weight"][1]
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = sampler.uniform(shape, low=-bound, high=bound, dtype=dtype)
        if name in zeroed:
            # torch draws first and zeroes afterwards; keep the draw so later tensors see the same stream
            params[name] = array_namespace(params[name]).zeros_like(params[name])
    return params


def _check_params(params: Mapping[str, Array], config: PromptLearningConfig) -> None:
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ShapeMismatchError(f"prompt encoder parameters missing {missing} for {type(config).__name__}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ShapeMismatchError(
                f"prompt encoder parameter {name!r} has shape {tuple(params[name].shape)}, expected {shape}"
            )


def encode_prompt(params: Mapping[str, Array], /, *, config: PromptLearningConfig) -> Array:
    """The encoder applied to every virtual token, without a batch axis (``prompt_encoder(arange(...))[0]``).

    PROMPT_TUNING ``(T·N, D)``: the table; P_TUNING ``(T·N, D)``: ``mlp_head(table)`` or
    ``mlp_head(lstm(table))``; PREFIX_TUNING ``(T, 2·L·D)``: the table or ``transform(table)``. With
    ``inference_mode`` (a loaded adapter) the table is returned as is: it already holds the output.
    """
    peft_type = _peft_type(config)
    _check_params(params, config)
    table = params["embedding.weight"]
    if config.inference_mode or peft_type == "PROMPT_TUNING":
        return table
    if peft_type == "PREFIX_TUNING":
        if not _is_projected(config):
            return table
        p = [params[f"transform.{i}.{kind}"] for i in (0, 2) for kind in ("weight", "bias")]
        return prefix_ops.prefix_projection(table, *p)
    if str(config.encoder_reparameterization_type) == "MLP":
        p = [params[f"mlp_head.{i}.{kind}"] for i in (0, 2, 4) for kind in ("weight", "bias")]
        return p_tuning_ops.mlp_head(table, *p)
    lstm_params = {name.removeprefix("lstm_head."): v for name, v in params.items() if name.startswith("lstm_head.")}
    hidden = p_tuning_ops.lstm(table, lstm_params, num_layers=config.encoder_num_layers)
    p = [params[f"mlp_head.{i}.{kind}"] for i in (0, 2) for kind in ("weight", "bias")]
    return p_tuning_ops.lstm_mlp_head(hidden, *p)


def get_prompt(
    params: Mapping[str, Array], /, *, config: PromptLearningConfig, batch_size: int, dtype: Any = None
) -> Array | tuple[tuple[Array, ...], ...]:
    """``peft``'s ``PeftModel.get_prompt`` in legacy form (no ``Cache`` object), cast to ``dtype`` if given.

    PROMPT_TUNING / P_TUNING: ``(B, T·N, D)``, the encoded prompt broadcast over the batch.
    PREFIX_TUNING: :func:`past_key_values_layout` of the encoded prefix.
    """
    encoded = encode_prompt(params, config=config)
    xp = array_namespace(encoded)
    if dtype is not None:
        encoded = xp.astype(encoded, dtype)
    if str(config.peft_type) == "PREFIX_TUNING":
        return past_key_values_layout(
            encoded, num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            token_dim=config.token_dim, num_transformer_submodules=config.num_transformer_submodules,
            batch_size=batch_size,
        )
    return xp.broadcast_to(encoded[None, ...], (batch_size, *encoded.shape))


def prompt_embeddings_to_save(params: Mapping[str, Array], /, *, config: PromptLearningConfig) -> Array:
    """The one tensor ``peft`` saves, under the key ``prompt_embeddings``: :func:`encode_prompt`'s output.

    (``peft``: ``embedding.weight`` in inference mode, else ``get_prompt_embedding_to_save``.)
    """
    return encode_prompt(params, config=config)


def load_prompt_embeddings(prompt_embeddings: Array, /, *, config: PromptLearningConfig) -> dict[str, Array]:
    """``{"embedding.weight": prompt_embeddings}``: a saved adapter's parameters (used with ``inference_mode``).

    ``ShapeMismatchError`` unless the shape is what this config saves: ``(T·N, D)``, or ``(T, 2·L·D)``
    for prefix tuning (``peft`` loads it into the table with ``strict=True``).
    """
    _peft_type(config)
    expected = parameter_shapes(_inference_view(config))["embedding.weight"]
    if tuple(prompt_embeddings.shape) != expected:
        raise ShapeMismatchError(
            f"prompt_embeddings has shape {tuple(prompt_embeddings.shape)}, but this {type(config).__name__} "
            f"saves {expected}"
        )
    return {"embedding.weight": prompt_embeddings}


def _inference_view(config: PromptLearningConfig) -> PromptLearningConfig:
    if config.inference_mode:
        return config
    view = dataclasses.replace(config, inference_mode=True)
    view.unknown_fields = dict(config.unknown_fields)
    return view
