"""P-tuning (a soft prompt produced by an MLP or LSTM encoder): ``peft``'s ``PeftType.P_TUNING``.

The adapter file holds one tensor, ``prompt_embeddings`` ``(T·N, D)``: the encoder's OUTPUT, so a
loaded adapter runs without the encoder. Encoders in :mod:`peftcore.methods.p_tuning.ops`.
"""

from peftcore.mapping import MethodSpec, register_method
from peftcore.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftcore.methods.p_tuning.ops import lstm, lstm_mlp_head, lstm_parameter_names, mlp_head

SPEC = register_method(
    MethodSpec(
        peft_type="P_TUNING",
        config_cls=PromptEncoderConfig,
        prefix="p_tuning_",
        parameter_containers=("prompt_embeddings",),
    )
)

__all__ = [
    "SPEC",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "lstm",
    "lstm_mlp_head",
    "lstm_parameter_names",
    "mlp_head",
]
