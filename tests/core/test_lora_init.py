"""LoRA initialisations on every backend: shapes, dtypes, distributions, PiSSA/OLoRA residuals, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore._xp import dtype_name
from peftcore.errors import ConfigError
from peftcore.methods.lora.init import LoraInit, adapter_dtype, init_conv, init_embedding, init_linear
from peftcore.random import NumpySampler, Sampler
from peftcore.testing import assert_close, to_numpy
from tests.reference import init as reference

LINEAR_MODES = [True, False, "gaussian", "pissa", "pissa_niter_2", "olora", "orthogonal"]
CONV_MODES = [True, False, "gaussian"]
OUT_OF_SCOPE = ["corda", "loftq", "eva", "mica", "lora_ga"]


def _array(xp, values, dtype=None):
    array = xp.asarray(values)
    return array if dtype is None else xp.astype(array, dtype)


def _gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


class RecordingSampler:
    """A NumpySampler that keeps a float64 copy of every draw, in order."""

    def __init__(self, seed):
        self.inner = NumpySampler(seed)
        self.draws = []

    def uniform(self, shape, *, low, high, dtype):
        sample = self.inner.uniform(shape, low=low, high=high, dtype=dtype)
        self.draws.append(sample.astype(np.float64))
        return sample

    def normal(self, shape, *, std, dtype):
        sample = self.inner.normal(shape, std=std, dtype=dtype)
        self.draws.append(sample.astype(np.float64))
        return sample


class NativeSampler:
    """A sampler returning arrays of the backend's own namespace (NumPy draws converted by the sampler)."""

    def __init__(self, seed, xp):
        self.inner, self.xp = NumpySampler(seed), xp

    def uniform(self, shape, *, low, high, dtype):
        return self.xp.asarray(self.inner.uniform(shape, low=low, high=high, dtype=dtype))

    def normal(self, shape, *, std, dtype):
        return self.xp.asarray(self.inner.normal(shape, std=std, dtype=dtype))


# ------------------------------------------------------------------------------------------ sampler


def test_numpy_sampler_is_a_sampler_and_reproducible():
    first, second = NumpySampler(3), NumpySampler(np.random.default_rng(3))
    assert isinstance(first, Sampler)
    u = first.uniform((4, 5), low=-0.5, high=0.25, dtype=np.float32)
    assert u.shape == (4, 5) and u.dtype == np.float32 and u.min() >= -0.5 and u.max() <= 0.25
    np.testing.assert_array_equal(u, second.uniform((4, 5), low=-0.5, high=0.25, dtype=np.float32))
    n = first.normal((3,), std=2.0, dtype="float64")
    assert n.dtype == np.float64
    np.testing.assert_array_equal(n, second.normal((3,), std=2.0, dtype=np.float64))


def test_numpy_sampler_accepts_dtypes_of_other_namespaces(xp):
    sample = NumpySampler(0).normal((2, 3), std=1.0, dtype=xp.float32)
    assert isinstance(sample, np.ndarray) and sample.dtype == np.float32


