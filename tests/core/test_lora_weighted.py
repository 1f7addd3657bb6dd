"""``peftcore.methods.lora.weighted`` against the float64 NumPy reference, on every backend (and under jax.jit)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.methods.lora import weighted
from peftcore.testing import Backend, assert_close, to_numpy
from tests.reference import weighted as ref

FLOATS = ["float64", "float32"]
HALF_ONLY_ON_TORCH_JAX = [
    pytest.mark.unsupported_on(Backend.NUMPY, reason="bfloat16 exists in torch and JAX only"),
    pytest.mark.unsupported_on(Backend.ARRAY_API_STRICT, reason="half precision is outside the standard"),
]
WEIGHTS = st.sampled_from([1.0, 0.5, 2.0, -0.7, -1.5, 0.0])
SCALINGS = st.sampled_from([0.5, 1.0, 2.0, 8 / 3])


def as_xp(xp, array, dtype="float64"):
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


def as_list(xp, arrays, dtype):
    return [as_xp(xp, a, dtype) for a in arrays]


@st.composite
def adapter_sets(draw, *, equal_ranks=False):
    """1-3 adapters of one Linear (``spatial=0``) or Conv1d/2d layer, with weights and scalings."""
    count = draw(st.integers(1, 3))
    spatial = draw(st.sampled_from([0, 0, 1, 2]))
    fan_in, fan_out = draw(st.sampled_from([3, 6])), draw(st.sampled_from([2, 5, 8]))
    kernel = tuple(draw(st.sampled_from([1, 2])) for _ in range(spatial))
    first = draw(st.integers(1, 4))
    ranks = [first] * count if equal_ranks else [first] + [draw(st.integers(1, 4)) for _ in range(count - 1)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(
        lora_As=[rng.normal(size=(r, fan_in, *kernel)) for r in ranks],
        lora_Bs=[rng.normal(size=(fan_out, r, *(1,) * spatial)) for r in ranks],
        weights=[draw(WEIGHTS) for _ in range(count)],
        scalings=[draw(SCALINGS) for _ in range(count)],
        extra_rank=draw(st.sampled_from([0, 0, 2])),
    )


def _flat_product(lora_A, lora_B):
    a, b = to_numpy(lora_A).astype(np.float64), to_numpy(lora_B).astype(np.float64)
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


# ------------------------------------------------------------------------------------------- cat


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=15)
@given(case=adapter_sets())
def test_cat_stacks_scaled_A_and_B(xp, call, dtype, case):
    As, Bs = as_list(xp, case["lora_As"], dtype), as_list(xp, case["lora_Bs"], dtype)
    total = sum(a.shape[0] for a in case["lora_As"])
    rank = total + case["extra_rank"]
    got = call(weighted.cat_combination, As, Bs, weights=case["weights"], scalings=case["scalings"], rank=rank)
    want_A, want_B = ref.cat(case["lora_As"], case["lora_Bs"], case["weights"], case["scalings"], rank)
    assert_close(got.lora_A, want_A, xp=xp, dtype=getattr(xp, dtype))
    assert_close(got.lora_B, want_B, xp=xp, dtype=getattr(xp, dtype))
    # cat is exact: B·A is the weighted sum of the updates
    expected_delta = ref.weighted_delta(case["lora_As"], case["lora_Bs"], case["weights"], case["scalings"])
    assert_close(xp.asarray(_flat_product(got.lora_A, got.lora_B)), expected_delta,
                 rtol=1e-10 if dtype == "float64" else 1e-5)


def test_cat_defaults_to_the_sum_of_ranks():
    rng = np.random.default_rng(0)
    As, Bs = [rng.normal(size=(2, 4)), rng.normal(size=(3, 4))], [rng.normal(size=(5, 2)), rng.normal(size=(5, 3))]
    got = weighted.cat_combination(As, Bs, weights=[1.0, -1.0], scalings=[2.0, 0.5])
    assert got.lora_A.shape == (5, 4) and got.lora_B.shape == (5, 5)


# ------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=15)
@given(case=adapter_sets(equal_ranks=True))
def test_linear_mixes_A_and_B_with_signed_root_weights(xp, call, dtype, case):
    As, Bs = as_list(xp, case["lora_As"], dtype), as_list(xp, case["lora_Bs"], dtype)
    rank = case["lora_As"][0].shape[0] + case["extra_rank"]
    got = call(weighted.linear_combination, As, Bs, weights=case["weights"], scalings=case["scalings"], rank=rank)
    want_A, want_B = ref.linear(case["lora_As"], case["lora_Bs"], case["weights"], case["scalings"], rank)
    assert_close(got.lora_A, want_A, xp=xp, dtype=getattr(xp, dtype))
    assert_close(got.lora_B, want_B, xp=xp, dtype=getattr(xp, dtype))


def test_linear_of_one_adapter_reproduces_its_weighted_update():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(3, 4)), rng.normal(size=(6, 3))
    got = weighted.linear_combination([A], [B], weights=[-0.5], scalings=[2.0])
    np.testing.assert_allclose(np.asarray(got.lora_B) @ np.asarray(got.lora_A), -1.0 * B @ A, rtol=1e-12)


# ------------------------------------------------------------------------------------------- svd


def _has_gap(delta, rank):
    s = np.linalg.svd(delta, compute_uv=False)
    if rank >= s.size or s[0] == 0 or s[rank] <= 1e-9 * s[0]:
        return True
    return s[rank - 1] - s[rank] > 1e-2 * s[0]


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=15)
@given(case=adapter_sets(), rank=st.integers(1, 6), full_matrices=st.booleans())
def test_svd_is_the_best_rank_k_approximation_of_the_weighted_update(xp, call, dtype, case, rank, full_matrices):
    expected_delta = ref.weighted_delta(case["lora_As"], case["lora_Bs"], case["weights"], case["scalings"])
    assume(_has_gap(expected_delta, rank))
    As, Bs = as_list(xp, case["lora_As"], dtype), as_list(xp, case["lora_Bs"], dtype)
    got = call(weighted.svd_combination, As, Bs, weights=case["weights"], scalings=case["scalings"], rank=rank,
               full_matrices=full_matrices)
    a0, b0 = case["lora_As"][0], case["lora_Bs"][0]
    assert tuple(got.lora_A.shape) == (rank, *a0.shape[1:])
    assert tuple(got.lora_B.shape) == (b0.shape[0], rank, *b0.shape[2:])
    assert got.lora_A.dtype == getattr(xp, dtype) and got.lora_B.dtype == getattr(xp, dtype)
    best, _ = ref.best_rank_k(expected_delta, rank)
    assert_close(xp.asarray(_flat_product(got.lora_A, got.lora_B)), best,
                 rtol=1e-9 if dtype == "float64" else 1e-4)
    # the A rows are orthonormal right singular vectors (zero rows beyond min(out, in))
    a = to_numpy(got.lora_A).astype(np.float64).reshape(rank, -1)
    k = min(rank, *expected_delta.shape)
    gram = a @ a.T
    nonzero = np.linalg.svd(expected_delta, compute_uv=False)[:k] > 1e-6 * max(1.0, np.abs(expected_delta).max())
    np.testing.assert_allclose(np.diag(gram)[:k][nonzero], 1.0, atol=1e-4 if dtype == "float32" else 1e-9)
    np.testing.assert_array_equal(a[k:], 0.0)


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=12)
@given(case=adapter_sets(), rank=st.integers(1, 4), q=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99, 1.0]))
def test_svd_clamp_clips_both_factors_at_the_quantile_of_their_entries(xp, call, dtype, case, rank, q):
    delta = ref.weighted_delta(case["lora_As"], case["lora_Bs"], case["weights"], case["scalings"])
    assume(_has_gap(delta, rank))
    k = min(rank, *delta.shape)
    As, Bs = as_list(xp, case["lora_As"], dtype), as_list(xp, case["lora_Bs"], dtype)
    options = dict(weights=case["weights"], scalings=case["scalings"], rank=k)
    plain = call(weighted.svd_combination, As, Bs, **options)
    clamped = call(weighted.svd_combination, As, Bs, clamp=q, **options)
    want_A, want_B = ref.clamp(to_numpy(plain.lora_A).astype(np.float64), to_numpy(plain.lora_B).astype(np.float64), q)
    # float32: the quantile's interpolation rounds in float32 (seen 6.4e-6 relative); the suite's float32 tolerance
    rtol = 1e-12 if dtype == "float64" else 2e-5
    assert_close(clamped.lora_A, want_A, xp=xp, rtol=rtol)
    assert_close(clamped.lora_B, want_B, xp=xp, rtol=rtol)


@settings(deadline=None, max_examples=10)
@given(case=adapter_sets())
def test_weighted_delta_is_the_weighted_sum_of_updates(xp, call, case):
    As, Bs = as_list(xp, case["lora_As"], "float64"), as_list(xp, case["lora_Bs"], "float64")
    got = call(weighted.weighted_delta, As, Bs, weights=case["weights"], scalings=case["scalings"])
    assert_close(got, ref.weighted_delta(case["lora_As"], case["lora_Bs"], case["weights"], case["scalings"]), xp=xp)


def test_svd_factors_pads_past_the_matrix_rank_and_uses_a_given_svd():
    rng = np.random.default_rng(2)
    delta = rng.normal(size=(3, 5))
    calls = []

    def svd(matrix, *, full_matrices):
        calls.append(full_matrices)
        return np.linalg.svd(matrix, full_matrices=full_matrices)

    got = weighted.svd_factors(delta, rank=6, svd=svd, full_matrices=False)
    assert calls == [False]
    assert got.lora_A.shape == (6, 5) and got.lora_B.shape == (3, 6)
    np.testing.assert_array_equal(np.asarray(got.lora_A)[3:], 0.0)
    np.testing.assert_allclose(np.asarray(got.lora_B) @ np.asarray(got.lora_A), delta, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- half precision


@HALF_ONLY_ON_TORCH_JAX[0]
@HALF_ONLY_ON_TORCH_JAX[1]
@pytest.mark.parametrize("combine", ["cat", "linear", "svd"])
def test_half_precision_factors_come_back_in_their_dtype(xp, call, combine):
    rng = np.random.default_rng(3)
    As_np, Bs_np = [rng.normal(size=(2, 6)), rng.normal(size=(2, 6))], [rng.normal(size=(4, 2)), rng.normal(size=(4, 2))]
    As, Bs = as_list(xp, As_np, "bfloat16"), as_list(xp, Bs_np, "bfloat16")
    rounded = [to_numpy(a).astype(np.float64) for a in As], [to_numpy(b).astype(np.float64) for b in Bs]
    options = dict(weights=[1.0, -0.5], scalings=[2.0, 1.0])
    if combine == "svd":
        got = call(weighted.svd_combination, As, Bs, rank=4, **options)
        want = ref.weighted_delta(*rounded, **options)
        assert_close(xp.asarray(_flat_product(got.lora_A, got.lora_B)), want, rtol=4e-2)
    else:
        function = weighted.cat_combination if combine == "cat" else weighted.linear_combination
        reference = ref.cat if combine == "cat" else ref.linear
        got = call(function, As, Bs, **options)
        want_A, want_B = reference(*rounded, **options)
        assert_close(got.lora_A, want_A, xp=xp)
        assert_close(got.lora_B, want_B, xp=xp)
    assert got.lora_A.dtype == xp.bfloat16 and got.lora_B.dtype == xp.bfloat16


# ------------------------------------------------------------------------------------------- errors


def test_bad_arguments_raise_named_errors():
    rng = np.random.default_rng(4)
    A2, B2 = rng.normal(size=(2, 4)), rng.normal(size=(5, 2))
    A3, B3 = rng.normal(size=(3, 4)), rng.normal(size=(5, 3))
    with pytest.raises(ConfigError, match="one lora_A, lora_B, weight and scaling per adapter"):
        weighted.cat_combination([A2, A3], [B2, B3], weights=[1.0], scalings=[1.0, 1.0])
    with pytest.raises(ConfigError, match="per adapter"):
        weighted.svd_combination([], [], weights=[], scalings=[], rank=2)
    with pytest.raises(ShapeMismatchError, match="one rank and shape"):
        weighted.linear_combination([A2, A3], [B2, B3], weights=[1.0, 1.0], scalings=[1.0, 1.0])
    with pytest.raises(ShapeMismatchError, match="does not adapt the same layer"):
        weighted.cat_combination([A2, rng.normal(size=(2, 7))], [B2, B2], weights=[1.0, 1.0], scalings=[1.0, 1.0])
    with pytest.raises(ShapeMismatchError, match="more than the requested rank 4"):
        weighted.cat_combination([A2, A3], [B2, B3], weights=[1.0, 1.0], scalings=[1.0, 1.0], rank=4)
    with pytest.raises(ConfigError, match=r"svd_clamp .* \[0, 1\], got 1.5"):
        weighted.svd_combination([A2], [B2], weights=[1.0], scalings=[1.0], rank=2, clamp=1.5)
    with pytest.raises(ConfigError, match="positive integer, got 0"):
        weighted.svd_combination([A2], [B2], weights=[1.0], scalings=[1.0], rank=0)
    with pytest.raises(ConfigError, match="weights must be real numbers"):
        weighted.cat_combination([A2], [B2], weights=["1"], scalings=[1.0])
    grouped_A, grouped_B = rng.normal(size=(4, 2, 3)), rng.normal(size=(6, 2, 1))
    with pytest.raises(ShapeMismatchError, match="grouped conv"):
        weighted.svd_combination([grouped_A], [grouped_B], weights=[1.0], scalings=[1.0], rank=2)
