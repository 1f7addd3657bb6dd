"""What the user-facing wrappers share: ``PeftModel`` and the prompt-learning task models (peft's ``PeftModel``).

Both hold the wrapped model as ``base_model``; unknown attributes fall through to it, as in peft.
Mix in before ``nn.Module``: ``class PeftModel(WrapperMixin, nn.Module)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WrapperMixin"]


class WrapperMixin:
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or name.startswith("_"):
                raise
            return getattr(self.base_model, name)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (tied parameters counted once, as ``named_parameters``)."""
        trainable = total = 0
        for _, param in self.named_parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
              f"{100 * trainable / total:.4f}")
