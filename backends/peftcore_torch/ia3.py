"""(IA)³ for torch: ``IA3Layer`` (peft's ``ia3.Linear``/``Conv2d``/``Conv3d``) and ``IA3Model``.

A layer holds one learned vector per adapter in ``ia3_l`` (a ``ParameterDict``, so keys read
``<m>.ia3_l.<adapter>`` as in peft). Feed-forward layers scale their input, the others their
output; several active adapters multiply. All arithmetic is ``peftcore.methods.ia3.ops``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftcore.errors import ConfigError, MergeError, UnsupportedLayerError
from peftcore.methods.ia3 import IA3Config, ops
from peftcore.methods.ia3.config import weighted_adapter_config
from peftcore.methods.lora import init
from peftcore.random import Sampler
from peftcore_torch.inject import model_type_of
from peftcore_torch.layers import ModulesToSaveWrapper, TunerLayer, check_fan_in_fan_out, layer_kind
from peftcore_torch.methods import TorchMethod, register_torch_method
from peftcore_torch.model import TunerModel

__all__ = ["IA3Layer", "IA3Model"]

_SUPPORTED = "torch.nn.Linear, transformers Conv1D, torch.nn.Conv2d and torch.nn.Conv3d"


class IA3Layer(TunerLayer):
    """A base ``nn.Linear`` / GPT-2 ``Conv1D`` (``kind="linear"``) or ``nn.Conv2d``/``Conv3d`` (``kind="conv"``)
    with (IA)³ vectors.

    ``forward``: disabled -> base (unmerging first if merged); merged -> base; else the product ``l``
    of the active adapters' vectors scales the input (``is_feedforward``) or the output of the base.
    """

    adapter_containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, *, is_feedforward: bool) -> None:
        torch_kind = layer_kind(base_layer)
        if torch_kind not in ("linear", "conv1d_gpt2") and not isinstance(base_layer, (nn.Conv2d, nn.Conv3d)):
            raise UnsupportedLayerError(
                f"(IA)³ cannot adapt a {type(base_layer).__module__}.{type(base_layer).__name__}; supported: "
                f"{_SUPPORTED}"
            )
        super().__init__(base_layer, "conv" if torch_kind == "conv" else "linear")
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = torch_kind == "conv1d_gpt2"
        self.groups = getattr(base_layer, "groups", 1) if self.kind == "conv" else 1

    @classmethod
    def wrap(cls, target: nn.Module, *, key: str, config: IA3Config) -> IA3Layer:
        """A new layer around ``target``: feed-forward when ``key`` matches ``config.feedforward_modules``."""
        kind = layer_kind(target)
        if kind not in ("linear", "conv1d_gpt2") and not isinstance(target, (nn.Conv2d, nn.Conv3d)):
            raise UnsupportedLayerError(
                f"Target module {key!r} is a {type(target).__module__}.{type(target).__name__}, which (IA)³ cannot "
                f"adapt. Supported: {_SUPPORTED}"
            )
        check_fan_in_fan_out(config, target)
        return cls(target, is_feedforward=ops.is_feedforward(config, key))

    def add_adapter(self, adapter_name: str, *, key: str, config: IA3Config, sampler: Sampler,
                    autocast_adapter_dtype: bool = True) -> None:
        """A new vector for ``adapter_name`` (peft's ``update_layer``): ones, or ``N(0, 1)`` draws."""
        if adapter_name in self.ia3_l:
            raise ValueError(f"adapter {adapter_name!r} already exists on this (IA)³ layer")
        weight = self.base_layer.weight.detach()
        dtype = init.adapter_dtype(weight.dtype, autocast_adapter_dtype=autocast_adapter_dtype)
        vector = ops.init_ia3(weight, feedforward=self.is_feedforward, kind=self.kind,
                              init_ia3_weights=config.init_ia3_weights, sampler=sampler,
                              fan_in_fan_out=self.fan_in_fan_out, groups=self.groups, dtype=dtype)
        self.ia3_l[adapter_name] = nn.Parameter(vector.to(weight.device))
        if not self._active_adapters:
            self._active_adapters = [adapter_name]
        self.set_adapter(self._active_adapters)

    def set_vector(self, adapter_name: str, vector: torch.Tensor) -> None:
        """Overwrite ``adapter_name``'s vector in place (cast to the parameter's dtype and device)."""
        with torch.no_grad():
            self.ia3_l[adapter_name].copy_(vector)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        vectors = [self.ia3_l[name] for name in self._active_adapters if name in self.ia3_l]
        if not vectors:
            return self.base_layer(x, *args, **kwargs)
        scale = vectors[0] if len(vectors) == 1 else ops.combine(*vectors)
        if self.kind == "linear":
            if self.is_feedforward:
                return self.base_layer(ops.scale_input(x, scale), *args, **kwargs)
            return ops.scale_output(self.base_layer(x, *args, **kwargs), scale)
        # peft's _ConvNd feeds the base its weight dtype and returns the input dtype
        if self.is_feedforward:
            result = self.base_layer(ops.scale_input(x, scale, dtype=self.base_layer.weight.dtype), *args, **kwargs)
        else:
            result = ops.scale_output(self.base_layer(x, *args, **kwargs), scale)
        return result if result.dtype == x.dtype else result.to(x.dtype)

    # -- merge -----------------------------------------------------------------------------------

    def _weight_options(self) -> dict[str, Any]:
        return dict(feedforward=self.is_feedforward, kind=self.kind, fan_in_fan_out=self.fan_in_fan_out,
                    groups=self.groups)

    def merge(self, *, safe_merge: bool = False, adapter_names: list[str] | None = None, name: str = "") -> None:
        """Scale the base weight (and, for output-scaled layers, the bias) by each adapter's vector in place."""
        base = self.base_layer
        for adapter_name in self._adapters_to_merge(adapter_names):
            vector = self.ia3_l[adapter_name].detach()
            weight = ops.merge_weight(base.weight.detach(), vector, **self._weight_options())
            bias = None
            if base.bias is not None and not self.is_feedforward:
                bias = ops.merge_bias(base.bias.detach(), vector, feedforward=False)
            if safe_merge and not all(bool(torch.isfinite(t).all()) for t in (weight, bias) if t is not None):
                raise MergeError(f"NaNs detected in the merged weights of {name or self.kind!r}. The adapter "
                                 f"{adapter_name} seems to be broken")
            self._write_base(weight, bias)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Divide the merged vectors back out, last merged first (inexact: warns ``IA3UnmergeWarning`` as peft)."""
        base = self.base_layer
        while self.merged_adapters:
            adapter_name = self.merged_adapters[-1]
            vector = self.ia3_l[adapter_name].detach()
            weight = ops.unmerge_weight(base.weight.detach(), vector, **self._weight_options())
            bias = None
            if base.bias is not None and not self.is_feedforward:
                bias = ops.unmerge_bias(base.bias.detach(), vector, feedforward=False)
            self._write_base(weight, bias)
            self.merged_adapters.pop()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.is_feedforward}"


class IA3Model(TunerModel):
    """peft's ``IA3Model``: ``TunerModel`` plus (IA)³'s ``add_weighted_adapter``."""

    prefix = "ia3_"

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add ``adapter_name`` with ``l = Σ w_i·l_i`` per layer (peft's ``IA3Model.add_weighted_adapter``).

        The config is the first adapter's with the targets and feed-forward modules of all of them
        (``peftcore.methods.ia3.config.weighted_adapter_config``); the new adapter is inactive and frozen.
        A layer none of ``adapters`` adapts gets a zero vector, as in peft. An existing ``adapter_name``
        is left as it is.
        """
        if adapter_name in self.peft_config:
            return
        adapters, weights = list(adapters), [float(w) for w in weights]
        for adapter in adapters:
            if adapter not in self.peft_config:
                raise ConfigError(f"Adapter {adapter} does not exist; known adapters: {sorted(self.peft_config)}")
        if len(weights) != len(adapters):
            raise ConfigError(f"add_weighted_adapter needs one weight per adapter; got adapters {adapters} and "
                              f"weights {weights}")
        shared = [name for name, layer in self._layers() if isinstance(layer, ModulesToSaveWrapper)
                  and sum(adapter in layer.modules_to_save for adapter in adapters) > 1]
        if shared:
            raise ConfigError(f"Cannot add weighted adapters targeting the same module with modules_to_save: {shared}")
        config = weighted_adapter_config([self.peft_config[adapter] for adapter in adapters])
        self.inject_adapter(adapter_name, config)
        for _, layer in self._layers():
            if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
                present = [(layer.ia3_l[a].detach(), w) for a, w in zip(adapters, weights) if a in layer.ia3_l]
                if present:
                    combined = ops.weighted_combination([v for v, _ in present], weights=[w for _, w in present])
                else:
                    combined = torch.zeros_like(layer.ia3_l[adapter_name])
                layer.set_vector(adapter_name, combined)
                layer.ia3_l[adapter_name].requires_grad_(False)


def _fill_model_defaults(config: IA3Config, model: nn.Module) -> None:
    """peft's ``IA3Model._prepare_adapter_config``: ``None`` targets / feed-forward modules from the tables."""
    if config.target_modules is None or config.feedforward_modules is None:
        filled = config.with_model_defaults(model_type_of(model))
        config.target_modules, config.feedforward_modules = filled.target_modules, filled.feedforward_modules


IA3 = register_torch_method(TorchMethod(peft_type="IA3", layer_cls=IA3Layer, tuner_cls=IA3Model,
                                        prepare_config=_fill_model_defaults))
