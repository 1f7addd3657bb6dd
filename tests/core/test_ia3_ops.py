"""``peftcore.methods.ia3.ops`` against the float64 NumPy reference, on every backend (and under jax.jit)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.methods.ia3 import IA3Config
from peftcore.methods.ia3 import ops
from peftcore.random import NumpySampler
from peftcore.testing import assert_close, to_numpy
from tests.reference import ia3 as ref

FLOATS = ["float64", "float32"]


def as_xp(xp, array, dtype="float64"):
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


@st.composite
def linear_cases(draw):
    batch_shape = tuple(draw(st.lists(st.sampled_from([1, 3]), min_size=0, max_size=2)))
    fan_in, fan_out = draw(st.sampled_from([1, 4, 7])), draw(st.sampled_from([1, 5, 8]))
    n_adapters = draw(st.integers(1, 3))
    feedforward = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (1, fan_in) if feedforward else (fan_out, 1)
    return dict(
        x=rng.normal(size=(*batch_shape, fan_in)),
        weight=rng.normal(size=(fan_out, fan_in)),
        bias=rng.normal(size=(fan_out,)),
        ls=[rng.normal(size=shape) for _ in range(n_adapters)],
        feedforward=feedforward,
    )


@st.composite
def conv_cases(draw):
    n = draw(st.sampled_from([2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    in_channels, out_channels = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 2)) for _ in range(n))
    feedforward = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    channels = in_channels if feedforward else out_channels
    return dict(
        x=rng.normal(size=(draw(st.integers(1, 2)), in_channels, *(k + 1 for k in kernel))),
        weight=rng.normal(size=(out_channels, in_channels // groups, *kernel)),
        bias=rng.normal(size=(out_channels,)),
        ls=[rng.normal(size=(1, channels) + (1,) * n) for _ in range(draw(st.integers(1, 2)))],
        feedforward=feedforward, groups=groups,
    )


# --- forward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=10)
@given(case=linear_cases())
def test_linear_forward_scales_input_or_output(xp, call, dtype, case):
    ls = [as_xp(xp, l, dtype) for l in case["ls"]]
    vector = ref.product([l.reshape(-1) for l in case["ls"]])
    combined = call(ops.combine, *ls)
    assert_close(combined, vector.reshape(case["ls"][0].shape), xp=xp, dtype=getattr(xp, dtype))
    x = as_xp(xp, case["x"], dtype)
    if case["feedforward"]:
        got = call(ops.scale_input, x, combined)
        expected = ref.scale_channels(case["x"], vector, -1)
        assert_close(got, expected, xp=xp, dtype=getattr(xp, dtype))
        expected_y = ref.linear(expected, case["weight"], case["bias"])
    else:
        base = ref.linear(case["x"], case["weight"], case["bias"])
        got = call(ops.scale_output, as_xp(xp, base, dtype), combined)
        expected_y = ref.scale_channels(base, vector, -1)
        assert_close(got, expected_y, xp=xp, dtype=getattr(xp, dtype))
    # the output-scaled bias is what merge_bias gives: y = x·(L⊙W)ᵀ + l⊙b
    assert_close(expected_y, ref.linear(
        case["x"], ref.merged_linear_weight(case["weight"], vector, feedforward=case["feedforward"]),
        case["bias"] if case["feedforward"] else case["bias"] * vector))


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=8)
@given(case=conv_cases())
def test_conv_forward_scales_channels(xp, call, dtype, case):
    ls = [as_xp(xp, l, dtype) for l in case["ls"]]
    vector = ref.product([l.reshape(-1) for l in case["ls"]])
    combined = call(ops.combine, *ls)
    if case["feedforward"]:
        got = call(ops.scale_input, as_xp(xp, case["x"], dtype), combined)
        expected = ref.scale_channels(case["x"], vector, 1)
    else:
        base = ref.conv(case["x"], case["weight"], case["bias"], groups=case["groups"])
        got = call(ops.scale_output, as_xp(xp, base, dtype), combined)
        expected = ref.scale_channels(base, vector, 1)
    assert_close(got, expected, xp=xp, dtype=getattr(xp, dtype))


def test_dtype_rules_follow_peft(xp, call):
    x32 = as_xp(xp, np.linspace(-1, 1, 6).reshape(2, 3), "float32")
    l64 = as_xp(xp, np.array([[0.5, 2.0, -1.0]]))
    got = call(ops.scale_input, x32, l64)
    assert got.dtype == xp.float32  # back to x's dtype (Linear)
    assert call(ops.scale_input, x32, l64, dtype=xp.float64).dtype == xp.float64  # Conv: base weight dtype
    r32 = as_xp(xp, np.ones((2, 3)), "float32")
    assert call(ops.scale_output, r32, as_xp(xp, np.ones((3, 1)))).dtype == xp.float32
    img = as_xp(xp, np.ones((1, 3, 2, 2)), "float32")
    assert call(ops.scale_output, img, as_xp(xp, np.ones((1, 3, 1, 1)))).dtype == xp.float32
    assert ops.combine(as_xp(xp, np.ones((3, 1)), "float32"), as_xp(xp, np.ones((3, 1)))).dtype == xp.float64


# --- merge / unmerge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@settings(deadline=None, max_examples=8)
@given(case=linear_cases())
def test_linear_merge_unmerge(xp, call, dtype, fan_in_fan_out, case):
    l_np, ff = case["ls"][0], case["feedforward"]
    vector = l_np.reshape(-1)
    stored = case["weight"].T if fan_in_fan_out else case["weight"]
    kw = dict(feedforward=ff, kind="linear", fan_in_fan_out=fan_in_fan_out)
    w, l, b = as_xp(xp, stored, dtype), as_xp(xp, l_np, dtype), as_xp(xp, case["bias"], dtype)
    merged = call(ops.merge_weight, w, l, **kw)
    expected = ref.merged_linear_weight(case["weight"], vector, feedforward=ff)
    assert_close(merged, expected.T if fan_in_fan_out else expected, xp=xp, dtype=getattr(xp, dtype))
    merged_b = call(ops.merge_bias, b, l, feedforward=ff)
    assert_close(merged_b, case["bias"] if ff else case["bias"] * vector, xp=xp, dtype=getattr(xp, dtype))
    with pytest.warns(ops.IA3UnmergeWarning, match=r"inaccurate for \(IA\)\^3"):
        back = call(ops.unmerge_weight, merged, l, **kw)
    factor = ref.merged_linear_weight(np.ones_like(case["weight"]), vector + 1e-8, feedforward=ff)
    expected_back = expected / factor
    assert_close(back, expected_back.T if fan_in_fan_out else expected_back, xp=xp, rtol=_unmerge_rtol(dtype, l_np))
    back_b = call(ops.unmerge_bias, merged_b, l, feedforward=ff)
    expected_b = case["bias"] if ff else case["bias"] * vector / (vector + 1e-8)
    assert_close(back_b, expected_b, xp=xp, rtol=_unmerge_rtol(dtype, l_np))


def _unmerge_rtol(dtype, l):
    # the float32 quotient loses ~ulp/|l| relative accuracy where |l| is small
    return 1e-9 if dtype == "float64" else 1e-6 * (2 + 1 / max(np.abs(l).min(), 1e-3))


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=8)
@given(case=conv_cases())
def test_conv_merge_unmerge(xp, call, dtype, case):
    l_np, ff, groups = case["ls"][0], case["feedforward"], case["groups"]
    kw = dict(feedforward=ff, kind="conv", groups=groups)
    w, l = as_xp(xp, case["weight"], dtype), as_xp(xp, l_np, dtype)
    merged = call(ops.merge_weight, w, l, **kw)
    expected = ref.merged_conv_weight(case["weight"], l_np.reshape(-1), feedforward=ff, groups=groups)
    assert_close(merged, expected, xp=xp, dtype=getattr(xp, dtype))
    with pytest.warns(ops.IA3UnmergeWarning):
        back = call(ops.unmerge_weight, merged, l, **kw)
    factor = ref.merged_conv_weight(np.ones_like(case["weight"]), l_np.reshape(-1) + 1e-8, feedforward=ff,
                                    groups=groups)
    assert_close(back, expected / factor, xp=xp, rtol=_unmerge_rtol(dtype, l_np))
    b = as_xp(xp, case["bias"], dtype)
    expected_b = case["bias"] if ff else case["bias"] * l_np.reshape(-1)
    assert_close(call(ops.merge_bias, b, l, feedforward=ff), expected_b, xp=xp, dtype=getattr(xp, dtype))


def test_merged_conv_equals_scaled_conv_in_reference():
    # the merge formula itself (grouped feed-forward spreading) checked against the forward definition
    rng = np.random.default_rng(0)
    x, w, bias = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(6, 2, 2, 2)), rng.normal(size=6)
    for ff, size in ((True, 4), (False, 6)):
        l = rng.normal(size=(1, size, 1, 1))
        merged = to_numpy(ops.merge_weight(w, l, feedforward=ff, kind="conv", groups=2))
        merged_b = to_numpy(ops.merge_bias(bias, l, feedforward=ff))
        if ff:
            expected = ref.conv(ref.scale_channels(x, l.reshape(-1), 1), w, bias, groups=2)
        else:
            expected = ref.scale_channels(ref.conv(x, w, bias, groups=2), l.reshape(-1), 1)
        np.testing.assert_allclose(ref.conv(x, merged, merged_b, groups=2), expected, rtol=1e-12, atol=1e-12)


def test_unmerge_divides_by_l_plus_eps(xp):
    w = as_xp(xp, np.ones((2, 2)))
    l = as_xp(xp, np.array([[0.0], [2.0]]))
    with pytest.warns(ops.IA3UnmergeWarning):
        back = ops.unmerge_weight(w, l, feedforward=False)
    assert_close(back, np.array([[1e8, 1e8], [0.5, 0.5]]), xp=xp)


# --- add_weighted_adapter, init, feed-forward membership -----------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=8)
@given(case=linear_cases(), data=st.data())
def test_weighted_combination(xp, call, dtype, case, data):
    weights = data.draw(st.lists(st.floats(-2, 2), min_size=len(case["ls"]), max_size=len(case["ls"])))
    got = call(ops.weighted_combination, [as_xp(xp, l, dtype) for l in case["ls"]], weights=tuple(weights))
    assert_close(got, ref.weighted_sum(case["ls"], weights), xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize(
    ("weight_shape", "kw", "expected"),
    [
        ((5, 3), dict(feedforward=False), (5, 1)),
        ((5, 3), dict(feedforward=True), (1, 3)),
        ((3, 5), dict(feedforward=False, fan_in_fan_out=True), (5, 1)),
        ((3, 5), dict(feedforward=True, fan_in_fan_out=True), (1, 3)),
        ((6, 2, 3, 3), dict(feedforward=False, kind="conv"), (1, 6, 1, 1)),
        ((6, 2, 3, 3), dict(feedforward=True, kind="conv", groups=2), (1, 4, 1, 1)),
        ((6, 2, 1, 3, 3), dict(feedforward=True, kind="conv"), (1, 2, 1, 1, 1)),
    ],
)
def test_init_shapes_ones_and_draws(xp, weight_shape, kw, expected):
    weight = xp.zeros(weight_shape, dtype=xp.float32)
    ones = ops.init_ia3(weight, **kw)
    assert_close(ones, np.ones(expected), xp=xp, dtype=xp.float32)
    drawn = ops.init_ia3(weight, **kw, init_ia3_weights=False, sampler=NumpySampler(3), dtype=xp.float64)
    assert_close(drawn, np.random.default_rng(3).normal(size=expected), xp=xp, dtype=xp.float64)


def test_init_errors(xp):
    weight = xp.zeros((4, 3))
    with pytest.raises(ConfigError, match="sampler"):
        ops.init_ia3(weight, feedforward=False, init_ia3_weights=False)
    with pytest.raises(ConfigError, match="kind"):
        ops.init_ia3(weight, feedforward=False, kind="embedding")
    with pytest.raises(ShapeMismatchError, match="2-d"):
        ops.init_ia3(xp.zeros((4, 3, 2)), feedforward=False)
    with pytest.raises(ShapeMismatchError, match="groups=4"):
        ops.init_ia3(xp.zeros((6, 1, 3, 3)), feedforward=False, kind="conv", groups=4)


@pytest.mark.parametrize(
    ("modules", "key", "expected"),
    [
        ({"fc2"}, "model.layers.0.mlp.fc2", True),
        ({"fc"}, "model.layers.0.mlp.xfc", True),  # no dot boundary, as peft
        ({"fc"}, "model.fc.proj", False),
        ({"down_proj", "w2"}, "h.0.mlp.w2", True),
        ([], "h.0.mlp.w2", False),
        (r".*\.mlp\.fc\d", "layers.0.mlp.fc2", True),
        (r"fc\d", "layers.0.mlp.fc2", False),  # fullmatch, not search
        ("fc2", "fc2", True),
    ],
)
def test_is_feedforward_follows_peft_rule(modules, key, expected):
    assert ops.is_feedforward(modules, key) is expected
    assert ref.is_feedforward(modules, key) is expected
    if not isinstance(modules, list):
        targets = modules if isinstance(modules, str) else set(modules) | {"q"}
        assert ops.is_feedforward(IA3Config(target_modules=targets, feedforward_modules=modules), key) is expected


def test_is_feedforward_needs_resolved_modules():
    with pytest.raises(ConfigError, match="with_model_defaults"):
        ops.is_feedforward(IA3Config(), "mlp.fc2")


# --- bad shapes ---------------------------------------------------------------------------------------


def test_shape_errors_name_the_shapes(xp):
    w = xp.zeros((5, 3))
    with pytest.raises(ShapeMismatchError, match=r"needs ia3_l \(5, 1\), got \(1, 3\)"):
        ops.merge_weight(w, xp.ones((1, 3)), feedforward=False)
    with pytest.raises(ShapeMismatchError, match=r"\(1, 4, 1, 1\)"):
        ops.merge_weight(xp.zeros((6, 2, 3, 3)), xp.ones((1, 6, 1, 1)), feedforward=True, kind="conv", groups=2)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 4\)"):
        ops.scale_input(xp.ones((2, 4)), xp.ones((1, 3)))
    with pytest.raises(ShapeMismatchError, match=r"\(out, 1\)"):
        ops.scale_output(xp.ones((2, 3)), xp.ones((1, 3)))
    with pytest.raises(ShapeMismatchError, match="channels"):
        ops.scale_output(xp.ones((2, 3, 4, 4)), xp.ones((1, 2, 1, 1)))
    with pytest.raises(ShapeMismatchError, match="bias"):
        ops.merge_bias(xp.ones((4,)), xp.ones((3, 1)), feedforward=False)
    with pytest.raises(ShapeMismatchError, match="share a shape"):
        ops.combine(xp.ones((3, 1)), xp.ones((1, 3)))
    with pytest.raises(ConfigError, match="2 .* but 1 weights"):
        ops.weighted_combination([xp.ones((3, 1)), xp.ones((3, 1))], weights=[1.0])
