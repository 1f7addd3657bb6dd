"""Factored adapter layers for model code: base layer plus the adapter's branch, never forming ``W + ΔW``.

``linear`` / ``embedding`` / ``conv`` take the base arrays and an optional module adapter (``LoraParams``,
``IA3Params``, ``AdaLoraParams``), or a sequence of them (several active adapters of one method); ``dense`` /
``embed`` / ``convolve`` take a module subtree (``{"weight": ..., "bias": ...}``, ``{"kernel": ...}``, or an
object with those attributes) and read its leaves through a ``Layout``. The method's layer function comes from
the method table (``peftcore_jax.methods``); LoRA's are here. The adapter math is the core's
(``peftcore.methods.lora.ops`` / ``dora``, ``ia3.ops``, ``adalora.ops``); only the base layer's own product is
computed here (``base_linear`` / ``base_conv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peftcore._conv import conv_nd
from peftcore.errors import ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.lora import dora, ops
from peftcore_jax.layout import Layout, get_layout, to_core
from peftcore_jax.methods import method_of_layer
from peftcore_jax.params import ModuleParams, LoraParams

__all__ = ["base_conv", "base_linear", "conv", "convolve", "dense", "embed", "embedding", "linear"]


Lora = ModuleParams | Sequence[ModuleParams] | None


def _as_tuple(lora: Lora) -> tuple[ModuleParams, ...]:
    """``lora`` as a tuple: one adapter, several active ones in order (peft's ``active_adapters``), or none."""
    if lora is None:
        return ()
    if isinstance(lora, (list, tuple)):
        return tuple(lora)
    return (lora,)


def _check_kind(mod: ModuleParams, kind: str) -> None:
    if mod.kind != kind:
        raise UnsupportedLayerError(f"a {mod.kind!r} adapter cannot be applied to a {kind} layer")


def _check_dora(lora: LoraParams) -> None:
    if lora.use_dora and lora.lora_B_bias is not None:
        raise UnsupportedLayerError("DoRA with lora_bias=True is not supported (peft does not support it either)")


def base_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None, *, fan_in_fan_out: bool) -> jax.Array:
    """The base Linear: ``x Wᵀ + b`` (``x W + b`` for a weight stored ``(in, out)``)."""
    result = jnp.matmul(x, weight if fan_in_fan_out else weight.T)
    return result if bias is None else result + bias


def base_conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None, *, stride: Any, padding: Any, dilation: Any,
              groups: int) -> jax.Array:
    """The base ConvNd in torch order: ``x (batch, in, *spatial)``, ``weight (out, in/groups, *k)``, bias per
    output channel."""
    result = conv_nd(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return result if bias is None else result + jnp.reshape(bias, (-1,) + (1,) * (weight.ndim - 2))


def dropout_keys(key: jax.Array | None, count: int) -> list[jax.Array | None]:
    """One dropout key per active adapter (peft gives each adapter its own dropout module)."""
    if key is None or count == 1:
        return [key] * count
    return [jax.random.fold_in(key, i) for i in range(count)]


def dropped(x: jax.Array, lora: Any, key: jax.Array | None) -> tuple[jax.Array, bool]:
    """``x`` through inverted dropout of rate ``lora.dropout`` when a ``key`` is given (peft's ``lora_dropout``).

    Returns ``(x', dropped)``.
    """
    if key is None or lora.dropout == 0.0:
        return x, False
    keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - lora.dropout), jnp.zeros_like(x)), True


def _add_adapters(result: jax.Array, loras: tuple[LoraParams, ...], update, dora_forward) -> jax.Array:
    """``result`` plus each adapter's contribution, in order, as peft's forward loops over its active adapters.

    Consecutive plain LoRA updates are accumulated and cast back once (peft's rounding); a DoRA adapter sees
    the running result as its base output, as in peft. ``update(i, lora)`` / ``dora_forward(i, lora, result)``
    compute adapter ``i``'s term.
    """
    pending: list[jax.Array] = []
    for i, lora in enumerate(loras):
        if lora.use_dora:
            if pending:
                result, pending = ops.accumulate(result, *pending), []
            result = dora_forward(i, lora, result)
        else:
            pending.append(update(i, lora))
    return ops.accumulate(result, *pending) if pending else result


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, lora: Lora = None, /, *,
           fan_in_fan_out: bool | None = None, key: jax.Array | None = None) -> jax.Array:
    """Base ``x Wᵀ + b`` with the adapter's branch, ``(..., in) -> (..., out)``.

    LoRA ``+ s·(x Aᵀ) Bᵀ`` (DoRA: peft's ``DoraLinearLayer``), AdaLoRA ``+ s·(x (A⊙E)ᵀ) Bᵀ``, (IA)³ scales the
    input (feed-forward) or the output. ``weight`` is ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out``
    (default: the adapter's flag, else False). ``lora`` may be a sequence: several active adapters of one method
    (peft's ``set_adapter([...])``). ``key`` switches on ``lora_dropout`` (LoRA, AdaLoRA) for training.
    """
    mods = _as_tuple(lora)
    if fan_in_fan_out is None:
        fan_in_fan_out = mods[0].fan_in_fan_out if mods else False
    for one in mods:
        _check_kind(one, "linear")
        if one.fan_in_fan_out != fan_in_fan_out:
            raise ShapeMismatchError(
                f"adapter made for fan_in_fan_out={one.fan_in_fan_out} applied to a weight {tuple(weight.shape)} "
                f"declared fan_in_fan_out={fan_in_fan_out}"
            )
    if not mods:
        return base_linear(x, weight, bias, fan_in_fan_out=fan_in_fan_out)
    return method_of_layer(mods, "linear").linear(x, weight, bias, mods, fan_in_fan_out=fan_in_fan_out, key=key)


