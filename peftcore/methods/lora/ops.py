"""LoRA arithmetic for Linear (and GPT-2 ``Conv1D``), Embedding and Conv1d/2d/3d layers.

Mirrors ``peft.tuners.lora.layer``: ``Linear``/``Embedding``/``_ConvNd`` ``forward``,
``get_delta_weight``, ``merge`` and ``unmerge``. Torch orientation throughout:
``lora_A (r, in[, *k])``, ``lora_B (out, r[ // groups, 1, ..])``, Linear weight ``(out, in)``
(``(in, out)`` with ``fan_in_fan_out``), Embedding ``lora_embedding_A (r, num_embeddings)``,
``lora_embedding_B (dim, r)``.

Dtype rule (peft's): the LoRA branch runs in the adapter dtype (``x`` is cast to ``lora_A.dtype``),
the update is added to the base result with type promotion and the sum is cast back to the base
result's dtype; delta weights of float16/bfloat16 factors are formed in float32 and cast back.
Every function is shape-checked statically and traceable under ``jax.jit``, except
``merge(..., safe=True)``/``merge_bias(..., safe=True)``, which inspect values.
"""

from __future__ import annotations

import math
from numbers import Real

from peftcore._conv import conv_nd
from peftcore._xp import (
    Array,
    Namespace,
    add_lora_product,
    add_product,
    array_namespace,
    compute_dtype,
    factor_transpose,
    stop_gradient,
)
from peftcore.errors import ConfigError, MergeError, ShapeMismatchError, UnsupportedLayerError

__all__ = [
    "accumulate",
    "conv_delta_weight",
    "conv_forward",
    "conv_update",
    "delta_weight",
    "embedding_delta_weight",
    "embedding_forward",
    "embedding_update",
    "linear_forward",
    "linear_update",
    "merge",
    "merge_bias",
    "scaling",
    "unmerge",
    "unmerge_bias",
]

# torch's embedding_renorm_ adds this to the norm before dividing
_RENORM_EPS = 1e-7


