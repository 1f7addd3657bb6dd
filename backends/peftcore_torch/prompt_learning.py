"""Prompt tuning, prefix tuning and P-tuning on transformers models (peft's prompt-learning task models).

``get_prompt_learning_model`` is ``peft.get_peft_model`` for a ``PromptTuningConfig`` /
``PrefixTuningConfig`` / ``PromptEncoderConfig``; ``load_prompt_learning_model`` is
``PeftModel.from_pretrained`` for their saved adapters. Files are interchangeable with peft's.
"""

from __future__ import annotations

import os
from typing import Any

import array_api_compat.torch as torch_xp
from torch import nn

from peftcore.errors import ConfigError
from peftcore.io import load_adapter as read_adapter
from peftcore.naming import DEFAULT_ADAPTER_NAME
from peftcore_torch.prompt_model import PromptLearningModel, base_model_name
from peftcore_torch.prompt_tasks import (
    PromptModelForCausalLM,
    PromptModelForFeatureExtraction,
    PromptModelForSeq2SeqLM,
    PromptModelForSequenceClassification,
    PromptModelForTokenClassification,
)

__all__ = [
    "PromptLearningModel",
    "PromptModelForCausalLM",
    "PromptModelForFeatureExtraction",
    "PromptModelForSeq2SeqLM",
    "PromptModelForSequenceClassification",
    "PromptModelForTokenClassification",
    "get_prompt_learning_model",
    "load_prompt_learning_model",
]

TASK_MODELS: dict[str, type[PromptLearningModel]] = {
    "CAUSAL_LM": PromptModelForCausalLM,
    "SEQ_2_SEQ_LM": PromptModelForSeq2SeqLM,
    "SEQ_CLS": PromptModelForSequenceClassification,
    "TOKEN_CLS": PromptModelForTokenClassification,
    "FEATURE_EXTRACTION": PromptModelForFeatureExtraction,
}
# accepted for a uniform call from peftcore_torch.get_peft_model; prompt encoders are float32 as in peft
_IGNORED = frozenset({"autocast_adapter_dtype", "low_cpu_mem_usage"})


def _task_model(config: Any) -> type[PromptLearningModel]:
    if not getattr(config, "is_prompt_learning", False):
        raise ConfigError(f"{type(config).__name__} (peft_type {config.peft_type}) is not a prompt-learning config")
    task = getattr(config.task_type, "value", config.task_type)
    if task not in TASK_MODELS:
        raise ConfigError(f"prompt learning in peftcore_torch needs task_type in {sorted(TASK_MODELS)}, got {task!r}")
    return TASK_MODELS[task]


def _options(kwargs: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = set(kwargs) - set(allowed) - _IGNORED
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    return {key: kwargs[key] for key in allowed if key in kwargs}


def get_prompt_learning_model(model: nn.Module, config: Any, adapter_name: str = DEFAULT_ADAPTER_NAME,
                              **kwargs: Any) -> PromptLearningModel:
    """Wrap a transformers ``model`` with a prompt-learning adapter (``peft.get_peft_model``).

    The task model follows ``config.task_type``; the base model is frozen; ``config`` gets its missing
    geometry from ``model.config`` (kept on the returned model). Options: ``sampler`` (a
    ``peftcore.random.Sampler``; default torch's global RNG) and ``tokenizer`` (TEXT init; default
    ``AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)``).
    """
    cls = _task_model(config)
    options = _options(kwargs, ("sampler", "tokenizer"))
    config.base_model_name_or_path = base_model_name(model)
    return cls(model, config, adapter_name, **options)


def load_prompt_learning_model(model: nn.Module, model_id: str | os.PathLike,
                               adapter_name: str = DEFAULT_ADAPTER_NAME, is_trainable: bool = False,
                               **kwargs: Any) -> PromptLearningModel:
    """Load a prompt-learning adapter saved by peft or peftcore onto ``model`` (``PeftModel.from_pretrained``).

    Eval mode; the encoder is the saved ``prompt_embeddings`` table alone (peft's inference mode).
    ``is_trainable=True`` is refused, as peft does (``load_adapter(..., is_trainable=True)`` on the
    returned model loads the table into a trainable encoder). Options: ``config`` (instead of the saved
    one), ``subfolder``, ``strict`` (default True: missing/unexpected keys raise ``IncompatibleKeysError``), ``sampler``,
    ``tokenizer``.
    """
    if is_trainable:
        raise ConfigError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
    options = _options(kwargs, ("config", "subfolder", "strict", "sampler", "tokenizer"))
    config = options.pop("config", None)
    subfolder = options.pop("subfolder", None)
    strict = options.pop("strict", True)
    loaded = read_adapter(model_id, subfolder=subfolder, xp=torch_xp)
    config = loaded.config if config is None else config
    cls = _task_model(config)
    config.inference_mode = True
    peft_model = cls(model, config, adapter_name, **options)
    peft_model.set_adapter_state_dict(adapter_name, loaded.state_dict, strict=strict)
    return peft_model.eval()

