"""(IA)³ in peftcore_jax: init, the layers (Linear, GPT-2 Conv1D, ConvNd; torch and flax layouts), several
active adapters, merge/unmerge, files, jit and grad, checked against the float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftcore_jax as pj
from peftcore import LoraConfig
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.ia3 import IA3Config
from peftcore.methods.ia3.ops import IA3UnmergeWarning
from tests.reference import ia3 as reference


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _llama_like(rng):
    """Two decoder layers keyed as transformers' Llama (torch layout), with a bias on k_proj."""
    def layer():
        return {"self_attn": {"q_proj": {"weight": _rand(rng, 6, 6)}, "k_proj": {"weight": _rand(rng, 4, 6),
                                                                              "bias": _rand(rng, 4)},
                              "v_proj": {"weight": _rand(rng, 4, 6)}},
                "mlp": {"up_proj": {"weight": _rand(rng, 8, 6)}, "down_proj": {"weight": _rand(rng, 6, 8)}}}
    tree = {"model": {"embed_tokens": {"weight": _rand(rng, 10, 6)}, "layers": [layer(), layer()]}}
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _perturbed(adapters, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, size=x.shape), x.dtype), adapters)


def _close(actual, expected, rtol=2e-5):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=rtol * max(np.max(np.abs(expected)), 1.0))


def test_init_takes_peft_defaults_for_the_model_type_and_ones():
    params = _llama_like(np.random.default_rng(0))
    adapters = pj.init_ia3(params, IA3Config(), model_type="llama")
    # peft's llama defaults: targets k_proj, v_proj, down_proj; feed-forward down_proj
    assert sorted(adapters.params) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                             for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert adapters.peft_type == "IA3"
    down, k = adapters["model.layers.0.mlp.down_proj"], adapters["model.layers.0.self_attn.k_proj"]
    assert down.feedforward and down.ia3_l.shape == (1, 8)
    assert not k.feedforward and k.ia3_l.shape == (4, 1)
    assert all(np.all(np.asarray(m.ia3_l) == 1.0) for m in adapters.params.values())
    assert adapters.config.feedforward_modules == {"down_proj"}


def test_init_errors_name_the_problem():
    params = _llama_like(np.random.default_rng(0))
    with pytest.raises(ConfigError, match="model_type"):
        pj.init_ia3(params, IA3Config())
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        pj.init_ia3(params, IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(ConfigError, match="jax.random key"):
        pj.init_ia3(params, IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False))


def test_random_init_draws_per_module_from_the_key():
    params = _llama_like(np.random.default_rng(0))
    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False)
    a = pj.init_ia3(params, config, jax.random.key(0))
    b = pj.init_ia3(params, config, jax.random.key(0))
    c = pj.init_ia3(params, config, jax.random.key(1))
    first = np.asarray(a["model.layers.0.self_attn.q_proj"].ia3_l)
    np.testing.assert_array_equal(first, np.asarray(b["model.layers.0.self_attn.q_proj"].ia3_l))
    assert not np.allclose(first, np.asarray(c["model.layers.0.self_attn.q_proj"].ia3_l))
    assert not np.allclose(first, np.asarray(a["model.layers.1.self_attn.q_proj"].ia3_l))


