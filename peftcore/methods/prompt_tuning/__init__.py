"""Prompt tuning (soft prompts): ``peft``'s ``PeftType.PROMPT_TUNING``.

The adapter file holds one tensor, ``prompt_embeddings`` ``(T·N, D)``. Shared math (prepending,
masks, labels, saving) in :mod:`peftcore.methods.prompt_learning`; initialisation in
:mod:`peftcore.methods.prompt_tuning.ops`.
"""

from peftcore.mapping import MethodSpec, register_method
from peftcore.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftcore.methods.prompt_tuning.ops import embeddings_for_token_ids, text_init_token_ids, tokenize_init_text

SPEC = register_method(
    MethodSpec(
        peft_type="PROMPT_TUNING",
        config_cls=PromptTuningConfig,
        prefix="prompt_tuning_",
        parameter_containers=("prompt_embeddings",),
    )
)

__all__ = [
    "SPEC",
    "PromptTuningConfig",
    "PromptTuningInit",
    "embeddings_for_token_ids",
    "text_init_token_ids",
    "tokenize_init_text",
]
