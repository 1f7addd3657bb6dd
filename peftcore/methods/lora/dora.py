"""DoRA, weight-decomposed LoRA: ``W ↦ m ⊙ (W' + sBA) / ‖W' + sBA‖_row`` with the norm held constant.

Mirrors ``peft/tuners/lora/dora.py`` (``DoraLinearLayer``, ``DoraEmbeddingLayer``, ``_DoraConvNdLayer``)
and the DoRA variants' merge/unmerge in ``peft/tuners/lora/variants.py``. ``W'`` is the Linear weight in
``(out, in)`` orientation (the transpose of a GPT-2 ``Conv1D`` weight, ``fan_in_fan_out=True``). The norm is
wrapped in :func:`peftcore._xp.stop_gradient`, so ``m``, ``A`` and ``B`` get gradients but not through the
norm (DoRA paper §4.3, as peft does).
"""

from __future__ import annotations

from peftcore._conv import conv_nd
from peftcore._xp import Array, Namespace, array_namespace, compute_dtype, stop_gradient
from peftcore.errors import MergeError, ShapeMismatchError
from peftcore.methods.lora import ops

__all__ = [
    "conv_forward",
    "conv_magnitude_init",
    "conv_merge",
    "conv_unmerge",
    "embedding_forward",
    "embedding_magnitude_init",
    "embedding_merge",
    "embedding_unmerge",
    "linear_forward",
    "magnitude_init",
    "merge",
    "unmerge",
    "weight_norm",
]


# ----------------------------------------------------------------------------------------------- checks


def _fail(what: str) -> None:
    raise ShapeMismatchError(f"DoRA: {what}")


def _check_same_shape(weight: Array, other: Array, label: str) -> None:
    if tuple(other.shape) != tuple(weight.shape):
        _fail(f"{label} has shape {tuple(other.shape)}, expected the weight's shape {tuple(weight.shape)}")


def _check_linear_factors(weight: Array, lora_A: Array, lora_B: Array, *, fan_in_fan_out: bool) -> tuple[int, int]:
    """``(out, in)`` of a Linear whose factors and weight agree; raises otherwise."""
    if weight.ndim != 2 or lora_A.ndim != 2 or lora_B.ndim != 2:
        _fail(
            f"Linear weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} "
            "must all be 2-d"
        )
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    expected = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    if lora_A.shape[0] != lora_B.shape[1] or tuple(weight.shape) != expected:
        _fail(
            f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit the weight "
            f"{tuple(weight.shape)} (fan_in_fan_out={fan_in_fan_out}; expected weight {expected}, "
            "A (r, in), B (out, r))"
        )
    return out_features, in_features


def _check_magnitude(magnitude: Array, expected: tuple[int, ...], weight: Array) -> None:
    if tuple(magnitude.shape) != expected:
        _fail(f"magnitude has shape {tuple(magnitude.shape)}, expected {expected} for the weight {tuple(weight.shape)}")


def _check_conv_factors(weight: Array, lora_A: Array, lora_B: Array) -> int:
    """``groups`` implied by conv factors that fit ``weight (out, in/groups, *k)``; raises otherwise."""
    nd = weight.ndim
    bad = (
        nd < 3
        or lora_A.ndim != nd
        or lora_B.ndim != nd
        or tuple(lora_A.shape[2:]) != tuple(weight.shape[2:])
        or lora_B.shape[0] != weight.shape[0]
        or any(k != 1 for k in lora_B.shape[2:])
        or lora_B.shape[1] == 0
        or lora_A.shape[0] % lora_B.shape[1] != 0
    )
    groups = 0 if bad else lora_A.shape[0] // lora_B.shape[1]
    if bad or lora_A.shape[1] != weight.shape[1] * groups:
        _fail(
            f"conv lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit the weight "
            f"{tuple(weight.shape)} (expected A (r, in, *k), B (out, r/groups, 1, ..), W (out, in/groups, *k))"
        )
    return groups


def _conv_magnitude_shape(weight: Array) -> tuple[int, ...]:
    return (1, weight.shape[0]) + (1,) * (weight.ndim - 2)


# --------------------------------------------------------------------------------------------- norms


def _promoted_sum(weight: Array, delta: Array, *, xp: Namespace) -> Array:
    dtype = xp.result_type(weight, delta)
    return xp.astype(weight, dtype, copy=False) + xp.astype(delta, dtype, copy=False)


