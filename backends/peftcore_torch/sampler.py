"""``TorchSampler``: the core's ``Sampler`` protocol on torch's random number generator.

``peft`` draws adapter initialisations from torch's global generator, so ``torch.manual_seed``
fixes them; drawing through this sampler keeps that habit (pass a ``torch.Generator`` for a
private stream).
"""

from __future__ import annotations

from typing import Any

import torch

from peftcore._xp import dtype_name

__all__ = ["TorchSampler"]


class TorchSampler:
    """``Sampler`` returning torch tensors drawn with ``generator`` (the global RNG when ``None``) on ``device``."""

    def __init__(self, generator: torch.Generator | None = None, device: Any = None) -> None:
        self.generator = generator
        self.device = device

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
        torch_dtype = getattr(torch, dtype_name(dtype))
        device = self.device if self.device is not None else (
            self.generator.device if self.generator is not None else None
        )
        return torch.empty(tuple(shape), dtype=torch_dtype, device=device)

    def uniform(self, shape: tuple[int, ...], *, low: float, high: float, dtype: Any) -> torch.Tensor:
        with torch.no_grad():
            return self._empty(shape, dtype).uniform_(low, high, generator=self.generator)

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: Any) -> torch.Tensor:
        with torch.no_grad():
            return self._empty(shape, dtype).normal_(0.0, std, generator=self.generator)

    def __repr__(self) -> str:
        return f"TorchSampler(generator={self.generator!r}, device={self.device!r})"
