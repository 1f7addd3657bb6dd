"""``PromptLearningModel``: peft's ``PeftModel`` for prompt tuning, prefix tuning and P-tuning.

As in peft, the wrapped transformers model is ``.base_model`` itself (no tuner in between), the
encoders live in ``.prompt_encoder[<adapter>]`` and task heads listed in ``modules_to_save`` are
wrapped, so state-dict keys read ``prompt_encoder.default.embedding.weight`` and
``base_model.classifier.modules_to_save.default.weight`` exactly as peft's do. The saved file holds
``prompt_embeddings`` (the encoder's output) plus the task heads, in peft's format.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import array_api_compat.torch as torch_xp
import torch
from torch import nn
from transformers import Cache, DynamicCache, EncoderDecoderCache, PreTrainedModel

from peftcore.errors import AdapterFileError, ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore.io import load_adapter as read_adapter
from peftcore.io import save_adapter as write_adapter
from peftcore.methods import prompt_learning as pl
from peftcore.methods.prompt_learning import PromptLearningConfig
from peftcore.methods.prompt_tuning import embeddings_for_token_ids, tokenize_init_text
from peftcore.random import Sampler
from peftcore_torch.layers import ModulesToSaveWrapper
from peftcore_torch.prompt_encoders import PromptEncoderParams, initial_params
from peftcore_torch.sampler import TorchSampler
from peftcore_torch.wrapper import WrapperMixin
from peftcore_torch.state import LoadReport

__all__ = ["PromptLearningModel", "base_model_name"]

_PREFIX = "PREFIX_TUNING"
#: peft's PeftModelForSequenceClassification heads (added to ``modules_to_save``)
CLASSIFIER_MODULE_NAMES = ("classifier", "score")
_MLP_LAYERS = re.escape(pl.MLP_LAYERS_WARNING)


def base_model_name(model: nn.Module) -> str | None:
    return model.__dict__.get("name_or_path", None) or None


def cache_argument(model: nn.Module) -> str | None:
    """The keyword ``model.forward`` takes a key/value cache under (transformers 5 renamed it ``cache``)."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _as_cache(layout: tuple[tuple[torch.Tensor, ...], ...], *, num_transformer_submodules: int) -> Cache:
    """peft's ``get_prompt`` wrapping: ``DynamicCache``, or an ``EncoderDecoderCache`` whose cross-attention
    half is dropped (the encoder output it would cache changes with the virtual tokens)."""
    if num_transformer_submodules == 1:
        return DynamicCache(layout)
    cache = EncoderDecoderCache(layout)
    cache.cross_attention_cache = DynamicCache()
    for key in cache.is_updated:
        cache.is_updated[key] = False
    return cache


def fill_cache(cache: Cache, layout: tuple[tuple[torch.Tensor, ...], ...]) -> None:
    """Write the prefix into ``generate``'s own (empty) cache, in place: self-attention keys/values per layer."""
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for layer_idx, (key, value, *_) in enumerate(layout):
        target.update(key, value, layer_idx)