def weight_norm(weight: Array, delta: Array, /, *, fan_in_fan_out: bool = False) -> Array:
    """``‖W' + Δ'‖`` per output row, ``(out,)``; ``weight`` and ``delta`` share the stored orientation.

    peft's ``DoraLinearLayer.get_weight_norm`` (with the scaling already inside ``delta``).
    """
    xp = array_namespace(weight, delta)
    if weight.ndim != 2:
        _fail(f"weight_norm needs a 2-d weight, got {tuple(weight.shape)}")
    _check_same_shape(weight, delta, "delta")
    return xp.linalg.vector_norm(_promoted_sum(weight, delta, xp=xp), axis=0 if fan_in_fan_out else 1)


def _conv_lora_weight(weight: Array, lora_A: Array, lora_B: Array, *, xp: Namespace) -> Array:
    """peft's DoRA conv ``lora_weight``: ``B.reshape(-1, r) @ A.reshape(r, -1)`` laid out as ``weight``.

    Equals ``ΔW / s`` for ``groups == 1``; for ``groups > 1`` it is peft's reshaped product, not the grouped
    ΔW, and we keep it so magnitudes and outputs match peft's.
    """
    r = lora_A.shape[0]
    dtype = compute_dtype(lora_A.dtype, xp=xp)
    flat_B = xp.reshape(xp.astype(lora_B, dtype, copy=False), (-1, r))
    flat_A = xp.reshape(xp.astype(lora_A, dtype, copy=False), (r, -1))
    return xp.astype(xp.reshape(xp.matmul(flat_B, flat_A), tuple(weight.shape)), lora_A.dtype, copy=False)


def _conv_weight_norm(weight: Array, delta: Array, *, xp: Namespace) -> Array:
    """``‖W + Δ‖`` over every dim but out-channels, ``(1, out, 1, ..)`` (``_DoraConvNdLayer.get_weight_norm``)."""
    norm = xp.linalg.vector_norm(_promoted_sum(weight, delta, xp=xp), axis=tuple(range(1, weight.ndim)))
    return xp.reshape(norm, _conv_magnitude_shape(weight))


def _conv_norm(weight: Array, lora_A: Array, lora_B: Array, *, scaling: float, xp: Namespace) -> Array:
    return _conv_weight_norm(weight, scaling * _conv_lora_weight(weight, lora_A, lora_B, xp=xp), xp=xp)


# ----------------------------------------------------------------------------------- magnitude init


