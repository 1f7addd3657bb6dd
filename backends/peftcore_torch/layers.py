"""Torch modules that hold adapter parameters and call ``peftcore`` for all of their math.

``TunerLayer`` is what every method's layer shares (``LoraLayer`` here; ``IA3Layer`` in ``ia3.py``,
``AdaLoraLayer`` in ``adalora.py``).

``LoraLayer`` wraps one base module (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d/2d/3d``) and names its containers exactly as ``peft``'s LoRA layers do, so
``state_dict()`` keys are peft's (``<m>.lora_A.<adapter>.weight``, ``<m>.base_layer.weight``, ...).
``ModulesToSaveWrapper`` is peft's full-fine-tuning wrapper (``original_module`` +
``modules_to_save.<adapter>``).

Mixed-adapter batches (peft's ``adapter_names=[...]``, one adapter name per sample, ``"__base__"``
for none): a layer takes the names as its own ``adapter_names=`` keyword or, when the model is
called, from ``adapter_names_context``. That context is a ``contextvars.ContextVar`` holding a
``{layer: names}`` map instead of peft's forward pre-hooks: it is private to the calling thread
(and asyncio task), nested contexts restore the outer one on exit, and nothing is left registered
on the modules when a forward raises. While no context is open anywhere, a forward reads only a
module-level counter, so ``torch.compile(fullgraph=True)`` traces plain forwards unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_internals

from peftcore.errors import ConfigError, MergeError, ShapeMismatchError, UnsupportedLayerError
from peftcore.matching import resolve_rank_alpha
from peftcore.methods.lora import dora, init, ops
from peftcore.random import Sampler

__all__ = [
    "BASE_ADAPTER_NAME",
    "AdapterWeight",
    "LoraLayer",
    "ModulesToSaveWrapper",
    "TunerLayer",
    "adapter_names_context",
    "check_fan_in_fan_out",
    "is_gpt2_conv1d",
    "layer_kind",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# base layers whose forward returns a fresh tensor (GPT-2 Conv1D is added when first wrapped)
_FRESH_OUTPUT_TYPES: set[type] = {nn.Linear, nn.Embedding, *_CONV_TYPES}
_FACTOR_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

#: The ``adapter_names`` entry that selects the base model for a sample (peft's ``"__base__"``).
BASE_ADAPTER_NAME = "__base__"

_ASSIGNED_ADAPTER_NAMES: contextvars.ContextVar[Mapping[nn.Module, list[str]]] = contextvars.ContextVar(
    "peftcore_torch_adapter_names", default={}
)
# contexts open in any thread; zero lets forwards skip the ContextVar, which torch.compile cannot trace
_open_contexts = 0
_open_contexts_lock = threading.Lock()


@contextlib.contextmanager
def adapter_names_context(assignment: Mapping[nn.Module, Sequence[str]]) -> Iterator[None]:
    """Within the block, each module of ``assignment`` runs its forward with ``adapter_names=assignment[module]``.

    Plays the role of peft's ``_adapter_names_pre_forward_hook``s; entries of an enclosing context
    stay visible unless overridden, and the previous state is restored on exit, even on an exception.
    """
    global _open_contexts
    merged = {**_ASSIGNED_ADAPTER_NAMES.get(), **{module: list(names) for module, names in assignment.items()}}
    with _open_contexts_lock:
        _open_contexts += 1
    token = _ASSIGNED_ADAPTER_NAMES.set(merged)
    try:
        yield
    finally:
        _ASSIGNED_ADAPTER_NAMES.reset(token)
        with _open_contexts_lock:
            _open_contexts -= 1


def _assigned_adapter_names(module: nn.Module, kwargs: dict[str, Any]) -> list[str] | None:
    """``adapter_names`` passed to ``module``'s forward (popped from ``kwargs``) or assigned by the context."""
    names = kwargs.pop("adapter_names", None)
    if names is None and _open_contexts:
        names = _ASSIGNED_ADAPTER_NAMES.get().get(module)
    return None if names is None else list(names)


