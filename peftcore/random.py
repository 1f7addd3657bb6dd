"""Randomness comes into the core through a ``Sampler``; the core never draws on its own.

``peft`` draws adapter initialisations from torch's global generator. peftcore asks a
``Sampler`` instead, so the caller chooses the library, the seed and the stream.
A sampler returns arrays of its own namespace; the core converts each sample to the
weight's namespace and device with ``xp.asarray``, so a NumPy sampler serves every backend
(under ``jax.jit`` its draws happen at trace time and become constants of the trace).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from peftcore._xp import Array, dtype_name

__all__ = ["NumpySampler", "Sampler"]


@runtime_checkable
class Sampler(Protocol):
    """Source of the random arrays an initialisation needs.

    ``dtype`` is a floating dtype of any namespace (the caller's); the sampler returns
    an array of its own namespace with the dtype of the same name.
    """

    def uniform(self, shape: tuple[int, ...], *, low: float, high: float, dtype: Any) -> Array:
        """Independent draws from U[low, high), ``shape``."""
        ...

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: Any) -> Array:
        """Independent draws from N(0, std²), ``shape``."""
        ...


class NumpySampler:
    """``Sampler`` backed by a ``numpy.random.Generator``.

    ``NumpySampler(seed_or_generator)`` accepts what ``numpy.random.default_rng`` accepts
    (an int seed, a ``SeedSequence`` or a ``Generator``, used as is). Draws are made in
    float64 and rounded to the requested dtype.
    """

    def __init__(self, seed_or_generator: int | np.random.SeedSequence | np.random.Generator | None, /) -> None:
        self.generator = np.random.default_rng(seed_or_generator)

    def uniform(self, shape: tuple[int, ...], *, low: float, high: float, dtype: Any) -> np.ndarray:
        draws = self.generator.uniform(low, high, size=tuple(shape))
        return draws.astype(_numpy_dtype(dtype))

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: Any) -> np.ndarray:
        draws = self.generator.normal(0.0, std, size=tuple(shape))
        return draws.astype(_numpy_dtype(dtype))

    def __repr__(self) -> str:
        return f"NumpySampler({self.generator!r})"


def _numpy_dtype(dtype: Any) -> np.dtype:
    # Dtypes of other namespaces (torch.float32, array_api_strict.float32) share NumPy's names.
    return np.dtype(dtype_name(dtype))
