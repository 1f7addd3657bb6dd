"""LoRA initialisations (``init_lora_weights``): adapter factors and, for PiSSA/OLoRA, the rewritten base weight.

Mirrors ``peft``'s ``LoraLayer.update_layer`` / ``reset_lora_parameters`` / ``pissa_init`` / ``olora_init`` /
``orthogonal_init`` and the Embedding/ConvNd ``update_layer``, followed by
``_move_adapter_to_device_of_base_layer`` (adapters take the base dtype) and ``cast_adapter_dtype``
(float16/bfloat16 adapters upcast to float32). Random draws come from a ``peftcore.random.Sampler``.

Modes in scope: ``True``, ``False``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``,
``"orthogonal"``. The data- or quantisation-driven modes (``"corda"``, ``"loftq"``, ``"eva"``, ``"mica"``,
``"lora_ga"``) raise ``ConfigError``.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, NamedTuple

import numpy as np

from peftcore._xp import Array, Namespace, array_namespace, compute_dtype, dtype_name, is_half, to_device_of
from peftcore.errors import ConfigError
from peftcore.random import Sampler

__all__ = ["LoraInit", "adapter_dtype", "init_conv", "init_embedding", "init_linear"]

_NEEDS_DATA = ("corda", "loftq", "eva", "mica", "lora_ga")
_PISSA_NITER = "pissa_niter_"


class LoraInit(NamedTuple):
    """Initial adapter parameters and the (possibly rewritten) base weight."""

    lora_A: Array
    lora_B: Array
    lora_B_bias: Array | None
    weight: Array


def adapter_dtype(base_dtype: Any, /, *, autocast_adapter_dtype: bool = True, xp: Namespace | None = None) -> Any:
    """Dtype of a new adapter on a base of ``base_dtype``: float16/bfloat16 -> float32, else ``base_dtype``.

    Mirrors ``peft``'s ``cast_adapter_dtype`` (on by default, ``autocast_adapter_dtype=False`` keeps the
    base dtype). ``xp`` picks the namespace of the returned float32; without it, float32 of the
    dtype's own library (torch for torch dtypes, NumPy's otherwise, which JAX accepts).
    """
    if not (autocast_adapter_dtype and is_half(base_dtype)):
        return base_dtype
    if xp is not None:
        return xp.float32
    library = sys.modules.get(type(base_dtype).__module__.partition(".")[0])
    if library is None or library is np:
        return np.dtype("float32")
    return getattr(library, "float32", np.dtype("float32"))


def init_linear(
    weight: Array,
    /,
    *,
    r: int,
    init_lora_weights: bool | str,
    sampler: Sampler,
    scaling: float,
    fan_in_fan_out: bool = False,
    lora_bias: bool = False,
    dtype: Any = None,
) -> LoraInit:
    """Initial ``lora_A (r, in)``, ``lora_B (out, r)``, ``lora_B_bias (out,)`` for a Linear/Conv1D base.

    ``weight`` is ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out``; ``W'`` is its ``(out, in)`` view.

    * ``True``: ``A ~ U(±1/√in)`` (kaiming-uniform, a=√5), ``B = 0``, bias 0.
    * ``"gaussian"``: ``A ~ N(0, 1/r²)``, ``B = 0``.
    * ``False``: torch's ``nn.Linear`` defaults, ``A ~ U(±1/√in)``, ``B`` and bias ``~ U(±1/√r)``.
    * ``"pissa"`` / ``"pissa_niter_K"``: ``W' ≈ U S Vh`` (exact SVD / randomized SVD with K power
      iterations), ``A = √(S_r/s)·Vh_r``, ``B = U_r·√(S_r/s)``, ``W ← W − s·B@A``.
    * ``"olora"``: ``W' = Q R``, ``B = Q[:, :r]``, ``A = R[:r]``, ``W ← W − s·B@A``.
    * ``"orthogonal"`` (even r): ``A = (G_A·Q[0::2])ᵀ/10``, ``B = G_Bᵀ·Q[1::2]/10``, ``Q`` from QR of an
      ``(r, r)`` Gaussian, ``G_A (in, r/2)``, ``G_B (r/2, out)`` Gaussian.

    Decompositions run in float32 (float64 for a float64 base; ``peft`` refuses float64 there) and the
    residual weight is cast back to ``weight.dtype``. As in ``peft``, when ``r > min(out, in)`` PiSSA and
    OLoRA return factors of rank ``min(out, in)``. Unlike ``peft``, OLoRA honours ``fan_in_fan_out``
    (``peft`` factors the stored ``(in, out)`` matrix). Adapters are rounded through a half-precision base
    dtype before taking ``dtype`` (default ``adapter_dtype(weight.dtype)``), as ``peft`` moves them to
    the base dtype before upcasting.
    """
    xp = array_namespace(weight)
    mode, niter = _parse_mode(init_lora_weights, layer="Linear", r=r, shape=weight.shape)
    if mode == "orthogonal" and r % 2 != 0:
        raise ConfigError(
            f"Linear layer with weight shape {tuple(weight.shape)}: orthogonal initialization requires an even "
            f"LoRA rank, got r={r}"
        )
    if lora_bias and init_lora_weights not in (True, False):
        raise ConfigError(
            f"lora_bias=True is only supported with init_lora_weights=True or False, got {init_lora_weights!r}"
        )
    dtype = adapter_dtype(weight.dtype, xp=xp) if dtype is None else dtype
    oriented = xp.matrix_transpose(weight) if fan_in_fan_out else weight
    out_features, in_features = oriented.shape
    draw = _Drawer(sampler, like=weight, dtype=dtype, xp=xp)

    bias = None
    if mode in ("pissa", "olora"):
        work = compute_dtype(weight.dtype, xp=xp)
        oriented = xp.astype(oriented, work)
        if mode == "pissa":
            lora_A, lora_B = _pissa_factors(oriented, r=r, scaling=scaling, niter=niter, draw=draw, xp=xp)
        else:
            lora_A, lora_B = _olora_factors(oriented, r=r, xp=xp)
        residual = oriented - scaling * (lora_B @ lora_A)
        residual = xp.matrix_transpose(residual) if fan_in_fan_out else residual
        return LoraInit(draw.finish(lora_A), draw.finish(lora_B), None, xp.astype(residual, weight.dtype))
    if mode == "orthogonal":
        lora_A, lora_B = _orthogonal_factors(in_features, out_features, r=r, draw=draw, xp=xp)
    elif mode == "none":
        lora_A = draw.uniform((r, in_features), bound=1 / math.sqrt(in_features))
        lora_B = draw.uniform((out_features, r), bound=1 / math.sqrt(r))
        bias = draw.uniform((out_features,), bound=1 / math.sqrt(r)) if lora_bias else None
    else:
        lora_A = _reset_A((r, in_features), mode=mode, fan_in=in_features, r=r, draw=draw)
        lora_B = draw.zeros((out_features, r))
        bias = draw.zeros((out_features,)) if lora_bias else None
    return LoraInit(draw.finish(lora_A), draw.finish(lora_B), None if bias is None else draw.finish(bias), weight)


def init_embedding(
    weight: Array,
    /,
    *,
    r: int,
    init_lora_weights: bool | str,
    sampler: Sampler,
    scaling: float,
    dtype: Any = None,
) -> LoraInit:
    """Initial ``lora_embedding_A (r, num_embeddings)``, ``lora_embedding_B (dim, r)`` for an Embedding base.

    ``weight`` is ``(num_embeddings, dim)`` and is returned unchanged; ``lora_B_bias`` is ``None``.
    ``False``: ``A, B ~ N(0, 1)``. Any other accepted mode: ``A = 0``, ``B ~ N(0, 1)``; as in ``peft``,
    whose Embedding routes every truthy mode to ``reset_lora_parameters``, this includes ``"gaussian"``,
    ``"pissa*"``, ``"olora"`` and ``"orthogonal"``. ``scaling`` is unused (kept for a uniform signature).
    Dtype handling as ``init_linear``.
    """
    xp = array_namespace(weight)
    mode, _ = _parse_mode(init_lora_weights, layer="Embedding", r=r, shape=weight.shape)
    dtype = adapter_dtype(weight.dtype, xp=xp) if dtype is None else dtype
    num_embeddings, embedding_dim = weight.shape
    draw = _Drawer(sampler, like=weight, dtype=dtype, xp=xp)
    if mode == "none":
        lora_A = draw.normal((r, num_embeddings), std=1.0)
    else:
        lora_A = draw.zeros((r, num_embeddings))
    lora_B = draw.normal((embedding_dim, r), std=1.0)
    return LoraInit(draw.finish(lora_A), draw.finish(lora_B), None, weight)


def init_conv(
    weight: Array,
    /,
    *,
    r: int,
    init_lora_weights: bool | str,
    sampler: Sampler,
    scaling: float,
    groups: int = 1,
    lora_bias: bool = False,
    dtype: Any = None,
) -> LoraInit:
    """Initial ``lora_A (r, in, *k)``, ``lora_B (out, r/groups, 1, ..)``, ``lora_B_bias (out,)`` for a ConvNd base.

    ``weight`` is ``(out, in/groups, *k)`` and is returned unchanged. With ``fan_in = in·∏k``:
    ``True``: ``A ~ U(±1/√fan_in)``, ``B = 0``, bias 0; ``"gaussian"``: ``A ~ N(0, 1/r²)``, ``B = 0``;
    ``False``: torch's ConvNd defaults, ``A ~ U(±1/√fan_in)``, ``B`` and bias ``~ U(±√(groups/r))``.
    Other modes raise ``ConfigError`` (``peft``'s conv layers reject them); ``r`` must divide by
    ``groups``. ``scaling`` is unused (kept for a uniform signature). Dtype handling as ``init_linear``.
    """
    xp = array_namespace(weight)
    mode, _ = _parse_mode(init_lora_weights, layer="Conv", r=r, shape=weight.shape)
    if mode not in ("default", "gaussian", "none"):
        raise ConfigError(
            f"init_lora_weights={init_lora_weights!r} is not supported for conv layers (weight shape "
            f"{tuple(weight.shape)}); use True, False or 'gaussian'"
        )
    if groups < 1 or r % groups != 0:
        raise ConfigError(
            f"conv layer with weight shape {tuple(weight.shape)} and groups={groups}: LoRA rank r={r} must be "
            "divisible by groups"
        )
    if lora_bias and init_lora_weights not in (True, False):
        raise ConfigError(
            f"lora_bias=True is only supported with init_lora_weights=True or False, got {init_lora_weights!r}"
        )
    dtype = adapter_dtype(weight.dtype, xp=xp) if dtype is None else dtype
    out_channels = weight.shape[0]
    in_channels = weight.shape[1] * groups
    kernel = tuple(weight.shape[2:])
    fan_in_A = in_channels * math.prod(kernel)
    fan_in_B = r // groups
    shape_A = (r, in_channels, *kernel)
    shape_B = (out_channels, fan_in_B) + (1,) * len(kernel)
    draw = _Drawer(sampler, like=weight, dtype=dtype, xp=xp)
    if mode == "none":
        lora_A = draw.uniform(shape_A, bound=1 / math.sqrt(fan_in_A))
        lora_B = draw.uniform(shape_B, bound=1 / math.sqrt(fan_in_B))
        bias = draw.uniform((out_channels,), bound=1 / math.sqrt(fan_in_B)) if lora_bias else None
    else:
        lora_A = _reset_A(shape_A, mode=mode, fan_in=fan_in_A, r=r, draw=draw)
        lora_B = draw.zeros(shape_B)
        bias = draw.zeros((out_channels,)) if lora_bias else None
    return LoraInit(draw.finish(lora_A), draw.finish(lora_B), None if bias is None else draw.finish(bias), weight)


class _Drawer:
    """Sampler draws and zeros in the working dtype, on the namespace/device of ``like``, and the final cast."""

    def __init__(self, sampler: Sampler, *, like: Array, dtype: Any, xp: Namespace) -> None:
        self.sampler, self.like, self.dtype, self.xp = sampler, like, dtype, xp
        self.work = compute_dtype(dtype, xp=xp)

    def _adopt(self, sample: Array) -> Array:
        sample = to_device_of(self.xp.asarray(sample), self.like, xp=self.xp)
        return self.xp.astype(sample, self.work)

    def uniform(self, shape: tuple[int, ...], *, bound: float) -> Array:
        return self._adopt(self.sampler.uniform(shape, low=-bound, high=bound, dtype=self.work))

    def normal(self, shape: tuple[int, ...], *, std: float) -> Array:
        return self._adopt(self.sampler.normal(shape, std=std, dtype=self.work))

    def zeros(self, shape: tuple[int, ...]) -> Array:
        return to_device_of(self.xp.zeros(shape, dtype=self.work), self.like, xp=self.xp)

    def finish(self, x: Array) -> Array:
        # peft first moves a new adapter to the base dtype, then upcasts half precision to float32.
        if is_half(self.like.dtype) and dtype_name(self.like.dtype) != dtype_name(self.dtype):
            x = self.xp.astype(x, self.like.dtype)
        return self.xp.astype(x, self.dtype)


def _reset_A(shape: tuple[int, ...], *, mode: str, fan_in: int, r: int, draw: _Drawer) -> Array:
    if mode == "gaussian":
        return draw.normal(shape, std=1 / r)
    return draw.uniform(shape, bound=1 / math.sqrt(fan_in))


def _pissa_factors(
    oriented: Array, /, *, r: int, scaling: float, niter: int | None, draw: _Drawer, xp: Namespace
) -> tuple[Array, Array]:
    if niter is None:
        u, s, vh = xp.linalg.svd(oriented, full_matrices=False)
        k = min(r, s.shape[0])
        u, s, vh = u[:, :k], s[:k], vh[:k, :]
    else:
        u, s, vh = _randomized_svd(oriented, rank=r, niter=niter, draw=draw, xp=xp)
    root = xp.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def _randomized_svd(
    matrix: Array, /, *, rank: int, niter: int, draw: _Drawer, xp: Namespace
) -> tuple[Array, Array, Array]:
    # Halko et al. 2009, Alg. 4.4 + 5.1, as torch.svd_lowrank(q=rank): work on the tall orientation.
    wide = matrix.shape[0] < matrix.shape[1]
    tall = xp.matrix_transpose(matrix) if wide else matrix
    test = xp.astype(draw.normal((tall.shape[1], rank), std=1.0), tall.dtype)
    basis, _ = xp.linalg.qr(tall @ test)
    for _ in range(niter):
        basis, _ = xp.linalg.qr(xp.matrix_transpose(tall) @ basis)
        basis, _ = xp.linalg.qr(tall @ basis)
    u, s, vh = xp.linalg.svd(xp.matrix_transpose(basis) @ tall, full_matrices=False)
    u = basis @ u
    if wide:
        return xp.matrix_transpose(vh), s, xp.matrix_transpose(u)
    return u, s, vh


def _olora_factors(oriented: Array, /, *, r: int, xp: Namespace) -> tuple[Array, Array]:
    q, upper = xp.linalg.qr(oriented)
    k = min(r, upper.shape[0])
    return upper[:k, :], q[:, :k]


def _orthogonal_factors(
    in_features: int, out_features: int, /, *, r: int, draw: _Drawer, xp: Namespace
) -> tuple[Array, Array]:
    q, _ = xp.linalg.qr(draw.normal((r, r), std=1.0))
    gauss_A = draw.normal((in_features, r // 2), std=1.0)
    gauss_B = draw.normal((r // 2, out_features), std=1.0)
    lora_A = xp.matrix_transpose(gauss_A @ q[0::2, :]) / 10.0
    lora_B = (xp.matrix_transpose(gauss_B) @ q[1::2, :]) / 10.0
    return lora_A, lora_B


def _parse_mode(init_lora_weights: Any, *, layer: str, r: int, shape: tuple[int, ...]) -> tuple[str, int | None]:
    """``(mode, niter)`` with mode in default/none/gaussian/pissa/olora/orthogonal; niter only for pissa_niter_K."""
    where = f"{layer} layer with weight shape {tuple(shape)}"
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{where}: `r` should be a positive integer, got {r!r}")
    if init_lora_weights is True:
        return "default", None
    if init_lora_weights is False:
        return "none", None
    if not isinstance(init_lora_weights, str):
        raise ConfigError(f"{where}: init_lora_weights must be a bool or a string, got {init_lora_weights!r}")
    # Matching follows peft: "olora" and "gaussian" case-insensitively, "pissa" as a prefix.
    if init_lora_weights in _NEEDS_DATA or init_lora_weights.startswith("corda") or init_lora_weights.lower() == "mica":
        raise ConfigError(
            f"{where}: init_lora_weights={init_lora_weights!r} needs calibration data or quantisation, "
            "which peftcore does not support yet"
        )
    if init_lora_weights.lower() == "gaussian":
        return "gaussian", None
    if init_lora_weights.lower() == "olora":
        return "olora", None
    if init_lora_weights == "orthogonal":
        return "orthogonal", None
    if init_lora_weights == "pissa":
        return "pissa", None
    if init_lora_weights.startswith(_PISSA_NITER):
        count = init_lora_weights[len(_PISSA_NITER) :]
        if count.isdecimal():
            return "pissa", int(count)
    raise ConfigError(
        f"{where}: unknown init_lora_weights={init_lora_weights!r}; expected True, False, 'gaussian', 'pissa', "
        "'pissa_niter_[number of iters]', 'olora' or 'orthogonal'"
    )