def _rows_by_adapter(adapter_names: Sequence[str]) -> dict[str, list[int]]:
    """``{name: sample indices}`` in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for index, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(index)
    return rows


def _check_batch_length(x: torch.Tensor, adapter_names: Sequence[str]) -> None:
    if len(x) != len(adapter_names):
        raise ShapeMismatchError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (a linear layer storing its weight ``(in, out)``)."""
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") for cls in type(module).__mro__
    )


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_gpt2"``, ``"embedding"``, ``"conv"`` or ``None`` (not adaptable)."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_gpt2_conv1d(module):
        return "conv1d_gpt2"
    return None


def base_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an adaptable base layer (GPT-2 ``Conv1D`` stores ``(in, out)``)."""
    kind = layer_kind(module)
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "conv":
        return module.in_channels, module.out_channels
    rows, cols = module.weight.shape
    return (rows, cols) if kind == "conv1d_gpt2" else (cols, rows)


def check_fan_in_fan_out(config: Any, module: nn.Module) -> None:
    """peft's per-layer correction of the (shared) config: ``fan_in_fan_out`` is False for ``nn.Linear``
    and True for GPT-2 ``Conv1D``, each change announced with peft's warning."""
    kind = layer_kind(module)
    if kind == "linear" and config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.")
        config.fan_in_fan_out = False
    elif kind == "conv1d_gpt2" and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                      "Setting fan_in_fan_out to True.")
        config.fan_in_fan_out = True


