"""The pure-JAX Llama example reproduces transformers' LlamaForCausalLM logits (fp32, rel err <= 1e-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from examples import jax_llama

pytestmark = pytest.mark.oracle


def _model(**overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **overrides)
    return transformers.LlamaForCausalLM(config).eval()


def _rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(tied):
    model = _model(tie_word_embeddings=tied)
    spec = jax_llama.spec_from_hf_config(model.config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax_llama.params_from_state_dict(state, tie_word_embeddings=tied)
    assert ("lm_head" in params) is not tied
    ids = np.array([[5, 17, 3, 63, 0, 9, 42], [1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    eager = jax_llama.forward(params, jnp.asarray(ids), spec=spec)
    jitted = jax.jit(jax_llama.forward, static_argnames="spec")(params, jnp.asarray(ids), spec=spec)
    assert eager.dtype == jnp.float32 and eager.shape == expected.shape
    assert _rel_err(eager, expected) <= 1e-5
    assert _rel_err(jitted, expected) <= 1e-5


def test_params_tree_mirrors_state_dict_names():
    model = _model()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = jax_llama.params_from_state_dict(state)
    flat = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(flat) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(flat[name]), value)
