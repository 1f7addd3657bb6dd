"""``PeftModel`` / ``TunerModel`` / ``LoraModel`` / ``get_peft_model``: peft's model-level API over adapter layers.

The module tree is peft's (``PeftModel.base_model`` is the method's tuner model, e.g. a ``LoraModel``,
whose ``.model`` is the user's model), so state-dict keys read ``base_model.model.<path>...`` exactly
as peft's do. The tuner class comes from the method table (``peftcore_torch.methods``); ``TunerModel``
holds what every method shares, ``LoraModel`` adds LoRA's mixed batches and weighted adapters
(``IA3Model`` and ``AdaLoraModel`` live in ``ia3.py`` / ``adalora.py``). Prompt-learning configs
are handed to ``peftcore_torch.prompt_learning``, imported on first use.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import array_api_compat.torch as torch_xp
import torch
from torch import nn

from peftcore.config import PeftConfig
from peftcore.constants import EMBEDDING_LAYER_NAMES, TASK_TYPE_MODULES_TO_SAVE
from peftcore.errors import AdapterFileError, ConfigError, MergeError
from peftcore.io import load_adapter as _read_adapter
from peftcore.io import save_adapter as _write_adapter
from peftcore.methods.lora import weighted
from peftcore.methods.lora.config import LoraConfig, weighted_adapter_config
from peftcore.naming import DEFAULT_ADAPTER_NAME
from peftcore.random import Sampler
from peftcore_torch.inject import adapter_layers, inject_adapter, set_active_adapters
from peftcore_torch.layers import (
    BASE_ADAPTER_NAME,
    LoraLayer,
    ModulesToSaveWrapper,
    TunerLayer,
    adapter_names_context,
)
from peftcore_torch.methods import TorchMethod, register_torch_method, torch_method
from peftcore_torch.state import LoadReport, get_peft_model_state_dict, set_peft_model_state_dict
from peftcore_torch.wrapper import WrapperMixin

__all__ = ["LoraModel", "PeftModel", "TunerModel", "get_peft_model"]


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    *,
    autocast_adapter_dtype: bool = True,
    sampler: Sampler | None = None,
    tokenizer: Any = None,
) -> nn.Module:
    """Wrap ``model`` (any ``nn.Module``) with an adapter (``peft.get_peft_model``): LoRA, (IA)³, AdaLoRA,
    or a prompt-learning method (handed to ``peftcore_torch.prompt_learning``; ``tokenizer`` serves
    ``PromptTuningInit.TEXT``, where peft would download ``tokenizer_name_or_path`` from the hub).

    The base is frozen; float16/bfloat16 bases get float32 adapters unless ``autocast_adapter_dtype=False``;
    random initialisations draw from torch's global RNG (or ``sampler``).
    """
    peft_config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    if getattr(peft_config, "is_prompt_learning", False):
        from peftcore_torch import prompt_learning

        extra = {key: value for key, value in dict(sampler=sampler, tokenizer=tokenizer).items() if value is not None}
        return prompt_learning.get_prompt_learning_model(model, peft_config, adapter_name=adapter_name, **extra)
    if tokenizer is not None:
        raise ConfigError(f"tokenizer= serves prompt tuning's TEXT init only; {peft_config.peft_type} takes none")
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     sampler=sampler)


class TunerModel(nn.Module):
    """peft's ``BaseTuner``: holds the user model as ``.model`` and manages its adapter layers (any method)."""

    prefix = ""

    def __init__(self, model: nn.Module, peft_config: PeftConfig | dict[str, PeftConfig], adapter_name: str, *,
                 autocast_adapter_dtype: bool = True, sampler: Sampler | None = None) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = [adapter_name]
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.inject_adapter(name, config, autocast_adapter_dtype=autocast_adapter_dtype, sampler=sampler)
        self.model.peft_config = self.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or name.startswith("_"):
                raise
            return getattr(self.model, name)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str] | None, *, num_beams: int | None = None) -> Iterator[None]:
        """Mixed-adapter batches are LoRA's (peft's other tuners have no ``adapter_names``); ``None`` is a no-op."""
        if adapter_names is not None:
            raise ConfigError(f"{type(self).__name__} does not support mixed-adapter batches (`adapter_names`); "
                              "peft supports them for LoRA only")
        yield

    def inject_adapter(self, adapter_name: str, config: PeftConfig, *, autocast_adapter_dtype: bool = True,
                       sampler: Sampler | None = None) -> None:
        _add_task_heads_to_modules_to_save(config)
        _check_tied_embeddings(self.model, config)
        inject_adapter(self.model, config, adapter_name, active_adapters=self.active_adapters,
                       configs=self.peft_config, autocast_adapter_dtype=autocast_adapter_dtype, sampler=sampler)

    def _layers(self) -> list[tuple[str, TunerLayer | ModulesToSaveWrapper]]:
        return adapter_layers(self.model)

    def set_adapter(self, adapter_name: str | list[str], *, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ConfigError(f"adapter(s) {unknown} not found; known adapters: {sorted(self.peft_config)}")
        for _, layer in self._layers():
            if isinstance(layer, TunerLayer) and layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
        self.active_adapters = names
        set_active_adapters(self.model, names, inference_mode=inference_mode)

    def enable_adapter_layers(self) -> None:
        for _, layer in self._layers():
            layer.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption."
                )
        for _, layer in self._layers():
            layer.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} does not exist; known adapters: {sorted(self.peft_config)}")
        merged_in = [name for name, layer in self._layers()
                     if isinstance(layer, TunerLayer) and adapter_name in layer.merged_adapters]
        if merged_in:
            raise MergeError(f"adapter {adapter_name!r} is merged into {merged_in[:5]}; unmerge it before deleting it")
        del self.peft_config[adapter_name]
        for _, layer in self._layers():
            layer.delete_adapter(adapter_name)
        if adapter_name in self.active_adapters:
            remaining = [name for name in self.active_adapters if name != adapter_name]
            if not remaining and self.peft_config:
                remaining = [next(iter(self.peft_config))]
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.")
            self.active_adapters = remaining
            set_active_adapters(self.model, remaining)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")

    def merge_adapter(self, adapter_names: list[str] | None = None, *, safe_merge: bool = False) -> None:
        for name, layer in self._layers():
            if isinstance(layer, TunerLayer):
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names, name=name)

    def unmerge_adapter(self) -> None:
        for _, layer in self._layers():
            if isinstance(layer, TunerLayer):
                layer.unmerge()

    def _unload(self, *, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        # deepest first, so a wrapper inside another is replaced before its parent's copy is picked
        for name, layer in reversed(self._layers()):
            if isinstance(layer, TunerLayer):
                replacement = layer.get_base_layer()
            else:
                replacement = layer.active_module() if layer.active_adapters else layer.original_module
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, replacement)
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        if merge:
            _untie_config_if_diverged(self.model)
        return self.model

    def merge_and_unload(self, *, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self._unload(merge=False)


class LoraModel(TunerModel):
    """peft's ``LoraModel``: ``TunerModel`` plus mixed-adapter batches and ``add_weighted_adapter``."""

    prefix = "lora_"

    # -- mixed-adapter batches -------------------------------------------------------------------

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str] | None, *, num_beams: int | None = None) -> Iterator[None]:
        """Within the block every adapter layer serves sample ``i`` with adapter ``adapter_names[i]``.

        peft's ``_enable_peft_forward_hooks``: ``None`` (or disabled adapters) changes nothing; refused in
        training mode and for names no layer holds (``"__base__"`` is the base model). With beam search
        (``num_beams > 1``) each name is repeated per beam, except in an encoder, which sees the
        original batch. Layers raise for a wrong length, merged adapters or DoRA adapters.
        """
        layers = [layer for _, layer in self._layers()]
        lora_layers = [layer for layer in layers if isinstance(layer, LoraLayer)]
        # peft's has_active_enabled_adapter: inside disable_adapter() the names are dropped unchecked
        if adapter_names is None or any(layer.disable_adapters for layer in lora_layers):
            yield
            return
        if self.training:
            raise ConfigError("Cannot pass `adapter_names` when the model is in training mode.")
        known = {name for layer in lora_layers for name in layer.adapter_names}
        unknown = sorted({name for name in adapter_names if name != BASE_ADAPTER_NAME} - known)
        if unknown:
            raise ConfigError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        names = list(adapter_names)
        beam_search = isinstance(num_beams, int) and num_beams > 1
        if beam_search:
            if not isinstance(adapter_names, (list, tuple)):
                raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
            names = [name for name in adapter_names for _ in range(num_beams)]
        assignment = {layer: names for layer in layers}
        encoder = _encoder(self.model) if beam_search else None
        if encoder is not None:
            # the encoder runs once on the original batch, before generate expands it per beam
            assignment.update({m: list(adapter_names) for m in encoder.modules() if m in assignment})
        with adapter_names_context(assignment):
            yield

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: Literal["svd", "linear", "cat"] = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
    ) -> None:
        """Add ``adapter_name``, the weighted combination of ``adapters`` (peft's ``add_weighted_adapter``).

        The new config copies the first adapter's with ``r = lora_alpha = `` the new rank (``Σ r_i`` for
        ``"cat"``, the common rank for ``"linear"``, ``svd_rank or max r_i`` for ``"svd"``), the targets
        of all adapters and no rank/alpha patterns; a single adapter always combines ``"linear"``. The
        new adapter is inactive. The factors come from ``peftcore.methods.lora.weighted`` per layer,
        over the adapters that layer holds. As in peft, an existing ``adapter_name`` is left as it is.
        DoRA and ``lora_bias`` adapters are refused (peft would keep the new adapter's initial
        magnitude/bias, unrelated to the combination).
        """
        if adapter_name in self.peft_config:
            return
        combination_type, config = self._check_add_weighted_adapter(list(adapters), list(weights), combination_type,
                                                                    svd_rank)
        # the factors are overwritten below: never let an initialisation rewrite the base weights (PiSSA, ...)
        init_mode = config.init_lora_weights
        if init_mode not in (True, False, "gaussian"):
            config.init_lora_weights = True
        try:
            self.inject_adapter(adapter_name, config)
        finally:
            config.init_lora_weights = init_mode
        svd = None if svd_driver is None else functools.partial(torch.linalg.svd, driver=svd_driver)
        try:
            for name, layer in self._layers():
                if isinstance(layer, LoraLayer) and adapter_name in layer.adapter_names:
                    _combine_into(layer, name, adapter_name, adapters, weights, combination_type, clamp=svd_clamp,
                                  full_matrices=svd_full_matrices, svd=svd)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _check_add_weighted_adapter(self, adapters: list[str], weights: list[float], combination_type: str,
                                    svd_rank: int | None) -> tuple[str, LoraConfig]:
        """What only the model can check (the adapters exist, no shared ``modules_to_save``); the rest is the
        core's ``weighted_adapter_config``."""
        if not adapters:
            raise ConfigError("add_weighted_adapter needs at least one adapter to combine")
        if len(weights) != len(adapters):
            raise ConfigError(f"add_weighted_adapter needs one weight per adapter; got adapters {adapters} and "
                              f"weights {weights}")
        for adapter in adapters:
            if adapter not in self.peft_config:
                raise ConfigError(f"Adapter {adapter} does not exist; known adapters: {sorted(self.peft_config)}")
        shared = [name for name, layer in self._layers() if isinstance(layer, ModulesToSaveWrapper)
                  and sum(adapter in layer.modules_to_save for adapter in adapters) > 1]
        if shared:
            raise ConfigError("Cannot add weighted adapters if they target the same module with modules_to_save, "
                              f"but found {len(shared)} such instance(s): {shared}")
        return weighted_adapter_config([self.peft_config[adapter] for adapter in adapters], adapter_names=adapters,
                                       combination_type=combination_type, svd_rank=svd_rank)


