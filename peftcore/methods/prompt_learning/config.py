"""``PromptLearningConfig``: the fields every prompt-learning method shares (``peft/config.py``, 0.21.2).

Prompt tuning, prefix tuning and P-tuning learn virtual tokens instead of adapting layers, so their
configs describe the base model's geometry (layers, heads, hidden size); ``peft`` fills the missing
values from the model's config (:func:`peftcore.methods.prompt_learning.prepare_config`).
"""

from __future__ import annotations

import dataclasses

from peftcore.config import PeftConfig
from peftcore.errors import ConfigError

__all__ = ["PromptLearningConfig"]

_POSITIVE_INT_FIELDS = ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                        "num_layers")


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Shared fields of ``peft``'s ``PromptLearningConfig``; ``None`` means "fill from the model's config".

    ``num_virtual_tokens`` T: virtual tokens per transformer submodule; ``token_dim`` D: width of the
    virtual tokens (for prefix tuning under grouped-query attention: ``head_dim * num_key_value_heads``);
    ``num_transformer_submodules`` N: 2 for encoder-decoder (``SEQ_2_SEQ_LM``), else 1.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{type(self).__name__}.{name} must be a positive integer or None, got {value!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """T·N: rows of the prompt embedding (prompt tuning, P-tuning) and of ``prompt_embeddings``."""
        if self.num_virtual_tokens is None or self.num_transformer_submodules is None:
            raise ConfigError(
                f"{type(self).__name__}: num_virtual_tokens ({self.num_virtual_tokens}) and "
                f"num_transformer_submodules ({self.num_transformer_submodules}) must be set; "
                "fill them with prepare_config(config, model_config)"
            )
        return self.num_virtual_tokens * self.num_transformer_submodules
