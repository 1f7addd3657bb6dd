"""LoRA (with rsLoRA, DoRA, lora_bias and the initialisations): ``peft``'s ``PeftType.LORA``."""

from peftcore.mapping import MethodSpec, register_method
from peftcore.methods.lora.config import LoraConfig

SPEC = register_method(
    MethodSpec(
        peft_type="LORA",
        config_cls=LoraConfig,
        prefix="lora_",
        module_containers=("lora_A", "lora_B", "lora_magnitude_vector"),
        parameter_containers=("lora_embedding_A", "lora_embedding_B"),
        weight_stripped_containers=("lora_magnitude_vector",),
    )
)

__all__ = ["SPEC", "LoraConfig"]
