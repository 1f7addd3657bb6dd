"""Adapter state as pytrees: array leaves are trainable, everything else is static (jit caches on it).

``LoraParams`` holds one module's factors in the core's (torch) orientation, the orientation peft saves:
Linear ``lora_A (r, in)``, ``lora_B (out, r)``; Embedding ``lora_A`` = ``lora_embedding_A (r, num)``,
``lora_B`` = ``lora_embedding_B (dim, r)``; Conv ``lora_A (r, in, *k)``, ``lora_B (out, r/groups, 1, ..)``.
``LoraAdapters`` holds every module's ``LoraParams`` for one adapter name plus its ``LoraConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax

from peftcore import LoraConfig, get_peft_config
from peftcore_jax.layout import Layout

__all__ = ["LoraAdapters", "LoraParams"]


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
