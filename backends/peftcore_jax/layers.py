"""Factored adapter layers for model code: base layer plus LoRA/DoRA branch, never forming ``W + ΔW``.

``linear`` / ``embedding`` / ``conv`` take the base arrays and an optional ``LoraParams``; ``dense`` / ``embed``
take a module subtree (``{"weight": ..., "bias": ...}``, ``{"kernel": ...}``, or an object with those
attributes) and read its leaves through a ``Layout``. The adapter math is the core's
(``peftcore.methods.lora.ops`` / ``dora``); only the base layer's own product is computed here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from peftcore._conv import conv_nd
from peftcore.errors import ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.lora import dora, ops
from peftcore_jax.layout import Layout, get_layout, to_core
from peftcore_jax.params import LoraParams

__all__ = ["conv", "dense", "embed", "embedding", "linear"]


def _check_kind(lora: LoraParams, kind: str) -> None:
    if lora.kind != kind:
        raise UnsupportedLayerError(f"a {lora.kind!r} adapter cannot be applied to a {kind} layer")
    if lora.use_dora and lora.lora_B_bias is not None:
        raise UnsupportedLayerError("DoRA with lora_bias=True is not supported (peft does not support it either)")


def _dropped(x: jax.Array, lora: LoraParams, key: jax.Array | None) -> tuple[jax.Array, bool]:
    """``x`` through inverted dropout of rate ``lora.dropout`` when a ``key`` is given (peft's ``lora_dropout``)."""
    if key is None or lora.dropout == 0.0:
        return x, False
    keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - lora.dropout), jnp.zeros_like(x)), True


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, lora: LoraParams | None = None, /, *,
           fan_in_fan_out: bool | None = None, key: jax.Array | None = None) -> jax.Array:
    """``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` (DoRA: peft's ``DoraLinearLayer``), ``(..., in) -> (..., out)``.

    ``weight`` is ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out`` (default: the adapter's flag, else
    False). ``key`` switches on ``lora_dropout`` for the LoRA branch (training), as peft's dropout does.
    """
    fan_in_fan_out = (lora.fan_in_fan_out if lora is not None else False) if fan_in_fan_out is None else fan_in_fan_out
    if lora is not None:
        _check_kind(lora, "linear")
        if lora.fan_in_fan_out != fan_in_fan_out:
            raise ShapeMismatchError(
                f"adapter made for fan_in_fan_out={lora.fan_in_fan_out} applied to a weight {tuple(weight.shape)} "
                f"declared fan_in_fan_out={fan_in_fan_out}"
            )
    result = jnp.matmul(x, weight if fan_in_fan_out else weight.T)
    if bias is not None:
        result = result + bias
    if lora is None:
        return result
    x_lora, dropped = _dropped(x, lora, key)
    if lora.use_dora:
        return dora.linear_forward(result, x_lora, lora.lora_A, lora.lora_B, lora.lora_magnitude_vector, weight, bias,
                                   scaling=lora.scaling, fan_in_fan_out=fan_in_fan_out, recompute_base=dropped)
    return ops.linear_forward(result, x_lora, lora.lora_A, lora.lora_B, lora.lora_B_bias, scaling=lora.scaling)


def embedding(indices: jax.Array, weight: jax.Array, lora: LoraParams | None = None, /, *,
              padding_idx: int | None = None, max_norm: float | None = None,
              embed_scale: float | jax.Array | None = None) -> jax.Array:
    """``W[idx] + s·(Aᵀ[idx]) Bᵀ`` for ``weight (num, dim)`` (DoRA: peft's ``DoraEmbeddingLayer``).

    ``padding_idx`` / ``max_norm`` / ``embed_scale`` are the base layer's, forwarded to the LoRA lookup as
    peft does; the base lookup itself is a plain gather (no renormalisation of the base table).
    """
    result = jnp.take(weight, indices, axis=0)
    if embed_scale is not None:
        result = result * embed_scale
    if lora is None:
        return result
    _check_kind(lora, "embedding")
    if lora.use_dora:
        return dora.embedding_forward(result, indices, lora.lora_A, lora.lora_B, lora.lora_magnitude_vector, weight,
                                      scaling=lora.scaling, embed_scale=embed_scale, max_norm=max_norm,
                                      padding_idx=padding_idx)
    return ops.embedding_forward(result, indices, lora.lora_A, lora.lora_B, scaling=lora.scaling,
                                 max_norm=max_norm, embed_scale=embed_scale, padding_idx=padding_idx)


def conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, lora: LoraParams | None = None, /, *,
         stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] | str = 0,
         dilation: int | tuple[int, ...] = 1, groups: int = 1, key: jax.Array | None = None) -> jax.Array:
    """Torch-ordered ConvNd ``x (batch, in, *spatial)``, ``weight (out, in/groups, *k)`` plus ``s·convB(convA(x))``."""
    result = conv_nd(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if bias is not None:
        result = result + jnp.reshape(bias, (-1,) + (1,) * (weight.ndim - 2))
    if lora is None:
        return result
    _check_kind(lora, "conv")
    x_lora, dropped = _dropped(x, lora, key)
    if lora.use_dora:
        return dora.conv_forward(result, x_lora, lora.lora_A, lora.lora_B, lora.lora_magnitude_vector, weight, bias,
                                 scaling=lora.scaling, stride=stride, padding=padding, dilation=dilation,
                                 groups=groups, recompute_base=dropped)
    return ops.conv_forward(result, x_lora, lora.lora_A, lora.lora_B, lora.lora_B_bias, scaling=lora.scaling,
                            stride=stride, padding=padding, groups=groups)


def _leaf(module: Any, name: str) -> Any:
    if isinstance(module, dict):
        return module.get(name)
    try:
        return module[name]
    except (TypeError, KeyError, IndexError):
        return getattr(module, name, None)


def _spec_of(module: Any, layout: Layout, kind: str):
    for spec in layout.specs:
        if spec.kind == kind and _leaf(module, spec.leaf) is not None:
            return spec, _leaf(module, spec.leaf)
    leaves = sorted({s.leaf for s in layout.specs if s.kind == kind})
    raise UnsupportedLayerError(f"module has no {kind} weight leaf {leaves} under the {layout.name!r} layout")


def dense(x: jax.Array, module: Any, lora: LoraParams | None = None, /, *, layout: str | Layout = "torch",
          key: jax.Array | None = None) -> jax.Array:
    """``linear`` on a module subtree: its weight leaf and orientation come from ``layout``, its bias if present.

    A torch-layout module adapted under ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``) follows the adapter's flag.
    """
    layout = get_layout(layout)
    spec, weight = _spec_of(module, layout, "linear")
    fan_in_fan_out = lora.fan_in_fan_out if lora is not None else spec.fan_in_fan_out
    return linear(x, weight, _leaf(module, layout.bias_leaf), lora, fan_in_fan_out=fan_in_fan_out, key=key)


def embed(indices: jax.Array, module: Any, lora: LoraParams | None = None, /, *, layout: str | Layout = "torch",
          **options: Any) -> jax.Array:
    """``embedding`` on a module subtree (weight leaf per ``layout``); ``options`` as ``embedding``'s keywords."""
    layout = get_layout(layout)
    spec, weight = _spec_of(module, layout, "embedding")
    return embedding(indices, to_core(weight, spec), lora, **options)