def magnitude_init(weight: Array, lora_A: Array, lora_B: Array, /, *, scaling: float,
                   fan_in_fan_out: bool = False) -> Array:
    """Linear/Conv1D magnitude ``m = ‖W' + s·B@A‖`` per output row, ``(out,)``.

    peft's ``DoraLinearLayer.update_layer``; with B = 0 (default init) this is the row norm of ``W'``.
    """
    array_namespace(weight, lora_A, lora_B)
    _check_linear_factors(weight, lora_A, lora_B, fan_in_fan_out=fan_in_fan_out)
    delta = ops.delta_weight(lora_A, lora_B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    return weight_norm(weight, delta, fan_in_fan_out=fan_in_fan_out)


def _check_embedding(weight: Array, lora_A: Array, lora_B: Array) -> int:
    if (
        weight.ndim != 2
        or lora_A.ndim != 2
        or lora_B.ndim != 2
        or lora_A.shape[0] != lora_B.shape[1]
        or tuple(weight.shape) != (lora_A.shape[1], lora_B.shape[0])
    ):
        _fail(
            f"lora_embedding_A {tuple(lora_A.shape)} and lora_embedding_B {tuple(lora_B.shape)} do not fit the "
            f"embedding weight {tuple(weight.shape)} (expected A (r, num_embeddings), B (dim, r))"
        )
    return weight.shape[1]


def embedding_magnitude_init(weight: Array, lora_embedding_A: Array, lora_embedding_B: Array, /, *,
                             scaling: float) -> Array:
    """Embedding magnitude ``m = ‖Wᵀ + s·B@A‖`` per row, ``(embedding_dim,)``.

    peft's ``DoraEmbeddingVariant.init`` (a ``DoraEmbeddingLayer`` with ``fan_in_fan_out=True``).
    """
    array_namespace(weight, lora_embedding_A, lora_embedding_B)
    _check_embedding(weight, lora_embedding_A, lora_embedding_B)
    delta = ops.embedding_delta_weight(lora_embedding_A, lora_embedding_B, scaling=scaling)
    return weight_norm(weight, delta, fan_in_fan_out=True)


def conv_magnitude_init(weight: Array, lora_A: Array, lora_B: Array, /, *, scaling: float) -> Array:
    """Conv magnitude ``m = ‖W + s·B@A‖`` over all dims but out-channels, ``(1, out, 1, ..)``.

    peft's ``DoraLinearLayer.update_layer`` for conv weights (then ``_DoraConvNdLayer.get_weight_norm``).
    """
    xp = array_namespace(weight, lora_A, lora_B)
    _check_conv_factors(weight, lora_A, lora_B)
    return _conv_norm(weight, lora_A, lora_B, scaling=scaling, xp=xp)


# -------------------------------------------------------------------------------------------- forward


def linear_forward(result: Array, x: Array, lora_A: Array, lora_B: Array, magnitude: Array, weight: Array,
                   bias: Array | None = None, /, *, scaling: float, fan_in_fan_out: bool = False,
                   recompute_base: bool = False) -> Array:
    """``result + (g−1)·base + g·s·(x Aᵀ) Bᵀ`` with ``g = m / stopgrad(‖W' + sBA‖_row)``, ``result``'s shape.

    ``result (..., out)`` is the running layer output; ``base = result − bias`` (peft reuses the running
    result, earlier adapters included), or ``x W'ᵀ`` when ``recompute_base`` (peft's path when dropout is
    active in training: ``x`` is then the dropped-out input). Runs in ``lora_A``'s dtype (``x`` and ``W`` cast
    to it) and returns ``result``'s dtype. peft's ``DoraLinearVariant.forward`` / ``DoraLinearLayer.forward``.
    """
    xp = array_namespace(result, x, lora_A, lora_B, magnitude, weight, bias)
    out_features, in_features = _check_linear_factors(weight, lora_A, lora_B, fan_in_fan_out=fan_in_fan_out)
    _check_magnitude(magnitude, (out_features,), weight)
    if x.ndim < 1 or x.shape[-1] != in_features or result.shape[-1:] != (out_features,):
        _fail(f"input {tuple(x.shape)} / result {tuple(result.shape)} do not fit the weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        _fail(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")

    adapter_dtype = lora_A.dtype
    x = xp.astype(x, adapter_dtype, copy=False)
    weight = xp.astype(weight, adapter_dtype, copy=False)
    delta = xp.astype(
        ops.delta_weight(lora_A, lora_B, scaling=scaling, fan_in_fan_out=fan_in_fan_out), adapter_dtype, copy=False
    )
    norm = stop_gradient(weight_norm(weight, delta, fan_in_fan_out=fan_in_fan_out), xp=xp)
    gain = magnitude / norm

    if recompute_base:
        base = xp.matmul(x, weight if fan_in_fan_out else weight.T)
    else:
        base = result if bias is None else result - bias
        base = xp.astype(base, adapter_dtype, copy=False)
    update = ops.linear_update(x, lora_A, lora_B, scaling=scaling)
    return ops.accumulate(result, (gain - 1.0) * base + gain * update)


def embedding_forward(result: Array, indices: Array, lora_embedding_A: Array, lora_embedding_B: Array,
                      magnitude: Array, weight: Array, /, *, scaling: float, embed_scale: float | Array | None = None,
                      max_norm: float | None = None, norm_type: float = 2.0,
                      padding_idx: int | None = None) -> Array:
    """``g·result + g·s·(Aᵀ[idx]) Bᵀ (·embed_scale)`` with ``g = m / stopgrad(‖Wᵀ + sBA‖_row)``.

    ``result (..., dim)`` is the base embedding output (``embed_scale`` already applied by the base layer);
    ``embed_scale`` scales only the DoRA term, after the norm, as peft's ``DoraEmbeddingVariant.forward``;
    ``max_norm``/``norm_type``/``padding_idx`` are the base layer's, applied to the lookup as
    ``ops.embedding_update`` does. Returns ``result``'s dtype.
    """
    xp = array_namespace(result, indices, lora_embedding_A, lora_embedding_B, magnitude, weight)
    dim = _check_embedding(weight, lora_embedding_A, lora_embedding_B)
    _check_magnitude(magnitude, (dim,), weight)
    if tuple(result.shape) != tuple(indices.shape) + (dim,):
        _fail(f"result {tuple(result.shape)} does not fit indices {tuple(indices.shape)} and dim {dim}")

    delta = ops.embedding_delta_weight(lora_embedding_A, lora_embedding_B, scaling=scaling)
    gain = magnitude / stop_gradient(weight_norm(weight, delta, fan_in_fan_out=True), xp=xp)
    update = ops.embedding_update(
        indices, lora_embedding_A, lora_embedding_B, scaling=scaling, max_norm=max_norm, norm_type=norm_type,
        embed_scale=embed_scale, padding_idx=padding_idx,
    )
    dtype = xp.result_type(gain, update, result)
    scaled = gain * xp.astype(result, dtype, copy=False) + gain * update
    return xp.astype(scaled, result.dtype, copy=False)


def conv_forward(result: Array, x: Array, lora_A: Array, lora_B: Array, magnitude: Array, weight: Array,
                 bias: Array | None = None, /, *, scaling: float, stride: int | tuple[int, ...],
                 padding: int | tuple[int, ...] | str, dilation: int | tuple[int, ...] = 1, groups: int = 1,
                 recompute_base: bool = False) -> Array:
    """``result + (g−1)·base + g·s·convB(convA(x))`` with ``g = m / stopgrad(‖W + s·lora_weight‖)``.

    ``x (batch, in, *spatial)``, ``result (batch, out, *spatial')``; ``g`` is ``(1, out, 1, ..)``;
    ``base = result − bias``, or ``conv(x, W)`` with the base stride/padding/dilation/groups when
    ``recompute_base`` (dropout active: ``x`` is the dropped-out input). convA uses the base stride and
    padding with dilation 1, as peft builds ``lora_A``. peft's ``_DoraConvNdLayer.forward``.
    """
    xp = array_namespace(result, x, lora_A, lora_B, magnitude, weight, bias)
    implied_groups = _check_conv_factors(weight, lora_A, lora_B)
    if groups != implied_groups:
        _fail(
            f"groups={groups}, but lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} imply {implied_groups}"
        )
    _check_magnitude(magnitude, _conv_magnitude_shape(weight), weight)
    if x.ndim != weight.ndim or x.shape[1] != lora_A.shape[1] or result.ndim != weight.ndim \
            or result.shape[1] != weight.shape[0]:
        _fail(f"input {tuple(x.shape)} / result {tuple(result.shape)} do not fit the conv weight "
              f"{tuple(weight.shape)} (expected batched (batch, channels, *spatial))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")

    x = xp.astype(x, lora_A.dtype, copy=False)
    gain = magnitude / stop_gradient(_conv_norm(weight, lora_A, lora_B, scaling=scaling, xp=xp), xp=xp)
    if recompute_base:
        base = conv_nd(
            x, xp.astype(weight, x.dtype, copy=False), stride=stride, padding=padding, dilation=dilation, groups=groups
        )
    else:
        base = result if bias is None else result - xp.reshape(bias, _conv_magnitude_shape(weight))
        base = xp.astype(base, x.dtype, copy=False)
    update = ops.conv_update(x, lora_A, lora_B, scaling=scaling, stride=stride, padding=padding, groups=groups)
    return ops.accumulate(result, (gain - 1.0) * base + gain * update)


# --------------------------------------------------------------------------------------- merge/unmerge


def _check_finite(weight: Array, name: str | None, *, xp: Namespace) -> None:
    # The one value-dependent check: safe merges are not jit-able, as in ops.merge.
    if not bool(xp.all(xp.isfinite(weight))):
        raise MergeError(
            f"safe merge found non-finite values (nan or inf) in the DoRA-merged weight of {name or 'the layer'}: "
            "the adapter seems to be broken"
        )


def _rescaled(weight: Array, delta: Array, factor: Array, *, xp: Namespace) -> Array:
    return xp.astype(factor * _promoted_sum(weight, delta, xp=xp), weight.dtype, copy=False)


def merge(weight: Array, delta: Array, magnitude: Array, base_weight: Array | None = None, /, *,
          safe: bool = False, name: str | None = None, fan_in_fan_out: bool = False) -> tuple[Array, Array]:
    """Linear/Conv1D merge: ``(m / ‖W₀' + Δ'‖)·(W + Δ)`` in ``W``'s dtype, and the norm ``(out,)``.

    ``delta`` is ``ops.delta_weight`` (scaling included, stored orientation). The norm is taken on
    ``base_weight`` (the weight with earlier-merged adapters taken out; default ``weight``), as peft 0.21's
    ``_unmerged_base_weight``; cache it for :func:`unmerge` (peft's ``<adapter>-weight_norm`` cache).
    ``safe=True`` raises ``MergeError`` naming ``name`` if the result is not finite (not jit-able).
    """
    xp = array_namespace(weight, delta, magnitude, base_weight)
    base = weight if base_weight is None else base_weight
    _check_same_shape(weight, base, "base_weight")
    norm = weight_norm(base, delta, fan_in_fan_out=fan_in_fan_out)
    _check_magnitude(magnitude, tuple(norm.shape), weight)
    factor = xp.reshape(magnitude / norm, (1, -1) if fan_in_fan_out else (-1, 1))
    merged = _rescaled(weight, delta, factor, xp=xp)
    if safe:
        _check_finite(merged, name, xp=xp)
    return merged, norm


def unmerge(weight: Array, delta: Array, magnitude: Array, cached_norm: Array, /, *,
            fan_in_fan_out: bool = False) -> Array:
    """Linear/Conv1D unmerge: ``W / (m / norm) − Δ`` in ``W``'s dtype, ``norm`` as returned by :func:`merge`."""
    xp = array_namespace(weight, delta, magnitude, cached_norm)
    _check_same_shape(weight, delta, "delta")
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    _check_magnitude(magnitude, (out_features,), weight)
    _check_magnitude(cached_norm, (out_features,), weight)
    factor = xp.reshape(magnitude / cached_norm, (1, -1) if fan_in_fan_out else (-1, 1))
    return xp.astype(_promoted_sum(weight / factor, -delta, xp=xp), weight.dtype, copy=False)


def embedding_merge(weight: Array, delta: Array, magnitude: Array, base_weight: Array | None = None, /, *,
                    safe: bool = False, name: str | None = None) -> tuple[Array, Array]:
    """Embedding merge: columns of ``W (num_emb, dim)`` scaled by ``m / ‖(W₀ + Δ)ᵀ‖_row``; also the ``(dim,)`` norm.

    ``delta`` is ``ops.embedding_delta_weight``; peft's ``DoraEmbeddingVariant.merge_*``.
    """
    return merge(weight, delta, magnitude, base_weight, safe=safe, name=name, fan_in_fan_out=True)


def embedding_unmerge(weight: Array, delta: Array, magnitude: Array, cached_norm: Array, /) -> Array:
    """Embedding unmerge: ``W / (m / norm) − Δ`` (``m``, ``norm`` per column)."""
    return unmerge(weight, delta, magnitude, cached_norm, fan_in_fan_out=True)


def conv_merge(weight: Array, delta: Array, magnitude: Array, base_weight: Array | None = None, /, *,
               safe: bool = False, name: str | None = None) -> tuple[Array, Array]:
    """Conv merge: ``(m / ‖W₀ + Δ‖)·(W + Δ)`` per out-channel; returns the ``(1, out, 1, ..)`` norm.

    ``delta`` is ``ops.conv_delta_weight`` (peft refuses to merge ``groups > 1`` convs; so should the caller).
    peft's ``_DoraConvNdVariant.merge_*``.
    """
    xp = array_namespace(weight, delta, magnitude, base_weight)
    base = weight if base_weight is None else base_weight
    if weight.ndim >= 3 and delta.ndim == weight.ndim and delta.shape[1] != weight.shape[1] \
            and delta.shape[0] == weight.shape[0] and weight.shape[1] and delta.shape[1] % weight.shape[1] == 0:
        raise MergeError(
            f"cannot merge DoRA into the grouped conv {name or ''} (groups={delta.shape[1] // weight.shape[1]}): "
            f"delta {tuple(delta.shape)} vs weight {tuple(weight.shape)}; peft refuses groups > 1 merges too"
        )
    _check_same_shape(weight, delta, "delta")
    _check_same_shape(weight, base, "base_weight")
    _check_magnitude(magnitude, _conv_magnitude_shape(weight), weight)
    norm = _conv_weight_norm(base, delta, xp=xp)
    factor = xp.reshape(magnitude / norm, (-1,) + (1,) * (weight.ndim - 1))
    merged = _rescaled(weight, delta, factor, xp=xp)
    if safe:
        _check_finite(merged, name, xp=xp)
    return merged, norm


def conv_unmerge(weight: Array, delta: Array, magnitude: Array, cached_norm: Array, /) -> Array:
    """Conv unmerge: ``W / (m / norm) − Δ`` per out-channel, ``norm`` as returned by :func:`conv_merge`."""
    xp = array_namespace(weight, delta, magnitude, cached_norm)
    _check_same_shape(weight, delta, "delta")
    _check_magnitude(magnitude, _conv_magnitude_shape(weight), weight)
    _check_magnitude(cached_norm, _conv_magnitude_shape(weight), weight)
    factor = xp.reshape(magnitude / cached_norm, (-1,) + (1,) * (weight.ndim - 1))
    return xp.astype(_promoted_sum(weight / factor, -delta, xp=xp), weight.dtype, copy=False)
