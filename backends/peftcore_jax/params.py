"""Adapter state as pytrees: array leaves are trainable, everything else is static (jit caches on it).

``LoraParams`` holds one module's factors in the core's (torch) orientation, the orientation peft saves:
Linear ``lora_A (r, in)``, ``lora_B (out, r)``; Embedding ``lora_A`` = ``lora_embedding_A (r, num)``,
``lora_B`` = ``lora_embedding_B (dim, r)``; Conv ``lora_A (r, in, *k)``, ``lora_B (out, r/groups, 1, ..)``.
``LoraAdapters`` holds every module's ``LoraParams`` for one adapter name plus its ``LoraConfig``;
``ActiveAdapters`` several of them active at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax

from peftcore import LoraConfig, get_peft_config
from peftcore.errors import ConfigError
from peftcore_jax.layout import Layout

__all__ = ["ActiveAdapters", "LoraAdapters", "LoraParams"]


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

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["config_json", "adapter_name", "layout"],
)
@dataclasses.dataclass(frozen=True)
class LoraAdapters:
    """All modules of one adapter: ``params`` maps module path -> ``LoraParams``.

    The config travels as its JSON text (hashable static data, so ``jit`` caches on it); read it back as
    ``.config``. ``layout`` is the convention of the base tree it was made for (merge needs it).
    """

    params: dict[str, LoraParams]
    config_json: str
    adapter_name: str
    layout: Layout

    @classmethod
    def create(cls, params: dict[str, LoraParams], config: LoraConfig, *, adapter_name: str,
               layout: Layout) -> LoraAdapters:
        return cls(dict(params), config.to_json_string(), adapter_name, layout)

    @functools.cached_property
    def config(self) -> LoraConfig:
        return get_peft_config(json.loads(self.config_json))

    def get(self, path: str, default: Any = None) -> LoraParams | None:
        return self.params.get(path, default)

    def __getitem__(self, path: str) -> LoraParams:
        return self.params[path]

    def __contains__(self, path: object) -> bool:
        return path in self.params

    def __len__(self) -> int:
        return len(self.params)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["adapters"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ActiveAdapters:
    """Several adapters active at once, applied in order: peft's ``set_adapter(["a", "b"])``.

    Pass it wherever a ``LoraAdapters`` goes in model code: ``.get(path)`` returns the tuple of that module's
    ``LoraParams`` (adapters without the module skipped), which the layers add one after the other as
    peft's forward loops over ``active_adapters``. A pytree: ``jax.grad`` w.r.t. it gives one per adapter.
    """

    adapters: tuple[LoraAdapters, ...]

    def __post_init__(self) -> None:
        adapters = tuple(self.adapters)
        object.__setattr__(self, "adapters", adapters)
        real = [a for a in adapters if isinstance(a, LoraAdapters)]
        names = [a.adapter_name for a in real]
        if len(set(names)) != len(names):
            raise ConfigError(f"active adapters need distinct names, got {names}")
        layouts = {a.layout.name for a in real}
        if len(layouts) > 1:
            raise ConfigError(f"active adapters were made for different layouts: {sorted(layouts)}")

    def get(self, path: str, default: Any = None) -> tuple[LoraParams, ...] | Any:
        found = tuple(a.params[path] for a in self.adapters if path in a.params)
        return found if found else default

    def __contains__(self, path: object) -> bool:
        return any(path in a for a in self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)
