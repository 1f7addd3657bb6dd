"""``peftcore._conv``: native and im2col convolution against a naive float64 loop, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore._conv import _conv_nd_generic, conv_nd
from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.testing import assert_close
from tests.reference import lora as ref

CONV_FUNCTIONS = [pytest.param(conv_nd, id="native"), pytest.param(_conv_nd_generic, id="generic")]


@st.composite
def conv_cases(draw):
    """A conv problem ``(x, weight, options)`` whose output has at least one position."""
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    in_per_group, out_per_group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    max_kernel = 3 if n < 3 else 2
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    mode = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * n if mode == "same" else tuple(draw(st.integers(1, 2)) for _ in range(n))
    if mode == "int":
        padding = draw(st.integers(0, 2))
    elif mode == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    else:
        padding = mode
    pads = ref.pad_pairs(padding, kernel, dilation)
    # smallest input that still covers one dilated kernel window, then a little more
    spatial = tuple(
        max(1, d * (k - 1) + 1 - lo - hi) + draw(st.integers(0, 2 if n < 3 else 1))
        for k, d, (lo, hi) in zip(kernel, dilation, pads)
    )
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, groups * in_per_group, *spatial))
    weight = rng.normal(size=(groups * out_per_group, in_per_group, *kernel))
    # scalar stride/dilation sometimes, to cover the int form
    options = dict(
        stride=stride[0] if len(set(stride)) == 1 and draw(st.booleans()) else stride,
        padding=padding,
        dilation=dilation[0] if len(set(dilation)) == 1 and draw(st.booleans()) else dilation,
        groups=groups,
    )
    return x, weight, options


@pytest.mark.parametrize("conv", CONV_FUNCTIONS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(deadline=None, max_examples=8)
@given(case=conv_cases())
def test_conv_matches_naive_reference(xp, call, conv, dtype, case):
    x, weight, options = case
    expected = ref.conv(x, weight, **options)
    x_xp = xp.astype(xp.asarray(x), getattr(xp, dtype))
    w_xp = xp.astype(xp.asarray(weight), getattr(xp, dtype))
    result = call(conv, x_xp, w_xp, **options)
    assert_close(result, expected, xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize("conv", CONV_FUNCTIONS)
def test_conv_accepts_unbatched_input(xp, call, conv):
    rng = np.random.default_rng(0)
    x, weight = rng.normal(size=(2, 5, 4)), rng.normal(size=(3, 2, 2, 3))
    result = call(conv, xp.asarray(x), xp.asarray(weight), padding=1, stride=(2, 1))
    assert_close(result, ref.conv(x[None], weight, padding=1, stride=(2, 1))[0], xp=xp)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [
        dict(stride=2, padding=1, dilation=1, groups=2),
        dict(stride=1, padding="same", dilation=2, groups=2),
        dict(stride=(1, 2, 1), padding="valid", dilation=1, groups=1),
    ],
    ids=["strided-grouped", "same-dilated", "valid"],
)
def test_generic_path_matches_torch(n, options):
    torch = pytest.importorskip("torch")
    options = {k: v[:n] if isinstance(v, tuple) else v for k, v in options.items()}
    rng = np.random.default_rng(n)
    x = torch.tensor(rng.normal(size=(2, 4, *(5,) * n)))
    weight = torch.tensor(rng.normal(size=(6, 4 // options["groups"], *(3,) * n)))
    expected = getattr(torch.nn.functional, f"conv{n}d")(x, weight, **options)
    assert_close(_conv_nd_generic(x, weight, **options), expected.numpy(), xp=None)


def test_bad_arguments_raise_named_errors():
    x, weight = np.zeros((1, 4, 5, 5)), np.zeros((6, 2, 3, 3))
    with pytest.raises(ShapeMismatchError, match=r"\(1, 4, 5, 5\).*\(6, 4, 3, 3\)"):
        conv_nd(x, np.zeros((6, 4, 3, 3)), groups=2)
    with pytest.raises(ShapeMismatchError, match="not divisible by groups=4"):
        conv_nd(np.zeros((1, 8, 5, 5)), weight, groups=4)
    with pytest.raises(ShapeMismatchError, match="spatial dims"):
        conv_nd(np.zeros((4, 5)), weight, groups=2)
    with pytest.raises(ShapeMismatchError, match="smaller than"):
        conv_nd(np.zeros((1, 4, 2, 2)), weight, groups=2)
    with pytest.raises(ConfigError, match="'same' needs stride 1"):
        conv_nd(x, weight, groups=2, padding="same", stride=2)
    with pytest.raises(ConfigError, match="padding"):
        conv_nd(x, weight, groups=2, padding="full")
    with pytest.raises(ConfigError, match="stride"):
        conv_nd(x, weight, groups=2, stride=(1, 1, 1))
    with pytest.raises(ConfigError, match="dilation"):
        conv_nd(x, weight, groups=2, dilation=0)
