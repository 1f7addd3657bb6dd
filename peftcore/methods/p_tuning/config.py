"""``PromptEncoderConfig``: ``peft``'s P-tuning config (0.21.2), same fields and defaults."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from peftcore.errors import ConfigError
from peftcore.methods.prompt_learning.config import PromptLearningConfig

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network between the virtual-token table and the prompt: an MLP or a bidirectional LSTM + MLP."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the soft prompt is ``encoder(embedding)`` (``peft.PromptEncoderConfig``).

    ``encoder_hidden_size`` E (``None``: ``token_dim``); ``encoder_num_layers``: LSTM layers (the MLP
    always has two hidden layers); ``encoder_dropout``: between LSTM layers, in training only.
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        value = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(value)
        except ValueError:
            raise ConfigError(
                "Prompt encoder type not recognized. Please use one of MLP (recommended) or LSTM; "
                f"got encoder_reparameterization_type={value!r}."
            ) from None
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if not 0.0 <= float(self.encoder_dropout) <= 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1], got {self.encoder_dropout!r}")