@pytest.mark.parametrize("layout", ["torch", "flax"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_dense_scales_output_or_input(layout, feedforward):
    rng = np.random.default_rng(1)
    weight, bias, x = _rand(rng, 5, 7), _rand(rng, 5), _rand(rng, 2, 3, 7)
    module = {"weight": weight, "bias": bias} if layout == "torch" else {"kernel": weight.T, "bias": bias}
    tree = {"fc": jax.tree_util.tree_map(jnp.asarray, module)}
    adapters = _perturbed(pj.init_ia3(tree, IA3Config(target_modules=["fc"],
                                                      feedforward_modules=["fc"] if feedforward else []),
                                      layout=layout), 2)
    l = np.asarray(adapters["fc"].ia3_l, dtype=np.float64).reshape(-1)
    got = pj.dense(jnp.asarray(x), tree["fc"], adapters.get("fc"), layout=layout)
    if feedforward:
        expected = reference.linear(reference.scale_channels(x, l, -1), weight, bias)
    else:
        expected = reference.scale_channels(reference.linear(x, weight, bias), l, -1)
    _close(got, expected)
    _close(pj.dense(jnp.asarray(x), pj.merge(tree, adapters)["fc"], layout=layout), expected)


@pytest.mark.parametrize("feedforward", [False, True])
def test_gpt2_conv1d_weights_in_out_with_fan_in_fan_out(feedforward):
    rng = np.random.default_rng(3)
    weight, bias, x = _rand(rng, 7, 5), _rand(rng, 5), _rand(rng, 4, 7)  # Conv1D stores (in, out)
    tree = {"h": {"c_fc": {"weight": jnp.asarray(weight), "bias": jnp.asarray(bias)}}}
    config = IA3Config(target_modules=["c_fc"], feedforward_modules=["c_fc"] if feedforward else [],
                       fan_in_fan_out=True)
    adapters = _perturbed(pj.init_ia3(tree, config), 4)
    mod = adapters["h.c_fc"]
    assert mod.fan_in_fan_out and mod.ia3_l.shape == ((1, 7) if feedforward else (5, 1))
    l = np.asarray(mod.ia3_l, dtype=np.float64).reshape(-1)
    if feedforward:
        expected = reference.linear(reference.scale_channels(x, l, -1), weight.T, bias)
    else:
        expected = reference.scale_channels(reference.linear(x, weight.T, bias), l, -1)
    _close(pj.dense(jnp.asarray(x), tree["h"]["c_fc"], mod), expected)
    merged = pj.merge(tree, adapters)["h"]["c_fc"]
    _close(merged["weight"].T, reference.merged_linear_weight(weight.T, l, feedforward=feedforward))
    _close(pj.linear(jnp.asarray(x), merged["weight"], merged["bias"], fan_in_fan_out=True), expected)


@pytest.mark.parametrize("layout", ["torch", "flax"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_conv_scales_channels_in_both_layouts(layout, feedforward):
    rng = np.random.default_rng(5)
    weight, bias, x = _rand(rng, 4, 3, 2, 2), _rand(rng, 4), _rand(rng, 2, 3, 5, 5)
    module = {"weight": weight, "bias": bias} if layout == "torch" else \
        {"kernel": np.transpose(weight, (2, 3, 1, 0)), "bias": bias}
    tree = {"conv": jax.tree_util.tree_map(jnp.asarray, module)}
    config = IA3Config(target_modules=["conv"], feedforward_modules=["conv"] if feedforward else [])
    adapters = _perturbed(pj.init_ia3(tree, config, layout=layout), 6)
    l = np.asarray(adapters["conv"].ia3_l, dtype=np.float64).reshape(-1)
    if feedforward:
        expected = reference.conv(reference.scale_channels(x, l, 1), weight, bias, padding=1)
    else:
        expected = reference.scale_channels(reference.conv(x, weight, bias, padding=1), l, 1)
    x_in = jnp.asarray(x if layout == "torch" else np.moveaxis(x, 1, -1))
    got = pj.convolve(x_in, tree["conv"], adapters.get("conv"), layout=layout, padding=1)
    merged = pj.convolve(x_in, pj.merge(tree, adapters)["conv"], layout=layout, padding=1)
    if layout == "flax":
        got, merged = jnp.moveaxis(got, -1, 1), jnp.moveaxis(merged, -1, 1)
    _close(got, expected)
    _close(merged, expected)


def test_active_adapters_multiply_and_merge_in_turn():
    params = _llama_like(np.random.default_rng(7))
    config = IA3Config(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])
    a = _perturbed(pj.init_ia3(params, config, adapter_name="a"), 8)
    b = _perturbed(pj.init_ia3(params, config, adapter_name="b"), 9)
    both = pj.ActiveAdapters((a, b))
    path = "model.layers.1.self_attn.k_proj"
    x = _rand(np.random.default_rng(10), 3, 6)
    module = params["model"]["layers"][1]["self_attn"]["k_proj"]
    l = np.asarray(a[path].ia3_l, np.float64).reshape(-1) * np.asarray(b[path].ia3_l, np.float64).reshape(-1)
    expected = reference.scale_channels(reference.linear(x, np.asarray(module["weight"]), np.asarray(module["bias"])),
                                        l, -1)
    _close(pj.dense(jnp.asarray(x), module, both.get(path)), expected)
    merged = pj.merge(params, both)["model"]["layers"][1]["self_attn"]["k_proj"]
    _close(pj.dense(jnp.asarray(x), merged), expected)


def test_unmerge_restores_and_warns_as_peft():
    params = _llama_like(np.random.default_rng(11))
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapters = _perturbed(pj.init_ia3(params, config), 12)
    merged = jax.jit(pj.merge)(params, adapters)
    with pytest.warns(IA3UnmergeWarning, match="inaccurate"):
        restored = pj.unmerge(merged, adapters)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        _close(got, want, rtol=1e-5)


def test_jit_and_grad_reach_only_the_vectors():
    params = _llama_like(np.random.default_rng(13))
    adapters = pj.init_ia3(params, IA3Config(target_modules=["up_proj", "down_proj"],
                                             feedforward_modules=["down_proj"]))
    x = jnp.asarray(_rand(np.random.default_rng(14), 3, 6))

    def loss(ad):
        mlp = params["model"]["layers"][0]["mlp"]
        h = pj.dense(x, mlp["up_proj"], ad.get("model.layers.0.mlp.up_proj"))
        return jnp.sum(pj.dense(h, mlp["down_proj"], ad.get("model.layers.0.mlp.down_proj")) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters)
    assert isinstance(grads, pj.Adapters)
    g = np.asarray(grads["model.layers.0.mlp.up_proj"].ia3_l)
    assert g.shape == (8, 1) and np.all(np.isfinite(g)) and np.any(g != 0)
    # finite-difference check of one entry of the feed-forward vector
    eps = 1e-2
    vec = adapters["model.layers.0.mlp.down_proj"].ia3_l

    def bumped(delta):
        mod = pj.IA3Params(vec.at[0, 2].add(delta), feedforward=True)
        return pj.Adapters({**adapters.params, "model.layers.0.mlp.down_proj": mod}, adapters.config_json,
                           adapters.adapter_name, adapters.layout)

    plus, minus = bumped(eps), bumped(-eps)
    numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
    analytic = float(grads["model.layers.0.mlp.down_proj"].ia3_l[0, 2])
    assert abs(numeric - analytic) <= 1e-2 * max(abs(analytic), 1.0)


def test_files_round_trip_and_errors_name_the_key(tmp_path):
    params = _llama_like(np.random.default_rng(15))
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapters = _perturbed(pj.init_ia3(params, config), 16)
    state = pj.adapter_state_dict(adapters)
    assert set(state) == {f"base_model.model.model.layers.{i}.{m}.ia3_l" for i in range(2)
                          for m in ("self_attn.k_proj", "mlp.down_proj")}
    pj.save_adapter(tmp_path, adapters)
    loaded = pj.load_adapter(tmp_path, params)
    assert loaded.peft_type == "IA3" and loaded.config.feedforward_modules == {"down_proj"}
    for path, mod in adapters.params.items():
        np.testing.assert_array_equal(np.asarray(loaded[path].ia3_l), np.asarray(mod.ia3_l))
        assert loaded[path].feedforward == mod.feedforward
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    bad = dict(state)
    bad[key] = jnp.ones((6, 1))
    with pytest.raises(ShapeMismatchError, match="down_proj.ia3_l"):
        pj.adapters_from_state_dict(bad, loaded.config, params)
    del bad[key]
    with pytest.raises(IncompatibleKeysError, match="down_proj.ia3_l"):
        pj.adapters_from_state_dict(bad, loaded.config, params)


def test_adapters_of_different_methods_do_not_mix():
    params = _llama_like(np.random.default_rng(17))
    ia3 = pj.init_ia3(params, IA3Config(target_modules=["q_proj"], feedforward_modules=[]), adapter_name="a")
    _, lora = pj.init_lora(params, LoraConfig(target_modules=["q_proj"]), jax.random.key(0), adapter_name="b")
    with pytest.raises(ConfigError, match="different methods"):
        pj.ActiveAdapters((ia3, lora))


def test_half_precision_base_gets_float32_vectors_and_keeps_its_dtype():
    rng = np.random.default_rng(18)
    tree = {"fc": {"weight": jnp.asarray(_rand(rng, 5, 4), dtype=jnp.bfloat16)}}
    adapters = pj.init_ia3(tree, IA3Config(target_modules=["fc"], feedforward_modules=["fc"]))
    assert adapters["fc"].ia3_l.dtype == jnp.float32  # peft's autocast_adapter_dtype
    x = jnp.asarray(_rand(rng, 3, 4), dtype=jnp.bfloat16)
    assert pj.dense(x, tree["fc"], adapters["fc"]).dtype == jnp.bfloat16
    assert pj.merge(tree, adapters)["fc"]["weight"].dtype == jnp.bfloat16
