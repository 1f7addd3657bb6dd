"""Bad input raises a named peftcore error whose message names the key, module or shape at fault."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftcore_jax as pj
from peftcore import LoraConfig
from peftcore.errors import (
    ConfigError,
    IncompatibleKeysError,
    MergeError,
    NoMatchingModuleError,
    ShapeMismatchError,
    UnsupportedLayerError,
)

Q = "model.layers.0.self_attn.q_proj"
KEY_A = f"base_model.model.{Q}.lora_A.weight"


def _params():
    rng = np.random.default_rng(0)

    def linear(out_f, in_f):
        return {"weight": jnp.asarray(rng.standard_normal((out_f, in_f)), jnp.float32)}

    layer = {"self_attn": {"q_proj": linear(8, 6), "v_proj": linear(4, 6)}, "mlp": {"up_proj": linear(12, 6)}}
    return {"model": {"layers": [layer, dict(layer)]}, "lm_head": linear(10, 6)}


CONFIG = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def test_shape_mismatch_names_key_and_both_shapes():
    params = _params()
    _, adapters = pj.init_lora(params, CONFIG, jax.random.key(0))
    state = pj.adapter_state_dict(adapters)
    state[KEY_A] = jnp.zeros((2, 7))
    with pytest.raises(ShapeMismatchError, match=rf"{KEY_A}.*\(2, 7\).*\(2, 6\)"):
        pj.adapters_from_state_dict(state, CONFIG, params)
    rank_config = dataclasses.replace(CONFIG, rank_pattern={"q_proj": 3})
    with pytest.raises(ShapeMismatchError, match=rf"{KEY_A}.*r=3.*\(3, 6\)"):
        pj.adapters_from_state_dict(pj.adapter_state_dict(adapters), rank_config, params)


def test_missing_and_unexpected_keys_are_named():
    params = _params()
    _, adapters = pj.init_lora(params, CONFIG, jax.random.key(0))
    state = pj.adapter_state_dict(adapters)
    del state[KEY_A]
    with pytest.raises(IncompatibleKeysError, match=rf"missing keys.*{KEY_A}"):
        pj.adapters_from_state_dict(state, CONFIG, params)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    state = {**pj.adapter_state_dict(adapters), extra: jnp.zeros((2, 6))}
    with pytest.raises(IncompatibleKeysError, match=rf"unexpected keys.*{extra}"):
        pj.adapters_from_state_dict(state, CONFIG, params)
    dora = dataclasses.replace(CONFIG, use_dora=True)
    with pytest.raises(IncompatibleKeysError, match=rf"{Q}.lora_magnitude_vector"):
        pj.adapters_from_state_dict(pj.adapter_state_dict(adapters), dora, params)


def test_loading_into_another_tree_names_the_missing_module(tmp_path):
    params = _params()
    _, adapters = pj.init_lora(params, CONFIG, jax.random.key(0))
    pj.save_adapter(tmp_path, adapters)
    smaller = {"model": {"layers": [params["model"]["layers"][0]]}, "lm_head": params["lm_head"]}
    with pytest.raises(IncompatibleKeysError, match=r"unexpected keys.*model\.layers\.1\.self_attn\.q_proj"):
        pj.load_adapter(tmp_path, smaller)


def test_targets_that_match_nothing_or_hold_no_weight():
    params = _params()
    with pytest.raises(NoMatchingModuleError, match="qproj"):
        pj.init_lora(params, LoraConfig(target_modules=["qproj"]), jax.random.key(0))
    with pytest.raises(UnsupportedLayerError, match=r"model\.layers\.0\.self_attn"):
        pj.init_lora(params, LoraConfig(target_modules=["self_attn"]), jax.random.key(0))
    with pytest.raises(ConfigError, match="modules_to_save"):
        pj.init_lora(params, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), jax.random.key(0))
    with pytest.raises(ConfigError, match="unknown layout 'haiku'"):
        pj.init_lora(params, CONFIG, jax.random.key(0), layout="haiku")


def test_all_linear_leaves_out_the_output_embedding():
    params = _params()
    _, adapters = pj.init_lora(params, LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    assert "lm_head" not in adapters and "model.layers.1.mlp.up_proj" in adapters and len(adapters) == 6


def test_merge_errors_name_the_module():
    params = _params()
    _, adapters = pj.init_lora(params, dataclasses.replace(CONFIG, lora_bias=True), jax.random.key(0))
    with pytest.raises(MergeError, match=Q):
        pj.merge(params, adapters)
    _, dora = pj.init_lora(params, dataclasses.replace(CONFIG, use_dora=True), jax.random.key(0))
    with pytest.raises(MergeError, match=rf"{Q}.*weight_norms"):
        pj.unmerge(pj.merge(params, dora), dora)
    broken = jax.tree_util.tree_map(lambda x: x * jnp.inf, adapters)
    plain = dataclasses.replace(broken, params={p: dataclasses.replace(v, lora_B_bias=None)
                                                for p, v in broken.params.items()})
    with pytest.raises(MergeError, match="non-finite"):
        pj.merge(params, plain, safe=True)
    with pytest.raises(ShapeMismatchError, match=r"fan_in_fan_out"):
        pj.linear(jnp.ones((1, 6)), params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].T, None,
                  adapters[Q], fan_in_fan_out=True)