class PromptLearningModel(WrapperMixin, nn.Module):
    """A transformers model with prompt-learning adapters (peft's ``PeftModel`` on a prompt-learning config).

    Subclasses are peft's task models (``PeftModelForCausalLM`` ...); this base wires the adapters.
    """

    def __init__(self, model: nn.Module, peft_config: PromptLearningConfig, adapter_name: str = "default", *,
                 sampler: Sampler | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.base_model = model
        self.prompt_encoder = nn.ModuleDict()
        self._peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        self.add_adapter(adapter_name, peft_config, sampler=sampler, tokenizer=tokenizer)

    # -- peft's attributes -----------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PromptLearningConfig]:
        return self._peft_config

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def active_peft_config(self) -> PromptLearningConfig:
        return self._peft_config[self.active_adapter]

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.base_model, "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # -- adapters --------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PromptLearningConfig, *, sampler: Sampler | None = None,
                    tokenizer: Any = None) -> None:
        """Add an (inactive unless first) adapter: fill the config from the model's, build its encoder.

        ``sampler`` draws the random initialisations (default: torch's global RNG, as peft);
        ``tokenizer`` serves TEXT init (default: ``AutoTokenizer.from_pretrained(tokenizer_name_or_path)``).
        """
        if adapter_name in self._peft_config:
            raise ConfigError(f"Adapter with name '{adapter_name}' already exists.")
        if not getattr(peft_config, "is_prompt_learning", False):
            raise ConfigError(f"{type(peft_config).__name__} is not a prompt-learning config")
        if str(peft_config.peft_type) != str(self.peft_type):
            raise ConfigError(f"Cannot combine adapters with different peft types. Found {self.peft_type} and "
                              f"{peft_config.peft_type}.")
        self._extend_modules_to_save(peft_config)
        config = pl.prepare_config(peft_config, self.base_model.config)
        for child in self.base_model.children():
            child.requires_grad_(False)
        if "word_embeddings" not in self._modules:
            self.word_embeddings = self._find_word_embeddings()
        device = self.word_embeddings.weight.device
        params = initial_params(config, sampler=sampler or TorchSampler(device=device), device=device)
        params.update(self._token_init(config, tokenizer))
        with self._quiet(config):
            self.prompt_encoder[adapter_name] = PromptEncoderParams(config, params)
        self._peft_config[adapter_name] = config
        self._wrap_modules_to_save(adapter_name, config)

    def _extend_modules_to_save(self, config: PromptLearningConfig) -> None:
        """Hook for task models that add their heads to ``modules_to_save`` (peft's SEQ_CLS)."""

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self._peft_config:
            raise ConfigError(f"Adapter {adapter_name} not found; known adapters: {sorted(self._peft_config)}")
        self.active_adapter = adapter_name
        for _, wrapper in self._wrappers():
            wrapper.set_adapter([adapter_name], inference_mode=self._peft_config[adapter_name].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self._peft_config:
            raise ConfigError(f"Adapter {adapter_name} does not exist; known adapters: {sorted(self._peft_config)}")
        if adapter_name == self.active_adapter:
            raise ConfigError(f"Adapter {adapter_name} is active; set another adapter before deleting it")
        del self._peft_config[adapter_name]
        del self.prompt_encoder[adapter_name]
        for _, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which forward and generate run the base model alone (no virtual tokens, no prefix)."""
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = False

    def _find_word_embeddings(self) -> nn.Module:
        """peft's rule: ``embeddings.word_embeddings``, else the backbone's first vocab-sized parameter."""
        with contextlib.suppress(AttributeError):
            return self.base_model.get_submodule("embeddings.word_embeddings")
        backbone = next((m for _, m in self.base_model.named_children() if isinstance(m, PreTrainedModel)),
                        self.base_model)
        model_config = self.base_model.config
        vocab_size = (model_config.get_text_config() if hasattr(model_config, "get_text_config")
                      else model_config).vocab_size
        for name, value in backbone.named_parameters():
            if value.shape[0] == vocab_size:
                return backbone.get_submodule(name.removesuffix(".weight"))
        raise ConfigError(f"cannot find the word embeddings of {type(self.base_model).__name__}: no parameter has "
                          f"vocab_size={vocab_size} rows")

    def _token_init(self, config: PromptLearningConfig, tokenizer: Any) -> dict[str, torch.Tensor]:
        """Prompt tuning's SAMPLE_VOCAB / TEXT initial table (rows of the word embeddings), as peft."""
        init = str(getattr(config, "prompt_tuning_init", "RANDOM"))
        if config.inference_mode or init not in ("SAMPLE_VOCAB", "TEXT"):
            return {}
        weight = self.word_embeddings.weight
        if init == "SAMPLE_VOCAB":
            ids = torch.randint(0, self.word_embeddings.num_embeddings, (config.total_virtual_tokens,),
                                dtype=torch.long).to(weight.device)
        else:
            if tokenizer is None:
                from transformers import AutoTokenizer

                kwargs = dict(config.tokenizer_kwargs or {})
                kwargs.pop("trust_remote_code", None)
                tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
            token_ids = tokenize_init_text(tokenizer, config.prompt_tuning_init_text,
                                           total_virtual_tokens=config.total_virtual_tokens)
            ids = torch.tensor(token_ids, dtype=torch.long, device=weight.device)
        return {"embedding.weight": embeddings_for_token_ids(weight.detach(), ids)}

    def _wrap_modules_to_save(self, adapter_name: str, config: PromptLearningConfig) -> None:
        """peft's ``_set_trainable``: every module whose name ends with an entry gets a per-adapter copy."""
        names = config.modules_to_save or []
        for key in [name for name, _ in self.base_model.named_modules() if name]:
            if not any(key.endswith(target) for target in names):
                continue
            try:
                target = self.base_model.get_submodule(key)
            except AttributeError:
                continue  # inside a wrapper made for an earlier match
            if not isinstance(target, ModulesToSaveWrapper):
                parent_name, _, child = key.rpartition(".")
                target = ModulesToSaveWrapper(target, adapter_name)
                setattr(self.base_model.get_submodule(parent_name), child, target)
            target.update(adapter_name)
            active = [self.active_adapter] if self.active_adapter in target.adapter_names else []
            target.set_adapter(active, inference_mode=self._peft_config[self.active_adapter].inference_mode)

    def _wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(name, module) for name, module in self.base_model.named_modules()
                if isinstance(module, ModulesToSaveWrapper)]

    @staticmethod
    @contextlib.contextmanager
    def _quiet(config: PromptLearningConfig) -> Iterator[None]:
        # the core re-checks shapes on every call; peft warns about encoder_num_layers once, when it builds
        # the encoder (initial_params), so later calls are quiet
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_MLP_LAYERS)
            yield

    # -- prompts ---------------------------------------------------------------------------------

    def _encoded(self, adapter_name: str | None = None) -> torch.Tensor:
        adapter_name = adapter_name or self.active_adapter
        encoder = self.prompt_encoder[adapter_name]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_MLP_LAYERS)
            return encoder()

    def prefix_layout(self, batch_size: int) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The active prefix as peft's legacy per-layer ``(key, value[, key', value'])`` tuple."""
        config = self.active_peft_config
        return pl.past_key_values_layout(
            self._encoded(), num_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            token_dim=config.token_dim, num_transformer_submodules=config.num_transformer_submodules,
            batch_size=batch_size, dtype=self.base_model_torch_dtype)

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor | Cache:
        """peft's ``get_prompt``: ``(B, T·N, D)`` virtual tokens, or the prefix as a transformers ``Cache``."""
        config = self.active_peft_config
        if str(config.peft_type) == _PREFIX:
            return _as_cache(self.prefix_layout(batch_size),
                             num_transformer_submodules=config.num_transformer_submodules)
        encoded = self._encoded()
        return encoded[None].expand(batch_size, *encoded.shape)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What peft saves under ``prompt_embeddings`` (the encoder's output, without dropout)."""
        config = self._peft_config[adapter_name]
        with self._quiet(config):
            params = self.prompt_encoder[adapter_name].params()
            return pl.prompt_embeddings_to_save(params, config=config).detach().cpu()

    def _adjust_kwargs(self, config: PromptLearningConfig, kwargs: dict[str, Any], *,
                       remove_token_type_ids: bool = True) -> None:
        """peft's ``_adjust_prompt_learning_kwargs``: prefix tuning shifts ``position_ids`` past the prefix;
        the other methods drop them (and ``token_type_ids`` unless the task keeps them), with peft's warnings."""
        if kwargs.get("position_ids") is not None:
            if str(config.peft_type) == _PREFIX:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
                kwargs["position_ids"] = None
        if remove_token_type_ids and kwargs.get("token_type_ids") is not None:
            warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
            kwargs["token_type_ids"] = None

    def _cache_taker(self) -> nn.Module:
        """The module whose forward names the cache keyword (task models whose backbone takes it override)."""
        return self.base_model

    def _set_cache(self, kwargs: dict[str, Any], cache: Cache, *, model: nn.Module | None = None) -> None:
        name = cache_argument(model or self.base_model) or "past_key_values"
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs[name] = cache

    @contextlib.contextmanager
    def _generation_inputs(self) -> Iterator[None]:
        """Within the block the base model's ``generate`` prepares its inputs through ours (peft's swap)."""
        base = self.base_model
        own = base.__dict__.get("prepare_inputs_for_generation")
        self._base_prepare_inputs = base.prepare_inputs_for_generation
        base.prepare_inputs_for_generation = self.prepare_inputs_for_generation
        try:
            yield
        finally:
            if own is None:
                del base.prepare_inputs_for_generation
            else:
                base.prepare_inputs_for_generation = own

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._base_prepare_inputs(*args, **kwargs)

    # -- files -----------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """peft's saved state: ``prompt_embeddings`` plus each wrapped head as ``base_model.<path>.<param>``."""
        state = {"prompt_embeddings": self.get_prompt_embedding_to_save(adapter_name)}
        for path, wrapper in self._wrappers():
            if adapter_name in wrapper.adapter_names:
                for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                    state[f"base_model.{path}.{key}"] = value.detach()
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, *, selected_adapters: list[str] | None = None,
                        **_: Any) -> None:
        """peft's files: ``adapter_config.json`` (inference_mode true) and ``adapter_model.safetensors``;
        ``default`` in ``save_directory``, other adapters in sub-folders."""
        names = list(self._peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self._peft_config]
        if unknown:
            raise ConfigError(f"cannot save unknown adapter(s) {unknown}; known adapters: {sorted(self._peft_config)}")
        if os.path.isfile(save_directory):
            raise AdapterFileError(f"Provided path ({save_directory}) should be a directory, not a file")
        for name in names:
            config = copy.copy(self._peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = base_model_name(self.base_model)
            write_adapter(save_directory, config, self.adapter_state_dict(name), adapter_name=name)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, *,
                     subfolder: str | None = None, strict: bool = True, sampler: Sampler | None = None,
                     tokenizer: Any = None, config: PromptLearningConfig | None = None) -> LoadReport:
        """Add adapter ``adapter_name`` from the folder ``model_id`` (peft's ``load_adapter``).

        The encoder is the saved table alone (inference mode); ``is_trainable=True`` is refused, as in peft.
        """
        if is_trainable:
            raise ConfigError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        loaded = read_adapter(model_id, subfolder=subfolder, xp=torch_xp)
        config = copy.copy(loaded.config if config is None else config)
        if not getattr(config, "is_prompt_learning", False):
            raise ConfigError(f"{loaded.path}: peft_type {config.peft_type} is not a prompt-learning method")
        config.inference_mode = True
        self.add_adapter(adapter_name, config, sampler=sampler, tokenizer=tokenizer)
        try:
            report = self.set_adapter_state_dict(adapter_name, loaded.state_dict, strict=strict)
        except Exception:
            if adapter_name != self.active_adapter:
                self.delete_adapter(adapter_name)
            raise
        self.eval()
        return report

    def set_adapter_state_dict(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor], *,
                               strict: bool = True) -> LoadReport:
        """Load a saved state (``prompt_embeddings`` + heads) into adapter ``adapter_name``.

        ``prompt_embeddings`` fills the encoder's table (peft: ``embedding.load_state_dict(strict=True)``);
        ``strict`` raises ``IncompatibleKeysError`` for missing or unexpected keys instead of reporting them.
        """
        config = self._peft_config[adapter_name]
        state = dict(state_dict)
        missing, unexpected = [], []
        table = self.prompt_encoder[adapter_name].embedding.weight
        if "prompt_embeddings" not in state:
            missing.append("prompt_embeddings")
        else:
            saved = state.pop("prompt_embeddings")
            if config.inference_mode:
                saved = pl.load_prompt_embeddings(saved, config=config)["embedding.weight"]
            elif tuple(saved.shape) != tuple(table.shape):
                raise ShapeMismatchError(f"prompt_embeddings has shape {tuple(saved.shape)}, but the trainable "
                                         f"encoder's embedding.weight is {tuple(table.shape)}")
            with torch.no_grad():
                table.copy_(saved)
        for path, wrapper in self._wrappers():
            if adapter_name not in wrapper.adapter_names:
                continue
            head = wrapper.modules_to_save[adapter_name]
            head_state = {}
            for key in head.state_dict():
                saved_key = f"base_model.{path}.{key}"
                if saved_key in state:
                    head_state[key] = state.pop(saved_key)
                else:
                    missing.append(saved_key)
            head.load_state_dict(head_state, strict=False)
        unexpected = sorted(state)
        if strict and (missing or unexpected):
            raise IncompatibleKeysError(f"adapter {adapter_name!r}: missing keys {missing}, unexpected keys "
                                        f"{unexpected}")
        return LoadReport(missing, unexpected, [])


def batch_size_of(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ConfigError("You have to provide either input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]
