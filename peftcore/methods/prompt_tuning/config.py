"""``PromptTuningConfig``: ``peft``'s ``PromptTuningConfig`` (0.21.2), same fields, defaults and checks."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from peftcore.errors import ConfigError
from peftcore.methods.prompt_learning.config import PromptLearningConfig

__all__ = ["PromptTuningConfig", "PromptTuningInit"]


class PromptTuningInit(str, enum.Enum):
    """How the prompt embedding starts: text tokens, random vocabulary rows, or N(0, 1) draws."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Soft prompt: ``T·N`` trainable embeddings prepended to the input embeddings (``peft.PromptTuningConfig``).

    TEXT init needs ``prompt_tuning_init_text`` and ``tokenizer_name_or_path`` (peftcore's own
    initialiser takes token ids from any tokenizer; the name is still written for ``peft``);
    ``tokenizer_kwargs`` only with TEXT.
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
            self.prompt_tuning_init = PromptTuningInit(init)
        except ValueError:
            raise ConfigError(
                f"prompt_tuning_init must be one of {[i.value for i in PromptTuningInit]}, "
                f"got {self.prompt_tuning_init!r}"
            ) from None
        text = self.prompt_tuning_init is PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ConfigError(
                f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {self.tokenizer_name_or_path}."
            )
        if text and self.prompt_tuning_init_text is None:
            raise ConfigError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.")
        if self.tokenizer_kwargs and not text:
            raise ConfigError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.")
