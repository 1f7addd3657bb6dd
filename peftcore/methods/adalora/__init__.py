"""AdaLoRA (SVD-form LoRA with adaptive rank allocation): ``peft``'s ``PeftType.ADALORA``.

Keys are ``ParameterDict`` entries: ``<module>.lora_A.<adapter>`` in memory, ``<module>.lora_A``
on disk (likewise ``lora_B``, ``lora_E``); ``ranknum`` is never saved.
"""

from peftcore.mapping import MethodSpec, register_method
from peftcore.methods.adalora.config import AdaLoraConfig

SPEC = register_method(
    MethodSpec(
        peft_type="ADALORA",
        config_cls=AdaLoraConfig,
        prefix="lora_",
        parameter_containers=("lora_A", "lora_B", "lora_E"),
    )
)

__all__ = ["SPEC", "AdaLoraConfig"]
