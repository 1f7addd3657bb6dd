"""Prefix tuning (a learned key/value prefix per layer): ``peft``'s ``PeftType.PREFIX_TUNING``.

The adapter file holds one tensor, ``prompt_embeddings`` ``(T, 2·L·D)``: the prefix itself (after the
projection when ``prefix_projection``). Layout into per-layer keys and values:
:func:`peftcore.methods.prompt_learning.past_key_values_layout`.
"""

from peftcore.mapping import MethodSpec, register_method
from peftcore.methods.prefix_tuning.config import PrefixTuningConfig
from peftcore.methods.prefix_tuning.ops import prefix_projection

SPEC = register_method(
    MethodSpec(
        peft_type="PREFIX_TUNING",
        config_cls=PrefixTuningConfig,
        prefix="prefix_tuning_",
        parameter_containers=("prompt_embeddings",),
    )
)

__all__ = ["SPEC", "PrefixTuningConfig", "prefix_projection"]