LORA = register_torch_method(TorchMethod(peft_type="LORA", layer_cls=LoraLayer, tuner_cls=LoraModel))


class PeftModel(WrapperMixin, nn.Module):
    """A model with adapters, as ``peft.PeftModel``: forward passes through the method's tuner model
    (``base_model``: ``LoraModel``, ``IA3Model``, ``AdaLoraModel``), adapters are managed here."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER_NAME, *,
                 autocast_adapter_dtype: bool = True, sampler: Sampler | None = None) -> None:
        super().__init__()
        tuner_cls = torch_method(peft_config).tuner_cls
        self.base_model = tuner_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                    sampler=sampler)

    # -- pass-through ----------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.base_model.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The tuner model's forward (the base model's, plus AdaLoRA's regulariser on the loss);
        ``adapter_names=[...]`` (one per sample) runs a mixed-adapter batch (LoRA)."""
        return self.base_model.forward(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names=[...]`` picks an adapter per prompt."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.get_base_model().generate(*args, **kwargs)
        with self.base_model.mixed_batch(adapter_names, num_beams=kwargs.get("num_beams")):
            return self.get_base_model().generate(*args, **kwargs)

    # -- adapters --------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *, autocast_adapter_dtype: bool = True,
                    sampler: Sampler | None = None) -> None:
        """Add an inactive adapter (``set_adapter`` activates it), as peft's ``add_adapter``."""
        peft_config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None) or None
        self.base_model.inject_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype,
                                       sampler=sampler)

    def set_adapter(self, adapter_name: str, *, inference_mode: bool = False) -> None:
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             *args: Any, **kwargs: Any) -> None:
        """Add ``adapter_name`` combining ``adapters`` with ``weights`` (the tuner's ``add_weighted_adapter``:
        ``LoraModel``'s takes ``combination_type``/``svd_*`` options, ``IA3Model``'s none)."""
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model computes as its base (merged adapters are unmerged on the first forward)."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: list[str] | None = None, *, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, *, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters (default: the active ones) into the base weights and return the bare base model."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the bare base model without merging (merged weights stay merged, as in peft)."""
        return self.base_model.unload()

    # -- files -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, selected_adapters: list[str] | None = None,
                        save_embedding_layers: bool | Literal["auto"] = "auto") -> None:
        """Write each adapter as peft does: ``default`` in ``save_directory``, others in sub-folders."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ConfigError(f"cannot save unknown adapter(s) {unknown}; known adapters: {sorted(self.peft_config)}")
        if os.path.isfile(save_directory):
            raise AdapterFileError(f"Provided path ({save_directory}) should be a directory, not a file")
        for name in names:
            state = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            config = copy.copy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None) or None
            if config.task_type is None:
                base_class = type(self.get_base_model())
                config.auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
            _write_adapter(save_directory, config, state, adapter_name=name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER_NAME,
                        is_trainable: bool = False, config: PeftConfig | None = None, *,
                        autocast_adapter_dtype: bool = True, strict: bool = True, sampler: Sampler | None = None,
                        subfolder: str | None = None) -> nn.Module:
        """Load the adapter saved in ``model_id`` (a local folder) onto ``model`` (peft's ``from_pretrained``).

        ``is_trainable=False`` puts the model in eval mode with frozen adapters. Loading is strict:
        see ``set_peft_model_state_dict``. A prompt-learning adapter is handed to
        ``peftcore_torch.prompt_learning.load_prompt_learning_model``.
        """
        saved_config = PeftConfig.from_pretrained(model_id, subfolder=subfolder) if config is None else config
        if getattr(saved_config, "is_prompt_learning", False):
            from peftcore_torch import prompt_learning

            extra = {key: value for key, value in dict(config=config, subfolder=subfolder, sampler=sampler).items()
                     if value is not None}
            return prompt_learning.load_prompt_learning_model(model, model_id, adapter_name=adapter_name,
                                                              is_trainable=is_trainable, strict=strict, **extra)
        torch_method(saved_config)
        loaded = _read_adapter(model_id, subfolder=subfolder, xp=torch_xp)
        config = loaded.config if config is None else config
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, sampler=sampler)
        set_peft_model_state_dict(peft_model, loaded.state_dict, adapter_name, strict=strict)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, *,
                     autocast_adapter_dtype: bool = True, strict: bool = True,
                     subfolder: str | None = None) -> LoadReport:
        """Add adapter ``adapter_name`` from the folder ``model_id`` (inactive; ``set_adapter`` to use it)."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} already exists; pick another adapter_name")
        loaded = _read_adapter(model_id, subfolder=subfolder, xp=torch_xp)
        torch_method(loaded.config)
        loaded.config.inference_mode = not is_trainable
        self.base_model.inject_adapter(adapter_name, loaded.config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            report = set_peft_model_state_dict(self, loaded.state_dict, adapter_name, strict=strict)
        except Exception:
            self.base_model.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()
        return report


def _add_task_heads_to_modules_to_save(config: PeftConfig) -> None:
    """Task heads join ``modules_to_save`` (peft's task models: SEQ_CLS/TOKEN_CLS classifier, QA qa_outputs).

    Appended without removing repeats, exactly as peft's ``extend`` (the saved config lists them so).
    """
    heads = TASK_TYPE_MODULES_TO_SAVE.get(str(config.task_type) if config.task_type is not None else "", ())
    if heads:
        config.modules_to_save = list(config.modules_to_save or []) + list(heads)


def _tied_output_embedding(model: nn.Module) -> bool:
    """True when the model's output layer shares its weight with the input embedding."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return False
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    out_w, in_w = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    return out_w is not None and in_w is not None and out_w.data_ptr() == in_w.data_ptr()


def _check_tied_embeddings(model: nn.Module, config: PeftConfig) -> None:
    """Warn, as peft does, when an adapter touches embeddings tied to the output layer.

    peft can keep such adapters tied (``ensure_weight_tying=True``); peftcore does not yet, and says so
    instead of ignoring the flag.
    """
    names = [*(config.modules_to_save or [])]
    targets = config.target_modules
    if isinstance(targets, str):
        import re

        touches = any(re.fullmatch(targets, name) or re.fullmatch(targets, f"model.{name}")
                      for name in EMBEDDING_LAYER_NAMES)
    else:
        names += list(targets or [])
        touches = False
    touches = touches or any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in names)
    if getattr(config, "ensure_weight_tying", False):
        raise ConfigError("ensure_weight_tying=True is not supported by peftcore_torch yet: the tied output "
                          "layer would not share the adapter")
    if touches and _tied_output_embedding(model):
        warnings.warn(
            "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, "
            "but `ensure_weight_tying` is not set to True. "
            "This can lead to complications, for example when merging the adapter "
            "or converting your model to formats other than safetensors. "
            "Check the discussion here: https://github.com/huggingface/peft/issues/2777"
        )


