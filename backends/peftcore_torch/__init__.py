"""peftcore for PyTorch: LoRA, (IA)³ and AdaLoRA on any ``nn.Module``, interchangeable with ``peft`` checkpoints.

``get_peft_model`` / ``PeftModel`` mirror peft's API and module tree (so state-dict keys are peft's);
every piece of adapter math is a ``peftcore`` function called on torch tensors. Each method is one
entry of the dispatch table in ``peftcore_torch.methods`` (layer class + tuner model class).
"""

from peftcore_torch.inject import inject_adapter_in_model
from peftcore_torch.layers import AdapterWeight, LoraLayer, ModulesToSaveWrapper, TunerLayer
from peftcore_torch.model import LoraModel, PeftModel, TunerModel, get_peft_model
from peftcore_torch.ia3 import IA3Layer, IA3Model
from peftcore_torch.adalora import AdaLoraLayer, AdaLoraModel
from peftcore_torch.methods import TorchMethod, supported_peft_types, torch_method
from peftcore_torch.sampler import TorchSampler
from peftcore_torch.state import LoadReport, get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "AdaLoraLayer",
    "AdaLoraModel",
    "AdapterWeight",
    "IA3Layer",
    "IA3Model",
    "LoadReport",
    "LoraLayer",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "TorchMethod",
    "TorchSampler",
    "TunerLayer",
    "TunerModel",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
    "supported_peft_types",
    "torch_method",
]
