"""peftcore: HuggingFace-PEFT-compatible adapters written once against the Array API standard.

The core computes with whatever array library its inputs come from (NumPy,
torch, JAX, array-api-strict, ...) and never imports a framework itself.
``peftcore_torch`` and ``peftcore_jax`` wrap it for models.
"""

from peftcore.config import PEFT_FORMAT_VERSION, PeftConfig, PeftType, TaskType, UnknownConfigFieldsWarning
from peftcore.io import LoadedAdapter, load_adapter, load_state_dict, save_adapter, save_state_dict
from peftcore.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    get_config_class,
    get_method,
    get_peft_config,
    get_prefix,
    register_method,
)
from peftcore.methods.adalora import AdaLoraConfig
from peftcore.methods.ia3 import IA3Config
from peftcore.methods.lora import LoraConfig
from peftcore.methods.p_tuning import PromptEncoderConfig
from peftcore.methods.prefix_tuning import PrefixTuningConfig
from peftcore.methods.prompt_tuning import PromptTuningConfig

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "IA3Config",
    "PEFT_FORMAT_VERSION",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "LoadedAdapter",
    "LoraConfig",
    "PeftConfig",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TaskType",
    "UnknownConfigFieldsWarning",
    "__version__",
    "get_config_class",
    "get_method",
    "get_peft_config",
    "get_prefix",
    "load_adapter",
    "load_state_dict",
    "register_method",
    "save_adapter",
    "save_state_dict",
]
