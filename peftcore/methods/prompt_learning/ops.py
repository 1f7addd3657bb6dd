"""Shared prompt-learning arithmetic: virtual tokens in front of the input, and the key/value prefix layout.

Mirrors the prompt-learning branches of ``peft``'s ``PeftModelForCausalLM`` / ``PeftModelForSeq2SeqLM`` /
``PeftModelForSequenceClassification`` ``forward`` and the legacy tuple ``PeftModel.get_prompt`` builds
before it wraps it in a transformers ``Cache``. Everything is jit-safe: no branch on array values.
"""

from __future__ import annotations

import array_api_compat

from peftcore._xp import Array, array_namespace
from peftcore.errors import ConfigError, ShapeMismatchError

__all__ = [
    "IGNORE_INDEX",
    "extend_attention_mask",
    "extend_labels",
    "extend_token_type_ids",
    "past_key_values_layout",
    "prepend_virtual_tokens",
    "split_seq2seq_prompts",
]

#: label of a virtual token: ignored by transformers' cross-entropy
IGNORE_INDEX = -100


def prepend_virtual_tokens(prompts: Array, inputs_embeds: Array, /) -> Array:
    """``concat([prompts, inputs_embeds], axis=1)``: ``(B, S, D)`` -> ``(B, T+S, D)``.

    ``prompts`` ``(T, D)``, ``(1, T, D)`` or ``(B, T, D)`` is broadcast over the batch and cast to the
    dtype of ``inputs_embeds`` (``peft``: ``prompts.to(inputs_embeds.dtype)``).
    """
    xp = array_namespace(prompts, inputs_embeds)
    if inputs_embeds.ndim != 3 or prompts.ndim not in (2, 3) or prompts.shape[-1] != inputs_embeds.shape[-1]:
        raise ShapeMismatchError(
            f"prepend_virtual_tokens: prompts {tuple(prompts.shape)} must be (T, D) or (B, T, D) and inputs_embeds "
            f"{tuple(inputs_embeds.shape)} (B, S, D) with the same D"
        )
    batch = inputs_embeds.shape[0]
    if prompts.ndim == 2:
        prompts = prompts[None, ...]
    if prompts.shape[0] not in (1, batch):
        raise ShapeMismatchError(f"prepend_virtual_tokens: prompts batch {prompts.shape[0]} != inputs batch {batch}")
    prompts = xp.broadcast_to(xp.astype(prompts, inputs_embeds.dtype), (batch, *prompts.shape[1:]))
    return xp.concat([prompts, inputs_embeds], axis=1)


def _prepend_constant(values: Array, /, *, num_virtual_tokens: int, fill: int, name: str) -> Array:
    xp = array_namespace(values)
    if values.ndim != 2:
        raise ShapeMismatchError(f"{name} must be (batch, seq_len), got {tuple(values.shape)}")
    if num_virtual_tokens < 0:
        raise ConfigError(f"num_virtual_tokens must be >= 0, got {num_virtual_tokens}")
    device = array_api_compat.device(values)
    head = xp.full((values.shape[0], num_virtual_tokens), fill, dtype=values.dtype, device=device)
    return xp.concat([head, values], axis=1)


def extend_attention_mask(attention_mask: Array, /, *, num_virtual_tokens: int) -> Array:
    """``concat([ones(B, T), mask], axis=1)`` in the mask's dtype: virtual tokens are always attended.

    ``peft`` concatenates a float32 ``torch.ones``, so its mask turns float32; the values are the same.
    """
    return _prepend_constant(attention_mask, num_virtual_tokens=num_virtual_tokens, fill=1, name="attention_mask")


def extend_labels(labels: Array, /, *, num_virtual_tokens: int, ignore_index: int = IGNORE_INDEX) -> Array:
    """``concat([full(B, T, -100), labels], axis=1)``: no loss on the virtual tokens (``peft`` causal LM)."""
    return _prepend_constant(labels, num_virtual_tokens=num_virtual_tokens, fill=ignore_index, name="labels")


