"""peft's task models for prompt learning: causal LM, seq2seq LM, sequence/token classification, features.

Each ``forward`` is the prompt-learning branch of peft's ``PeftModelFor<Task>.forward``: virtual
tokens in front of the input embeddings (attention mask, labels and token type ids extended by the
core), or the key/value prefix handed to the model as a transformers ``Cache``. ``generate`` swaps
in our ``prepare_inputs_for_generation`` as peft does; the prefix is written into ``generate``'s own
cache on the first step (transformers 5 passes it as ``cache``, which peft 0.21.2 does not fill).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Cache

from peftcore.errors import ConfigError
from peftcore.methods import prompt_learning as pl
from peftcore_torch.prompt_model import (
    _PREFIX,
    CLASSIFIER_MODULE_NAMES,
    PromptLearningModel,
    batch_size_of,
    cache_argument,
    fill_cache,
)

__all__ = [
    "PromptModelForCausalLM",
    "PromptModelForFeatureExtraction",
    "PromptModelForSeq2SeqLM",
    "PromptModelForSequenceClassification",
    "PromptModelForTokenClassification",
]


def _return_dict(model: torch.nn.Module, return_dict: bool | None) -> bool:
    if return_dict is not None:
        return return_dict
    config = model.config
    return getattr(config, "return_dict", True) and not getattr(config, "torchscript", False)


def _two_dimensional(mask: Any) -> torch.Tensor:
    if isinstance(mask, dict):
        if len(mask) != 1:
            raise ConfigError(f"Expected a single attention mask, got {len(mask)} instead")
        mask = next(iter(mask.values()))
    if mask.dim() != 2:
        raise ConfigError(f"prompt learning extends 2-D attention masks; got shape {tuple(mask.shape)} (a static "
                          "cache builds 4-D masks: generate with the default dynamic cache)")
    return mask


def _prompted_forward(model: PromptLearningModel, input_ids: Any, inputs_embeds: Any, attention_mask: Any,
                      kwargs: dict[str, Any], *, extend_labels: bool = False,
                      keep_token_type_ids: bool = False) -> Any:
    """peft's prompt-learning forward for models fed ``inputs_embeds`` (causal LM, classification, features).

    ``kwargs`` hold every other argument of the base model (labels included). Prefix tuning puts the prefix
    in the model's cache and shifts ``position_ids``; the other methods prepend the prompt, extend the mask
    with ones (and, where the task asks, the labels with -100 and the token types with 0).
    """
    if model._adapters_disabled:
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                **kwargs)
    config = model.active_peft_config
    tokens = config.num_virtual_tokens
    batch_size = batch_size_of(input_ids, inputs_embeds)
    if attention_mask is not None:
        attention_mask = pl.extend_attention_mask(attention_mask, num_virtual_tokens=tokens)
    model._adjust_kwargs(config, kwargs, remove_token_type_ids=not keep_token_type_ids)
    kwargs["attention_mask"] = attention_mask
    if str(config.peft_type) == _PREFIX:
        model._set_cache(kwargs, model.get_prompt(batch_size), model=model._cache_taker())
        return model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    if keep_token_type_ids and kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = pl.extend_token_type_ids(kwargs["token_type_ids"], num_virtual_tokens=tokens)
    if extend_labels and kwargs.get("labels") is not None:
        kwargs["labels"] = pl.extend_labels(kwargs["labels"], num_virtual_tokens=tokens)
    if inputs_embeds is None:
        inputs_embeds = model.word_embeddings(input_ids)
    inputs_embeds = pl.prepend_virtual_tokens(model.get_prompt(batch_size), inputs_embeds)
    return model.base_model(inputs_embeds=inputs_embeds, **kwargs)


class PromptModelForCausalLM(PromptLearningModel):
    """peft's ``PeftModelForCausalLM`` for prompt tuning, prefix tuning and P-tuning."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        kwargs.update(labels=labels, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      return_dict=return_dict)
        return _prompted_forward(self, input_ids, inputs_embeds, attention_mask, kwargs, extend_labels=True)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self._adapters_disabled:
            return self.base_model.generate(*args, **kwargs)
        with self._generation_inputs():
            return self.base_model.generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, task_ids: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """peft's prompt-learning step preparation: extended mask, shifted/dropped positions, and on the
        first step the virtual tokens in front of the prompt (or the prefix written into the cache)."""
        config = self.active_peft_config
        model_kwargs = self._base_prepare_inputs(*args, **kwargs)
        tokens = config.num_virtual_tokens
        prefix = str(config.peft_type) == _PREFIX
        cache_key = "cache" if "cache" in model_kwargs else "past_key_values"
        cache = model_kwargs.get(cache_key)
        first_step = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
        if model_kwargs.get("attention_mask") is not None:
            mask = _two_dimensional(model_kwargs["attention_mask"])
            model_kwargs["attention_mask"] = pl.extend_attention_mask(mask, num_virtual_tokens=tokens)
        positions = model_kwargs.pop("position_ids", None)
        self._adjust_kwargs(config, model_kwargs)
        if positions is not None:
            # generate counts positions over the real tokens: shifted past the prefix, or dropped as in peft
            # (without its warning, which would repeat at every step for positions the user did not pass)
            model_kwargs["position_ids"] = positions + tokens if prefix else None
        batch_size = batch_size_of(model_kwargs.get("input_ids"), model_kwargs.get("inputs_embeds"))
        if first_step and prefix:
            if isinstance(cache, Cache):
                fill_cache(cache, self.prefix_layout(batch_size))
            else:
                self._set_cache(model_kwargs, self.get_prompt(batch_size))
        elif first_step:
            embeds = model_kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = self.word_embeddings(model_kwargs["input_ids"])
            model_kwargs["inputs_embeds"] = pl.prepend_virtual_tokens(self.get_prompt(batch_size), embeds)
            model_kwargs["input_ids"] = None
        if "cache_position" in model_kwargs:  # transformers < 5
            if prefix and first_step:
                model_kwargs["cache_position"] = model_kwargs["cache_position"] + tokens
            elif not prefix:
                model_kwargs.pop("cache_position")
        return model_kwargs


