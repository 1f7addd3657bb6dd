"""Adapter state as pytrees: array leaves are trainable, everything else is static (jit caches on it).

``LoraParams`` holds one module's factors in the core's (torch) orientation, the orientation peft saves:
Linear ``lora_A (r, in)``, ``lora_B (out, r)``; Embedding ``lora_A`` = ``lora_embedding_A (r, num)``,
``lora_B`` = ``lora_embedding_B (dim, r)``; Conv ``lora_A (r, in, *k)``, ``lora_B (out, r/groups, 1, ..)``.
``IA3Params`` holds one (IA)³ vector ``ia3_l`` (``(out, 1)``, feed-forward ``(1, in)``; conv ``(1, C, 1, ..)``),
``AdaLoraParams`` one SVD triplet ``lora_A (r, in)``, ``lora_E (r, 1)``, ``lora_B (out, r)``.
``Adapters`` (alias ``LoraAdapters``) holds every module's parameters for one adapter name plus its config,
whatever the method (``.peft_type``); ``ActiveAdapters`` several of them active at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar

import jax

from peftcore import get_peft_config
from peftcore.config import PeftConfig
from peftcore.errors import ConfigError
from peftcore_jax.layout import Layout

__all__ = ["ActiveAdapters", "AdaLoraParams", "Adapters", "IA3Params", "LoraAdapters", "LoraParams"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector"],
    meta_fields=["kind", "scaling", "fan_in_fan_out", "dropout"],
)
@dataclasses.dataclass(frozen=True)
class LoraParams:
    """One adapted module. ``lora_B_bias`` (``lora_bias=True``) and ``lora_magnitude_vector`` (DoRA) may be None.

    Static: ``kind`` ("linear" | "embedding" | "conv"), ``scaling`` (α/r or α/√r), ``fan_in_fan_out``
    (the base Linear weight is stored ``(in, out)``), ``dropout`` (``lora_dropout``, used when a key is given).
    """

    lora_A: jax.Array
    lora_B: jax.Array
    lora_B_bias: jax.Array | None = None
    lora_magnitude_vector: jax.Array | None = None
    kind: str = "linear"
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    dropout: float = 0.0

    peft_type: ClassVar[str] = "LORA"

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["ia3_l"],
    meta_fields=["kind", "feedforward", "fan_in_fan_out", "groups"],
)
@dataclasses.dataclass(frozen=True)
class IA3Params:
    """One (IA)³ module: ``ia3_l`` scales the layer's input (``feedforward``) or its output.

    Static: ``kind`` ("linear" | "conv"), ``feedforward``, ``fan_in_fan_out`` (GPT-2 ``Conv1D`` storage),
    ``groups`` (a grouped conv's, needed to merge a feed-forward vector).
    """

    ia3_l: jax.Array
    kind: str = "linear"
    feedforward: bool = False
    fan_in_fan_out: bool = False
    groups: int = 1

    peft_type: ClassVar[str] = "IA3"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["lora_A", "lora_E", "lora_B"],
    meta_fields=["kind", "scaling", "fan_in_fan_out", "dropout"],
)
@dataclasses.dataclass(frozen=True)
class AdaLoraParams:
    """One AdaLoRA module: ``ΔW = scaling·B·diag(E)·A``; Conv2d ``lora_A`` is ``(r, in·kh·kw)``.

    Static: ``kind`` ("linear" | "conv"), ``scaling`` = ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` =
    ``init_r`` (kept through pruning, as peft's), ``fan_in_fan_out``, ``dropout`` (``lora_dropout``).
    """

    lora_A: jax.Array
    lora_E: jax.Array
    lora_B: jax.Array
    kind: str = "linear"
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    dropout: float = 0.0

    peft_type: ClassVar[str] = "ADALORA"

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])


ModuleParams = LoraParams | IA3Params | AdaLoraParams


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["config_json", "adapter_name", "layout"],
)
@dataclasses.dataclass(frozen=True)
class Adapters:
    """All modules of one adapter: ``params`` maps module path -> ``LoraParams`` / ``IA3Params`` / ``AdaLoraParams``.

    The config travels as its JSON text (hashable static data, so ``jit`` caches on it); read it back as
    ``.config``. ``layout`` is the convention of the base tree it was made for (merge needs it).
    """

    params: dict[str, ModuleParams]
    config_json: str
    adapter_name: str
    layout: Layout

    @classmethod
    def create(cls, params: dict[str, ModuleParams], config: PeftConfig, *, adapter_name: str,
               layout: Layout) -> Adapters:
        return cls(dict(params), config.to_json_string(), adapter_name, layout)

    @functools.cached_property
    def config(self) -> PeftConfig:
        return get_peft_config(json.loads(self.config_json))

    @property
    def peft_type(self) -> str:
        """``"LORA"``, ``"IA3"``, ``"ADALORA"``: the key of the method table (``peftcore_jax.methods``)."""
        return json.loads(self.config_json)["peft_type"]

    def get(self, path: str, default: Any = None) -> ModuleParams | None:
        return self.params.get(path, default)

    def __getitem__(self, path: str) -> ModuleParams:
        return self.params[path]

    def __contains__(self, path: object) -> bool:
        return path in self.params

    def __len__(self) -> int:
        return len(self.params)


#: the name the LoRA-only releases gave ``Adapters``
LoraAdapters = Adapters


@functools.partial(jax.tree_util.register_dataclass, data_fields=["adapters"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ActiveAdapters:
    """Several adapters active at once, applied in order: peft's ``set_adapter(["a", "b"])``.

    Pass it wherever a ``LoraAdapters`` goes in model code: ``.get(path)`` returns the tuple of that module's
    ``LoraParams`` (adapters without the module skipped), which the layers add one after the other as
    peft's forward loops over ``active_adapters``. A pytree: ``jax.grad`` w.r.t. it gives one per adapter.
    """

    adapters: tuple[Adapters, ...]

    def __post_init__(self) -> None:
        adapters = tuple(self.adapters)
        object.__setattr__(self, "adapters", adapters)
        real = [a for a in adapters if isinstance(a, Adapters)]
        names = [a.adapter_name for a in real]
        if len(set(names)) != len(names):
            raise ConfigError(f"active adapters need distinct names, got {names}")
        layouts = {a.layout.name for a in real}
        if len(layouts) > 1:
            raise ConfigError(f"active adapters were made for different layouts: {sorted(layouts)}")
        methods = {a.peft_type for a in real}
        if len(methods) > 1:
            raise ConfigError(f"active adapters of different methods cannot be combined: {sorted(methods)}")

    @property
    def peft_type(self) -> str:
        return self.adapters[0].peft_type

    def get(self, path: str, default: Any = None) -> tuple[ModuleParams, ...] | Any:
        found = tuple(a.params[path] for a in self.adapters if path in a.params)
        return found if found else default

    def __contains__(self, path: object) -> bool:
        return any(path in a for a in self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)
