"""``peftcore.methods.adalora.ops`` against the float64 NumPy reference, on every backend (and under jax.jit)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore.methods.adalora import ops
from peftcore.random import NumpySampler
from peftcore.testing import Backend, assert_close, to_numpy
from tests.reference import adalora as ref

FLOATS = ["float64", "float32"]


def as_xp(xp, array, dtype="float64"):
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


@st.composite
def linear_cases(draw):
    batch_shape = tuple(draw(st.lists(st.sampled_from([1, 3]), min_size=0, max_size=2)))
    fan_in, fan_out = draw(st.sampled_from([1, 5, 8])), draw(st.sampled_from([1, 5, 8]))
    rank = draw(st.sampled_from([1, 3, 6]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        x=rng.normal(size=(*batch_shape, fan_in)),
        lora_A=rng.normal(size=(rank, fan_in)),
        lora_E=rng.normal(size=(rank, 1)),
        lora_B=rng.normal(size=(fan_out, rank)),
        weight=rng.normal(size=(fan_out, fan_in)),
        scaling=ref.scaling(rank, draw(st.sampled_from([1, 8, 32.0]))),
    )


@st.composite
def conv_cases(draw):
    in_channels, out_channels, rank = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    stride, padding, dilation = draw(st.sampled_from([1, 2])), draw(st.integers(0, 1)), draw(st.sampled_from([1, 2]))
    spatial = tuple(dilation * (k - 1) + 1 + draw(st.integers(0, 2)) for k in kernel)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        x=rng.normal(size=(draw(st.integers(1, 2)), in_channels, *spatial)),
        lora_A=rng.normal(size=(rank, in_channels * kernel[0] * kernel[1])),
        lora_E=rng.normal(size=(rank, 1)),
        lora_B=rng.normal(size=(out_channels, rank)),
        weight_shape=(out_channels, in_channels, *kernel),
        scaling=ref.scaling(rank, 8),
        stride=stride, padding=padding, dilation=dilation,
    )


def rtol(dtype):
    return 1e-10 if dtype == "float64" else 2e-5


def test_scaling_is_alpha_over_ranknum_plus_eps():
    assert ops.scaling(12, 32) == pytest.approx(32 / (12 + 1e-5), rel=1e-15)
    # peft: a non-positive alpha falls back to the layer's rank r (ranknum unless given)
    assert ops.scaling(12, 0) == pytest.approx(12 / (12 + 1e-5), rel=1e-15)
    assert ops.scaling(12, -1, r=5) == pytest.approx(5 / (12 + 1e-5), rel=1e-15)
    with pytest.raises(ConfigError, match="ranknum"):
        ops.scaling(-1, 8)


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=8)
@given(case=linear_cases())
def test_linear_update_and_forward_match_reference(xp, call, dtype, case):
    x, a, e, b = (as_xp(xp, case[k], dtype) for k in ("x", "lora_A", "lora_E", "lora_B"))
    s = case["scaling"]
    expected = ref.linear_update(case["x"], case["lora_A"], case["lora_E"], case["lora_B"], s)
    assert_close(call(ops.linear_update, x, a, e, b, scaling=s), expected, xp=xp, dtype=getattr(xp, dtype))
    base = np.einsum("...i,oi->...o", case["x"], case["weight"])
    got = call(ops.linear_forward, as_xp(xp, base, dtype), x, a, e, b, scaling=s)
    assert_close(got, base + expected, xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@settings(deadline=None, max_examples=5)
@given(case=linear_cases())
def test_delta_merge_unmerge(xp, call, dtype, fan_in_fan_out, case):
    a, e, b = (as_xp(xp, case[k], dtype) for k in ("lora_A", "lora_E", "lora_B"))
    s = case["scaling"]
    expected = ref.delta(case["lora_A"], case["lora_E"], case["lora_B"], s, fan_in_fan_out=fan_in_fan_out)
    delta = call(ops.delta_weight, a, e, b, scaling=s, fan_in_fan_out=fan_in_fan_out)
    assert_close(delta, expected, xp=xp, dtype=getattr(xp, dtype))
    stored = case["weight"].T if fan_in_fan_out else case["weight"]
    merged = call(ops.merge, as_xp(xp, stored, dtype), delta)
    assert_close(merged, stored + expected, xp=xp, dtype=getattr(xp, dtype))
    tolerance = 4 * rtol(dtype) * max(np.abs(expected).max(), np.abs(stored).max())
    assert_close(call(ops.unmerge, merged, delta), stored, xp=xp, atol=tolerance)


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=6)
@given(case=conv_cases())
def test_conv_update_forward_delta_match_reference(xp, call, dtype, case):
    x, a, e, b = (as_xp(xp, case[k], dtype) for k in ("x", "lora_A", "lora_E", "lora_B"))
    kw = dict(scaling=case["scaling"], weight_shape=case["weight_shape"])
    conv_kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    expected_delta = ref.delta(case["lora_A"], case["lora_E"], case["lora_B"], case["scaling"]).reshape(
        case["weight_shape"])
    assert_close(call(ops.conv_delta_weight, a, e, b, **kw), expected_delta, xp=xp, dtype=getattr(xp, dtype))
    expected = ref.conv_update(case["x"], case["lora_A"], case["lora_E"], case["lora_B"], case["scaling"],
                               weight_shape=case["weight_shape"], **conv_kw)
    assert_close(call(ops.conv_update, x, a, e, b, **kw, **conv_kw), expected, xp=xp, dtype=getattr(xp, dtype))
    result = xp.ones(expected.shape, dtype=getattr(xp, dtype))
    got = call(ops.conv_forward, result, x, a, e, b, **kw, **conv_kw)
    assert_close(got, expected + 1.0, xp=xp, dtype=getattr(xp, dtype))


def test_conv_with_groups_cannot_be_reshaped(xp):
    a, e, b = xp.ones((2, 4 * 9)), xp.ones((2, 1)), xp.ones((4, 2))
    with pytest.raises(ShapeMismatchError, match="groups == 1"):
        ops.conv_delta_weight(a, e, b, scaling=1.0, weight_shape=(4, 2, 3, 3))


def test_shape_errors_name_the_factors(xp):
    with pytest.raises(ShapeMismatchError, match="lora_E"):
        ops.delta_weight(xp.ones((3, 4)), xp.ones((2, 1)), xp.ones((5, 3)), scaling=1.0)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        ops.delta_weight(xp.ones((3, 4)), xp.ones((3,)), xp.ones((5, 3)), scaling=1.0)


@settings(deadline=None, max_examples=5)
@given(seed=st.integers(0, 2**32 - 1), ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_orth_regularizer_is_mean_frobenius_distance(xp, call, seed, ranks):
    rng = np.random.default_rng(seed)
    params, factors = {}, []
    for i, r in enumerate(ranks):
        a, b, e = rng.normal(size=(r, 5)), rng.normal(size=(6, r)), rng.normal(size=(r, 1))
        params.update({f"m{i}.lora_A.default": a, f"m{i}.lora_E.default": e, f"m{i}.lora_B.default": b})
        factors += [(a, False), (b, True)]
    params["m0.lora_A.other"] = rng.normal(size=(2, 5))
    arrays = {k: as_xp(xp, v) for k, v in params.items()}
    got = call(ops.orth_regularizer, arrays, adapter_name="default")
    assert_close(got, np.asarray(ref.orth_regularizer(factors)), xp=xp, dtype=xp.float64)
    everything = factors + [(params["m0.lora_A.other"], False)]
    assert_close(call(ops.orth_regularizer, arrays), np.asarray(ref.orth_regularizer(everything)), xp=xp)
    assert ops.orth_regularizer({}) == 0.0


def test_orth_regularizer_is_zero_for_orthonormal_factors(xp):
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 3)))[0]
    got = ops.orth_regularizer({"m.lora_A": xp.asarray(q.T.copy()), "m.lora_B": xp.asarray(q)})
    assert abs(float(to_numpy(got))) < 1e-12


def test_prune_triplet_and_state_dict(xp, call):
    rng = np.random.default_rng(1)
    a, e, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 1)), rng.normal(size=(5, 4))
    keep = [True, False, False, True]
    got = call(ops.prune_triplet, *(as_xp(xp, t) for t in (a, e, b)), keep=keep)
    idx = [0, 3]
    for g, want in zip(got, (a[idx], e[idx], b[:, idx])):
        assert_close(g, want, xp=xp)
    sd = {"base_model.model.m.lora_A.default": a, "base_model.model.m.lora_E.default": e,
          "base_model.model.m.lora_B.default": b, "base_model.model.other.weight": np.ones(2)}
    sd = {k: as_xp(xp, v) for k, v in sd.items()}
    pruned = ops.prune_state_dict(sd, rank_pattern={"m.lora_E": keep}, adapter_name="default",
                                  prefix="base_model.model.")
    assert_close(pruned["base_model.model.m.lora_B.default"], b[:, idx], xp=xp)
    assert_close(pruned["base_model.model.m.lora_A.default"], a[idx], xp=xp)
    assert pruned["base_model.model.other.weight"] is sd["base_model.model.other.weight"]
    assert ops.kept_ranks({"m.lora_E.default": keep, "n.lora_E.default": [False]}, adapter_name="default") == {
        "m": 2, "n": 0}
    with pytest.raises(IncompatibleKeysError, match="missing|no"):
        ops.prune_state_dict(sd, rank_pattern={"x.lora_E": keep}, adapter_name="default")
    none = call(ops.prune_triplet, *(as_xp(xp, t) for t in (a, e, b)), keep=[False] * 4)
    assert [tuple(t.shape) for t in none] == [(0, 3), (0, 1), (5, 0)]  # peft keeps rank-0 layers
    with pytest.raises(ShapeMismatchError, match="length 2"):
        ops.prune_triplet(*(as_xp(xp, t) for t in (a, e, b)), keep=[True, False])
    with pytest.raises(ConfigError, match="lora_E"):
        ops.kept_ranks({"m.lora_A": keep})


@pytest.mark.parametrize("init", [True, False])
def test_init_svd_follows_peft(init):
    lora_A, lora_E, lora_B = ops.init_svd(50, 40, r=30, init_lora_weights=init, sampler=NumpySampler(0),
                                          dtype=np.float64)
    assert lora_A.shape == (30, 50) and lora_E.shape == (30, 1) and lora_B.shape == (40, 30)
    std = 0.02 if init else 1.0
    assert np.std(lora_A) == pytest.approx(std, rel=0.1) and np.std(lora_B) == pytest.approx(std, rel=0.1)
    if init:
        assert not np.any(lora_E)
    else:
        assert np.std(lora_E) == pytest.approx(1.0, rel=0.35)
    with pytest.raises(ConfigError, match="positive integer or 0"):
        ops.init_svd(2, 2, r=-1, init_lora_weights=True, sampler=NumpySampler(0), dtype=np.float64)
    empty = ops.init_svd(2, 3, r=0, init_lora_weights=True, sampler=NumpySampler(0), dtype=np.float64)
    assert empty.lora_B.shape == (3, 0)


@pytest.mark.unsupported_on(Backend.NUMPY, reason="half-precision rules are checked where bfloat16 exists")
@pytest.mark.unsupported_on(Backend.ARRAY_API_STRICT, reason="half precision is outside the standard")
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_base_with_float32_adapter_keeps_base_dtype(xp, call, half):
    rng = np.random.default_rng(3)
    x, a, e, b = rng.normal(size=(2, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 1)), rng.normal(size=(5, 3))
    base = rng.normal(size=(2, 5))
    factors = (as_xp(xp, t, "float32") for t in (a, e, b))
    got = call(ops.linear_forward, as_xp(xp, base, half), as_xp(xp, x, half), *factors, scaling=0.5)
    expected = base.astype(np.float32) + ref.linear_update(x, a, e, b, 0.5)
    assert_close(got, expected, xp=xp, dtype=getattr(xp, half), rtol=1e-2)