def lora_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None, loras: tuple[LoraParams, ...], *,
                fan_in_fan_out: bool, key: jax.Array | None) -> jax.Array:
    """LoRA/DoRA's ``linear`` (the method table's entry)."""
    for one in loras:
        _check_dora(one)
    result = base_linear(x, weight, bias, fan_in_fan_out=fan_in_fan_out)
    # Tokens flattened to one axis: the factor gradients (gᵀh, dhᵀx) then contract over a single axis. Contracting
    # over (batch, seq) makes XLA:CPU materialise a transposed copy of the cotangent, fused with (and recomputing)
    # whatever produced it, e.g. SiLU's derivative after gate_proj (2-3x the step time; see bench/jax_lora.py).
    lead = x.shape[:-1]
    flat = jnp.reshape(x, (-1, x.shape[-1]))
    inputs = [dropped(flat, one, k) for one, k in zip(loras, dropout_keys(key, len(loras)))]

    def update(i, one):
        return ops.linear_update(inputs[i][0], one.lora_A, one.lora_B, one.lora_B_bias, scaling=one.scaling)

    def dora_forward(i, one, running):
        x_i, was_dropped = inputs[i]
        return dora.linear_forward(running, x_i, one.lora_A, one.lora_B, one.lora_magnitude_vector, weight, bias,
                                   scaling=one.scaling, fan_in_fan_out=fan_in_fan_out, recompute_base=was_dropped)

    out = _add_adapters(jnp.reshape(result, (-1, result.shape[-1])), loras, update, dora_forward)
    return jnp.reshape(out, (*lead, out.shape[-1]))


def embedding(indices: jax.Array, weight: jax.Array, lora: Lora = None, /, *,
              padding_idx: int | None = None, max_norm: float | None = None,
              embed_scale: float | jax.Array | None = None) -> jax.Array:
    """``W[idx] + s·(Aᵀ[idx]) Bᵀ`` for ``weight (num, dim)`` (DoRA: peft's ``DoraEmbeddingLayer``).

    ``padding_idx`` / ``max_norm`` / ``embed_scale`` are the base layer's, forwarded to the LoRA lookup as
    peft does; the base lookup itself is a plain gather (no renormalisation of the base table). ``lora`` may
    be a sequence of active adapters, as in ``linear``. Only LoRA adapts embeddings (as in peft).
    """
    mods = _as_tuple(lora)
    for one in mods:
        _check_kind(one, "embedding")
    options = dict(max_norm=max_norm, embed_scale=embed_scale, padding_idx=padding_idx)
    if not mods:
        return _base_embedding(indices, weight, embed_scale)
    return method_of_layer(mods, "embedding").embedding(indices, weight, mods, **options)


def _base_embedding(indices: jax.Array, weight: jax.Array, embed_scale: Any) -> jax.Array:
    result = jnp.take(weight, indices, axis=0)
    return result if embed_scale is None else result * embed_scale


def lora_embedding(indices: jax.Array, weight: jax.Array, loras: tuple[LoraParams, ...], *,
                   padding_idx: int | None, max_norm: float | None, embed_scale: Any) -> jax.Array:
    """LoRA/DoRA's ``embedding`` (the method table's entry)."""
    for one in loras:
        _check_dora(one)
    result = _base_embedding(indices, weight, embed_scale)
    options = dict(max_norm=max_norm, embed_scale=embed_scale, padding_idx=padding_idx)

    def update(i, one):
        return ops.embedding_update(indices, one.lora_A, one.lora_B, scaling=one.scaling, **options)

    def dora_forward(i, one, running):
        return dora.embedding_forward(running, indices, one.lora_A, one.lora_B, one.lora_magnitude_vector, weight,
                                      scaling=one.scaling, **options)

    return _add_adapters(result, loras, update, dora_forward)


def conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, lora: Lora = None, /, *,
         stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] | str = 0,
         dilation: int | tuple[int, ...] = 1, groups: int = 1, key: jax.Array | None = None) -> jax.Array:
    """Torch-ordered ConvNd ``x (batch, in, *spatial)``, ``weight (out, in/groups, *k)`` with the adapter's branch.

    LoRA ``+ s·convB(convA(x))``, AdaLoRA ``+ conv(x, s·B(A⊙E))``, (IA)³ scales input or output channels.
    ``lora`` may be a sequence of active adapters, as in ``linear``.
    """
    mods = _as_tuple(lora)
    for one in mods:
        _check_kind(one, "conv")
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if not mods:
        return base_conv(x, weight, bias, **options)
    return method_of_layer(mods, "conv").conv(x, weight, bias, mods, key=key, **options)


def lora_conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None, loras: tuple[LoraParams, ...], *,
              stride: Any, padding: Any, dilation: Any, groups: int, key: jax.Array | None) -> jax.Array:
    """LoRA/DoRA's ``conv`` (the method table's entry)."""
    for one in loras:
        _check_dora(one)
    result = base_conv(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    inputs = [dropped(x, one, k) for one, k in zip(loras, dropout_keys(key, len(loras)))]

    def update(i, one):
        return ops.conv_update(inputs[i][0], one.lora_A, one.lora_B, one.lora_B_bias, scaling=one.scaling,
                               stride=stride, padding=padding, groups=groups)

    def dora_forward(i, one, running):
        x_i, was_dropped = inputs[i]
        return dora.conv_forward(running, x_i, one.lora_A, one.lora_B, one.lora_magnitude_vector, weight, bias,
                                 scaling=one.scaling, stride=stride, padding=padding, dilation=dilation,
                                 groups=groups, recompute_base=was_dropped)

    return _add_adapters(result, loras, update, dora_forward)


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


def dense(x: jax.Array, module: Any, lora: Lora = None, /, *, layout: str | Layout = "torch",
          key: jax.Array | None = None) -> jax.Array:
    """``linear`` on a module subtree: its weight leaf and orientation come from ``layout``, its bias if present.

    A torch-layout module adapted under ``fan_in_fan_out=True`` (GPT-2 ``Conv1D``) follows the adapter's flag.
    """
    layout = get_layout(layout)
    spec, weight = _spec_of(module, layout, "linear")
    loras = _as_tuple(lora)
    fan_in_fan_out = loras[0].fan_in_fan_out if loras else spec.fan_in_fan_out
    return linear(x, weight, _leaf(module, layout.bias_leaf), loras, fan_in_fan_out=fan_in_fan_out, key=key)


def embed(indices: jax.Array, module: Any, lora: Lora = None, /, *, layout: str | Layout = "torch",
          **options: Any) -> jax.Array:
    """``embedding`` on a module subtree (weight leaf per ``layout``); ``options`` as ``embedding``'s keywords."""
    layout = get_layout(layout)
    spec, weight = _spec_of(module, layout, "embedding")
    return embedding(indices, to_core(weight, spec), lora, **options)


def convolve(x: jax.Array, module: Any, lora: Lora = None, /, *, layout: str | Layout = "torch",
             channels_last: bool | None = None, stride: int | tuple[int, ...] = 1,
             padding: int | tuple[int, ...] | str = 0, dilation: int | tuple[int, ...] = 1, groups: int = 1,
             key: jax.Array | None = None) -> jax.Array:
    """``conv`` on a module subtree: the kernel leaf and its axis order come from ``layout``, the bias if present.

    ``x`` is ``(batch, in, *spatial)``, or ``(batch, *spatial, in)`` when ``channels_last`` (default: True for
    the flax layout, as ``flax.linen.Conv`` takes it; the output follows the same convention). ``padding``
    strings are case-insensitive (flax's ``"SAME"``/``"VALID"``, torch's semantics: ``"same"`` needs stride 1).
    """
    layout = get_layout(layout)
    spec, weight = _spec_of(module, layout, "conv")
    channels_last = layout.name == "flax" if channels_last is None else channels_last
    if isinstance(padding, str):
        padding = padding.lower()
    if channels_last:
        x = jnp.moveaxis(x, -1, 1)
    y = conv(x, to_core(weight, spec), _leaf(module, layout.bias_leaf), lora, stride=stride, padding=padding,
             dilation=dilation, groups=groups, key=key)
    return jnp.moveaxis(y, 1, -1) if channels_last else y
