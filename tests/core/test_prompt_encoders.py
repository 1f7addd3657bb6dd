"""Prompt encoders (prefix projection, P-tuning MLP and LSTM) and the peft-named dispatch vs the NumPy reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.methods import prompt_learning as pl
from peftcore.methods.p_tuning import PromptEncoderConfig, lstm, lstm_mlp_head, lstm_parameter_names, mlp_head
from peftcore.methods.prefix_tuning import PrefixTuningConfig, prefix_projection
from peftcore.methods.prompt_tuning import PromptTuningConfig
from peftcore.random import NumpySampler
from peftcore.testing import assert_close, to_numpy
from tests.reference import prompt as ref

FLOATS = ["float64", "float32"]


def as_xp(xp, array, dtype="float64"):
    return xp.astype(xp.asarray(array), getattr(xp, dtype))


def lstm_params(rng, num_layers, dim, hidden):
    params = {}
    for name in lstm_parameter_names(num_layers):
        layer = int(name.split("_l")[1].split("_")[0])
        width = dim if layer == 0 else 2 * hidden
        shape = {"weight_ih": (4 * hidden, width), "weight_hh": (4 * hidden, hidden)}.get(name[:9], (4 * hidden,))
        params[name] = rng.normal(size=shape)
    return params


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=3)
@given(tokens=st.integers(1, 3), dim=st.sampled_from([1, 4]), hidden=st.sampled_from([2, 3]), layers=st.integers(1, 2),
       batched=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_prefix_projection_and_mlp_heads(xp, call, dtype, tokens, dim, hidden, layers, batched, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, tokens, dim) if batched else (tokens, dim))
    w1, b1 = rng.normal(size=(hidden, dim)), rng.normal(size=hidden)
    w2, b2 = rng.normal(size=(2 * layers * dim, hidden)), rng.normal(size=2 * layers * dim)
    got = call(prefix_projection, *(as_xp(xp, a, dtype) for a in (x, w1, b1, w2, b2)))
    assert_close(got, ref.prefix_projection(x, w1, b1, w2, b2), xp=xp, dtype=getattr(xp, dtype))
    mlp = [rng.normal(size=s) for s in ((hidden, dim), (hidden,), (hidden, hidden), (hidden,), (dim, hidden), (dim,))]
    got = call(mlp_head, *(as_xp(xp, a, dtype) for a in (x, *mlp)))
    assert_close(got, ref.mlp_head(x, *mlp), xp=xp, dtype=getattr(xp, dtype))
    h = rng.normal(size=(*x.shape[:-1], 2 * hidden))
    head = [rng.normal(size=s) for s in ((2 * hidden, 2 * hidden), (2 * hidden,), (dim, 2 * hidden), (dim,))]
    got = call(lstm_mlp_head, *(as_xp(xp, a, dtype) for a in (h, *head)))
    assert_close(got, ref.lstm_mlp_head(h, *head), xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@settings(deadline=None, max_examples=3)
@given(tokens=st.integers(1, 3), dim=st.sampled_from([1, 3]), hidden=st.sampled_from([1, 2]), num_layers=st.integers(1, 3),
       batched=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_lstm_from_equations(xp, call, dtype, tokens, dim, hidden, num_layers, batched, masked, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, tokens, dim) if batched else (tokens, dim))
    params = lstm_params(rng, num_layers, dim, hidden)
    masks = None
    arrays = {k: as_xp(xp, v, dtype) for k, v in params.items()}
    if masked:
        masks = [rng.integers(0, 2, size=(*x.shape[:-1], 2 * hidden)) * 2.0 for _ in range(num_layers - 1)]
        got = call(_lstm_with_masks, as_xp(xp, x, dtype), arrays, [as_xp(xp, m, dtype) for m in masks],
                   num_layers=num_layers)
    else:
        got = call(lstm, as_xp(xp, x, dtype), arrays, num_layers=num_layers)
    assert_close(got, ref.lstm(x, params, num_layers, masks), xp=xp, dtype=getattr(xp, dtype))


def _lstm_with_masks(x, params, masks, /, *, num_layers):
    return lstm(x, params, num_layers=num_layers, dropout_masks=masks)


def test_lstm_rejects_wrong_parameters(xp):
    rng = np.random.default_rng(0)
    params = {k: xp.asarray(v) for k, v in lstm_params(rng, 2, 3, 2).items()}
    x = xp.asarray(rng.normal(size=(2, 3)))
    with pytest.raises(ShapeMismatchError, match="missing"):
        lstm(x, {k: v for k, v in params.items() if k != "bias_hh_l1"}, num_layers=2)
    with pytest.raises(ShapeMismatchError, match="dropout masks"):
        lstm(x, params, num_layers=2, dropout_masks=[])
    with pytest.raises(ShapeMismatchError, match="weight_ih_l0"):
        lstm(xp.asarray(rng.normal(size=(2, 5))), params, num_layers=2)


# --- the peft-named dispatch -------------------------------------------------------------------------------


def prepared(config, **model):
    geometry = dict(num_hidden_layers=2, hidden_size=6, num_attention_heads=3)
    geometry.update(model)
    return pl.prepare_config(config, geometry)


CONFIGS = {
    "prompt": lambda: prepared(PromptTuningConfig(num_virtual_tokens=3)),
    "prompt-seq2seq": lambda: prepared(PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM")),
    "prefix": lambda: prepared(PrefixTuningConfig(num_virtual_tokens=3)),
    "prefix-gqa": lambda: prepared(PrefixTuningConfig(num_virtual_tokens=2), num_key_value_heads=1),
    "prefix-proj": lambda: prepared(PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=4)),
    "prefix-proj-seq2seq": lambda: prepared(
        PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, task_type="SEQ_2_SEQ_LM")),
    "mlp": lambda: prepared(PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=5)),
    "lstm": lambda: prepared(PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                                 encoder_hidden_size=2)),
    "lstm-seq2seq-1layer": lambda: prepared(PromptEncoderConfig(
        num_virtual_tokens=2, encoder_reparameterization_type="LSTM", encoder_num_layers=1, task_type="SEQ_2_SEQ_LM")),
}


def reference_encode(params, config):
    p = params
    if config.inference_mode or str(config.peft_type) == "PROMPT_TUNING":
        return p["embedding.weight"]
    if str(config.peft_type) == "PREFIX_TUNING":
        if not config.prefix_projection:
            return p["embedding.weight"]
        return ref.prefix_projection(p["embedding.weight"], p["transform.0.weight"], p["transform.0.bias"],
                                     p["transform.2.weight"], p["transform.2.bias"])
    if str(config.encoder_reparameterization_type) == "MLP":
        return ref.mlp_head(p["embedding.weight"], *(p[f"mlp_head.{i}.{k}"] for i in (0, 2, 4) for k in ("weight", "bias")))
    hidden = ref.lstm(p["embedding.weight"], {k[10:]: v for k, v in p.items() if k.startswith("lstm_head.")},
                      config.encoder_num_layers)
    return ref.lstm_mlp_head(hidden, *(p[f"mlp_head.{i}.{k}"] for i in (0, 2) for k in ("weight", "bias")))


def flatten(prompt):
    return [t for layer in prompt for t in layer] if isinstance(prompt, tuple) else [prompt]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_get_prompt_save_load(xp, call, name):
    config = CONFIGS[name]()
    params = pl.init_params(config, sampler=NumpySampler(7), dtype=np.float64)
    assert {k: tuple(v.shape) for k, v in params.items()} == pl.parameter_shapes(config)
    expected = reference_encode({k: np.asarray(v) for k, v in params.items()}, config)
    arrays = {k: xp.asarray(np.asarray(v)) for k, v in params.items()}
    saved = call(pl.prompt_embeddings_to_save, arrays, config=config)
    assert_close(saved, expected, xp=xp)
    prompt = call(pl.get_prompt, arrays, config=config, batch_size=2, dtype=xp.float32)
    if str(config.peft_type) == "PREFIX_TUNING":
        layout = ref.past_key_values(expected, config.num_layers, config.num_attention_heads, config.token_dim,
                                     config.num_transformer_submodules, 2)
        for got_layer, exp_layer in zip(prompt, layout, strict=True):
            for g, e in zip(got_layer, exp_layer, strict=True):
                assert_close(g, e, xp=xp, dtype=xp.float32)
    else:
        assert_close(prompt, np.broadcast_to(expected, (2, *expected.shape)), xp=xp, dtype=xp.float32)
    # a saved adapter loads into the inference-mode table and gives the same prompt without any head
    loaded_config = type(config).from_dict({**config.to_dict(), "inference_mode": True})
    loaded = pl.load_prompt_embeddings(saved, config=loaded_config)
    assert set(loaded) == set(pl.parameter_shapes(loaded_config)) == {"embedding.weight"}
    again = call(pl.get_prompt, loaded, config=loaded_config, batch_size=2, dtype=xp.float32)
    for g, e in zip(flatten(again), flatten(prompt), strict=True):
        np.testing.assert_array_equal(to_numpy(g), to_numpy(e))
    with pytest.raises(ShapeMismatchError, match="prompt_embeddings has shape"):
        pl.load_prompt_embeddings(xp.asarray(np.zeros((1, 1))), config=config)


def test_init_params_follow_torch_defaults():
    config = CONFIGS["lstm"]()
    params = pl.init_params(config, sampler=NumpySampler(0), dtype=np.float64)
    assert np.all(np.abs(params["lstm_head.weight_ih_l1"]) <= 1 / np.sqrt(2))
    assert np.all(np.abs(params["mlp_head.0.weight"]) <= 1 / np.sqrt(4)) and np.std(params["embedding.weight"]) > 0.3
    zero = prepared(PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero", prefix_projection=True))
    p = pl.init_params(zero, sampler=NumpySampler(0), dtype=np.float32)
    assert not np.any(p["transform.2.weight"]) and not np.any(p["transform.2.bias"]) and np.any(p["transform.0.weight"])
    assert p["embedding.weight"].dtype == np.float32
    plain = pl.init_params(prepared(PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero")),
                           sampler=NumpySampler(0), dtype=np.float64)
    assert not np.any(plain["embedding.weight"])


def test_mlp_encoder_layers_warning_and_unfilled_config():
    config = prepared(PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=3))
    with pytest.warns(UserWarning, match="Exactly 2 MLP layers"):
        pl.parameter_shapes(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.parameter_shapes(prepared(PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="LSTM",
                                                         encoder_num_layers=3)))
    with pytest.raises(ConfigError, match="token_dim is None"):
        pl.parameter_shapes(PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=1, num_layers=1,
                                               num_attention_heads=1))
    with pytest.raises(ShapeMismatchError, match="'embedding.weight' has shape"):
        pl.encode_prompt({"embedding.weight": np.zeros((2, 2))}, config=CONFIGS["prompt"]())
