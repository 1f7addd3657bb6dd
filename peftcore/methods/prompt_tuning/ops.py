"""Prompt tuning's initialisation from real tokens (``peft``'s ``PromptEmbedding``, TEXT and SAMPLE_VOCAB).

The learned parameter is the ``(T·N, D)`` embedding table itself; its forward is a row lookup of
``arange(T·N)``, i.e. the table. Token ids come from any tokenizer the caller passes (TEXT) or from
the caller's random draw (SAMPLE_VOCAB): the core draws nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from peftcore._xp import Array, array_namespace
from peftcore.errors import ConfigError, ShapeMismatchError

__all__ = ["embeddings_for_token_ids", "text_init_token_ids", "tokenize_init_text"]


def text_init_token_ids(token_ids: Sequence[int], /, *, total_virtual_tokens: int) -> list[int]:
    """Exactly ``total_virtual_tokens`` ids: the first ones, or the ids repeated then cut (``peft``'s TEXT init)."""
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to no tokens; TEXT init needs at least one")
    repeats = -(-total_virtual_tokens // len(ids))
    return (ids * repeats)[:total_virtual_tokens]


def tokenize_init_text(tokenizer: Callable[[str], Any], text: str, /, *, total_virtual_tokens: int) -> list[int]:
    """``text_init_token_ids(tokenizer(text)["input_ids"])``: any Hugging Face style tokenizer (special tokens
    included, as ``peft`` calls it), or any callable returning a mapping with ``"input_ids"``."""
    encoded = tokenizer(text)
    try:
        ids = encoded["input_ids"]
    except (KeyError, TypeError, IndexError):
        raise ConfigError(
            f"tokenizer({text!r}) must return a mapping with 'input_ids', got {type(encoded).__name__}"
        ) from None
    return text_init_token_ids(ids, total_virtual_tokens=total_virtual_tokens)


def embeddings_for_token_ids(word_embeddings: Array, token_ids: Array, /) -> Array:
    """``word_embeddings[token_ids]`` as float32: ``(V, D)``, ``(T·N,)`` int -> ``(T·N, D)``.

    ``peft`` copies these rows (cast to float32) into the prompt embedding for TEXT and SAMPLE_VOCAB.
    """
    xp = array_namespace(word_embeddings, token_ids)
    if word_embeddings.ndim != 2 or token_ids.ndim != 1:
        raise ShapeMismatchError(
            f"embeddings_for_token_ids: word_embeddings {tuple(word_embeddings.shape)} must be (V, D) and "
            f"token_ids {tuple(token_ids.shape)} one-dimensional"
        )
    return xp.astype(xp.take(word_embeddings, token_ids, axis=0), xp.float32)
