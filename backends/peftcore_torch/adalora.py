"""AdaLoRA for torch: ``AdaLoraLayer`` (peft's ``SVDLinear``/``SVDConv2d``) and ``AdaLoraModel``.

A layer holds per adapter the SVD triplet ``lora_A (r, in)``, ``lora_E (r, 1)``, ``lora_B (out, r)``
in ``ParameterDict``s (keys ``<m>.lora_A.<adapter>`` as in peft) and the starting rank ``ranknum``
(a Python number here; peft keeps an unsaved float parameter). The model drives the core's rank
allocator (``peftcore.methods.adalora.allocator``) from ``update_and_allocate(step)``, keeping its
``AllocatorState`` as ``allocator_state``, and adds the orthogonal regulariser to the loss.
Saving cuts each layer to its kept triplets (``rank_pattern``); loading rebuilds it at that rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.errors import ConfigError, UnsupportedLayerError
from peftcore.methods.adalora import AdaLoraConfig, allocator, ops
from peftcore.methods.lora import init
from peftcore.naming import BASE_MODEL_PREFIX
from peftcore.random import Sampler
from peftcore_torch.layers import TunerLayer, check_fan_in_fan_out, layer_kind
from peftcore_torch.methods import TorchMethod, register_torch_method
from peftcore_torch.model import PeftModel, TunerModel

__all__ = ["AdaLoraLayer", "AdaLoraModel"]

_CONTAINERS = ("lora_A", "lora_E", "lora_B")


def _adalora_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    kind = layer_kind(module)
    return kind if kind in ("linear", "conv1d_gpt2") else None


class AdaLoraLayer(TunerLayer):
    """A base ``nn.Linear`` / GPT-2 ``Conv1D`` / ``nn.Conv2d`` plus AdaLoRA adapters.

    ``forward``: disabled -> base (unmerging first if merged); merged -> base; else ``base(x)`` plus,
    per active adapter, ``s·B·(A⊙E)`` applied to the dropped-out input, ``s = α / (ranknum + 1e-5)``.
    """

    adapter_containers = ("lora_A", "lora_B", "lora_E")
    other_containers = ("lora_dropout",)
    adapter_tables = ("r", "lora_alpha", "ranknum", "scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        kind = _adalora_kind(base_layer)
        if kind is None:
            raise UnsupportedLayerError(
                f"AdaLoRA cannot adapt a {type(base_layer).__module__}.{type(base_layer).__name__}; supported: "
                "torch.nn.Linear, transformers Conv1D and torch.nn.Conv2d"
            )
        super().__init__(base_layer, kind)
        self.fan_in_fan_out = kind == "conv1d_gpt2"
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.ranknum: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    @classmethod
    def wrap(cls, target: nn.Module, *, key: str, config: AdaLoraConfig) -> AdaLoraLayer:
        if _adalora_kind(target) is None:
            raise UnsupportedLayerError(
                f"Target module {key!r} is a {type(target).__module__}.{type(target).__name__}, which AdaLoRA "
                "cannot adapt. Currently, only `torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d` are supported."
            )
        check_fan_in_fan_out(config, target)
        return cls(target)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def _factor_in_features(self) -> int:
        if self.kind == "conv2d":
            kernel_h, kernel_w = self.base_layer.kernel_size
            return self.in_features * kernel_h * kernel_w
        return self.in_features

    def add_adapter(self, adapter_name: str, *, key: str, config: AdaLoraConfig, sampler: Sampler,
                    autocast_adapter_dtype: bool = True) -> None:
        """A new adapter at rank ``config.init_r`` (peft's ``_create_and_replace``: patterns do not apply)."""
        if adapter_name in self.r:
            raise ValueError(f"adapter {adapter_name!r} already exists on this AdaLoRA layer")
        weight = self.base_layer.weight.detach()
        dtype = init.adapter_dtype(weight.dtype, autocast_adapter_dtype=autocast_adapter_dtype)
        start = ops.init_svd(self._factor_in_features(), self.out_features, r=config.init_r,
                             init_lora_weights=config.init_lora_weights, sampler=sampler, dtype=dtype)
        self._set_triplet(adapter_name, start, ranknum=config.init_r, lora_alpha=config.lora_alpha)
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if not self._active_adapters:
            self._active_adapters = [adapter_name]
        self.set_adapter(self._active_adapters)

    def _set_triplet(self, adapter_name: str, triplet: ops.SvdInit, *, ranknum: int, lora_alpha: float) -> None:
        device = self.base_layer.weight.device
        for name, value in zip(_CONTAINERS, (triplet.lora_A, triplet.lora_E, triplet.lora_B)):
            getattr(self, name)[adapter_name] = nn.Parameter(value.detach().to(device).clone())
        rank = int(triplet.lora_A.shape[0])
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = lora_alpha
        self.ranknum[adapter_name] = ranknum
        self.scaling[adapter_name] = ops.scaling(ranknum, lora_alpha, r=rank)

    def resize(self, adapter_name: str, keep: list[bool], *, inference_mode: bool = False) -> None:
        """Keep only the triplets flagged in ``keep`` (peft's ``resize_modules_by_rank_pattern``).

        ``ranknum`` (hence the scaling) stays the starting rank, unless no triplet is kept.
        """
        triplet = ops.prune_triplet(*(getattr(self, name)[adapter_name].detach() for name in _CONTAINERS), keep=keep)
        rank = int(triplet.lora_A.shape[0])
        ranknum = self.ranknum[adapter_name] if rank > 0 else 0
        self._set_triplet(adapter_name, triplet, ranknum=ranknum, lora_alpha=self.lora_alpha[adapter_name])
        self.set_adapter(self._active_adapters, inference_mode=inference_mode)

    def _triplet(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        modules = self._modules
        return (modules["lora_A"][adapter_name], modules["lora_E"][adapter_name], modules["lora_B"][adapter_name])

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return result
        base = self.base_layer
        for adapter_name in self._active_adapters:
            if adapter_name not in self.r:
                continue
            lora_A, lora_E, lora_B = self._triplet(adapter_name)
            dropped = self.lora_dropout[adapter_name](x if x.dtype == lora_A.dtype else x.to(lora_A.dtype))
            scaling = self.scaling[adapter_name]
            if self.kind == "conv2d":
                result = ops.conv_forward(result, dropped, lora_A, lora_E, lora_B, scaling=scaling,
                                          weight_shape=tuple(base.weight.shape), stride=base.stride,
                                          padding=base.padding, dilation=base.dilation, groups=base.groups)
            else:
                result = ops.linear_forward(result, dropped, lora_A, lora_E, lora_B, scaling=scaling)
        return result

    # -- merge -----------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW = s·B·(A⊙E)`` in the base weight's layout (peft's ``get_delta_weight``), detached."""
        lora_A, lora_E, lora_B = (t.detach() for t in self._triplet(adapter_name))
        scaling = self.scaling[adapter_name]
        if self.kind == "conv2d":
            return ops.conv_delta_weight(lora_A, lora_E, lora_B, scaling=scaling,
                                         weight_shape=tuple(self.base_layer.weight.shape))
        return ops.delta_weight(lora_A, lora_E, lora_B, scaling=scaling, fan_in_fan_out=self.fan_in_fan_out)

    def merge(self, *, safe_merge: bool = False, adapter_names: list[str] | None = None, name: str = "") -> None:
        """Add each adapter's ``ΔW`` to the base weight in place (``safe_merge``: ``MergeError`` on inf/nan)."""
        for adapter_name in self._adapters_to_merge(adapter_names):
            merged = ops.merge(self.base_layer.weight.detach(), self.delta_weight(adapter_name), safe=safe_merge,
                               name=name or self.kind)
            self._write_base(merged)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW``, last merged first."""
        while self.merged_adapters:
            adapter_name = self.merged_adapters[-1]
            self._write_base(ops.unmerge(self.base_layer.weight.detach(), self.delta_weight(adapter_name)))
            self.merged_adapters.pop()


class AdaLoraModel(TunerModel):
    """peft's ``AdaLoraModel``: one trainable adapter, rank allocation and the orthogonal regulariser.

    ``trainable_adapter_name`` is the adapter created without ``inference_mode`` (``None`` if none);
    ``allocator_state`` is the core's ``AllocatorState`` for it (``None`` until the first ``update_and_allocate``).
    """

    prefix = "lora_"

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig | dict[str, AdaLoraConfig], adapter_name: str,
                 **kwargs: Any) -> None:
        self.trainable_adapter_name: str | None = None
        self.allocator_state: allocator.AllocatorState | None = None
        self._schedule: allocator.Schedule | None = None
        super().__init__(model, peft_config, adapter_name, **kwargs)
        config = self.peft_config[adapter_name]
        if config.inference_mode:
            for param in self._triplet_parameters(adapter_name).values():
                param.requires_grad_(False)
        else:
            self.trainable_adapter_name = adapter_name
            # the budget counts the starting ranks (peft's RankAllocator.__init__), before any load prunes them
            params = {n: p.detach() for n, p in self._triplet_parameters(adapter_name).items()}
            self._schedule = allocator.make_schedule(params, config=config, adapter_name=adapter_name)

    def inject_adapter(self, adapter_name: str, config: AdaLoraConfig, **kwargs: Any) -> None:
        trainable = [name for name, c in self.peft_config.items() if not c.inference_mode]
        if not config.inference_mode and trainable:
            raise ConfigError(
                f"{type(self).__name__} supports only 1 trainable adapter. When using multiple adapters, set "
                f"inference_mode to True for all adapters except the one you want to train (trainable: {trainable})."
            )
        super().inject_adapter(adapter_name, config, **kwargs)

    def _triplet_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """``{name in self.model: parameter}`` of ``adapter_name``'s triplets, named as peft's allocator names them."""
        found = {}
        for name, layer in self._layers():
            if isinstance(layer, AdaLoraLayer) and adapter_name in layer.r:
                for container in _CONTAINERS:
                    found[f"{name}.{container}.{adapter_name}"] = getattr(layer, container)[adapter_name]
        return found

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's outputs; a tensor ``loss`` gains ``orth_reg_weight · mean_P ‖P Pᵀ − I‖_F`` (as peft)."""
        outputs = super().forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self.trainable_adapter_name is not None:
            name = self.trainable_adapter_name
            factors = {n: p for n, p in self._triplet_parameters(name).items() if ".lora_E." not in n}
            regulariser = ops.orth_regularizer(factors, adapter_name=name)
            outputs.loss = loss + self.peft_config[name].orth_reg_weight * regulariser
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """peft's ``update_and_allocate``: call after ``backward()`` (and the optimiser step), before ``zero_grad``.

        Updates the importance EMAs from the gradients, masks ``lora_E`` in place to the scheduled budget
        (writing the masks to ``config.rank_pattern``), and after ``total_step - tfinal`` re-applies
        ``config.rank_pattern``.
        """
        name = self.trainable_adapter_name
        if name is None:
            raise ConfigError("update_and_allocate needs a trainable AdaLoRA adapter; every adapter of this model "
                              "is in inference mode")
        config = self.peft_config[name]
        parameters = self._triplet_parameters(name)
        params = {n: p.detach() for n, p in parameters.items()}
        final = config.total_step - config.tfinal
        if global_step > final:
            if config.rank_pattern is None:
                raise ConfigError(f"AdaLoRA step {global_step} > {final} re-applies config.rank_pattern, which is None")
            updated = allocator.apply_rank_pattern(params, rank_pattern=config.rank_pattern, adapter_name=name)
        else:
            grads = None
            if global_step < final:
                grads = {n: p.grad for n, p in parameters.items() if p.grad is not None}
            if self.allocator_state is None:  # zeros shaped like the parameters now, as peft's lazy EMAs
                self.allocator_state = allocator.init_state(params, adapter_name=name)
            schedule = self._schedule._replace(tinit=config.tinit, tfinal=config.tfinal, total_step=config.total_step,
                                               deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2)
            self.allocator_state, updated, masks = allocator.update_and_allocate(
                self.allocator_state, params, grads, step=global_step, schedule=schedule, adapter_name=name)
            if masks is not None:
                config.rank_pattern = allocator.rank_pattern_to_lists(masks)
        with torch.no_grad():
            for n, param in parameters.items():
                if ".lora_E." in n and updated[n] is not params[n]:
                    param.copy_(updated[n])


def _user_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The model ``rank_pattern`` keys are relative to, and the prefix of ``model``'s keys in front of them."""
    if isinstance(model, PeftModel):
        return model.get_base_model(), BASE_MODEL_PREFIX
    return model, ""


def _prune_for_save(model: nn.Module, config: AdaLoraConfig, adapter_name: str,
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's AdaLoRA ``_get_adapter_state_dict``: ``rank_pattern`` loses the adapter name (in the config, as
    peft does) and each layer's triplets are cut to the kept ones (``ops.prune_state_dict``)."""
    if config.rank_pattern is None:
        return state
    config.rank_pattern = allocator.rank_pattern_to_lists(config.rank_pattern, adapter_name=adapter_name)
    _, prefix = _user_model(model)
    return ops.prune_state_dict(state, rank_pattern=config.rank_pattern, adapter_name=adapter_name, prefix=prefix)


def _resize_for_load(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    """peft's ``resize_modules_by_rank_pattern``: every layer in ``rank_pattern`` keeps its flagged triplets."""
    if not config.rank_pattern:
        return
    root, _ = _user_model(model)
    ranks = ops.kept_ranks(config.rank_pattern, adapter_name=adapter_name)
    for (module_name, rank), keep in zip(ranks.items(), config.rank_pattern.values()):
        try:
            layer = root.get_submodule(module_name)
        except AttributeError:
            raise ConfigError(f"AdaLoRA rank_pattern names {module_name!r}, which is not a module of the model") \
                from None
        if not isinstance(layer, AdaLoraLayer) or adapter_name not in layer.r:
            raise ConfigError(f"AdaLoRA rank_pattern names {module_name!r}, which holds no AdaLoRA adapter "
                              f"{adapter_name!r}")
        if layer.r[adapter_name] == len(keep) != rank:
            layer.resize(adapter_name, [bool(k) for k in keep], inference_mode=bool(config.inference_mode))


ADALORA = register_torch_method(TorchMethod(peft_type="ADALORA", layer_cls=AdaLoraLayer, tuner_cls=AdaLoraModel,
                                            saved_state=_prune_for_save, before_load=_resize_for_load))