def scaling(r: int, lora_alpha: float, *, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (peft's ``LoraLayer.update_layer``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def accumulate(result: Array, update: Array, /, *updates: Array) -> Array:
    """``(result + update + ...)`` with type promotion, cast back to ``result.dtype``.

    peft adds each active adapter's update to the running (promoted) result and casts once at
    the end; pass several updates to reproduce that rounding exactly.
    """
    xp = array_namespace(result, update, *updates)
    total = result
    for term in (update, *updates):
        if tuple(term.shape) != tuple(result.shape):
            raise ShapeMismatchError(
                f"LoRA update of shape {tuple(term.shape)} cannot be added to the base result of shape "
                f"{tuple(result.shape)}"
            )
        # equal dtypes (the common case) skip result_type: this runs on every adapter layer call
        if term.dtype != total.dtype:
            common = xp.result_type(total.dtype, term.dtype)
            total, term = _cast(total, common, xp=xp), _cast(term, common, xp=xp)
        total = total + term
    return _cast(total, result.dtype, xp=xp)


# --- Linear (nn.Linear, GPT-2 Conv1D) --------------------------------------------------------


def linear_update(
    x: Array, lora_A: Array, lora_B: Array, lora_B_bias: Array | None = None, /, *, scaling: float
) -> Array:
    """``s·((x·Aᵀ)·Bᵀ + b_B)`` with ``x`` cast to ``A.dtype``: ``(..., in) -> (..., out)``.

    peft ``lora.Linear.forward``'s branch ``lora_B(lora_A(dropout(x))) * scaling``; ``x`` is the
    already dropped-out input. GPT-2 ``Conv1D`` uses the same untransposed factors. ``s`` multiplies
    the thin ``(..., r)`` intermediate, not the ``(..., out)`` update (same value, one small pass).
    """
    xp = array_namespace(x, lora_A, lora_B, lora_B_bias)
    hidden, lora_B = _hidden(x, lora_A, lora_B, lora_B_bias, xp=xp)
    update = (hidden * scaling) @ factor_transpose(lora_B, xp=xp)
    if lora_B_bias is not None:
        update = update + lora_B_bias * scaling
    return update


def linear_forward(
    result: Array,
    x: Array,
    lora_A: Array,
    lora_B: Array,
    lora_B_bias: Array | None = None,
    /,
    *,
    scaling: float,
    donate_result: bool = False,
) -> Array:
    """``result + linear_update(x, ...)`` in ``result.dtype`` (peft ``lora.Linear.forward``).

    ``result (..., out)`` is promoted to the adapter dtype first (peft adds the update with type
    promotion), so the product ``(x·Aᵀ)·Bᵀ`` is accumulated straight into it
    (:func:`peftcore._xp.add_lora_product`: one ``linear`` and one ``addmm`` on torch) before the
    cast back. ``result`` is not modified unless ``donate_result=True``: the caller gives up
    ``result`` (never reads it again) and torch may accumulate into its buffer in place; other
    namespaces ignore the flag.
    """
    xp = array_namespace(result, x, lora_A, lora_B, lora_B_bias)
    _check_linear_operands(result, x, lora_A, lora_B, lora_B_bias)
    dtype = lora_A.dtype
    total = result
    if result.dtype != dtype:
        total = _cast(result, xp.result_type(result.dtype, dtype), xp=xp)
    if lora_B_bias is not None:
        total = total + _cast(lora_B_bias, dtype, xp=xp) * scaling
    # an array made here (by the promotion or the bias) is ours to accumulate into
    owned = donate_result or total is not result
    total = add_lora_product(total, _cast(x, dtype, xp=xp), lora_A, _cast(lora_B, dtype, xp=xp), alpha=scaling,
                             xp=xp, donate_c=owned)
    return _cast(total, result.dtype, xp=xp)


def delta_weight(lora_A: Array, lora_B: Array, /, *, scaling: float, fan_in_fan_out: bool = False) -> Array:
    """``ΔW = s·B·A`` ``(out, in)``, or its transpose ``(in, out)`` for ``fan_in_fan_out`` (GPT-2 Conv1D).

    peft ``lora.Linear.get_delta_weight``; half-precision factors are multiplied in float32.
    """
    xp = array_namespace(lora_A, lora_B)
    _check_factors(lora_A, lora_B, None, spatial=0)
    delta = _in_compute_dtype(lambda a, b: xp.matmul(b, a) * scaling, lora_A, lora_B, xp=xp)
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


# --- Embedding ----------------------------------------------------------------------------------


def embedding_update(
    indices: Array,
    lora_embedding_A: Array,
    lora_embedding_B: Array,
    /,
    *,
    scaling: float,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    embed_scale: float | Array | None = None,
    padding_idx: int | None = None,
) -> Array:
    """``s·(Aᵀ[idx])·Bᵀ`` (times ``embed_scale``): integer ``idx (...)`` -> ``(..., dim)``.

    peft ``lora.Embedding.forward``: ``F.embedding(idx, Aᵀ, **base kwargs) @ Bᵀ * s``, no dropout
    and no input cast. ``max_norm`` renormalises each looked-up row of ``Aᵀ`` whose ``norm_type``
    norm exceeds it to ``max_norm / (norm + 1e-7)`` times itself, as torch's ``embedding_renorm_``
    does, but functionally: ``lora_embedding_A`` is left untouched (torch rewrites it in place) and
    gradients pass as if unscaled, like torch's. ``padding_idx`` rows get no gradient, as in torch.
    Out-of-range indices are not checked (that would need their values). ``s`` and ``embed_scale``
    multiply the thin ``(tokens, r)`` rows, not the ``(..., dim)`` update (same value, one small pass).
    """
    xp = array_namespace(indices, lora_embedding_A, lora_embedding_B)
    rows = _embedding_rows(indices, lora_embedding_A, lora_embedding_B, max_norm=max_norm, norm_type=norm_type,
                           embed_scale=embed_scale, padding_idx=padding_idx, xp=xp)
    update = xp.matmul(rows * scaling, xp.matrix_transpose(lora_embedding_B))
    return xp.reshape(update, (*indices.shape, lora_embedding_B.shape[0]))


def embedding_forward(
    result: Array,
    indices: Array,
    lora_embedding_A: Array,
    lora_embedding_B: Array,
    /,
    *,
    scaling: float,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    embed_scale: float | Array | None = None,
    padding_idx: int | None = None,
    donate_result: bool = False,
) -> Array:
    """``result + embedding_update(indices, ...)`` in ``result.dtype`` (peft ``lora.Embedding.forward``).

    As :func:`linear_forward`: ``result`` is promoted to the adapter dtype and the product accumulated
    into it (:func:`peftcore._xp.add_product`, one ``addmm`` on torch; in place with ``donate_result``).
    """
    xp = array_namespace(result, indices, lora_embedding_A, lora_embedding_B)
    rows = _embedding_rows(indices, lora_embedding_A, lora_embedding_B, max_norm=max_norm, norm_type=norm_type,
                           embed_scale=embed_scale, padding_idx=padding_idx, xp=xp)
    expected = (*indices.shape, lora_embedding_B.shape[0])
    if tuple(result.shape) != expected:
        raise ShapeMismatchError(
            f"LoRA update of shape {expected} cannot be added to the base result of shape {tuple(result.shape)}"
        )
    total = result
    if result.dtype != rows.dtype:
        total = _cast(result, xp.result_type(result.dtype, rows.dtype), xp=xp)
    total = add_product(total, rows, _cast(lora_embedding_B, rows.dtype, xp=xp), alpha=scaling, xp=xp,
                        donate_c=donate_result or total is not result)
    return _cast(total, result.dtype, xp=xp)


def _embedding_rows(indices: Array, lora_embedding_A: Array, lora_embedding_B: Array, *, max_norm: float | None,
                    norm_type: float, embed_scale: float | Array | None, padding_idx: int | None,
                    xp: Namespace) -> Array:
    """The looked-up rows ``Aᵀ[idx] (tokens, r)`` (renormalised, padding rows detached, times ``embed_scale``)."""
    _check_embedding_factors(lora_embedding_A, lora_embedding_B)
    if not xp.isdtype(indices.dtype, "integral"):
        raise ShapeMismatchError(
            f"embedding indices of shape {tuple(indices.shape)} must have an integer dtype, got {indices.dtype}"
        )
    num_embeddings = lora_embedding_A.shape[1]
    flat = xp.reshape(indices, (-1,))
    rows = xp.matrix_transpose(xp.take(lora_embedding_A, flat, axis=1))  # (n, r)
    if max_norm is not None:
        norms = xp.linalg.vector_norm(rows, axis=-1, keepdims=True, ord=norm_type)
        factor = xp.where(norms > max_norm, max_norm / (norms + _RENORM_EPS), xp.ones_like(norms))
        # value: the renormalised row; gradient: identity (torch renormalises outside autograd)
        rows = stop_gradient(rows * factor, xp=xp) + (rows - stop_gradient(rows, xp=xp))
    if padding_idx is not None:
        pad = padding_idx + num_embeddings if padding_idx < 0 else padding_idx
        rows = xp.where(xp.expand_dims(flat == pad, axis=-1), stop_gradient(rows, xp=xp), rows)
    if embed_scale is None:
        return rows
    if isinstance(embed_scale, Real):
        return rows * embed_scale
    return rows * _cast(embed_scale, rows.dtype, xp=xp)


def embedding_delta_weight(lora_embedding_A: Array, lora_embedding_B: Array, /, *, scaling: float) -> Array:
    """``ΔW = s·(B·A)ᵀ`` ``(num_embeddings, dim)`` (peft ``lora.Embedding.get_delta_weight``)."""
    xp = array_namespace(lora_embedding_A, lora_embedding_B)
    _check_embedding_factors(lora_embedding_A, lora_embedding_B)
    delta = _in_compute_dtype(lambda a, b: xp.matmul(b, a) * scaling, lora_embedding_A, lora_embedding_B, xp=xp)
    return xp.matrix_transpose(delta)


# --- Conv1d / Conv2d / Conv3d ---------------------------------------------------------------------


def conv_update(
    x: Array,
    lora_A: Array,
    lora_B: Array,
    lora_B_bias: Array | None = None,
    /,
    *,
    scaling: float,
    stride: int | tuple[int, ...],
    padding: int | tuple[int, ...] | str,
    groups: int = 1,
) -> Array:
    """``s·(convB(convA(x)) + b_B)`` with ``x (batch, in, *spatial)`` cast to ``A.dtype``.

    peft ``lora._ConvNd``: ``convA`` has A's kernel and the base layer's stride and padding but
    dilation 1 and groups 1 (zero padding whatever the base's ``padding_mode``); ``convB`` is a
    1×…×1 conv with the base layer's ``groups``, so ``r`` must be divisible by ``groups``.
    """
    xp = array_namespace(x, lora_A, lora_B, lora_B_bias)
    spatial = lora_A.ndim - 2
    _check_factors(lora_A, lora_B, lora_B_bias, spatial=spatial, groups=groups)
    x = _cast(x, lora_A.dtype, xp=xp)
    # s on the thin (batch, r, ...) intermediate: the same value as on the update, one small pass
    hidden = conv_nd(x, lora_A, stride=stride, padding=padding) * scaling
    update = conv_nd(hidden, lora_B, groups=groups)
    if lora_B_bias is not None:
        update = update + xp.reshape(lora_B_bias * scaling, (-1,) + (1,) * spatial)
    return update


def conv_forward(
    result: Array,
    x: Array,
    lora_A: Array,
    lora_B: Array,
    lora_B_bias: Array | None = None,
    /,
    *,
    scaling: float,
    stride: int | tuple[int, ...],
    padding: int | tuple[int, ...] | str,
    groups: int = 1,
) -> Array:
    """``result + conv_update(x, ...)`` in ``result.dtype`` (peft ``lora._ConvNd.forward``)."""
    update = conv_update(x, lora_A, lora_B, lora_B_bias, scaling=scaling, stride=stride, padding=padding, groups=groups)
    return accumulate(result, update)


def conv_delta_weight(lora_A: Array, lora_B: Array, /, *, scaling: float, groups: int = 1) -> Array:
    """``ΔW[o, c, *k] = s·Σ_j B[o, j]·A[g(o)·r/groups + j, c, *k]`` ``(out, in, *k)``.

    peft ``lora._ConvNd.get_delta_weight`` for ``groups == 1`` (the 1×1 special case is the same
    formula). With ``groups > 1`` this is the ungrouped kernel equivalent to the LoRA branch; it
    cannot be merged into the grouped base weight (peft cannot either), so ``merge`` raises.
    """
    xp = array_namespace(lora_A, lora_B)
    spatial = lora_A.ndim - 2
    _check_factors(lora_A, lora_B, None, spatial=spatial, groups=groups)
    rank, out_channels = lora_A.shape[0], lora_B.shape[0]
    in_shape = tuple(lora_A.shape[1:])

    def grouped_product(a, b):
        a = xp.reshape(a, (groups, rank // groups, math.prod(in_shape)))
        b = xp.reshape(b, (groups, out_channels // groups, rank // groups))
        return xp.reshape(xp.matmul(b, a), (out_channels, *in_shape)) * scaling

    return _in_compute_dtype(grouped_product, lora_A, lora_B, xp=xp)


# --- merge / unmerge ------------------------------------------------------------------------------


def merge(weight: Array, delta: Array, /, *, safe: bool = False, name: str | None = None) -> Array:
    """``W + ΔW`` (added with type promotion) cast to ``W.dtype``; a new array, ``weight`` is untouched.

    peft ``merge(safe_merge=...)`` for plain LoRA. ``safe=True`` raises ``MergeError`` naming
    ``name`` when the result holds inf or nan; it reads values, so it cannot run under ``jax.jit``.
    (peft's safe path and Embedding merge round ΔW to ``W.dtype`` before adding: pass
    ``delta`` cast to ``W.dtype`` to reproduce that; it only differs for mixed half precision.)
    """
    xp = array_namespace(weight, delta)
    _check_merge_shapes(weight, delta, name=name)
    common = xp.result_type(weight.dtype, delta.dtype)
    merged = _cast(_cast(weight, common, xp=xp) + _cast(delta, common, xp=xp), weight.dtype, xp=xp)
    if safe:
        _check_finite(merged, name=name, what="weight", xp=xp)
    return merged


def unmerge(weight: Array, delta: Array, /) -> Array:
    """``W − ΔW`` in ``W.dtype`` (ΔW cast to ``W.dtype`` first, as peft's ``unmerge``)."""
    xp = array_namespace(weight, delta)
    _check_merge_shapes(weight, delta, name=None)
    return weight - _cast(delta, weight.dtype, xp=xp)


def merge_bias(
    bias: Array | None, lora_B_bias: Array, /, *, scaling: float, safe: bool = False, name: str | None = None
) -> Array:
    """``b + s·b_B`` in ``b.dtype`` (peft's ``lora_bias`` merge); no base bias raises ``MergeError``."""
    if bias is None:
        raise MergeError(
            f"cannot merge the LoRA bias of {_label(name)}: the base layer has no bias (lora_bias=True)"
        )
    xp = array_namespace(bias, lora_B_bias)
    _check_bias_shapes(bias, lora_B_bias)
    scaled = lora_B_bias * scaling
    common = xp.result_type(bias.dtype, scaled.dtype)
    merged = _cast(_cast(bias, common, xp=xp) + _cast(scaled, common, xp=xp), bias.dtype, xp=xp)
    if safe:
        _check_finite(merged, name=name, what="bias", xp=xp)
    return merged


def unmerge_bias(bias: Array, lora_B_bias: Array, /, *, scaling: float) -> Array:
    """``b − s·b_B`` in ``b.dtype`` (peft's ``unmerge`` of a ``lora_bias``)."""
    xp = array_namespace(bias, lora_B_bias)
    _check_bias_shapes(bias, lora_B_bias)
    scaled = lora_B_bias * scaling
    common = xp.result_type(bias.dtype, scaled.dtype)
    return _cast(_cast(bias, common, xp=xp) - _cast(scaled, common, xp=xp), bias.dtype, xp=xp)


# --- helpers --------------------------------------------------------------------------------------


def _cast(x: Array, dtype, *, xp: Namespace) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _hidden(x: Array, lora_A: Array, lora_B: Array, lora_B_bias: Array | None, *, xp: Namespace) -> tuple[Array, Array]:
    """``x·Aᵀ (..., r)`` with ``x`` cast to ``A.dtype``, and ``B`` in ``A.dtype``.

    Shapes are checked first, so errors name ``x``'s own shape.
    """
    _check_factors(lora_A, lora_B, lora_B_bias, spatial=0)
    _check_input(x, lora_A)
    # operators on 2-D factors (standard ``@`` and ``.T``) skip array-api-compat's wrappers: this is the hot path
    return _cast(x, lora_A.dtype, xp=xp) @ lora_A.T, _cast(lora_B, lora_A.dtype, xp=xp)


def _check_input(x: Array, lora_A: Array) -> None:
    if x.ndim < 1 or x.shape[-1] != lora_A.shape[1]:
        raise ShapeMismatchError(
            f"LoRA input x {tuple(x.shape)} must end in in_features={lora_A.shape[1]} to match "
            f"lora_A {tuple(lora_A.shape)} (r, in)"
        )


def _check_linear_operands(result: Array, x: Array, lora_A: Array, lora_B: Array, lora_B_bias: Array | None) -> None:
    """``x (..., in)``, ``lora_A (r, in)``, ``lora_B (out, r)``, ``lora_B_bias (out,)``, ``result (..., out)``."""
    a, b, x_shape, result_shape = lora_A.shape, lora_B.shape, x.shape, result.shape
    # one comparison chain on the hot path; the checks below only word the error
    if (len(a) == 2 and len(b) == 2 and b[1] == a[0] and len(x_shape) >= 1 and x_shape[-1] == a[1]
            and len(result_shape) == len(x_shape) and result_shape[:-1] == x_shape[:-1] and result_shape[-1] == b[0]
            and (lora_B_bias is None or tuple(lora_B_bias.shape) == (b[0],))):
        return
    _check_factors(lora_A, lora_B, lora_B_bias, spatial=0)
    _check_input(x, lora_A)
    raise ShapeMismatchError(
        f"LoRA update of shape {(*x_shape[:-1], b[0])} cannot be added to the base result of shape "
        f"{tuple(result_shape)}"
    )


def _in_compute_dtype(product, lora_A: Array, lora_B: Array, *, xp: Namespace) -> Array:
    """``product(A, B)`` formed in float32 when the factors are half precision, cast back."""
    dtype = xp.result_type(lora_A.dtype, lora_B.dtype)
    work = compute_dtype(dtype, xp=xp)
    return _cast(product(_cast(lora_A, work, xp=xp), _cast(lora_B, work, xp=xp)), dtype, xp=xp)


def _check_factors(lora_A, lora_B, lora_B_bias, *, spatial: int, groups: int = 1) -> None:
    a, b = tuple(lora_A.shape), tuple(lora_B.shape)
    kind = "(r, in)" if spatial == 0 else "(r, in, *kernel)"
    if len(a) != spatial + 2:
        raise ShapeMismatchError(f"lora_A must be {kind}, got shape {a}")
    if len(b) != spatial + 2 or any(k != 1 for k in b[2:]):
        expected = "(out, r)" if spatial == 0 else f"(out, r // groups, {', '.join('1' * spatial)})"
        raise ShapeMismatchError(f"lora_B must be {expected}, got shape {b} (lora_A {a})")
    rank = a[0]
    if spatial and (not isinstance(groups, int) or groups < 1 or rank % groups or b[0] % groups):
        raise UnsupportedLayerError(
            f"a conv LoRA with groups={groups} needs rank r and out_channels divisible by groups; "
            f"got lora_A {a} (r={rank}) and lora_B {b}"
        )
    if b[1] * groups != rank:
        what = f"r // groups = {rank // groups}" if groups > 1 else f"r = {rank}"
        raise ShapeMismatchError(f"lora_A {a} and lora_B {b} disagree on the rank: lora_B needs {what} columns")
    if lora_B_bias is not None and tuple(lora_B_bias.shape) != (b[0],):
        raise ShapeMismatchError(
            f"lora_B bias must be (out,) = ({b[0]},) for lora_B {b}, got {tuple(lora_B_bias.shape)}"
        )


def _check_embedding_factors(lora_embedding_A, lora_embedding_B) -> None:
    a, b = tuple(lora_embedding_A.shape), tuple(lora_embedding_B.shape)
    if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
        raise ShapeMismatchError(
            f"lora_embedding_A (r, num_embeddings) and lora_embedding_B (dim, r) do not fit: got {a} and {b}"
        )


def _check_merge_shapes(weight, delta, *, name: str | None) -> None:
    w, d = tuple(weight.shape), tuple(delta.shape)
    if w == d:
        return
    where = f" of {name!r}" if name else ""
    grouped_conv = len(w) == len(d) >= 3 and w[0] == d[0] and w[2:] == d[2:] and w[1] and d[1] % w[1] == 0
    if grouped_conv:
        raise MergeError(
            f"cannot merge a LoRA into the grouped conv{where} (groups={d[1] // w[1]}): the delta {d} is not grouped "
            f"like the weight {w}; peft does not support merging conv layers with groups > 1 either"
        )
    raise ShapeMismatchError(f"delta weight {d} does not match the base weight{where} {w}")


def _check_bias_shapes(bias, lora_B_bias) -> None:
    if tuple(bias.shape) != tuple(lora_B_bias.shape):
        raise ShapeMismatchError(
            f"lora_B bias {tuple(lora_B_bias.shape)} does not match the base bias {tuple(bias.shape)}"
        )


def _label(name: str | None) -> str:
    return repr(name) if name else "the layer"


def _check_finite(merged, *, name: str | None, what: str, xp: Namespace) -> None:
    if not bool(xp.all(xp.isfinite(merged))):
        raise MergeError(
            f"safe merge found non-finite values (nan or inf) in the merged {what} of {_label(name)}: "
            "the adapter seems to be broken"
        )
