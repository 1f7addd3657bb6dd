"""DoRA (``peftcore.methods.lora.dora``) against the float64 NumPy reference, on every backend.

Identities checked besides the reference: B = 0 gives magnitude = row norms and forward = base;
the eval forward equals one dense layer with ``g ⊙ (W' + sBA)``; merge/unmerge round-trips and
the merged layer reproduces the unmerged forward; gradients reach m, A, B but not the norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import MergeError, ShapeMismatchError
from peftcore.methods.lora import dora
from peftcore.testing import assert_close, to_numpy
from tests.reference import dora as ref

DTYPES = ["float64", "float32"]
SETTINGS = settings(deadline=None, max_examples=10)
FEW = settings(deadline=None, max_examples=6)


def _to(xp, array, dtype):
    if array is None:
        return None
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


def _rng(draw) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


# ------------------------------------------------------------------------------------------- cases


@dataclass
class LinearCase:
    weight: np.ndarray  # stored orientation
    lora_A: np.ndarray
    lora_B: np.ndarray
    magnitude: np.ndarray
    bias: np.ndarray | None
    x: np.ndarray  # the LoRA-branch input (dropped-out for recompute cases)
    result: np.ndarray  # the base layer's output x W'ᵀ + b
    running_result: np.ndarray  # as if earlier adapters had added to it (peft's base = result − bias)
    scaling: float
    fan_in_fan_out: bool

    @property
    def oriented(self) -> np.ndarray:
        return self.weight.T if self.fan_in_fan_out else self.weight


@st.composite
def linear_cases(draw):
    rng = _rng(draw)
    # few distinct shapes: JAX compiles every primitive once per shape
    out_f, in_f = draw(st.sampled_from([1, 3, 7])), draw(st.sampled_from([1, 4, 8]))
    r = draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.sampled_from([(3,), (2, 3)]))
    fan_in_fan_out = draw(st.booleans())
    scaling = draw(st.floats(0.25, 4.0))
    w = rng.standard_normal((out_f, in_f))
    lora_A = rng.standard_normal((r, in_f))
    lora_B = rng.standard_normal((out_f, r))
    bias = rng.standard_normal(out_f) if draw(st.booleans()) else None
    x = rng.standard_normal((*batch, in_f))
    magnitude = np.linalg.norm(w + scaling * lora_B @ lora_A, axis=1) * rng.uniform(0.5, 1.5, out_f)
    result = x @ w.T + (0.0 if bias is None else bias)
    running = result + 0.3 * rng.standard_normal(result.shape)
    stored = w.T.copy() if fan_in_fan_out else w
    return LinearCase(stored, lora_A, lora_B, magnitude, bias, x, result, running, scaling, fan_in_fan_out)


@dataclass
class EmbeddingCase:
    weight: np.ndarray  # (num_emb, dim)
    lora_A: np.ndarray  # (r, num_emb)
    lora_B: np.ndarray  # (dim, r)
    magnitude: np.ndarray
    indices: np.ndarray
    scaling: float
    embed_scale: float | None
    max_norm: float | None


@st.composite
def embedding_cases(draw, *, plain=False):
    rng = _rng(draw)
    num, dim, r = draw(st.sampled_from([2, 9])), draw(st.sampled_from([1, 5, 8])), draw(st.sampled_from([1, 3]))
    scaling = draw(st.floats(0.25, 4.0))
    weight = rng.standard_normal((num, dim))
    lora_A = rng.standard_normal((r, num))
    lora_B = rng.standard_normal((dim, r))
    magnitude = np.linalg.norm(weight.T + scaling * lora_B @ lora_A, axis=1) * rng.uniform(0.5, 1.5, dim)
    indices = rng.integers(0, num, size=draw(st.sampled_from([(4,), (2, 3)])))
    embed_scale = None if plain else draw(st.sampled_from([None, 1.7]))
    max_norm = None if plain else draw(st.sampled_from([None, 1.0]))
    return EmbeddingCase(weight, lora_A, lora_B, magnitude, indices, scaling, embed_scale, max_norm)


@dataclass
class ConvCase:
    weight: np.ndarray
    lora_A: np.ndarray
    lora_B: np.ndarray
    magnitude: np.ndarray
    bias: np.ndarray | None
    x: np.ndarray
    result: np.ndarray  # the base conv's output
    running_result: np.ndarray  # as if earlier adapters had added to it
    scaling: float
    stride: int
    padding: int | str
    dilation: int
    groups: int

    @property
    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


@st.composite
def conv_cases(draw, *, groups=None, max_nd=3, dilated=True):
    rng = _rng(draw)
    nd = draw(st.integers(1, max_nd))
    groups = draw(st.sampled_from([1, 2])) if groups is None else groups
    in_c, out_c = groups * draw(st.sampled_from([1, 3])), groups * draw(st.sampled_from([1, 3]))
    r = groups * draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.sampled_from([1, 3])) for _ in range(nd))
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    # torch forbids strided "same"; LoRA's undilated lora_A only lines up with a dilated base under "same"
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2])) if padding == "same" and dilated else 1
    spatial = tuple(dilation * (k - 1) + draw(st.sampled_from([1, 3])) for k in kernel)
    scaling = draw(st.floats(0.25, 4.0))
    weight = rng.standard_normal((out_c, in_c // groups, *kernel))
    lora_A = rng.standard_normal((r, in_c, *kernel))
    lora_B = rng.standard_normal((out_c, r // groups) + (1,) * nd)
    bias = rng.standard_normal(out_c) if draw(st.booleans()) else None
    x = rng.standard_normal((2, in_c, *spatial))
    norm = ref.conv_norm(weight, lora_A, lora_B, scaling)
    magnitude = norm * rng.uniform(0.5, 1.5, norm.shape)
    result = ref.conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if bias is not None:
        result = result + bias.reshape((1, -1) + (1,) * nd)
    running = result + 0.3 * rng.standard_normal(result.shape)
    return ConvCase(weight, lora_A, lora_B, magnitude, bias, x, result, running, scaling, stride, padding, dilation,
                    groups)


# ------------------------------------------------------------------------------------------ Linear
# One test per layer kind checks several identities on the same draw: JAX compiles once per shape.


def _linear_forward(xp, call, case, dtype, *, result, magnitude=None, lora_B=None, recompute_base=False):
    magnitude = _to(xp, case.magnitude, dtype) if magnitude is None else magnitude
    lora_B = case.lora_B if lora_B is None else lora_B
    return call(dora.linear_forward, *(_to(xp, a, dtype) for a in (result, case.x, case.lora_A, lora_B)), magnitude,
                *(_to(xp, a, dtype) for a in (case.weight, case.bias)), scaling=case.scaling,
                fan_in_fan_out=case.fan_in_fan_out, recompute_base=recompute_base)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=linear_cases())
def test_linear_magnitude_and_forward(xp, call, dtype, case):
    fifo, want_dtype = case.fan_in_fan_out, getattr(xp, dtype)
    magnitude = call(dora.magnitude_init, *(_to(xp, a, dtype) for a in (case.weight, case.lora_A, case.lora_B)),
                     scaling=case.scaling, fan_in_fan_out=fifo)
    expected = ref.linear_norm(case.weight, case.lora_A, case.lora_B, case.scaling, fan_in_fan_out=fifo)
    assert_close(magnitude, expected, xp=xp, dtype=want_dtype, err_msg="magnitude_init")

    for recompute_base in (False, True):
        got = _linear_forward(xp, call, case, dtype, result=case.running_result, recompute_base=recompute_base)
        expected = ref.linear_forward(case.running_result, case.x, case.lora_A, case.lora_B, case.magnitude,
                                      case.weight, case.bias, case.scaling, fan_in_fan_out=fifo,
                                      recompute_base=recompute_base)
        assert_close(got, expected, xp=xp, dtype=want_dtype, err_msg=f"forward, recompute_base={recompute_base}")

        # from the base output and without dropout, DoRA is one dense layer with g ⊙ (W' + sBA)
        got = _linear_forward(xp, call, case, dtype, result=case.result, recompute_base=recompute_base)
        expected = ref.linear_dense(case.x, case.lora_A, case.lora_B, case.magnitude, case.weight, case.bias,
                                    case.scaling, fan_in_fan_out=fifo)
        assert_close(got, expected, xp=xp, err_msg=f"dense layer, recompute_base={recompute_base}")

    # B = 0 (peft's default init): m is the row norm of W' and the layer is the base layer
    zero_B = np.zeros_like(case.lora_B)
    magnitude = call(dora.magnitude_init, *(_to(xp, a, dtype) for a in (case.weight, case.lora_A, zero_B)),
                     scaling=case.scaling, fan_in_fan_out=fifo)
    assert_close(magnitude, np.linalg.norm(case.oriented, axis=1), xp=xp, err_msg="B = 0 magnitude")
    got = _linear_forward(xp, call, case, dtype, result=case.result, magnitude=magnitude, lora_B=zero_B)
    assert_close(got, case.result, xp=xp, err_msg="B = 0 forward")


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=linear_cases(), earlier=st.booleans())
def test_linear_merge_unmerge(xp, call, dtype, case, earlier):
    fifo = case.fan_in_fan_out
    delta = case.scaling * (case.lora_B @ case.lora_A)
    delta = delta.T if fifo else delta
    # an earlier-merged adapter: the norm must come from the base weight, the factor applies to the current one
    current = case.weight + (0.2 * np.cos(np.arange(case.weight.size)).reshape(case.weight.shape) if earlier else 0.0)
    base = case.weight if earlier else None
    merged, norm = call(dora.merge, *(_to(xp, a, dtype) for a in (current, delta, case.magnitude, base)),
                        fan_in_fan_out=fifo)
    want_merged, want_norm = ref.merge(current, delta, case.magnitude, fan_in_fan_out=fifo, base_weight=base)
    assert_close(merged, want_merged, xp=xp, dtype=getattr(xp, dtype))
    assert_close(norm, want_norm, xp=xp)
    direct = call(dora.weight_norm, *(_to(xp, a, dtype) for a in (case.weight, delta)), fan_in_fan_out=fifo)
    assert_close(direct, ref.merge(case.weight, delta, case.magnitude, fan_in_fan_out=fifo)[1], xp=xp,
                 dtype=getattr(xp, dtype), err_msg="weight_norm")

    restored = call(dora.unmerge, merged, *(_to(xp, a, dtype) for a in (delta, case.magnitude)), norm,
                    fan_in_fan_out=fifo)
    assert_close(restored, current, xp=xp, dtype=getattr(xp, dtype))

    if not earlier:  # the merged layer reproduces the DoRA forward
        merged_np = to_numpy(merged).astype(np.float64)
        dense = case.x @ (merged_np if fifo else merged_np.T) + (0.0 if case.bias is None else case.bias)
        expected = ref.linear_forward(case.result, case.x, case.lora_A, case.lora_B, case.magnitude, case.weight,
                                      case.bias, case.scaling, fan_in_fan_out=fifo)
        assert_close(dense, expected, rtol=4e-5 if dtype == "float32" else None)


def test_safe_merge_rejects_non_finite(xp):
    weight = xp.asarray(np.ones((3, 2)))
    delta = xp.asarray(np.array([[np.inf, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    magnitude = xp.asarray(np.ones(3))
    with np.errstate(all="ignore"), pytest.raises(MergeError, match="q_proj"):
        dora.merge(weight, delta, magnitude, safe=True, name="q_proj")
    with np.errstate(all="ignore"):
        merged, _ = dora.merge(weight, delta, magnitude, safe=False)  # unsafe merges do not look
    assert merged.shape == (3, 2)


# --------------------------------------------------------------------------------------- Embedding


def _embedding_forward(xp, call, case, dtype, *, result, magnitude=None, lora_B=None, plain=False):
    magnitude = _to(xp, case.magnitude, dtype) if magnitude is None else magnitude
    lora_B = case.lora_B if lora_B is None else lora_B
    options = {} if plain else dict(embed_scale=case.embed_scale, max_norm=case.max_norm)
    return call(dora.embedding_forward, _to(xp, result, dtype), xp.asarray(case.indices),
                *(_to(xp, a, dtype) for a in (case.lora_A, lora_B)), magnitude, _to(xp, case.weight, dtype),
                scaling=case.scaling, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=embedding_cases())
def test_embedding_magnitude_and_forward(xp, call, dtype, case):
    want_dtype = getattr(xp, dtype)
    magnitude = call(dora.embedding_magnitude_init,
                     *(_to(xp, a, dtype) for a in (case.weight, case.lora_A, case.lora_B)), scaling=case.scaling)
    expected = ref.embedding_norm(case.weight, case.lora_A, case.lora_B, case.scaling)
    assert_close(magnitude, expected, xp=xp, dtype=want_dtype, err_msg="embedding_magnitude_init")

    base = case.weight[case.indices] * (1.0 if case.embed_scale is None else case.embed_scale)
    running = base + np.cos(np.arange(base.size)).reshape(base.shape)
    got = _embedding_forward(xp, call, case, dtype, result=running)
    expected = ref.embedding_forward(running, case.indices, case.lora_A, case.lora_B, case.magnitude, case.weight,
                                     case.scaling, embed_scale=case.embed_scale, max_norm=case.max_norm)
    assert_close(got, expected, xp=xp, dtype=want_dtype, err_msg="forward")

    # the base lookup in, DoRA is one lookup in the table g ⊙ (W + s(BA)ᵀ) (columns scaled)
    plain_base = case.weight[case.indices]
    got = _embedding_forward(xp, call, case, dtype, result=plain_base, plain=True)
    expected = ref.embedding_dense(case.indices, case.lora_A, case.lora_B, case.magnitude, case.weight, case.scaling)
    assert_close(got, expected, xp=xp, err_msg="one table")

    zero_B = np.zeros_like(case.lora_B)
    magnitude = call(dora.embedding_magnitude_init,
                     *(_to(xp, a, dtype) for a in (case.weight, case.lora_A, zero_B)), scaling=case.scaling)
    assert_close(magnitude, np.linalg.norm(case.weight, axis=0), xp=xp, err_msg="B = 0 magnitude")
    got = _embedding_forward(xp, call, case, dtype, result=base, magnitude=magnitude, lora_B=zero_B)
    assert_close(got, base, xp=xp, err_msg="B = 0 forward")


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=embedding_cases(plain=True))
def test_embedding_merge_unmerge(xp, call, dtype, case):
    delta = case.scaling * (case.lora_B @ case.lora_A).T
    merged, norm = call(dora.embedding_merge, *(_to(xp, a, dtype) for a in (case.weight, delta, case.magnitude)))
    want_merged, want_norm = ref.merge(case.weight, delta, case.magnitude, fan_in_fan_out=True)
    assert_close(merged, want_merged, xp=xp, dtype=getattr(xp, dtype))
    assert_close(norm, want_norm, xp=xp)
    merged_lookup = to_numpy(merged).astype(np.float64)[case.indices]
    expected = ref.embedding_dense(case.indices, case.lora_A, case.lora_B, case.magnitude, case.weight, case.scaling)
    assert_close(merged_lookup, expected, rtol=4e-5 if dtype == "float32" else None)
    restored = call(dora.embedding_unmerge, merged, _to(xp, delta, dtype), _to(xp, case.magnitude, dtype), norm)
    assert_close(restored, case.weight, xp=xp, dtype=getattr(xp, dtype))


# -------------------------------------------------------------------------------------------- Conv


def _conv_forward(xp, call, case, dtype, *, result, magnitude=None, lora_B=None, recompute_base=False):
    magnitude = _to(xp, case.magnitude, dtype) if magnitude is None else magnitude
    lora_B = case.lora_B if lora_B is None else lora_B
    return call(dora.conv_forward, *(_to(xp, a, dtype) for a in (result, case.x, case.lora_A, lora_B)), magnitude,
                *(_to(xp, a, dtype) for a in (case.weight, case.bias)), scaling=case.scaling,
                recompute_base=recompute_base, **case.conv_kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(case=conv_cases())
def test_conv_magnitude_and_forward(xp, call, dtype, case):
    want_dtype = getattr(xp, dtype)
    magnitude = call(dora.conv_magnitude_init, *(_to(xp, a, dtype) for a in (case.weight, case.lora_A, case.lora_B)),
                     scaling=case.scaling)
    expected = ref.conv_norm(case.weight, case.lora_A, case.lora_B, case.scaling)
    assert_close(magnitude, expected, xp=xp, dtype=want_dtype, err_msg="conv_magnitude_init")

    for recompute_base in (False, True):
        got = _conv_forward(xp, call, case, dtype, result=case.running_result, recompute_base=recompute_base)
        expected = ref.conv_forward(case.running_result, case.x, case.lora_A, case.lora_B, case.magnitude,
                                    case.weight, case.bias, case.scaling, recompute_base=recompute_base,
                                    **case.conv_kwargs)
        assert_close(got, expected, xp=xp, dtype=want_dtype, err_msg=f"forward, recompute_base={recompute_base}")

    zero_B = np.zeros_like(case.lora_B)
    magnitude = call(dora.conv_magnitude_init, *(_to(xp, a, dtype) for a in (case.weight, case.lora_A, zero_B)),
                     scaling=case.scaling)
    row_norms = np.linalg.norm(case.weight.reshape(case.weight.shape[0], -1), axis=1)
    assert_close(magnitude, row_norms.reshape(case.magnitude.shape), xp=xp, err_msg="B = 0 magnitude")
    got = _conv_forward(xp, call, case, dtype, result=case.result, magnitude=magnitude, lora_B=zero_B)
    assert_close(got, case.result, xp=xp, err_msg="B = 0 forward")


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(case=conv_cases(groups=1, dilated=False))  # undilated lora_A: merging a dilated conv changes it
def test_conv_merge_unmerge(xp, call, dtype, case):
    delta = ref.conv_delta(case.lora_A, case.lora_B, case.scaling)
    merged, norm = call(dora.conv_merge, *(_to(xp, a, dtype) for a in (case.weight, delta, case.magnitude)))
    want_merged, want_norm = ref.conv_merge(case.weight, delta, case.magnitude)
    assert_close(merged, want_merged, xp=xp, dtype=getattr(xp, dtype))
    assert_close(norm, want_norm, xp=xp)
    # the merged conv reproduces the DoRA forward (no dropout)
    merged_np = to_numpy(merged).astype(np.float64)
    dense = ref.conv(case.x, merged_np, **case.conv_kwargs)
    if case.bias is not None:
        dense = dense + case.bias.reshape((1, -1) + (1,) * (case.x.ndim - 2))
    expected = ref.conv_forward(case.result, case.x, case.lora_A, case.lora_B, case.magnitude, case.weight,
                                case.bias, case.scaling, **case.conv_kwargs)
    assert_close(dense, expected, rtol=4e-5 if dtype == "float32" else None)
    restored = call(dora.conv_unmerge, merged, _to(xp, delta, dtype), _to(xp, case.magnitude, dtype), norm)
    assert_close(restored, case.weight, xp=xp, dtype=getattr(xp, dtype))


def test_conv_merge_refuses_groups(xp):
    weight = xp.asarray(np.ones((4, 1, 3)))
    delta = xp.asarray(np.ones((4, 2, 3)))
    with pytest.raises(MergeError, match="groups=2"):
        dora.conv_merge(weight, delta, xp.asarray(np.ones((1, 4, 1))), name="conv")


# ------------------------------------------------------------------------------------------ errors


def test_shape_errors_name_the_shapes(xp):
    a = lambda *shape: xp.asarray(np.ones(shape))  # noqa: E731
    with pytest.raises(ShapeMismatchError, match=r"\(5, 4\)"):
        dora.magnitude_init(a(5, 4), a(2, 4), a(6, 2), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"magnitude has shape \(5,\)"):
        dora.linear_forward(a(3, 6), a(3, 4), a(2, 4), a(6, 2), a(5), a(6, 4), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"input \(3, 5\)"):
        dora.linear_forward(a(3, 6), a(3, 5), a(2, 4), a(6, 2), a(6), a(6, 4), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(4, 6\)"):  # fan_in_fan_out wants (in, out)
        dora.linear_forward(a(3, 6), a(3, 4), a(2, 4), a(6, 2), a(6), a(6, 4), scaling=1.0, fan_in_fan_out=True)
    with pytest.raises(ShapeMismatchError, match=r"embedding weight \(7, 3\)"):
        dora.embedding_magnitude_init(a(7, 3), a(2, 8), a(3, 2), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(1, 6, 1, 1\)"):
        dora.conv_forward(a(2, 6, 3, 3), a(2, 4, 3, 3), a(2, 4, 1, 1), a(6, 2, 1, 1), a(6), a(6, 4, 1, 1),
                          scaling=1.0, stride=1, padding=0)
    with pytest.raises(ShapeMismatchError, match="imply 1"):
        dora.conv_forward(a(2, 6, 3, 3), a(2, 4, 3, 3), a(2, 4, 1, 1), a(6, 2, 1, 1), a(1, 6, 1, 1),
                          a(6, 4, 1, 1), scaling=1.0, stride=1, padding=0, groups=2)
    with pytest.raises(ShapeMismatchError, match=r"delta has shape \(4, 5\)"):
        dora.merge(a(5, 4), a(4, 5), a(5))


# --------------------------------------------------------------------------------------- gradients


def _autodiff_grads(framework, fn, arrays, params, cotangent):
    """Gradients of ``Σ cotangent ⊙ fn(*arrays)`` wrt ``arrays[i]`` for i in ``params``, as NumPy."""
    if framework == "torch":
        torch = pytest.importorskip("torch")
        tensors = [None if a is None else torch.tensor(a, requires_grad=i in params) for i, a in enumerate(arrays)]
        (fn(*tensors) * torch.tensor(cotangent)).sum().backward()
        return [tensors[i].grad.numpy() for i in params]
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def loss(*chosen):
        full = [jnp.asarray(a) if a is not None else None for a in arrays]
        for i, value in zip(params, chosen):
            full[i] = value
        return jnp.sum(fn(*full) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(params)))))(*(jnp.asarray(arrays[i]) for i in params))
    return [np.asarray(g) for g in grads]


def _check_detached_grads(framework, fn, arrays, params, frozen_fn, out_shape, seed):
    cotangent = np.random.default_rng(seed).standard_normal(out_shape)
    got = _autodiff_grads(framework, fn, arrays, params, cotangent)
    expected = ref.numeric_gradient(frozen_fn, [arrays[i] for i in params], cotangent)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-6)


@pytest.mark.parametrize("recompute_base", [False, True])
@pytest.mark.parametrize("framework", ["torch", "jax"])
@FEW
@given(case=linear_cases())
def test_linear_gradients_skip_the_norm(framework, recompute_base, case):
    norm = ref.linear_norm(case.weight, case.lora_A, case.lora_B, case.scaling, fan_in_fan_out=case.fan_in_fan_out)
    kw = dict(fan_in_fan_out=case.fan_in_fan_out, recompute_base=recompute_base)

    def frozen(magnitude, lora_A, lora_B):
        return ref.linear_forward(case.running_result, case.x, lora_A, lora_B, magnitude, case.weight, case.bias,
                                  case.scaling, frozen_norm=norm, **kw)

    def ours(result, x, lora_A, lora_B, magnitude, weight, bias):
        return dora.linear_forward(result, x, lora_A, lora_B, magnitude, weight, bias, scaling=case.scaling, **kw)

    arrays = [case.running_result, case.x, case.lora_A, case.lora_B, case.magnitude, case.weight, case.bias]
    _check_detached_grads(framework, ours, arrays, [4, 2, 3], frozen, case.result.shape, 0)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@FEW
@given(case=embedding_cases(plain=True))
def test_embedding_gradients_skip_the_norm(framework, case):
    norm = ref.embedding_norm(case.weight, case.lora_A, case.lora_B, case.scaling)
    result = case.weight[case.indices]

    def frozen(magnitude, lora_A, lora_B):
        return ref.embedding_forward(result, case.indices, lora_A, lora_B, magnitude, case.weight, case.scaling,
                                     frozen_norm=norm)

    def ours(result, indices, lora_A, lora_B, magnitude, weight):
        return dora.embedding_forward(result, indices, lora_A, lora_B, magnitude, weight, scaling=case.scaling)

    arrays = [result, case.indices, case.lora_A, case.lora_B, case.magnitude, case.weight]
    _check_detached_grads(framework, ours, arrays, [4, 2, 3], frozen, result.shape, 1)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@FEW
@given(case=conv_cases(max_nd=2))
def test_conv_gradients_skip_the_norm(framework, case):
    norm = ref.conv_norm(case.weight, case.lora_A, case.lora_B, case.scaling)

    def frozen(magnitude, lora_A, lora_B):
        return ref.conv_forward(case.running_result, case.x, lora_A, lora_B, magnitude, case.weight, case.bias,
                                case.scaling, frozen_norm=norm, **case.conv_kwargs)

    def ours(result, x, lora_A, lora_B, magnitude, weight, bias):
        return dora.conv_forward(result, x, lora_A, lora_B, magnitude, weight, bias, scaling=case.scaling,
                                 **case.conv_kwargs)

    arrays = [case.running_result, case.x, case.lora_A, case.lora_B, case.magnitude, case.weight, case.bias]
    _check_detached_grads(framework, ours, arrays, [4, 2, 3], frozen, case.result.shape, 2)
