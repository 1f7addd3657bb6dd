"""What prompt tuning, prefix tuning and P-tuning share (not a method of its own; registers nothing).

The config base (:class:`PromptLearningConfig`), filling it from a model config
(:func:`prepare_config`), the encoders as functions of ``peft``-named parameters (:func:`encode_prompt`,
:func:`get_prompt`, saving and loading ``prompt_embeddings``), and the input-side ops: virtual tokens
prepended to the embeddings, attention mask / labels / token type ids extended, and the key/value
prefix laid out per layer as ``peft`` does.
"""

from peftcore.methods.prompt_learning.config import PromptLearningConfig
from peftcore.methods.prompt_learning.prepare import prepare_config
from peftcore.methods.prompt_learning.ops import (
    IGNORE_INDEX,
    extend_attention_mask,
    extend_labels,
    extend_token_type_ids,
    past_key_values_layout,
    prepend_virtual_tokens,
    split_seq2seq_prompts,
)
from peftcore.methods.prompt_learning.encoder import (
    MLP_LAYERS_WARNING,
    encode_prompt,
    get_prompt,
    init_params,
    load_prompt_embeddings,
    parameter_shapes,
    prompt_embeddings_to_save,
)

__all__ = [
    "IGNORE_INDEX",
    "MLP_LAYERS_WARNING",
    "PromptLearningConfig",
    "encode_prompt",
    "extend_attention_mask",
    "extend_labels",
    "extend_token_type_ids",
    "get_prompt",
    "init_params",
    "load_prompt_embeddings",
    "parameter_shapes",
    "past_key_values_layout",
    "prepare_config",
    "prepend_virtual_tokens",
    "prompt_embeddings_to_save",
    "split_seq2seq_prompts",
]