def _untie_config_if_diverged(model: nn.Module) -> None:
    """After a merge, a config still claiming tied embeddings whose weights differ is corrected (peft does too)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    out_w, in_w = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        config.tie_word_embeddings = False
        warnings.warn("Input and output embeddings are no longer tied after merging. "
                      "Setting `tie_word_embeddings=False` in the model config.")


def _encoder(model: nn.Module) -> nn.Module | None:
    # transformers 5 returns the model itself from get_encoder() when it has no separate encoder
    getter = getattr(model, "get_encoder", None)
    if getter is None:
        return None
    encoder = getter()
    return None if encoder is model else encoder


def _combine_into(layer: LoraLayer, name: str, adapter_name: str, adapters: Sequence[str], weights: Sequence[float],
                  combination_type: str, *, clamp: float | None, full_matrices: bool, svd: Any) -> None:
    """Write the combination of the ``adapters`` that ``layer`` holds into its new adapter ``adapter_name``."""
    present = [(adapter, weight) for adapter, weight in zip(adapters, weights) if adapter in layer.adapter_names]
    if not present:
        raise ConfigError(f"none of the adapters {list(adapters)} adapts {name!r}, which the combined adapter "
                          f"{adapter_name!r} targets")
    factors = [layer._factors(adapter) for adapter, _ in present]
    lora_As = [lora_A.detach() for lora_A, _, _ in factors]
    lora_Bs = [lora_B.detach() for _, lora_B, _ in factors]
    combined = weighted.combination(lora_As, lora_Bs, combination_type=combination_type,
                                    weights=[float(w) for _, w in present],
                                    scalings=[layer.scaling[a] for a, _ in present], rank=layer.r[adapter_name],
                                    clamp=clamp, full_matrices=full_matrices, svd=svd, name=name)
    layer.set_factors(adapter_name, combined.lora_A, combined.lora_B)