def extend_token_type_ids(token_type_ids: Array, /, *, num_virtual_tokens: int) -> Array:
    """``concat([zeros(B, T), token_type_ids], axis=1)`` (``peft`` sequence classification)."""
    return _prepend_constant(token_type_ids, num_virtual_tokens=num_virtual_tokens, fill=0, name="token_type_ids")


def split_seq2seq_prompts(prompts: Array, /, *, num_virtual_tokens: int) -> tuple[Array, Array]:
    """``(prompts[:, :T], prompts[:, T:])``: encoder and decoder virtual tokens of an encoder-decoder model.

    ``prompts`` ``(B, 2T, D)`` from a config with ``num_transformer_submodules == 2`` (``peft``'s
    ``PeftModelForSeq2SeqLM``: the first T go before the encoder input, the rest before the decoder's).
    """
    if prompts.ndim != 3 or prompts.shape[1] != 2 * num_virtual_tokens:
        raise ShapeMismatchError(
            f"split_seq2seq_prompts: prompts {tuple(prompts.shape)} must be (B, 2*{num_virtual_tokens}, D)"
        )
    return prompts[:, :num_virtual_tokens, ...], prompts[:, num_virtual_tokens:, ...]


def past_key_values_layout(
    prefix: Array,
    /,
    *,
    num_layers: int,
    num_attention_heads: int,
    token_dim: int,
    num_transformer_submodules: int = 1,
    batch_size: int | None = None,
    dtype=None,
) -> tuple[tuple[Array, ...], ...]:
    """The per-layer key/value prefix exactly as ``peft``'s ``get_prompt`` lays it out.

    ``prefix`` ``(T, 2·L·D)`` (broadcast to ``batch_size``, default 1) or ``(B, T, 2·L·D)``, cast to
    ``dtype`` first (``peft``: the base model's dtype). ``peft`` views it as ``(B, T, 2L, H, hd)``
    (``hd = D // H``), repeats axis 2 ``N`` times, permutes to ``(2LN, B, H, T, hd)`` and splits it
    in chunks of ``2N``. So entry ``(l, j)`` of the result is slice ``(2N·l + j) mod 2L`` of axis 2,
    as ``(B, H, T, hd)``:

    * N = 1: ``L`` pairs ``(key_l, value_l)`` -> ``DynamicCache``;
    * N = 2: ``L`` 4-tuples ``(k, v, k', v')`` of slices ``4l..4l+3 mod 2L`` -> ``EncoderDecoderCache``,
      whose cross-attention half ``peft`` then discards.
    """
    xp = array_namespace(prefix)
    if num_transformer_submodules not in (1, 2):
        raise ConfigError(f"num_transformer_submodules must be 1 or 2, got {num_transformer_submodules}")
    if token_dim % num_attention_heads:
        raise ShapeMismatchError(
            f"token_dim {token_dim} is not a multiple of num_attention_heads {num_attention_heads}"
        )
    width = 2 * num_layers * token_dim
    if prefix.ndim not in (2, 3) or prefix.shape[-1] != width:
        raise ShapeMismatchError(
            f"prefix {tuple(prefix.shape)} must be (T, {width}) or (B, T, {width}) = 2*num_layers*token_dim"
        )
    if dtype is not None:
        prefix = xp.astype(prefix, dtype)
    if prefix.ndim == 2:
        prefix = xp.broadcast_to(prefix[None, ...], (1 if batch_size is None else batch_size, *prefix.shape))
    elif batch_size is not None and batch_size != prefix.shape[0]:
        raise ShapeMismatchError(f"prefix batch {prefix.shape[0]} != batch_size {batch_size}")
    batch, tokens = prefix.shape[0], prefix.shape[1]
    head_dim = token_dim // num_attention_heads
    # (B, T, 2L, H, hd) -> (2L, B, H, T, hd): slice s of axis 0 is key (s even) or value (s odd) of layer s // 2
    slices = xp.permute_dims(
        xp.reshape(prefix, (batch, tokens, 2 * num_layers, num_attention_heads, head_dim)), (2, 0, 3, 1, 4)
    )
    chunk = 2 * num_transformer_submodules
    return tuple(
        tuple(slices[(chunk * layer + j) % (2 * num_layers), ...] for j in range(chunk))
        for layer in range(num_layers)
    )