class AdapterWeight(nn.Module):
    """Holds one adapter tensor as ``.weight`` (and ``lora_B``'s optional ``.bias``); has no forward.

    It stands where peft keeps an ``nn.Linear``/``nn.Conv`` per adapter, so the keys stay peft's
    while the math stays in ``peftcore``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError("AdapterWeight only holds parameters; LoraLayer.forward computes the adapter branch")

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}, bias={self.bias is not None}"


class TunerLayer(nn.Module):
    """What every adapter layer shares (peft's ``BaseTunerLayer``): a wrapped ``base_layer``, adapters
    held per name in the ``adapter_containers`` (``ModuleDict``/``ParameterDict``, so ``state_dict()``
    keys are peft's), the active/disabled/merged state, and activation/deletion of adapters.

    A method's layer adds ``add_adapter`` (from its config), ``forward``, ``merge`` and ``unmerge``;
    ``wrap`` builds the layer around a target module or raises ``UnsupportedLayerError``.
    """

    #: containers holding one parameter (or parameter-holding module) per adapter, all saved
    adapter_containers: tuple[str, ...] = ()
    #: per-adapter containers without saved parameters (dropout modules)
    other_containers: tuple[str, ...] = ()
    #: per-adapter plain dicts (ranks, scalings, ...) whose keys are the adapter names
    adapter_tables: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = base_features(base_layer)
        self.merged_adapters: list[str] = []
        self._active_adapters: list[str] = []
        self._disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(getattr(self, self.adapter_containers[0]))

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params = []
        for name in self.adapter_containers:
            container = getattr(self, name)
            if adapter_name in container:
                entry = container[adapter_name]
                params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        return params

    def set_adapter(self, adapter_names: str | list[str], *, inference_mode: bool = False) -> None:
        """Activate ``adapter_names`` (in order); only their parameters require grad (none in inference mode)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for adapter in self.adapter_names:
            trainable = adapter in names and not inference_mode
            for param in self._adapter_parameters(adapter):
                param.requires_grad_(trainable)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """peft's ``enable_adapters``: disabling also stops gradients to every adapter parameter."""
        if enabled:
            self.set_adapter(self._active_adapters)
            self._disable_adapters = False
        else:
            for adapter in self.adapter_names:
                for param in self._adapter_parameters(adapter):
                    param.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; a merged adapter must be unmerged first."""
        if adapter_name in self.merged_adapters:
            raise MergeError(f"adapter {adapter_name!r} is merged into this layer; unmerge it before deleting it")
        for name in (*self.adapter_containers, *self.other_containers):
            container = getattr(self, name)
            if adapter_name in container:
                del container[adapter_name]
        for name in self.adapter_tables:
            getattr(self, name).pop(adapter_name, None)
        self._active_adapters = [name for name in self._active_adapters if name != adapter_name]

    def _adapters_to_merge(self, adapter_names: Sequence[str] | None) -> list[str]:
        """The adapters ``merge`` folds in: the given (default: active) ones this layer holds, not yet merged."""
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        held = self.adapter_names
        return [name for name in names if name in held and name not in self.merged_adapters]

    def _write_base(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Overwrite the base weight (and bias) in place, so the parameter objects survive."""
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, adapters={self.adapter_names}, active={self._active_adapters}"


class LoraLayer(TunerLayer):
    """A base module plus any number of named LoRA adapters (peft's ``lora.Linear``/``Embedding``/``ConvNd``).

    ``forward``: disabled -> base (unmerging first if merged); merged -> base; else ``base(x)`` plus,
    for each active adapter in order, its LoRA (or DoRA) branch from ``peftcore.methods.lora``.
    """

    adapter_containers = _FACTOR_CONTAINERS
    other_containers = ("lora_dropout",)
    adapter_tables = ("r", "lora_alpha", "scaling", "use_dora", "lora_bias", "_dora_norms")

    def __init__(self, base_layer: nn.Module) -> None:
        kind = layer_kind(base_layer)
        if kind is None:
            raise UnsupportedLayerError(
                f"LoRA cannot adapt a {type(base_layer).__module__}.{type(base_layer).__name__}; supported: "
                "torch.nn.Linear, transformers Conv1D, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d"
            )
        super().__init__(base_layer, kind)
        self.fan_in_fan_out = kind == "conv1d_gpt2"
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._dora_norms: dict[str, torch.Tensor] = {}
        if kind == "conv1d_gpt2" and type(base_layer).__module__ == "transformers.pytorch_utils":
            _FRESH_OUTPUT_TYPES.add(type(base_layer))

    @classmethod
    def wrap(cls, target: nn.Module, *, key: str, config: Any) -> LoraLayer:
        """A new ``LoraLayer`` around ``target`` (``config.fan_in_fan_out`` corrected with peft's warnings)."""
        if layer_kind(target) is None:
            raise UnsupportedLayerError(
                f"Target module {key!r} is a {type(target).__module__}.{type(target).__name__}, which LoRA "
                "cannot adapt. Supported: torch.nn.Linear, transformers Conv1D, torch.nn.Embedding, "
                "torch.nn.Conv1d/Conv2d/Conv3d"
            )
        check_fan_in_fan_out(config, target)
        return cls(target)

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(self.r)

    def add_adapter(self, adapter_name: str, *, key: str, config: Any, sampler: Sampler,
                    autocast_adapter_dtype: bool = True) -> None:
        """``update_layer`` with this module's rank and alpha after ``rank_pattern``/``alpha_pattern``."""
        r, lora_alpha = resolve_rank_alpha(config, key)
        self.update_layer(adapter_name, r=r, lora_alpha=lora_alpha, config=config, sampler=sampler,
                          autocast_adapter_dtype=autocast_adapter_dtype)

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        lora_alpha: float,
        config: Any,
        sampler: Sampler,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Create adapter ``adapter_name`` (peft's ``LoraLayer.update_layer``) with the core's initialisation.

        PiSSA/OLoRA rewrite the base weight in place (``copy_``, so the parameter object survives).
        """
        if adapter_name in self.r:
            raise ValueError(f"adapter {adapter_name!r} already exists on this {self.kind} layer")
        scaling = ops.scaling(r, lora_alpha, use_rslora=bool(config.use_rslora))
        base = self.base_layer
        weight = base.weight.detach()
        dtype = init.adapter_dtype(weight.dtype, autocast_adapter_dtype=autocast_adapter_dtype)
        common = dict(r=r, init_lora_weights=config.init_lora_weights, sampler=sampler, scaling=scaling, dtype=dtype)
        lora_bias = bool(getattr(config, "lora_bias", False))
        use_dora = bool(config.use_dora)
        if self.kind == "embedding":
            start = init.init_embedding(weight, **common)
        elif self.kind == "conv":
            start = init.init_conv(weight, groups=base.groups, lora_bias=lora_bias, **common)
        else:
            start = init.init_linear(weight, fan_in_fan_out=self.fan_in_fan_out, lora_bias=lora_bias, **common)
        if start.weight is not weight:
            with torch.no_grad():
                base.weight.copy_(start.weight)

        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = scaling
        self.use_dora[adapter_name] = use_dora
        self.lora_bias[adapter_name] = lora_bias
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if self.kind == "embedding":
            self.lora_embedding_A[adapter_name] = nn.Parameter(start.lora_A)
            self.lora_embedding_B[adapter_name] = nn.Parameter(start.lora_B)
        else:
            self.lora_A[adapter_name] = AdapterWeight(start.lora_A)
            self.lora_B[adapter_name] = AdapterWeight(start.lora_B, start.lora_B_bias)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = AdapterWeight(self._magnitude_init(adapter_name).to(dtype))
        if not self._active_adapters:
            self._active_adapters = [adapter_name]
        self.set_adapter(self._active_adapters)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(lora_A, lora_B, lora_B bias)`` of ``adapter_name`` (read once per forward: lookups cost)."""
        # containers and AdapterWeights always hold these entries: reading _modules/_parameters skips
        # nn.Module.__getattr__'s fallback chain and ModuleDict.__getitem__ (~2 µs on every forward)
        modules = self._modules
        if self.kind == "embedding":
            return (modules["lora_embedding_A"]._parameters[adapter_name],
                    modules["lora_embedding_B"]._parameters[adapter_name], None)
        lora_B = modules["lora_B"]._modules[adapter_name]._parameters
        return modules["lora_A"]._modules[adapter_name]._parameters["weight"], lora_B["weight"], lora_B["bias"]

    def set_factors(self, adapter_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Overwrite ``adapter_name``'s factors in place (cast to the parameters' dtype and device)."""
        current_A, current_B, _ = self._factors(adapter_name)
        for name, current, new in (("lora_A", current_A, lora_A), ("lora_B", current_B, lora_B)):
            if tuple(new.shape) != tuple(current.shape):
                raise ShapeMismatchError(
                    f"{name} of adapter {adapter_name!r} on this {self.kind} layer is {tuple(current.shape)}, "
                    f"cannot set it to {tuple(new.shape)}"
                )
        with torch.no_grad():
            current_A.copy_(lora_A)
            current_B.copy_(lora_B)

    def _magnitude_init(self, adapter_name: str) -> torch.Tensor:
        lora_A, lora_B, _ = (t.detach() if t is not None else None for t in self._factors(adapter_name))
        weight, scaling = self.base_layer.weight.detach(), self.scaling[adapter_name]
        if self.kind == "embedding":
            return dora.embedding_magnitude_init(weight, lora_A, lora_B, scaling=scaling)
        if self.kind == "conv":
            return dora.conv_magnitude_init(weight, lora_A, lora_B, scaling=scaling)
        return dora.magnitude_init(weight, lora_A, lora_B, scaling=scaling, fan_in_fan_out=self.fan_in_fan_out)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = _assigned_adapter_names(self, kwargs)
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        base = self._modules["base_layer"]
        private = self._base_output_is_private(base)
        # a hook-free base's __call__ would only call forward: skipping it saves a few µs on every layer
        result = base.forward(x, *args, **kwargs) if private else base(x, *args, **kwargs)
        if self.merged_adapters:
            return result
        # peft adds each update to the promoted running result and casts back once, at the end
        running = result
        for adapter_name in self._active_adapters:
            if adapter_name in self.r:
                running = self._add_branch(running, x, adapter_name, private=private)
                private = private or running is not result  # the core returns new arrays: ours to reuse
        return running if running.dtype == result.dtype else running.to(result.dtype)

    @staticmethod
    def _base_output_is_private(base: nn.Module) -> bool:
        """True when ``base(x)`` surely returns a fresh tensor that nothing else holds.

        Then the LoRA update may be accumulated into it in place (``donate_result``), which saves a
        full copy of the output: a plain ``nn.Linear``/``nn.Embedding``/``nn.ConvNd``/GPT-2 ``Conv1D``
        without an instance-level ``forward``, without module hooks (a forward hook may keep the output; a
        backward hook wraps it) and outside ``torch.jit.trace``, exactly the case where
        ``nn.Module.__call__`` calls ``forward`` directly.
        """
        return (
            type(base) in _FRESH_OUTPUT_TYPES
            and "forward" not in base.__dict__
            and not torch._C._get_tracing_state()
            and not (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks
                     or base._backward_pre_hooks or _module_internals._global_forward_hooks
                     or _module_internals._global_forward_pre_hooks or _module_internals._global_backward_hooks
                     or _module_internals._global_backward_pre_hooks)
        )

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
        """peft's ``_check_forward_args``: one name per sample, nothing merged, no DoRA adapter named."""
        _check_batch_length(x, adapter_names)
        if self.merged:
            raise MergeError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first "
                f"(merged into this {self.kind} layer: {self.merged_adapters})."
            )
        dora_names = sorted({name for name in adapter_names if self.use_dora.get(name, False)})
        if dora_names:
            raise ConfigError(f"Cannot pass `adapter_names` when DoRA is enabled (DoRA adapters: {dora_names}).")

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any,
                             **kwargs: Any) -> torch.Tensor:
        """Base output for the whole batch; the rows of each named adapter's samples get its update.

        peft's ``_mixed_batch_forward``: a Linear/Conv update is cast to the result dtype before it is
        added, an Embedding update is added with promotion.
        """
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name, rows in _rows_by_adapter(adapter_names).items():
            if adapter_name == BASE_ADAPTER_NAME or adapter_name not in self.r:
                continue
            index = torch.tensor(rows, device=x.device)
            update = self._lora_update(x.index_select(0, index), adapter_name, self._factors(adapter_name))
            if self.kind != "embedding":
                update = update.to(result.dtype)
            result = result.index_copy(0, index, ops.accumulate(result.index_select(0, index), update))
        return result

    def _lora_update(self, x: torch.Tensor, adapter_name: str,
                     factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """The plain LoRA branch of ``adapter_name`` on ``x`` (dropout included, ``x`` cast to the adapter dtype)."""
        lora_A, lora_B, lora_B_bias = factors
        scaling = self.scaling[adapter_name]
        base = self.base_layer
        if self.kind == "embedding":
            return ops.embedding_update(x, lora_A, lora_B, scaling=scaling, max_norm=base.max_norm,
                                        norm_type=base.norm_type, embed_scale=self._embed_scale(),
                                        padding_idx=base.padding_idx)
        x = self._dropped_out(x, adapter_name, lora_A.dtype)
        if self.kind == "conv":
            return ops.conv_update(x, lora_A, lora_B, lora_B_bias, scaling=scaling, stride=base.stride,
                                   padding=base.padding, groups=base.groups)
        return ops.linear_update(x, lora_A, lora_B, lora_B_bias, scaling=scaling)

    def _dropped_out(self, x: torch.Tensor, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """``lora_dropout(x)`` on ``x`` cast to the adapter ``dtype`` (peft casts first)."""
        if x.dtype != dtype:
            x = x.to(dtype)
        dropout = self._modules["lora_dropout"][adapter_name]
        # peft's nn.Identity for lora_dropout=0: a module call costs more than the whole LoRA branch on few tokens
        return x if type(dropout) is nn.Identity else dropout(x)

    def _add_branch(self, running: torch.Tensor, x: torch.Tensor, adapter_name: str, *,
                    private: bool = False) -> torch.Tensor:
        """``running`` plus adapter ``adapter_name``'s branch; ``private``: ``running`` may be overwritten."""
        factors = self._factors(adapter_name)
        lora_A, lora_B, lora_B_bias = factors
        if running.dtype != lora_A.dtype:
            promoted = torch.promote_types(running.dtype, lora_A.dtype)
            if promoted != running.dtype:
                running, private = running.to(promoted), True
        if not self.use_dora[adapter_name]:
            if self.kind == "linear" or self.kind == "conv1d_gpt2":
                x = self._dropped_out(x, adapter_name, lora_A.dtype)
                return ops.linear_forward(running, x, lora_A, lora_B, lora_B_bias, scaling=self.scaling[adapter_name],
                                          donate_result=private)
            if self.kind == "embedding":
                base = self.base_layer
                return ops.embedding_forward(running, x, lora_A, lora_B, scaling=self.scaling[adapter_name],
                                             max_norm=base.max_norm, norm_type=base.norm_type,
                                             embed_scale=self._embed_scale(), padding_idx=base.padding_idx,
                                             donate_result=private)
            return ops.accumulate(running, self._lora_update(x, adapter_name, factors))
        scaling = self.scaling[adapter_name]
        base = self.base_layer
        if self.kind == "embedding":
            magnitude = self.lora_magnitude_vector[adapter_name].weight
            return dora.embedding_forward(running, x, lora_A, lora_B, magnitude, base.weight, scaling=scaling,
                                          max_norm=base.max_norm, norm_type=base.norm_type,
                                          embed_scale=self._embed_scale(), padding_idx=base.padding_idx)

        if x.dtype != lora_A.dtype:
            x = x.to(lora_A.dtype)
        dropout = self.lora_dropout[adapter_name]
        conv_options = {}
        if self.kind == "conv":
            conv_options = dict(stride=base.stride, padding=base.padding, groups=base.groups)
        # DoRA reuses the base result unless dropout really drops, then recomputes the base on the dropped x
        recompute_base = self.training and not isinstance(dropout, nn.Identity)
        x = dropout(x) if recompute_base else x
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        if self.kind == "conv":
            return dora.conv_forward(running, x, lora_A, lora_B, magnitude, base.weight, base.bias, scaling=scaling,
                                     dilation=base.dilation, recompute_base=recompute_base, **conv_options)
        return dora.linear_forward(running, x, lora_A, lora_B, magnitude, base.weight, base.bias, scaling=scaling,
                                   fan_in_fan_out=self.fan_in_fan_out, recompute_base=recompute_base)

    def _embed_scale(self) -> torch.Tensor | None:
        # peft's _get_embed_scale: a scalar attribute of the base (Gemma's scaled embeddings), in the base dtype
        if type(self.base_layer) is nn.Embedding:  # has none; the failing getattr below costs µs per forward
            return None
        scale = getattr(self.base_layer, "embed_scale", None)
        weight = self.base_layer.weight
        if isinstance(scale, Real):
            return torch.tensor(scale, dtype=weight.dtype, device=weight.device)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    # -- merge -----------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` of ``adapter_name`` in the base weight's layout (peft's ``get_delta_weight``), detached."""
        lora_A, lora_B, _ = self._factors(adapter_name)
        lora_A, lora_B, scaling = lora_A.detach(), lora_B.detach(), self.scaling[adapter_name]
        if self.kind == "embedding":
            return ops.embedding_delta_weight(lora_A, lora_B, scaling=scaling)
        if self.kind == "conv":
            return ops.conv_delta_weight(lora_A, lora_B, scaling=scaling, groups=self.base_layer.groups)
        return ops.delta_weight(lora_A, lora_B, scaling=scaling, fan_in_fan_out=self.fan_in_fan_out)

    def _merged_weight(self, weight: torch.Tensor, adapter_name: str, *, safe: bool, base_weight: torch.Tensor | None,
                       name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta = self.delta_weight(adapter_name)
        if not self.use_dora[adapter_name]:
            if self.kind == "embedding":
                delta = delta.to(weight.dtype)  # peft's Embedding merge rounds ΔW to the weight dtype first
            return ops.merge(weight, delta, safe=safe, name=name), None
        magnitude = self.lora_magnitude_vector[adapter_name].weight.detach()
        if self.kind == "embedding":
            return dora.embedding_merge(weight, delta, magnitude, base_weight, safe=safe, name=name)
        if self.kind == "conv":
            return dora.conv_merge(weight, delta, magnitude, base_weight, safe=safe, name=name)
        return dora.merge(weight, delta, magnitude, base_weight, safe=safe, name=name,
                          fan_in_fan_out=self.fan_in_fan_out)

    def _unmerged_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = self.delta_weight(adapter_name)
        if not self.use_dora[adapter_name]:
            return ops.unmerge(weight, delta)
        magnitude = self.lora_magnitude_vector[adapter_name].weight.detach()
        norm = self._dora_norms[adapter_name]
        if self.kind == "embedding":
            return dora.embedding_unmerge(weight, delta, magnitude, norm)
        if self.kind == "conv":
            return dora.conv_unmerge(weight, delta, magnitude, norm)
        return dora.unmerge(weight, delta, magnitude, norm, fan_in_fan_out=self.fan_in_fan_out)

    def merge(self, *, safe_merge: bool = False, adapter_names: list[str] | None = None, name: str = "") -> None:
        """Fold adapters (default: the active ones) into the base weight in place (peft's ``merge``).

        ``safe_merge`` checks each merged weight for inf/nan before writing it (``MergeError``). A DoRA
        adapter merged after others gets its norm from the weight with those taken out (peft 0.21).
        """
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        label = name or self.kind
        for adapter_name in names:
            if adapter_name not in self.r or adapter_name in self.merged_adapters:
                continue
            weight = self.base_layer.weight.detach()
            base_weight = self._unmerged_base_weight() if self.use_dora[adapter_name] and self.merged else None
            merged, norm = self._merged_weight(weight, adapter_name, safe=safe_merge, base_weight=base_weight,
                                               name=label)
            new_bias = None
            if self.lora_bias[adapter_name]:
                new_bias = ops.merge_bias(
                    None if self.base_layer.bias is None else self.base_layer.bias.detach(),
                    self.lora_B[adapter_name].bias.detach(), scaling=self.scaling[adapter_name], safe=safe_merge,
                    name=label,
                )
            with torch.no_grad():
                self.base_layer.weight.copy_(merged)
                if new_bias is not None:
                    self.base_layer.bias.copy_(new_bias)
            if norm is not None:
                self._dora_norms[adapter_name] = norm
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight, last merged first (peft's ``unmerge``)."""
        while self.merged_adapters:
            adapter_name = self.merged_adapters[-1]
            weight = self._unmerged_weight(self.base_layer.weight.detach(), adapter_name)
            with torch.no_grad():
                self.base_layer.weight.copy_(weight)
                if self.lora_bias[adapter_name]:
                    bias = ops.unmerge_bias(self.base_layer.bias.detach(), self.lora_B[adapter_name].bias.detach(),
                                            scaling=self.scaling[adapter_name])
                    self.base_layer.bias.copy_(bias)
            self._dora_norms.pop(adapter_name, None)
            self.merged_adapters.pop()

    def _unmerged_base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight.detach()
        for adapter_name in reversed(self.merged_adapters):
            weight = self._unmerged_weight(weight, adapter_name)
        return weight


class ModulesToSaveWrapper(nn.Module):
    """peft's ``ModulesToSaveWrapper``: a trainable copy of a module per adapter, the original kept frozen.

    Forward runs the active adapter's copy (the original when none is active or adapters are disabled).
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def update(self, adapter_name: str) -> None:
        """Add a fresh copy of the original module for ``adapter_name`` (frozen unless it is active)."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name in self._active_adapters)

    def set_adapter(self, adapter_names: str | list[str], *, inference_mode: bool = False) -> None:
        """Activate at most one adapter's copy (peft refuses several); only it requires grad."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [name for name in names if name in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"modules_to_save cannot activate several adapters at once, got {names}")
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in names and not inference_mode)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self._active_adapters)
        else:
            for module in self.modules_to_save.values():
                module.requires_grad_(False)
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapters = [name for name in self._active_adapters if name != adapter_name]

    def active_module(self) -> nn.Module:
        if self._disable_adapters or not self._active_adapters:
            return self.original_module
        return self.modules_to_save[self._active_adapters[0]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = _assigned_adapter_names(self, kwargs)
        if adapter_names is not None and args:
            _check_batch_length(args[0], adapter_names)
        if adapter_names is None or self._disable_adapters or not args:
            return self.active_module()(*args, **kwargs)
        return self._mixed_batch_forward(args[0], adapter_names, *args[1:], **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any,
                             **kwargs: Any) -> torch.Tensor:
        """Each sample through its adapter's copy (the original module for ``"__base__"``), as peft.

        A name this wrapper does not hold also gets the original module (that adapter does not
        replace this module; peft raises ``KeyError`` there).
        """
        if not isinstance(self.original_module, (nn.Linear, nn.Embedding, *_CONV_TYPES)):
            raise UnsupportedLayerError(
                "Mixed batching is only supported for the following modules: Linear, Embedding, Conv1d, Conv2d, "
                f"Conv3d; this modules_to_save wraps a {type(self.original_module).__name__}"
            )
        outputs, order = [], []
        for adapter_name, rows in _rows_by_adapter(adapter_names).items():
            module = self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else \
                self.original_module
            outputs.append(module(x[rows], *args, **kwargs))
            order.extend(rows)
        stacked = torch.cat(outputs)
        inverse = torch.empty(len(order), dtype=torch.long, device=stacked.device)
        inverse[torch.tensor(order, device=stacked.device)] = torch.arange(len(order), device=stacked.device)
        return stacked.index_select(0, inverse)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)
