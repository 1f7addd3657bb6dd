"""Prompt tuning, prefix tuning and P-tuning for JAX models: the adapter as a pytree, and peft's files.

A ``PromptAdapter`` holds the prompt encoder's parameters under ``peft``'s names (``embedding.weight``,
``transform.0.weight``, ``mlp_head.4.bias``, ``lstm_head.weight_ih_l0_reverse``, ...) as array leaves and its
prepared config as static data, so ``jax.grad`` sees only the encoder and ``jax.jit`` caches on the config::

    adapter = init_prompt_adapter(PrefixTuningConfig(num_virtual_tokens=8), hf_config.to_dict(), jax.random.key(0))
    prefix = get_prompt(adapter, batch_size=4)          # per layer (key, value), each (B, H_kv, T, head_dim)
    save_prompt_adapter("out", adapter)                 # peft's files: one tensor, "prompt_embeddings"
    adapter = load_prompt_adapter("out")                # a peft-trained adapter: inference-mode table only

All math is ``peftcore.methods.prompt_learning``'s; see ``spec/prompt_learning.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from peftcore import get_peft_config
from peftcore._xp import array_namespace
from peftcore.config import PeftConfig
from peftcore.errors import ConfigError, IncompatibleKeysError
from peftcore.io import load_adapter, save_adapter
from peftcore.methods import prompt_learning as pl
from peftcore.methods.prompt_tuning import embeddings_for_token_ids, tokenize_init_text
from peftcore_jax.lora import JaxSampler

__all__ = [
    "PromptAdapter",
    "get_prompt",
    "init_prompt_adapter",
    "load_prompt_adapter",
    "prompt_embeddings",
    "save_prompt_adapter",
]

SAVED_KEY = "prompt_embeddings"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["config_json"])
@dataclasses.dataclass(frozen=True)
class PromptAdapter:
    """One prompt-learning adapter: ``params`` (peft-named arrays) and its prepared config, as JSON (static)."""

    params: dict[str, jax.Array]
    config_json: str

    @property
    def config(self) -> pl.PromptLearningConfig:
        return get_peft_config(json.loads(self.config_json))

    @property
    def peft_type(self) -> str:
        return json.loads(self.config_json)["peft_type"]

    @classmethod
    def from_config(cls, config: PeftConfig, params: Mapping[str, jax.Array], /) -> PromptAdapter:
        if not isinstance(config, pl.PromptLearningConfig):
            raise ConfigError(f"PromptAdapter needs a prompt-learning config, got {type(config).__name__}")
        expected = pl.parameter_shapes(config)
        if set(params) != set(expected):
            raise IncompatibleKeysError(
                f"{type(config).__name__}: parameters {sorted(params)} do not match {sorted(expected)}"
            )
        return cls(dict(params), config.to_json_string())


def init_prompt_adapter(
    config: pl.PromptLearningConfig,
    model_config: Any,
    key: jax.Array,
    /,
    *,
    dtype: Any = jnp.float32,
    word_embeddings: jax.Array | None = None,
    tokenizer: Callable[[str], Any] | None = None,
    token_ids: Any = None,
) -> PromptAdapter:
    """A fresh trainable adapter: ``prepare_config`` then torch's default initialisation from ``key``.

    Prompt tuning TEXT takes its ids from ``token_ids`` or ``tokenizer(prompt_tuning_init_text)``
    (any Hugging Face style tokenizer); SAMPLE_VOCAB draws them uniformly from ``[0, V)`` with ``key``
    unless ``token_ids`` are given. Both copy rows of ``word_embeddings`` ``(V, D)`` as float32, as ``peft``.
    """
    config = pl.prepare_config(config, model_config)
    init_key, vocab_key = jax.random.split(key)
    params = pl.init_params(config, sampler=JaxSampler(init_key), dtype=dtype)
    init = str(getattr(config, "prompt_tuning_init", "RANDOM"))
    if init != "RANDOM" and not config.inference_mode:
        if word_embeddings is None:
            raise ConfigError(f"prompt_tuning_init={init!r} needs the model's word_embeddings (V, D)")
        total = config.total_virtual_tokens
        if token_ids is None and init == "TEXT":
            if tokenizer is None:
                raise ConfigError("prompt_tuning_init='TEXT' needs token_ids or a tokenizer")
            token_ids = tokenize_init_text(tokenizer, config.prompt_tuning_init_text, total_virtual_tokens=total)
        if token_ids is None:
            token_ids = jax.random.randint(vocab_key, (total,), 0, word_embeddings.shape[0])
        params["embedding.weight"] = embeddings_for_token_ids(word_embeddings, jnp.asarray(token_ids))
    return PromptAdapter.from_config(config, params)


def get_prompt(adapter: PromptAdapter, /, *, batch_size: int, dtype: Any = None) -> Any:
    """``peft``'s ``get_prompt``: soft prompts ``(B, T·N, D)``, or the prefix as per-layer key/value tuples."""
    return pl.get_prompt(adapter.params, config=adapter.config, batch_size=batch_size, dtype=dtype)


def prompt_embeddings(adapter: PromptAdapter, /) -> jax.Array:
    """What ``peft`` saves under ``prompt_embeddings`` (the encoder output; the table in inference mode)."""
    return pl.prompt_embeddings_to_save(adapter.params, config=adapter.config)


def save_prompt_adapter(directory: str | os.PathLike, adapter: PromptAdapter, /, *,
                        adapter_name: str = "default") -> Path:
    """peft's ``save_pretrained`` files: ``adapter_config.json`` (``inference_mode: true``) and one tensor."""
    return save_adapter(directory, adapter.config, {SAVED_KEY: prompt_embeddings(adapter)}, adapter_name=adapter_name)


def load_prompt_adapter(directory: str | os.PathLike, /, *, model_config: Any = None, adapter_name: str | None = None,
                        dtype: Any = None) -> PromptAdapter:
    """An adapter saved by ``peft`` (or :func:`save_prompt_adapter`), in inference mode as ``peft`` loads it.

    ``model_config`` fills geometry the file leaves unset (peft always writes it). Keys other than
    ``prompt_embeddings`` (a task model's ``modules_to_save``) raise ``IncompatibleKeysError``.
    """
    loaded = load_adapter(directory, adapter_name=adapter_name, xp=array_namespace(jnp.zeros(())), dtype=dtype)
    config = loaded.config
    if not isinstance(config, pl.PromptLearningConfig):
        raise ConfigError(f"{loaded.path} holds a {config.peft_type} adapter, not a prompt-learning one")
    if model_config is not None:
        config = pl.prepare_config(config, model_config)
    extra = sorted(set(loaded.state_dict) - {SAVED_KEY})
    if SAVED_KEY not in loaded.state_dict or extra:
        raise IncompatibleKeysError(
            f"{loaded.path}: a prompt-learning adapter holds exactly {SAVED_KEY!r}; found {sorted(loaded.state_dict)}"
        )
    config = dataclasses.replace(config, inference_mode=True)
    params = pl.load_prompt_embeddings(jnp.asarray(loaded.state_dict[SAVED_KEY]), config=config)
    return PromptAdapter.from_config(config, params)
