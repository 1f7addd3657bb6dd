"""``peftcore.methods.lora.ops`` against the float64 NumPy reference, on every backend (and under jax.jit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore._xp import add_lora_product
from peftcore.errors import ConfigError, MergeError, ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.lora import ops
from peftcore.testing import Backend, assert_close, to_numpy
from tests.reference import lora as ref

FLOATS = ["float64", "float32"]
HALF_ONLY_ON_TORCH_JAX = [
    pytest.mark.unsupported_on(Backend.NUMPY, reason="half-precision rules are checked where bfloat16 exists"),
    pytest.mark.unsupported_on(Backend.ARRAY_API_STRICT, reason="half precision is outside the standard"),
]


def as_xp(xp, array, dtype="float64"):
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


# ------------------------------------------------------------------------------------------- strategies

DIMS = st.sampled_from([1, 5, 8])
RANKS = st.sampled_from([1, 2, 6])


@st.composite
def linear_cases(draw):
    # few distinct sizes: eager JAX compiles every op once per shape
    batch_shape = tuple(draw(st.lists(st.sampled_from([1, 3]), min_size=0, max_size=2)))
    fan_in, fan_out, rank = draw(DIMS), draw(DIMS), draw(RANKS)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    case = dict(
        x=rng.normal(size=(*batch_shape, fan_in)),
        lora_A=rng.normal(size=(rank, fan_in)),
        lora_B=rng.normal(size=(fan_out, rank)),
        bias=rng.normal(size=(fan_out,)) if draw(st.booleans()) else None,
        weight=rng.normal(size=(fan_out, fan_in)),
        base_bias=rng.normal(size=(fan_out,)),
        scaling=ref.scaling(rank, draw(st.sampled_from([1, 8, 16.0])), use_rslora=draw(st.booleans())),
    )
    return case


@st.composite
def embedding_cases(draw):
    num_embeddings, dim, rank = draw(DIMS), draw(DIMS), draw(RANKS)
    index_shape = tuple(draw(st.lists(st.sampled_from([1, 4]), min_size=1, max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        indices=rng.integers(0, num_embeddings, size=index_shape),
        lora_A=rng.normal(size=(rank, num_embeddings)),
        lora_B=rng.normal(size=(dim, rank)),
        weight=rng.normal(size=(num_embeddings, dim)),
        scaling=ref.scaling(rank, draw(st.sampled_from([1, 8, 16.0]))),
        max_norm=draw(st.sampled_from([None, 0.5, 1.5])),
        norm_type=draw(st.sampled_from([2.0, 1.0, math.inf])),
        embed_scale=draw(st.sampled_from([None, 0.5, 3.0])),
    )


@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    in_channels = draw(st.integers(1, 3)) * groups
    rank = draw(st.integers(1, 3)) * groups
    out_channels = draw(st.integers(1, 2)) * groups
    kernel = tuple(draw(st.integers(1, 3 if n < 3 else 2)) for _ in range(n))
    mode = draw(st.sampled_from(["int", "same", "valid"]))
    stride = 1 if mode == "same" else draw(st.sampled_from([1, 2, tuple(draw(st.integers(1, 2)) for _ in range(n))]))
    padding = draw(st.integers(0, 2)) if mode == "int" else mode
    pads = ref.pad_pairs(padding, kernel)
    spatial = tuple(max(1, k - lo - hi) + draw(st.integers(0, 2 if n < 3 else 1)) for k, (lo, hi) in zip(kernel, pads))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        x=rng.normal(size=(draw(st.integers(1, 2)), in_channels, *spatial)),
        lora_A=rng.normal(size=(rank, in_channels, *kernel)),
        lora_B=rng.normal(size=(out_channels, rank // groups, *(1,) * n)),
        bias=rng.normal(size=(out_channels,)) if draw(st.booleans()) else None,
        weight=rng.normal(size=(out_channels, in_channels // groups, *kernel)),
        scaling=ref.scaling(rank, draw(st.sampled_from([1, 8]))),
        stride=stride,
        padding=padding,
        groups=groups,
    )


def ops_rtol(dtype):
    return 1e-10 if dtype == "float64" else 2e-5


def _maybe(xp, array, dtype):
    return None if array is None else as_xp(xp, array, dtype)


# ------------------------------------------------------------------------------------------- scaling


def test_scaling_is_alpha_over_r_or_sqrt_r():
    assert ops.scaling(4, 8) == 2.0
    assert ops.scaling(4, 8, use_rslora=True) == 4.0
    assert ops.scaling(3, 1) == pytest.approx(1 / 3)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ConfigError, match="positive integer"):
            ops.scaling(bad, 8)


# ------------------------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=10)
@given(case=linear_cases())
def test_linear_update_and_forward_match_reference(xp, call, dtype, case):
    x, a, b, bias = (_maybe(xp, case[k], dtype) for k in ("x", "lora_A", "lora_B", "bias"))
    s = case["scaling"]
    expected_update = ref.linear_update(case["x"], case["lora_A"], case["lora_B"], s, case["bias"])
    assert_close(call(ops.linear_update, *[t for t in (x, a, b, bias) if t is not None], scaling=s),
                 expected_update, xp=xp, dtype=getattr(xp, dtype))
    base = ref.linear_dense(case["x"], case["weight"], case["base_bias"])
    result = as_xp(xp, base, dtype)
    got = call(ops.linear_forward, *[t for t in (result, x, a, b, bias) if t is not None], scaling=s)
    assert_close(got, base + expected_update, xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
@pytest.mark.parametrize("donate", [False, True])
def test_add_lora_product_matches_reference_and_keeps_c_unless_donated(xp, call, lead, donate):
    rng = np.random.default_rng(11)
    c, x, a, b = (rng.normal(size=shape) for shape in ((*lead, 5), (*lead, 4), (3, 4), (5, 3)))
    c_x = as_xp(xp, c, "float32")
    got = call(add_lora_product, c_x, *(as_xp(xp, t, "float32") for t in (x, a, b)), alpha=0.5, xp=xp,
               donate_c=donate)
    assert got.dtype == xp.float32 and tuple(got.shape) == (*lead, 5)
    assert_close(got, c + 0.5 * np.einsum("...k,rk,nr->...n", x, a, b), xp=xp)
    if not donate:
        np.testing.assert_array_equal(to_numpy(c_x), c.astype(np.float32))


def test_add_lora_product_promotes_mixed_dtypes(xp, call):
    rng = np.random.default_rng(12)
    c, x, a, b = rng.normal(size=(2, 4)), rng.normal(size=(2, 5)), rng.normal(size=(3, 5)), rng.normal(size=(4, 3))
    x32, a32, b32 = (as_xp(xp, t, "float32") for t in (x, a, b))
    got = call(add_lora_product, as_xp(xp, c), x32, a32, b32, alpha=2.0, xp=xp, donate_c=True)
    assert got.dtype == xp.float64
    # the product is formed in float32 (its own dtype), then added in float64
    hidden32 = (to_numpy(x32).astype(np.float64) @ to_numpy(a32).astype(np.float64).T).astype(np.float32)
    product32 = hidden32.astype(np.float64) * 2.0 @ to_numpy(b32).astype(np.float64).T
    assert_close(got, c + product32, xp=xp, rtol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_forward_with_donated_result_gives_the_same_values(xp, call, with_bias):
    rng = np.random.default_rng(13)
    x, a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4)), rng.normal(size=(5, 2))
    bias = rng.normal(size=(5,)) if with_bias else None
    result = rng.normal(size=(2, 3, 5))
    arrays = [t for t in (x, a, b, bias) if t is not None]
    kept = call(ops.linear_forward, as_xp(xp, result), *(as_xp(xp, t) for t in arrays), scaling=0.5)
    donated = call(ops.linear_forward, as_xp(xp, result), *(as_xp(xp, t) for t in arrays), scaling=0.5,
                   donate_result=True)
    expected = result + ref.linear_update(x, a, b, 0.5, bias)
    assert_close(kept, expected, xp=xp)
    assert_close(donated, expected, xp=xp)


def test_linear_forward_promotes_result_to_the_adapter_dtype_and_casts_back(xp, call):
    rng = np.random.default_rng(14)
    x, a, b, bias = rng.normal(size=(3, 4)), rng.normal(size=(2, 4)), rng.normal(size=(5, 2)), rng.normal(size=5)
    result = rng.normal(size=(3, 5)).astype(np.float32)
    result_x = as_xp(xp, result, "float32")
    got = call(ops.linear_forward, result_x, as_xp(xp, x), as_xp(xp, a), as_xp(xp, b), as_xp(xp, bias), scaling=3.0)
    assert got.dtype == xp.float32
    # summed in float64 (the adapter dtype), rounded once to float32
    exact = (result.astype(np.float64) + ref.linear_update(x, a, b, 3.0, bias)).astype(np.float32)
    np.testing.assert_allclose(to_numpy(got), exact, rtol=2e-7, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(result_x), result)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@settings(deadline=None, max_examples=6)
@given(case=linear_cases())
def test_linear_delta_merge_unmerge_and_merged_forward(xp, call, dtype, fan_in_fan_out, case):
    a, b = as_xp(xp, case["lora_A"], dtype), as_xp(xp, case["lora_B"], dtype)
    s = case["scaling"]
    expected_delta = ref.linear_delta(case["lora_A"], case["lora_B"], s, fan_in_fan_out=fan_in_fan_out)
    delta = call(ops.delta_weight, a, b, scaling=s, fan_in_fan_out=fan_in_fan_out)
    assert_close(delta, expected_delta, xp=xp, dtype=getattr(xp, dtype))

    stored = case["weight"].T if fan_in_fan_out else case["weight"]
    merged = call(ops.merge, as_xp(xp, stored, dtype), delta)
    assert_close(merged, ref.merge(stored, expected_delta), xp=xp, dtype=getattr(xp, dtype))
    # the merged layer computes what the unmerged layer plus LoRA branch computes
    merged_out = ref.linear_dense(case["x"], to_numpy(merged).astype(np.float64), case["base_bias"],
                                  fan_in_fan_out=fan_in_fan_out)
    base_out = ref.linear_dense(case["x"], stored, case["base_bias"], fan_in_fan_out=fan_in_fan_out)
    lora_out = base_out + ref.linear_update(case["x"], case["lora_A"], case["lora_B"], s)
    assert_close(xp.asarray(merged_out), lora_out, rtol=ops_rtol(dtype))
    restored = call(ops.unmerge, merged, delta)
    # W + Δ − Δ loses the low bits of W below Δ's scale
    tolerance = 4 * ops_rtol(dtype) * max(np.abs(expected_delta).max(), np.abs(stored).max())
    assert_close(restored, stored, xp=xp, dtype=getattr(xp, dtype), atol=tolerance)


@pytest.mark.parametrize("dtype", FLOATS)
def test_lora_bias_merge_and_unmerge(xp, call, dtype):
    rng = np.random.default_rng(3)
    bias, lora_bias = rng.normal(size=5), rng.normal(size=5)
    merged = call(ops.merge_bias, as_xp(xp, bias, dtype), as_xp(xp, lora_bias, dtype), scaling=0.5)
    assert_close(merged, bias + 0.5 * lora_bias, xp=xp, dtype=getattr(xp, dtype))
    restored = call(ops.unmerge_bias, merged, as_xp(xp, lora_bias, dtype), scaling=0.5)
    assert_close(restored, bias, xp=xp, dtype=getattr(xp, dtype), atol=1e-6)
    with pytest.raises(MergeError, match="'proj'.*no bias"):
        ops.merge_bias(None, as_xp(xp, lora_bias, dtype), scaling=0.5, name="proj")


def test_accumulate_adds_several_updates_then_casts_once(xp, call):
    rng = np.random.default_rng(0)
    result, u1, u2 = (rng.normal(size=(2, 3)) for _ in range(3))
    got = call(ops.accumulate, as_xp(xp, result, "float32"), as_xp(xp, u1), as_xp(xp, u2))
    assert_close(got, result + u1 + u2, xp=xp, dtype=xp.float32)
    with pytest.raises(ShapeMismatchError, match=r"\(3,\).*\(2, 3\)"):
        ops.accumulate(as_xp(xp, result), as_xp(xp, u1[0]))


# ------------------------------------------------------------------------------------------- Embedding


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=10)
@given(case=embedding_cases())
def test_embedding_update_forward_delta_match_reference(xp, call, dtype, case):
    idx = xp.asarray(case["indices"])
    a, b = as_xp(xp, case["lora_A"], dtype), as_xp(xp, case["lora_B"], dtype)
    options = dict(scaling=case["scaling"], max_norm=case["max_norm"], norm_type=case["norm_type"],
                   embed_scale=case["embed_scale"])
    expected = ref.embedding_update(case["indices"], case["lora_A"], case["lora_B"], **options)
    assert_close(call(ops.embedding_update, idx, a, b, **options), expected, xp=xp, dtype=getattr(xp, dtype))
    base = case["weight"][case["indices"]]
    got = call(ops.embedding_forward, as_xp(xp, base, dtype), idx, a, b, **options)
    assert_close(got, base + expected, xp=xp, dtype=getattr(xp, dtype))

    expected_delta = ref.embedding_delta(case["lora_A"], case["lora_B"], case["scaling"])
    delta = call(ops.embedding_delta_weight, a, b, scaling=case["scaling"])
    assert_close(delta, expected_delta, xp=xp, dtype=getattr(xp, dtype))
    if case["max_norm"] is None and case["embed_scale"] is None:
        merged = to_numpy(call(ops.merge, as_xp(xp, case["weight"], dtype), delta)).astype(np.float64)
        assert_close(xp.asarray(merged[case["indices"]]), base + expected, rtol=ops_rtol(dtype))


def test_embedding_array_embed_scale_and_padding_idx(xp, call):
    rng = np.random.default_rng(1)
    indices = np.array([[0, 3, 3], [1, 0, 2]])
    a, b = rng.normal(size=(2, 4)), rng.normal(size=(5, 2))
    expected = ref.embedding_update(indices, a, b, 2.0, embed_scale=1.5)

    def fn(idx, lora_a, lora_b, scale):
        return ops.embedding_update(idx, lora_a, lora_b, scaling=2.0, embed_scale=scale, padding_idx=-4)

    got = call(fn, xp.asarray(indices), xp.asarray(a), xp.asarray(b), as_xp(xp, np.asarray(1.5), "float32"))
    # padding_idx only blocks gradients; a float32 embed_scale is cast to the update's dtype
    assert_close(got, expected, xp=xp, dtype=xp.float64)


def test_embedding_padding_idx_and_max_norm_gradients_follow_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a = torch.tensor(rng.normal(size=(3, 4)) * 3, requires_grad=True)
    b = torch.tensor(rng.normal(size=(5, 3)))
    indices = torch.tensor([0, 2, 2, 1])
    ours = ops.embedding_update(indices, a, b, scaling=1.0, padding_idx=2, max_norm=1.0)
    ours.sum().backward()
    # torch renormalises the looked-up rows in place, outside autograd, and skips padding_idx in backward
    a_torch = a.detach().clone().requires_grad_(True)
    theirs = torch.nn.functional.embedding(indices, a_torch.T, padding_idx=2, max_norm=1.0) @ b.T
    theirs.sum().backward()
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(a.grad.numpy(), a_torch.grad.numpy(), rtol=1e-12)
    assert np.all(a.grad.numpy()[:, 2] == 0) and np.any(a.grad.numpy() != 0)
    assert not torch.equal(a.detach(), a_torch.detach())  # torch rewrote its copy; ours is untouched


def test_embedding_rejects_float_indices_and_bad_factors():
    a, b = np.zeros((2, 4)), np.zeros((5, 2))
    with pytest.raises(ShapeMismatchError, match="integer dtype"):
        ops.embedding_update(np.zeros(3), a, b, scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 4\) and \(5, 3\)"):
        ops.embedding_update(np.zeros(3, dtype=np.int64), a, np.zeros((5, 3)), scaling=1.0)


# ------------------------------------------------------------------------------------------- Conv


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=8)
@given(case=conv_cases())
def test_conv_update_forward_delta_match_reference(xp, call, dtype, case):
    x, a, b, bias = (_maybe(xp, case[k], dtype) for k in ("x", "lora_A", "lora_B", "bias"))
    options = dict(scaling=case["scaling"], stride=case["stride"], padding=case["padding"], groups=case["groups"])
    expected = ref.conv_update(case["x"], case["lora_A"], case["lora_B"], case["scaling"], stride=case["stride"],
                               padding=case["padding"], groups=case["groups"], lora_B_bias=case["bias"])
    arrays = [t for t in (x, a, b, bias) if t is not None]
    assert_close(call(ops.conv_update, *arrays, **options), expected, xp=xp, dtype=getattr(xp, dtype))
    base = ref.conv(case["x"], case["weight"], stride=case["stride"], padding=case["padding"], groups=case["groups"])
    got = call(ops.conv_forward, as_xp(xp, base, dtype), *arrays, **options)
    assert_close(got, base + expected, xp=xp, dtype=getattr(xp, dtype))

    expected_delta = ref.conv_delta(case["lora_A"], case["lora_B"], case["scaling"], groups=case["groups"])
    delta = call(ops.conv_delta_weight, a, b, scaling=case["scaling"], groups=case["groups"])
    assert_close(delta, expected_delta, xp=xp, dtype=getattr(xp, dtype))
    weight = as_xp(xp, case["weight"], dtype)
    if case["groups"] > 1:
        with pytest.raises(MergeError, match="groups > 1"):
            ops.merge(weight, delta, name="conv")
        return
    # the merged conv computes base + LoRA branch (A and the base share stride and padding)
    merged = to_numpy(call(ops.merge, weight, delta)).astype(np.float64)
    via_merged = ref.conv(case["x"], merged, stride=case["stride"], padding=case["padding"])
    lora_bias = 0 if case["bias"] is None else case["scaling"] * case["bias"].reshape(-1, *(1,) * (x.ndim - 2))
    assert_close(xp.asarray(via_merged), base + expected - lora_bias, rtol=ops_rtol(dtype) * 4)


def test_conv_rank_not_divisible_by_groups_is_unsupported():
    with pytest.raises(UnsupportedLayerError, match="groups=2.*r=3"):
        ops.conv_delta_weight(np.zeros((3, 4, 3, 3)), np.zeros((4, 1, 1, 1)), scaling=1.0, groups=2)
    with pytest.raises(ShapeMismatchError, match="rank"):
        ops.conv_update(np.zeros((1, 4, 5, 5)), np.zeros((4, 4, 3, 3)), np.zeros((4, 4, 1, 1)), scaling=1.0,
                        stride=1, padding=0, groups=2)
    with pytest.raises(ShapeMismatchError, match="lora_B must be"):
        ops.conv_delta_weight(np.zeros((4, 4, 3, 3)), np.zeros((4, 4, 3, 3)), scaling=1.0)


# ------------------------------------------------------------------------------------------- merge safety


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_safe_merge_names_the_module_on_non_finite(xp, bad):
    weight = np.ones((3, 2))
    delta = np.zeros((3, 2))
    delta[1, 0] = bad
    with pytest.raises(MergeError, match="non-finite.*'layers.0.q_proj'"):
        ops.merge(xp.asarray(weight), xp.asarray(delta), safe=True, name="layers.0.q_proj")
    with pytest.raises(MergeError, match="non-finite.*bias of 'layers.0.q_proj'"):
        ops.merge_bias(xp.asarray(weight[0]), xp.asarray(delta[1]), scaling=1.0, safe=True, name="layers.0.q_proj")
    merged = ops.merge(xp.asarray(weight), xp.asarray(delta))  # unsafe merge does not look at values
    assert not np.isfinite(to_numpy(merged)[1, 0])
    assert_close(ops.merge(xp.asarray(weight), xp.asarray(np.zeros_like(delta)), safe=True, name="x"), weight, xp=xp)


def test_shape_errors_name_both_shapes():
    x, a, b = np.zeros((2, 5)), np.zeros((3, 4)), np.zeros((6, 3))
    with pytest.raises(ShapeMismatchError, match=r"x \(2, 5\).*in_features=4.*lora_A \(3, 4\)"):
        ops.linear_update(x, a, b, scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"lora_A \(3, 4\) and lora_B \(6, 2\) disagree on the rank"):
        ops.delta_weight(a, np.zeros((6, 2)), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(6,\).*\(5,\)"):
        ops.linear_update(np.zeros((2, 4)), a, b, np.zeros(5), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match=r"delta weight \(6, 4\).*'fc' \(4, 6\)"):
        ops.merge(np.zeros((4, 6)), np.zeros((6, 4)), name="fc")
    with pytest.raises(ShapeMismatchError, match=r"\(6, 4\).*\(4, 6\)"):
        ops.unmerge(np.zeros((4, 6)), np.zeros((6, 4)))
    with pytest.raises(ShapeMismatchError, match="lora_A must be"):
        ops.linear_update(x, np.zeros(4), b, scaling=1.0)


def test_inputs_are_not_mutated(backend, xp):
    rng = np.random.default_rng(5)
    arrays = dict(
        x=rng.normal(size=(2, 4)), a=rng.normal(size=(3, 4)), b=rng.normal(size=(6, 3)), bb=rng.normal(size=6),
        w=rng.normal(size=(6, 4)), bias=rng.normal(size=6), result=rng.normal(size=(2, 6)),
        idx=np.array([0, 3, 1]), ea=rng.normal(size=(3, 5)) * 4, eb=rng.normal(size=(6, 3)),
        eres=rng.normal(size=(3, 6)),
        cx=rng.normal(size=(1, 2, 5, 5)), ca=rng.normal(size=(2, 2, 3, 3)), cb=rng.normal(size=(4, 2, 1, 1)),
        cres=rng.normal(size=(1, 4, 3, 3)),
    )
    snapshot = {k: v.copy() for k, v in arrays.items()}
    for v in arrays.values():
        v.setflags(write=False)  # NumPy raises on any in-place write
    t = {k: xp.asarray(v) if backend is Backend.NUMPY else xp.asarray(v.copy()) for k, v in arrays.items()}
    s = 0.5
    ops.linear_forward(t["result"], t["x"], t["a"], t["b"], t["bb"], scaling=s)
    delta = ops.delta_weight(t["a"], t["b"], scaling=s)
    ops.unmerge(ops.merge(t["w"], delta, safe=True, name="w"), delta)
    ops.unmerge_bias(ops.merge_bias(t["bias"], t["bb"], scaling=s), t["bb"], scaling=s)
    ops.embedding_forward(t["eres"], t["idx"], t["ea"], t["eb"], scaling=s, max_norm=1.0, padding_idx=0)
    ops.embedding_delta_weight(t["ea"], t["eb"], scaling=s)
    ops.conv_forward(t["cres"], t["cx"], t["ca"], t["cb"], scaling=s, stride=1, padding=0)
    ops.conv_delta_weight(t["ca"], t["cb"], scaling=s)
    for k, v in t.items():
        np.testing.assert_array_equal(to_numpy(v), snapshot[k], err_msg=k)


# ------------------------------------------------------------------------------------------- dtype rule


def _mark_half(fn):
    for mark in HALF_ONLY_ON_TORCH_JAX:
        fn = mark(fn)
    return pytest.mark.parametrize("half", ["bfloat16", "float16"])(fn)


@_mark_half
def test_half_base_with_float32_adapter_keeps_base_dtype(xp, call, half):
    rng = np.random.default_rng(7)
    x, a, b, result = rng.normal(size=(2, 4)), rng.normal(size=(3, 4)), rng.normal(size=(5, 3)), rng.normal(size=(2, 5))
    half_dtype = getattr(xp, half)
    x_h, result_h = as_xp(xp, x, half), as_xp(xp, result, half)
    a32, b32 = as_xp(xp, a, "float32"), as_xp(xp, b, "float32")
    update = call(ops.linear_update, x_h, a32, b32, scaling=2.0)
    # the branch runs in the adapter dtype, on x rounded to half then cast up
    x_rounded = to_numpy(x_h).astype(np.float64)
    assert_close(update, ref.linear_update(x_rounded, a, b, 2.0), xp=xp, dtype=xp.float32)
    out = call(ops.linear_forward, result_h, x_h, a32, b32, scaling=2.0)
    expected = to_numpy(result_h).astype(np.float64) + ref.linear_update(x_rounded, a, b, 2.0)
    assert_close(out, expected, xp=xp, dtype=half_dtype)
    # exactly one rounding: (half → float32) + float32 update, then back to half
    exact = xp.astype(xp.astype(result_h, xp.float32) + update, half_dtype)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(exact))

    cx, ca, cb = rng.normal(size=(1, 2, 4, 4)), rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(3, 2, 1, 1))
    cres = rng.normal(size=(1, 3, 2, 2))
    conv_out = call(ops.conv_forward, as_xp(xp, cres, half), as_xp(xp, cx, half), as_xp(xp, ca, "float32"),
                    as_xp(xp, cb, "float32"), scaling=0.5, stride=1, padding=0)
    cx_rounded = to_numpy(as_xp(xp, cx, half)).astype(np.float64)
    assert_close(conv_out, to_numpy(as_xp(xp, cres, half)) + ref.conv_update(cx_rounded, ca, cb, 0.5),
                 xp=xp, dtype=half_dtype)

    idx = xp.asarray(np.array([1, 0]))
    ea = rng.normal(size=(3, 2))
    emb_out = call(ops.embedding_forward, result_h, idx, as_xp(xp, ea, "float32"), b32, scaling=1.0)
    expected_emb = to_numpy(result_h).astype(np.float64) + ref.embedding_update(np.array([1, 0]), ea, b, 1.0)
    assert_close(emb_out, expected_emb, xp=xp, dtype=half_dtype)


@_mark_half
def test_half_factors_form_deltas_in_float32(xp, call, half):
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(3, 6)), rng.normal(size=(5, 3))
    a_h, b_h = as_xp(xp, a, half), as_xp(xp, b, half)
    a_r, b_r = to_numpy(a_h).astype(np.float64), to_numpy(b_h).astype(np.float64)
    half_dtype = getattr(xp, half)
    delta = call(ops.delta_weight, a_h, b_h, scaling=2.0, fan_in_fan_out=True)
    expected = ref.linear_delta(a_r, b_r, 2.0, fan_in_fan_out=True)
    # formed in float32 and rounded once: as close as the half dtype can hold (2^-8 or 2^-11 relative)
    ulp = 2.0**-8 if half == "bfloat16" else 2.0**-11
    assert_close(delta, expected, xp=xp, dtype=half_dtype, rtol=ulp, atol=1e-6)
    emb = call(ops.embedding_delta_weight, a_h, b_h, scaling=2.0)
    assert_close(emb, ref.embedding_delta(a_r, b_r, 2.0), xp=xp, dtype=half_dtype)
    conv = call(ops.conv_delta_weight, as_xp(xp, a.reshape(3, 2, 3), half), as_xp(xp, b[..., None], half), scaling=2.0)
    assert_close(conv, ref.conv_delta(a_r.reshape(3, 2, 3), b_r[..., None], 2.0), xp=xp, dtype=half_dtype)

    w = rng.normal(size=(6, 5))
    merged = call(ops.merge, as_xp(xp, w, half), as_xp(xp, expected, "float32"))
    assert merged.dtype == half_dtype
    exact_merge = xp.astype(xp.astype(as_xp(xp, w, half), xp.float32) + as_xp(xp, expected, "float32"), half_dtype)
    np.testing.assert_array_equal(to_numpy(merged), to_numpy(exact_merge))
