"""peftcore for PyTorch: LoRA on any ``nn.Module``, interchangeable with ``peft`` checkpoints.

``get_peft_model`` / ``PeftModel`` mirror peft's API and module tree (so state-dict keys are peft's);
every piece of adapter math is a ``peftcore`` function called on torch tensors.
"""

from peftcore_torch.inject import inject_adapter_in_model
from peftcore_torch.layers import AdapterWeight, LoraLayer, ModulesToSaveWrapper
from peftcore_torch.model import LoraModel, PeftModel, get_peft_model
from peftcore_torch.sampler import TorchSampler
from peftcore_torch.state import LoadReport, get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "AdapterWeight",
    "LoadReport",
    "LoraLayer",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "TorchSampler",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]
