"""``peftcore.methods.prompt_learning`` input-side ops and key/value layout vs the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.methods import prompt_learning as pl
from peftcore.testing import assert_close, to_numpy
from tests.reference import prompt as ref

FLOATS = ["float64", "float32"]


def as_xp(xp, array, dtype="float64"):
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=10)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 4), seq=st.integers(1, 5), dim=st.integers(1, 6),
       prompt_rank=st.sampled_from([2, 3, 1]), seed=st.integers(0, 2**32 - 1))
def test_prepend_virtual_tokens(xp, call, dtype, batch, tokens, seq, dim, prompt_rank, seed):
    rng = np.random.default_rng(seed)
    shape = {2: (tokens, dim), 1: (1, tokens, dim), 3: (batch, tokens, dim)}[prompt_rank]
    prompts, embeds = rng.normal(size=shape), rng.normal(size=(batch, seq, dim))
    # prompts arrive in float64 and are cast to the embeddings' dtype, as peft's prompts.to(inputs_embeds.dtype)
    got = call(pl.prepend_virtual_tokens, as_xp(xp, prompts), as_xp(xp, embeds, dtype))
    assert_close(got, ref.prepend(prompts, embeds), xp=xp, dtype=getattr(xp, dtype))


@settings(deadline=None, max_examples=6)
@given(batch=st.integers(1, 3), tokens=st.integers(0, 4), seq=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_mask_labels_token_types_are_extended(xp, call, batch, tokens, seq, seed):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 2, size=(batch, seq))
    labels = rng.integers(-100, 50, size=(batch, seq))
    types = rng.integers(0, 2, size=(batch, seq))
    for fn, values, fill in ((pl.extend_attention_mask, mask, 1), (pl.extend_labels, labels, -100),
                             (pl.extend_token_type_ids, types, 0)):
        arr = xp.asarray(values)
        got = call(fn, arr, num_virtual_tokens=tokens)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(to_numpy(got), ref.prepend_constant(values, tokens, fill))
    got = call(pl.extend_labels, xp.asarray(labels), num_virtual_tokens=tokens, ignore_index=-1)
    np.testing.assert_array_equal(to_numpy(got), ref.prepend_constant(labels, tokens, -1))
    # a float mask stays float (peft's mask turns float32 after torch.cat; same values)
    got = call(pl.extend_attention_mask, as_xp(xp, mask, "float32"), num_virtual_tokens=tokens)
    assert_close(got, ref.prepend_constant(mask, tokens, 1), xp=xp, dtype=xp.float32)


def test_split_seq2seq_prompts(xp, call):
    prompts = np.arange(2 * 6 * 3, dtype=np.float64).reshape(2, 6, 3)
    enc, dec = call(pl.split_seq2seq_prompts, xp.asarray(prompts), num_virtual_tokens=3)
    assert_close(enc, prompts[:, :3], xp=xp)
    assert_close(dec, prompts[:, 3:], xp=xp)
    with pytest.raises(ShapeMismatchError, match=r"\(B, 2\*2, D\)"):
        pl.split_seq2seq_prompts(xp.asarray(prompts), num_virtual_tokens=2)


@st.composite
def layout_cases(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 4))
    tokens = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    batched = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    width = 2 * layers * heads * head_dim
    prefix = rng.normal(size=(batch, tokens, width) if batched else (tokens, width))
    return dict(prefix=prefix, layers=layers, heads=heads, dim=heads * head_dim, batch=batch, batched=batched,
                submodules=draw(st.sampled_from([1, 2])))


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=8)
@given(case=layout_cases())
def test_past_key_values_layout_matches_peft_view_permute_split(xp, call, dtype, case):
    kwargs = dict(num_layers=case["layers"], num_attention_heads=case["heads"], token_dim=case["dim"],
                  num_transformer_submodules=case["submodules"])
    got = call(pl.past_key_values_layout, as_xp(xp, case["prefix"]), **kwargs,
               batch_size=None if case["batched"] else case["batch"], dtype=getattr(xp, dtype))
    expected = ref.past_key_values(case["prefix"], case["layers"], case["heads"], case["dim"], case["submodules"],
                                   case["batch"])
    assert len(got) == len(expected) == case["layers"]
    for got_layer, expected_layer in zip(got, expected):
        assert len(got_layer) == len(expected_layer) == 2 * case["submodules"]
        for g, e in zip(got_layer, expected_layer):
            assert_close(g, e, xp=xp, dtype=getattr(xp, dtype))


def test_layout_seq2seq_layers_follow_peft_chunks(xp):
    """N=2 with 3 layers: chunk l holds slices 4l..4l+3 (mod 6), so layer 1's self-attention gets layer 2's key."""
    layers, dim, tokens = 3, 2, 1
    prefix = np.zeros((tokens, 2 * layers * dim))
    for s in range(2 * layers):  # slice s of the (2L) axis carries the value s
        prefix[:, s * dim:(s + 1) * dim] = s
    got = pl.past_key_values_layout(xp.asarray(prefix), num_layers=layers, num_attention_heads=1, token_dim=dim,
                                    num_transformer_submodules=2)
    firsts = [[float(to_numpy(t).ravel()[0]) for t in layer] for layer in got]
    assert firsts == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]


def test_layout_errors_name_the_shape(xp):
    prefix = xp.asarray(np.zeros((2, 12)))
    with pytest.raises(ShapeMismatchError, match=r"\(T, 16\)"):
        pl.past_key_values_layout(prefix, num_layers=2, num_attention_heads=2, token_dim=4)
    with pytest.raises(ShapeMismatchError, match="multiple of num_attention_heads"):
        pl.past_key_values_layout(prefix, num_layers=2, num_attention_heads=4, token_dim=3)
    with pytest.raises(ConfigError, match="1 or 2"):
        pl.past_key_values_layout(prefix, num_layers=2, num_attention_heads=1, token_dim=3, num_transformer_submodules=3)
    with pytest.raises(ShapeMismatchError, match="batch_size 3"):
        pl.past_key_values_layout(xp.asarray(np.zeros((2, 1, 12))), num_layers=2, num_attention_heads=1, token_dim=3,
                                  batch_size=3)


def test_input_ops_reject_bad_shapes(xp):
    with pytest.raises(ShapeMismatchError, match="same D"):
        pl.prepend_virtual_tokens(xp.asarray(np.zeros((2, 3))), xp.asarray(np.zeros((1, 2, 4))))
    with pytest.raises(ShapeMismatchError, match="prompts batch 2"):
        pl.prepend_virtual_tokens(xp.asarray(np.zeros((2, 2, 4))), xp.asarray(np.zeros((3, 2, 4))))
    with pytest.raises(ShapeMismatchError, match="labels must be"):
        pl.extend_labels(xp.asarray(np.zeros((3,), dtype=np.int64)), num_virtual_tokens=2)
