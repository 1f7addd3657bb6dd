"""``AdaLoraConfig``: ``peft``'s ``AdaLoraConfig`` (0.21.2), a ``LoraConfig`` with the rank-allocation schedule.

Every LoRA field is kept (and written to ``adapter_config.json``) but ``r`` is ignored
(``init_r`` is the starting rank). ``rank_pattern`` changes meaning: here it is the
allocator's result, ``{"<module>.lora_E[.<adapter>]": [keep_0, ..., keep_{init_r-1}]}``
(one bool per SVD triplet), default ``None``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from peftcore.errors import ConfigError
from peftcore.methods.lora.config import LoraConfig

__all__ = ["AdaLoraConfig"]

# ``LoraConfig.r``'s default; peft warns when AdaLoRA is given any other ``r``
_LORA_DEFAULT_R = 8


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter, as ``peft.AdaLoraConfig``.

    Three phases (``peft``'s ``RankAllocator``): steps ``<= tinit`` keep the full budget
    ``init_r·L``; steps in ``(tinit, total_step - tfinal]`` shrink it cubically towards
    ``target_r·L``, masking every ``deltaT`` steps; later steps keep the final mask.
    ``beta1``/``beta2`` smooth the importance and its uncertainty; ``orth_reg_weight``
    weighs the orthogonal regulariser added to the loss.
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        # LoraConfig reads rank_pattern as {pattern: int}; AdaLoRA's holds bool masks, checked below.
        # A stand-in of the same truthiness keeps LoraConfig's rsLoRA/rank_pattern warning as peft's.
        rank_pattern = self.rank_pattern
        self.rank_pattern = {"<adalora masks>": 1} if rank_pattern else {}
        super().__post_init__()
        self.rank_pattern = _checked_rank_pattern(rank_pattern)
        if self.use_dora:
            raise ConfigError("ADALORA does not support DoRA.")
        if self.loftq_config:
            raise ConfigError("ADALORA does not support LOFTQ.")
        if self.r != _LORA_DEFAULT_R:
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored."
                "If you intended to set the initial rank, use `init_r` instead.",
                stacklevel=3,
            )
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "total_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"`{name}` must be an integer, got {value!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(
                "`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                f"{self.orth_reg_weight}"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
                "increase `total_step`."
            )


def _checked_rank_pattern(rank_pattern: Any) -> dict[str, list[bool]] | None:
    if rank_pattern is None:
        return None
    if not isinstance(rank_pattern, Mapping):
        raise ConfigError(f"AdaLoRA `rank_pattern` must be None or a dict of bool lists, got {rank_pattern!r}")
    checked = {}
    for key, mask in rank_pattern.items():
        values = mask.tolist() if hasattr(mask, "tolist") else mask
        if not isinstance(key, str) or not isinstance(values, (list, tuple)):
            raise ConfigError(f"AdaLoRA `rank_pattern[{key!r}]` must be a list of bools, got {mask!r}")
        values = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
        if not all(isinstance(v, bool) or v in (0, 1) for v in values):
            raise ConfigError(f"AdaLoRA `rank_pattern[{key!r}]` must be a list of bools, got {mask!r}")
        checked[key] = [bool(v) for v in values]
    return checked