def test_native_sampler_gives_the_same_init_as_numpy_sampler(xp, call):
    weight = _array(xp, _gaussian((6, 5)), xp.float32)
    for mode in (True, False, "orthogonal"):
        ours = call(init_linear, weight, r=4, init_lora_weights=mode, sampler=NumpySampler(1), scaling=1.0)
        native = call(init_linear, weight, r=4, init_lora_weights=mode, sampler=NativeSampler(1, xp), scaling=1.0)
        assert_close(native.lora_A, to_numpy(ours.lora_A), xp=xp, rtol=0, atol=0)
        assert_close(native.lora_B, to_numpy(ours.lora_B), xp=xp, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ shapes / dtypes


@pytest.mark.parametrize("mode", LINEAR_MODES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_shapes_and_dtypes(xp, call, mode, fan_in_fan_out):
    out_features, in_features, r = 7, 5, 4
    stored = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    weight = _array(xp, _gaussian(stored), xp.float32)
    lora_bias = mode in (True, False)
    got = call(
        init_linear, weight, r=r, init_lora_weights=mode, sampler=NumpySampler(0), scaling=2.0,
        fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias,
    )
    assert isinstance(got, LoraInit)
    assert tuple(got.lora_A.shape) == (r, in_features)
    assert tuple(got.lora_B.shape) == (out_features, r)
    assert tuple(got.weight.shape) == stored
    for array in (got.lora_A, got.lora_B, got.weight):
        assert dtype_name(array.dtype) == "float32"
    if lora_bias:
        assert tuple(got.lora_B_bias.shape) == (out_features,) and dtype_name(got.lora_B_bias.dtype) == "float32"
    else:
        assert got.lora_B_bias is None
    if mode not in ("pissa", "pissa_niter_2", "olora"):
        assert_close(got.weight, to_numpy(weight), xp=xp, rtol=0, atol=0)


def test_linear_dtype_argument_and_float64(xp, call):
    weight = _array(xp, _gaussian((6, 5)))
    got = call(init_linear, weight, r=2, init_lora_weights=True, sampler=NumpySampler(0), scaling=1.0)
    assert dtype_name(got.lora_A.dtype) == "float64" and dtype_name(got.lora_B.dtype) == "float64"
    got = call(init_linear, weight, r=2, init_lora_weights="olora", sampler=NumpySampler(0), scaling=1.0,
               dtype=xp.float32)
    assert dtype_name(got.lora_A.dtype) == "float32" and dtype_name(got.weight.dtype) == "float64"


@pytest.mark.parametrize("mode", CONV_MODES)
@pytest.mark.parametrize(("kernel", "groups"), [((3,), 1), ((3, 2), 1), ((1, 1), 2), ((2, 1, 2), 1)])
def test_conv_shapes_and_dtypes(xp, call, mode, kernel, groups):
    out_channels, in_channels, r = 4, 6, 4
    weight = _array(xp, _gaussian((out_channels, in_channels // groups, *kernel)), xp.float32)
    lora_bias = not isinstance(mode, str)
    got = call(init_conv, weight, r=r, init_lora_weights=mode, sampler=NumpySampler(0), scaling=1.0,
               groups=groups, lora_bias=lora_bias)
    assert tuple(got.lora_A.shape) == (r, in_channels, *kernel)
    assert tuple(got.lora_B.shape) == (out_channels, r // groups) + (1,) * len(kernel)
    assert (got.lora_B_bias is not None) == lora_bias
    if lora_bias:
        assert tuple(got.lora_B_bias.shape) == (out_channels,)
    for array in (got.lora_A, got.lora_B):
        assert dtype_name(array.dtype) == "float32"
    assert_close(got.weight, to_numpy(weight), xp=xp, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [True, False, "gaussian", "pissa", "olora", "orthogonal"])
def test_embedding_shapes_and_values(xp, call, mode):
    num_embeddings, dim, r = 9, 5, 3
    weight = _array(xp, _gaussian((num_embeddings, dim)), xp.float32)
    got = call(init_embedding, weight, r=r, init_lora_weights=mode, sampler=NumpySampler(0), scaling=1.0)
    assert tuple(got.lora_A.shape) == (r, num_embeddings) and tuple(got.lora_B.shape) == (dim, r)
    assert dtype_name(got.lora_A.dtype) == "float32" and got.lora_B_bias is None
    assert_close(got.weight, to_numpy(weight), xp=xp, rtol=0, atol=0)
    # peft's Embedding sends every truthy mode to reset_lora_parameters: A = 0, B ~ N(0, 1).
    a = to_numpy(got.lora_A)
    assert np.any(a != 0) if mode is False else np.all(a == 0)
    assert np.all(to_numpy(got.lora_B) != 0)


# ------------------------------------------------------------------------------------------ distributions


def _assert_uniform(samples, bound, label):
    samples = np.asarray(samples, dtype=np.float64)
    assert np.all(np.abs(samples) <= bound), f"{label}: a draw exceeds the bound {bound}"
    assert reference.ks_uniform(samples, -bound, bound) < reference.ks_critical(samples.size), label


def _assert_normal(samples, std, label):
    samples = np.asarray(samples, dtype=np.float64)
    assert abs(samples.std() / std - 1.0) < 0.05, f"{label}: std {samples.std()} != {std}"
    assert reference.ks_normal(samples, std) < reference.ks_critical(samples.size), label


def test_linear_default_is_kaiming_uniform_and_zero_B(xp, call):
    out_features, in_features, r = 24, 512, 16
    weight = _array(xp, np.zeros((out_features, in_features)), xp.float32)
    got = call(init_linear, weight, r=r, init_lora_weights=True, sampler=NumpySampler(1), scaling=2.0, lora_bias=True)
    _assert_uniform(to_numpy(got.lora_A), reference.kaiming_bound(in_features), "lora_A")
    assert np.abs(to_numpy(got.lora_A)).max() > 0.9 * reference.kaiming_bound(in_features)
    assert np.all(to_numpy(got.lora_B) == 0) and np.all(to_numpy(got.lora_B_bias) == 0)
    assert np.all(to_numpy(got.lora_B) @ to_numpy(got.lora_A) == 0)


def test_linear_false_is_torch_linear_default(xp, call):
    out_features, in_features, r = 600, 400, 8
    weight = _array(xp, np.zeros((out_features, in_features)), xp.float32)
    got = call(init_linear, weight, r=r, init_lora_weights=False, sampler=NumpySampler(2), scaling=1.0, lora_bias=True)
    _assert_uniform(to_numpy(got.lora_A), 1 / math.sqrt(in_features), "lora_A")
    _assert_uniform(to_numpy(got.lora_B), 1 / math.sqrt(r), "lora_B")
    _assert_uniform(to_numpy(got.lora_B_bias), 1 / math.sqrt(r), "lora_B_bias")


def test_linear_gaussian_has_std_one_over_r(xp, call):
    r = 16
    weight = _array(xp, np.zeros((8, 512)), xp.float32)
    got = call(init_linear, weight, r=r, init_lora_weights="gaussian", sampler=NumpySampler(3), scaling=1.0)
    _assert_normal(to_numpy(got.lora_A), 1 / r, "lora_A")
    assert np.all(to_numpy(got.lora_B) == 0)


def test_conv_distributions(xp, call):
    out_channels, in_channels, kernel, r, groups = 8, 32, (3, 3), 16, 2
    fan_in = in_channels * 9
    weight = _array(xp, np.zeros((out_channels, in_channels // groups, *kernel)), xp.float32)
    default = call(init_conv, weight, r=r, init_lora_weights=True, sampler=NumpySampler(4), scaling=1.0,
                   groups=groups, lora_bias=True)
    _assert_uniform(to_numpy(default.lora_A), reference.kaiming_bound(fan_in), "default lora_A")
    assert np.all(to_numpy(default.lora_B) == 0) and np.all(to_numpy(default.lora_B_bias) == 0)
    gaussian = call(init_conv, weight, r=r, init_lora_weights="gaussian", sampler=NumpySampler(5), scaling=1.0)
    _assert_normal(to_numpy(gaussian.lora_A), 1 / r, "gaussian lora_A")
    assert np.all(to_numpy(gaussian.lora_B) == 0)
    wide = _array(xp, np.zeros((512, in_channels // groups, *kernel)), xp.float32)
    torch_default = call(init_conv, wide, r=r, init_lora_weights=False, sampler=NumpySampler(6), scaling=1.0,
                         groups=groups, lora_bias=True)
    _assert_uniform(to_numpy(torch_default.lora_A), 1 / math.sqrt(fan_in), "False lora_A")
    _assert_uniform(to_numpy(torch_default.lora_B), math.sqrt(groups / r), "False lora_B")
    assert np.all(np.abs(to_numpy(torch_default.lora_B_bias)) <= math.sqrt(groups / r))


def test_embedding_distributions(xp, call):
    weight = _array(xp, np.zeros((400, 300)), xp.float32)
    default = call(init_embedding, weight, r=8, init_lora_weights=True, sampler=NumpySampler(7), scaling=1.0)
    assert np.all(to_numpy(default.lora_A) == 0)
    _assert_normal(to_numpy(default.lora_B), 1.0, "True lora_embedding_B")
    off = call(init_embedding, weight, r=8, init_lora_weights=False, sampler=NumpySampler(8), scaling=1.0)
    _assert_normal(to_numpy(off.lora_A), 1.0, "False lora_embedding_A")
    _assert_normal(to_numpy(off.lora_B), 1.0, "False lora_embedding_B")


def test_same_seed_same_init_and_inputs_untouched(xp, call):
    original = _gaussian((6, 8))
    weight = _array(xp, original)
    first = call(init_linear, weight, r=4, init_lora_weights="pissa_niter_1", sampler=NumpySampler(9), scaling=1.0)
    second = call(init_linear, weight, r=4, init_lora_weights="pissa_niter_1", sampler=NumpySampler(9), scaling=1.0)
    assert_close(first.lora_A, to_numpy(second.lora_A), xp=xp, rtol=0, atol=0)
    assert_close(weight, original, xp=xp, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ PiSSA / OLoRA


def _separated_weight(seed, out_features, in_features):
    # Well-separated singular values keep the top-r subspace well conditioned in float32.
    k = min(out_features, in_features)
    return reference.with_spectrum(np.random.default_rng(seed), out_features, in_features, 1.0 + np.arange(k)[::-1])


def _oriented(matrix, fan_in_fan_out):
    return matrix.T if fan_in_fan_out else matrix


def _atol(dtype, w):
    # Entries of W − s·B@A cancel to far below |W|: judge them on the scale of W.
    return {"float32": 2e-5, "float64": 1e-10}[dtype] * np.abs(w).max() * 4


decomposition_cases = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(2, 12), st.integers(1, 6),
    st.booleans(), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from(["float32", "float64"]),
)


@settings(deadline=None, max_examples=10)
@given(case=decomposition_cases)
def test_pissa_matches_reference(xp, call, case):
    seed, out_features, in_features, r, fan_in_fan_out, scaling, dtype = case
    r = min(r, out_features, in_features)
    w = _separated_weight(seed, out_features, in_features)
    stored = w.T if fan_in_fan_out else w
    weight = _array(xp, stored, getattr(xp, dtype))
    got = call(init_linear, weight, r=r, init_lora_weights="pissa", sampler=NumpySampler(0), scaling=scaling,
               fan_in_fan_out=fan_in_fan_out)
    ref_A, ref_B, ref_residual = reference.pissa(stored, r, scaling, fan_in_fan_out=fan_in_fan_out)
    assert_close(got.weight, ref_residual, xp=xp, atol=float(_atol(dtype, w)))
    assert_close(got.lora_B @ got.lora_A, ref_B @ ref_A, xp=xp)
    # Singular vectors are unique up to sign: compare magnitudes and the exact reconstruction.
    assert_close(xp.abs(got.lora_A), np.abs(ref_A), xp=xp)
    assert_close(xp.abs(got.lora_B), np.abs(ref_B), xp=xp)
    rebuilt = to_numpy(got.weight) + _oriented(scaling * to_numpy(got.lora_B) @ to_numpy(got.lora_A), fan_in_fan_out)
    np.testing.assert_allclose(rebuilt, stored, atol=float(_atol(dtype, w)))


@settings(deadline=None, max_examples=10)
@given(case=decomposition_cases)
def test_olora_matches_reference(xp, call, case):
    seed, out_features, in_features, r, fan_in_fan_out, scaling, dtype = case
    r = min(r, out_features, in_features)
    w = _separated_weight(seed, out_features, in_features)
    stored = w.T if fan_in_fan_out else w
    weight = _array(xp, stored, getattr(xp, dtype))
    got = call(init_linear, weight, r=r, init_lora_weights="olora", sampler=NumpySampler(0), scaling=scaling,
               fan_in_fan_out=fan_in_fan_out)
    ref_A, ref_B, ref_residual = reference.olora(stored, r, scaling, fan_in_fan_out=fan_in_fan_out)
    assert_close(got.weight, ref_residual, xp=xp, atol=float(_atol(dtype, w)))
    assert_close(got.lora_B @ got.lora_A, ref_B @ ref_A, xp=xp)
    # QR is unique up to the signs of Q's columns (and R's rows).
    assert_close(xp.abs(got.lora_A), np.abs(ref_A), xp=xp)
    assert_close(xp.abs(got.lora_B), np.abs(ref_B), xp=xp)
    rebuilt = to_numpy(got.weight) + _oriented(scaling * to_numpy(got.lora_B) @ to_numpy(got.lora_A), fan_in_fan_out)
    np.testing.assert_allclose(rebuilt, stored, atol=float(_atol(dtype, w)))


@pytest.mark.parametrize(("mode", "expected_rank"), [("pissa", 4), ("olora", 4)])
def test_rank_is_capped_at_min_dimension_like_peft(xp, call, mode, expected_rank):
    weight = _array(xp, _separated_weight(1, 6, 4))
    got = call(init_linear, weight, r=6, init_lora_weights=mode, sampler=NumpySampler(0), scaling=1.0)
    assert tuple(got.lora_A.shape) == (expected_rank, 4) and tuple(got.lora_B.shape) == (6, expected_rank)
    np.testing.assert_allclose(to_numpy(got.weight), 0.0, atol=1e-10)


@settings(deadline=None, max_examples=10)
@given(case=st.tuples(st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(2, 12), st.integers(1, 6),
                      st.integers(0, 3), st.booleans(), st.integers(0, 4)))
def test_pissa_niter_is_exact_on_low_rank_weights(xp, call, case):
    seed, out_features, in_features, r, deficit, fan_in_fan_out, niter = case
    r = min(r, out_features, in_features)
    rank = max(1, r - deficit)
    rng = np.random.default_rng(seed)
    w = reference.with_spectrum(rng, out_features, in_features, rng.uniform(1.0, 3.0, rank))
    stored = w.T if fan_in_fan_out else w
    weight = _array(xp, stored)
    got = call(init_linear, weight, r=r, init_lora_weights=f"pissa_niter_{niter}", sampler=NumpySampler(seed),
               scaling=2.0, fan_in_fan_out=fan_in_fan_out)
    ref_A, ref_B, _ = reference.pissa(stored, r, 2.0, fan_in_fan_out=fan_in_fan_out)
    assert tuple(got.lora_A.shape) == (r, in_features) and tuple(got.lora_B.shape) == (out_features, r)
    assert_close(got.lora_B @ got.lora_A, ref_B @ ref_A, xp=xp, rtol=1e-8)
    assert_close(got.weight, np.zeros_like(stored), xp=xp, atol=1e-8 * np.abs(w).max())


@pytest.mark.parametrize("niter", [0, 2, 4])
def test_pissa_niter_approximates_the_top_r_part(xp, call, niter):
    out_features, in_features, r = 12, 10, 4
    rng = np.random.default_rng(niter)
    w = reference.with_spectrum(rng, out_features, in_features, 0.5 ** np.arange(10))
    best, floor = reference.best_rank(w, r)
    got = call(init_linear, _array(xp, w), r=r, init_lora_weights=f"pissa_niter_{niter}", sampler=NumpySampler(1),
               scaling=1.0)
    error = np.linalg.norm(to_numpy(got.lora_B) @ to_numpy(got.lora_A) - best)
    residual = np.linalg.norm(to_numpy(got.weight))
    # Subspace iteration contracts the error like (σ_{r+1}/σ_r)^(2 niter + 1) = 2^-(2 niter + 1).
    bound = 0.5 ** (2 * niter + 1) * np.linalg.norm(best)
    assert error <= bound
    assert floor - 1e-12 <= residual <= floor + bound
    np.testing.assert_allclose(to_numpy(got.weight) + to_numpy(got.lora_B) @ to_numpy(got.lora_A), w, atol=1e-12)


# ------------------------------------------------------------------------------------------ orthogonal


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_orthogonal_matches_reference_from_the_same_draws(xp, call, fan_in_fan_out):
    out_features, in_features, r = 7, 5, 6
    stored = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    weight = _array(xp, np.zeros(stored))
    sampler = RecordingSampler(11)
    got = call(init_linear, weight, r=r, init_lora_weights="orthogonal", sampler=sampler, scaling=1.0,
               fan_in_fan_out=fan_in_fan_out)
    square, draws_A, draws_B = sampler.draws
    assert square.shape == (r, r) and draws_A.shape == (in_features, r // 2) and draws_B.shape == (r // 2, out_features)
    ref_A, ref_B = reference.orthogonal(square, draws_A, draws_B)
    # QR fixes Q up to column signs, which flip rows of A and columns of B: compare sign-free quantities.
    assert_close(xp.abs(got.lora_A), np.abs(ref_A), xp=xp)
    assert_close(xp.abs(got.lora_B), np.abs(ref_B), xp=xp)
    assert_close(xp.matrix_transpose(got.lora_A) @ got.lora_A, draws_A @ draws_A.T / 100.0, xp=xp)
    assert_close(got.lora_B @ xp.matrix_transpose(got.lora_B), draws_B.T @ draws_B / 100.0, xp=xp)
    # Even and odd rows of an orthogonal Q are orthogonal, so the initial delta vanishes.
    np.testing.assert_allclose(to_numpy(got.lora_B @ got.lora_A), 0.0, atol=1e-12)


# ------------------------------------------------------------------------------------------ dtypes


def _half_dtypes(xp):
    return [getattr(xp, name) for name in ("float16", "bfloat16") if hasattr(xp, name)]


def test_adapter_dtype(xp):
    assert adapter_dtype(xp.float32) == xp.float32 and adapter_dtype(xp.float64, xp=xp) == xp.float64
    for half in _half_dtypes(xp):
        assert adapter_dtype(half, xp=xp) == xp.float32
        inferred = adapter_dtype(half)
        assert dtype_name(inferred) == "float32"
        assert xp.astype(xp.ones(2, dtype=half), inferred).dtype == xp.float32
        assert adapter_dtype(half, autocast_adapter_dtype=False) == half


@pytest.mark.parametrize("mode", [True, False, "gaussian", "pissa", "olora", "orthogonal"])
def test_half_base_gives_float32_adapters_rounded_through_the_base_dtype(xp, call, mode):
    base = _separated_weight(2, 8, 6)
    for half in _half_dtypes(xp):
        weight = _array(xp, base, half)
        got = call(init_linear, weight, r=4, init_lora_weights=mode, sampler=NumpySampler(0), scaling=2.0)
        assert got.lora_A.dtype == xp.float32 and got.lora_B.dtype == xp.float32 and got.weight.dtype == half
        for factor in (got.lora_A, got.lora_B):
            assert_close(xp.astype(xp.astype(factor, half), xp.float32), to_numpy(factor), xp=xp, rtol=0, atol=0)
        kept = call(init_linear, weight, r=4, init_lora_weights=mode, sampler=NumpySampler(0), scaling=2.0,
                    dtype=half)
        assert kept.lora_A.dtype == half
        assert_close(kept.lora_A, to_numpy(got.lora_A), xp=xp, rtol=0, atol=0)
        if mode in ("pissa", "olora"):
            w32 = to_numpy(weight).astype(np.float64)
            ref = reference.pissa(w32, 4, 2.0) if mode == "pissa" else reference.olora(w32, 4, 2.0)
            assert_close(got.weight, ref[2], xp=xp, atol=2e-2 * np.abs(w32).max())
    for half in _half_dtypes(xp):
        emb = call(init_embedding, _array(xp, base, half), r=4, init_lora_weights=mode, sampler=NumpySampler(0),
                   scaling=1.0)
        assert emb.lora_B.dtype == xp.float32
    assert call(init_linear, _array(xp, base, xp.float32), r=4, init_lora_weights=mode, sampler=NumpySampler(0),
                scaling=1.0).lora_A.dtype == xp.float32


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("mode", OUT_OF_SCOPE)
def test_data_driven_modes_are_refused(xp, mode):
    weight = _array(xp, np.ones((4, 4)))
    for init, kwargs in ((init_linear, {}), (init_embedding, {}), (init_conv, {})):
        w = _array(xp, np.ones((4, 4, 1, 1))) if init is init_conv else weight
        with pytest.raises(ConfigError, match=f"{mode}.*not support"):
            init(w, r=2, init_lora_weights=mode, sampler=NumpySampler(0), scaling=1.0, **kwargs)


@pytest.mark.parametrize("mode", ["foo", "PISSA", "pissa_niter_", "pissa_niter_x", "pissa_niter_-1", 1, None, 0.5])
def test_unknown_modes_are_refused(xp, mode):
    with pytest.raises(ConfigError, match="init_lora_weights"):
        init_linear(_array(xp, np.ones((4, 4))), r=2, init_lora_weights=mode, sampler=NumpySampler(0), scaling=1.0)


def test_case_insensitive_modes_follow_peft(xp):
    weight = _array(xp, _separated_weight(0, 5, 4))
    upper = init_linear(weight, r=2, init_lora_weights="OLoRA", sampler=NumpySampler(0), scaling=1.0)
    lower = init_linear(weight, r=2, init_lora_weights="olora", sampler=NumpySampler(0), scaling=1.0)
    assert_close(upper.lora_A, to_numpy(lower.lora_A), xp=xp, rtol=0, atol=0)
    gauss = init_linear(weight, r=2, init_lora_weights="Gaussian", sampler=NumpySampler(0), scaling=1.0)
    assert np.all(to_numpy(gauss.lora_B) == 0) and np.any(to_numpy(gauss.lora_A) != 0)


def test_orthogonal_needs_an_even_rank(xp):
    with pytest.raises(ConfigError, match="even.*r=3"):
        init_linear(_array(xp, np.ones((4, 4))), r=3, init_lora_weights="orthogonal", sampler=NumpySampler(0),
                    scaling=1.0)


@pytest.mark.parametrize("mode", ["pissa", "pissa_niter_2", "olora", "orthogonal"])
def test_conv_refuses_weight_driven_modes(xp, mode):
    with pytest.raises(ConfigError, match=r"conv.*\(4, 3, 2, 2\)"):
        init_conv(_array(xp, np.ones((4, 3, 2, 2))), r=2, init_lora_weights=mode, sampler=NumpySampler(0),
                  scaling=1.0)


def test_bad_rank_groups_and_bias_combinations(xp):
    weight = _array(xp, np.ones((4, 4)))
    for r in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="positive integer"):
            init_linear(weight, r=r, init_lora_weights=True, sampler=NumpySampler(0), scaling=1.0)
    with pytest.raises(ConfigError, match="divisible by groups"):
        init_conv(_array(xp, np.ones((4, 2, 1, 1))), r=3, init_lora_weights=True, sampler=NumpySampler(0),
                  scaling=1.0, groups=2)
    with pytest.raises(ConfigError, match="lora_bias"):
        init_linear(weight, r=2, init_lora_weights="gaussian", sampler=NumpySampler(0), scaling=1.0, lora_bias=True)
    with pytest.raises(ConfigError, match="lora_bias"):
        init_conv(_array(xp, np.ones((4, 4, 1, 1))), r=2, init_lora_weights="gaussian", sampler=NumpySampler(0),
                  scaling=1.0, lora_bias=True)
