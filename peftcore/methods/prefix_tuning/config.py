"""``PrefixTuningConfig``: ``peft``'s ``PrefixTuningConfig`` (0.21.2), same fields and defaults."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftcore.errors import ConfigError
from peftcore.methods.prompt_learning.config import PromptLearningConfig

__all__ = ["PrefixTuningConfig"]


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Key/value prefix of ``T`` virtual tokens in every attention layer (``peft.PrefixTuningConfig``).

    ``prefix_projection``: the prefix is ``transform(embedding)`` (Linear-Tanh-Linear of width
    ``encoder_hidden_size``) instead of the ``(T, 2·L·D)`` table itself; ``init_weights="zero"``
    starts the prefix at zero (the last Linear, or the table, zeroed).
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