class PromptModelForSeq2SeqLM(PromptLearningModel):
    """peft's ``PeftModelForSeq2SeqLM``: virtual tokens before the encoder input, or a decoder prefix."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        if self._adapters_disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                   decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict, **kwargs)
        config = self.active_peft_config
        tokens = config.num_virtual_tokens
        prefix = str(config.peft_type) == _PREFIX
        batch_size = batch_size_of(input_ids, inputs_embeds)
        if decoder_attention_mask is not None and prefix:
            decoder_attention_mask = pl.extend_attention_mask(decoder_attention_mask, num_virtual_tokens=tokens)
        self._adjust_kwargs(config, kwargs)
        kwargs.update(attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask, labels=labels,
                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      return_dict=return_dict)
        if prefix:
            self._set_cache(kwargs, self.get_prompt(batch_size))
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds,
                                   **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if attention_mask is not None:
            kwargs["attention_mask"] = pl.extend_attention_mask(attention_mask, num_virtual_tokens=tokens)
        inputs_embeds = pl.prepend_virtual_tokens(self._encoder_prompts(batch_size), inputs_embeds)
        return self.base_model(inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
                               decoder_inputs_embeds=decoder_inputs_embeds, **kwargs)

    def _encoder_prompts(self, batch_size: int) -> torch.Tensor:
        """The first T virtual tokens (peft feeds only these, to the encoder; the decoder's half is unused)."""
        config = self.active_peft_config
        prompts = self.get_prompt(batch_size)
        if config.num_transformer_submodules == 2:
            return pl.split_seq2seq_prompts(prompts, num_virtual_tokens=config.num_virtual_tokens)[0]
        return prompts

    def generate(self, **kwargs: Any) -> Any:
        if self._adapters_disabled:
            return self.base_model.generate(**kwargs)
        config = self.active_peft_config
        if "input_ids" not in kwargs:
            raise ConfigError("input_ids must be provided for Peft model generation")
        kwargs = dict(kwargs)
        self._adjust_kwargs(config, kwargs)
        if str(config.peft_type) == _PREFIX:
            with self._generation_inputs():
                return self.base_model.generate(**kwargs)
        if "encoder_outputs" in kwargs:
            del kwargs["encoder_outputs"]
            warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
        input_ids = kwargs.pop("input_ids")
        kwargs.pop("task_ids", None)
        embeds = self.word_embeddings(input_ids)
        kwargs["inputs_embeds"] = pl.prepend_virtual_tokens(self._encoder_prompts(embeds.shape[0]), embeds)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = pl.extend_attention_mask(kwargs["attention_mask"],
                                                                num_virtual_tokens=config.num_virtual_tokens)
        return self.base_model.generate(**kwargs)

    def prepare_inputs_for_generation(self, *args: Any, task_ids: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """On the first decoder step, the prefix goes into the self-attention half of ``generate``'s cache."""
        model_kwargs = self._base_prepare_inputs(*args, **kwargs)
        cache_key = "cache" if "cache" in model_kwargs else "past_key_values"
        cache = model_kwargs.get(cache_key)
        if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
            batch_size = model_kwargs["decoder_input_ids"].shape[0]
            if isinstance(cache, Cache):
                fill_cache(cache, self.prefix_layout(batch_size))
            else:
                self._set_cache(model_kwargs, self.get_prompt(batch_size))
        return model_kwargs


class PromptModelForSequenceClassification(PromptLearningModel):
    """peft's ``PeftModelForSequenceClassification``: the classifier head (``classifier`` / ``score``) is trained
    and saved with the prompt."""

    def _extend_modules_to_save(self, config) -> None:
        # peft extends the list in __init__ and again in add_adapter, so the first adapter's config lists the
        # heads twice; kept for byte-identical adapter_config.json
        config.modules_to_save = [*(config.modules_to_save or []), *CLASSIFIER_MODULE_NAMES]

    def __init__(self, model, peft_config, adapter_name: str = "default", **kwargs: Any) -> None:
        self._extend_modules_to_save(peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self.cls_layer_name = next((name for name, _ in self.base_model.named_children()
                                    if any(head in name for head in CLASSIFIER_MODULE_NAMES)), None)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        kwargs.update(labels=labels, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      return_dict=_return_dict(self.base_model, return_dict))
        return _prompted_forward(self, input_ids, inputs_embeds, attention_mask, kwargs, keep_token_type_ids=True)

    def _cache_taker(self) -> torch.nn.Module:
        """The module whose forward names the cache keyword: the task model, or the backbone its ``**kwargs``
        reach (peft 0.21.2 looks for ``past_key_values`` only, which transformers 5 renamed ``cache``)."""
        if cache_argument(self.base_model) is not None:
            return self.base_model
        backbone_name = next((name for name, module in self.base_model.named_children()
                              if cache_argument(module) is not None), None)
        if backbone_name is None:
            raise ConfigError("Model does not support past key values which are required for prefix tuning.")
        return self.base_model.get_submodule(backbone_name)


class PromptModelForTokenClassification(PromptModelForSequenceClassification):
    """peft's ``PeftModelForTokenClassification``: the same prompt-learning forward and heads as sequence
    classification (as in peft, labels are not extended: pass labels covering the virtual tokens too)."""


class PromptModelForFeatureExtraction(PromptLearningModel):
    """peft's ``PeftModelForFeatureExtraction``: the base model's hidden states, virtual tokens included."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        kwargs.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                      return_dict=return_dict)
        return _prompted_forward(self, input_ids, inputs_embeds, attention_mask, kwargs)
