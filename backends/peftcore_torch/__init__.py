"""peftcore for PyTorch ``nn.Module``s (``get_peft_model``, ``PeftModel``, ...).

Not built yet: this package is reserved for the torch backend (tracked as its own
issue). It will hold parameters, walk modules and move dtype/device, and call
``peftcore`` for every piece of math.
"""

__all__: list[str] = []
