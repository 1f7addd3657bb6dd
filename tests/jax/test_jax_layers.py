"""Module paths, the layout map, initialisation and the factored layers, checked against float64 NumPy math."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftcore_jax as pj
from peftcore import LoraConfig
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError
from peftcore_jax.layout import from_core, to_core
from tests.reference import lora as reference


@functools.partial(jax.tree_util.register_dataclass, data_fields=["attn", "norm"], meta_fields=[])
@dataclasses.dataclass
class Block:
    attn: dict
    norm: jax.Array


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _torch_tree(rng):
    return {
        "model": {
            "embed_tokens": {"weight": jnp.asarray(_rand(rng, 10, 6))},
            "layers": [Block({"q_proj": {"weight": jnp.asarray(_rand(rng, 4, 6)), "bias": jnp.asarray(_rand(rng, 4))}},
                             jnp.ones(6)) for _ in range(2)],
        },
        "conv": {"weight": jnp.asarray(_rand(rng, 5, 3, 2, 2))},
    }


def test_module_paths_follow_key_paths_through_dicts_lists_and_dataclasses():
    tree = _torch_tree(np.random.default_rng(0))
    modules = pj.find_modules(tree, layout="torch")
    assert {p: m.kind for p, m in modules.items()} == {
        "model.embed_tokens": "embedding", "model.layers.0.attn.q_proj": "linear",
        "model.layers.1.attn.q_proj": "linear", "conv": "conv"}
    assert modules["model.layers.1.attn.q_proj"].bias_path == "model.layers.1.attn.q_proj.bias"
    assert modules["conv"].bias_path is None
    names = pj.module_names(tree)
    assert names[0] == "" and {"model", "model.layers", "model.layers.0", "model.layers.0.attn"} <= set(names)
    # `norm` is a leaf, not a module: it is not a weight
    assert "model.layers.0.norm" not in modules


def test_flax_layout_finds_kernels_and_embeddings_and_permutes_by_axis_names():
    rng = np.random.default_rng(1)
    kernel = _rand(rng, 2, 3, 4, 5)  # (kh, kw, in, out)
    tree = {"Dense_0": {"kernel": jnp.asarray(_rand(rng, 6, 4))},
            "Embed_0": {"embedding": jnp.asarray(_rand(rng, 9, 3))},
            "Conv_0": {"kernel": jnp.asarray(kernel)}}
    modules = pj.find_modules(tree, layout="flax")
    assert {p: m.kind for p, m in modules.items()} == {"Dense_0": "linear", "Embed_0": "embedding", "Conv_0": "conv"}
    assert modules["Dense_0"].spec.fan_in_fan_out
    core = to_core(jnp.asarray(kernel), modules["Conv_0"].spec)
    np.testing.assert_array_equal(np.asarray(core), kernel.transpose(3, 2, 0, 1))  # (out, in, kh, kw)
    np.testing.assert_array_equal(np.asarray(from_core(core, modules["Conv_0"].spec)), kernel)


def test_replace_leaves_is_pure():
    tree = _torch_tree(np.random.default_rng(2))
    before = jax.tree_util.tree_leaves(tree)
    new = pj.replace_leaves(tree, {"conv.weight": jnp.zeros((5, 3, 2, 2))})
    assert float(jnp.abs(pj.leaf_paths(new)["conv.weight"]).max()) == 0
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(tree), before))
    assert isinstance(new["model"]["layers"][0], Block)


def test_init_is_deterministic_per_module_and_independent_of_other_targets():
    tree = _torch_tree(np.random.default_rng(3))
    key = jax.random.key(7)
    _, one = pj.init_lora(tree, LoraConfig(r=2, target_modules=["q_proj"]), key)
    _, again = pj.init_lora(tree, LoraConfig(r=2, target_modules=["q_proj"]), key)
    _, more = pj.init_lora(tree, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens", "conv"]), key)
    path = "model.layers.0.attn.q_proj"
    np.testing.assert_array_equal(one[path].lora_A, again[path].lora_A)
    np.testing.assert_array_equal(one[path].lora_A, more[path].lora_A)
    assert not np.array_equal(one[path].lora_A, one["model.layers.1.attn.q_proj"].lora_A)
    # peft's default init: A ~ U(±1/sqrt(in)), B = 0; embeddings: A = 0, B ~ N(0, 1)
    assert one[path].lora_A.shape == (2, 6) and float(jnp.abs(one[path].lora_A).max()) <= 1 / np.sqrt(6)
    assert float(jnp.abs(one[path].lora_B).max()) == 0
    emb = more["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.lora_A.shape == (2, 10) and emb.lora_B.shape == (6, 2)
    assert float(jnp.abs(emb.lora_A).max()) == 0 and float(jnp.abs(emb.lora_B).max()) > 0
    assert more["conv"].lora_A.shape == (2, 3, 2, 2) and more["conv"].lora_B.shape == (5, 2, 1, 1)


def _random_lora(rng, lora: pj.LoraParams) -> pj.LoraParams:
    return dataclasses.replace(lora, lora_A=jnp.asarray(_rand(rng, *lora.lora_A.shape)),
                               lora_B=jnp.asarray(_rand(rng, *lora.lora_B.shape)))


def test_factored_linear_matches_numpy_in_torch_and_flax_layouts_under_jit_grad_vmap():
    rng = np.random.default_rng(4)
    weight, bias, x = _rand(rng, 4, 6), _rand(rng, 4), _rand(rng, 3, 5, 6)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["proj"])
    torch_tree = {"proj": {"weight": jnp.asarray(weight), "bias": jnp.asarray(bias)}}
    flax_tree = {"proj": {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}}
    _, torch_adapters = pj.init_lora(torch_tree, config, jax.random.key(0))
    _, flax_adapters = pj.init_lora(flax_tree, config, jax.random.key(0), layout="flax")
    lora = _random_lora(rng, torch_adapters["proj"])
    flax_lora = dataclasses.replace(flax_adapters["proj"], lora_A=lora.lora_A, lora_B=lora.lora_B)
    A, B = np.asarray(lora.lora_A, np.float64), np.asarray(lora.lora_B, np.float64)
    x64 = x.astype(np.float64)
    expected = x64 @ weight.T.astype(np.float64) + bias + (5 / 3) * (x64 @ A.T) @ B.T

    y_torch = jax.jit(lambda x, l: pj.dense(x, torch_tree["proj"], l))(jnp.asarray(x), lora)
    y_flax = jax.jit(lambda x, l: pj.dense(x, flax_tree["proj"], l, layout="flax"))(jnp.asarray(x), flax_lora)
    np.testing.assert_allclose(y_torch, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_flax, expected, rtol=1e-5, atol=1e-5)
    y_vmap = jax.vmap(lambda xi: pj.dense(xi, torch_tree["proj"], lora))(jnp.asarray(x))
    np.testing.assert_allclose(y_vmap, expected, rtol=1e-5, atol=1e-5)

    # d/dB of sum(y) = s * sum_rows (x A^T), summed over all tokens: (out, r)
    grad_B = jax.grad(lambda l: pj.dense(jnp.asarray(x), torch_tree["proj"], l).sum())(lora).lora_B
    expected_grad_B = (5 / 3) * np.ones((4, 1)) * (x64.reshape(-1, 6) @ A.T).sum(axis=0)[None, :]
    np.testing.assert_allclose(grad_B, expected_grad_B, rtol=1e-5, atol=1e-5)

    merged_torch = pj.merge(torch_tree, pj.LoraAdapters.create({"proj": lora}, config, adapter_name="default",
                                                                layout=pj.TORCH))
    merged_flax = pj.merge(flax_tree, pj.LoraAdapters.create({"proj": flax_lora}, config, adapter_name="default",
                                                              layout=pj.FLAX))
    expected_w = weight + (5 / 3) * B @ A
    np.testing.assert_allclose(merged_torch["proj"]["weight"], expected_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged_flax["proj"]["kernel"], expected_w.T, rtol=1e-5, atol=1e-5)


def test_factored_embedding_and_conv_match_numpy_and_merged_weights():
    rng = np.random.default_rng(5)
    tree = _torch_tree(rng)
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens", "conv"])
    _, adapters = pj.init_lora(tree, config, jax.random.key(0))
    emb = _random_lora(rng, adapters["model.embed_tokens"])
    conv = _random_lora(rng, adapters["conv"])
    s = 3 / 2

    ids = np.array([[0, 3, 9], [2, 2, 5]])
    W = np.asarray(tree["model"]["embed_tokens"]["weight"], np.float64)
    A, B = np.asarray(emb.lora_A, np.float64), np.asarray(emb.lora_B, np.float64)
    expected = W[ids] + s * A.T[ids] @ B.T
    got = pj.embed(jnp.asarray(ids), tree["model"]["embed_tokens"], emb)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    x = _rand(rng, 2, 3, 5, 5)
    Wc = np.asarray(tree["conv"]["weight"], np.float64)
    Ac, Bc = np.asarray(conv.lora_A, np.float64), np.asarray(conv.lora_B, np.float64)
    merged_w = Wc + s * (Bc.reshape(5, 2) @ Ac.reshape(2, -1)).reshape(Wc.shape)
    expected = jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(merged_w, jnp.float32),
                                            (1, 1), [(1, 1), (1, 1)])
    got = pj.conv(jnp.asarray(x), tree["conv"]["weight"], None, conv, stride=1, padding=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    both = pj.LoraAdapters.create({"model.embed_tokens": emb, "conv": conv}, config, adapter_name="default",
                                  layout=pj.TORCH)
    merged = pj.merge(tree, both)
    np.testing.assert_allclose(merged["conv"]["weight"], merged_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged["model"]["embed_tokens"]["weight"], W + s * (B @ A).T, rtol=1e-5, atol=1e-5)
    restored = pj.unmerge(merged, both)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dora_merge_unmerge_round_trip_with_cached_norms():
    rng = np.random.default_rng(6)
    tree = _torch_tree(rng)
    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    _, adapters = pj.init_lora(tree, config, jax.random.key(0))
    path = "model.layers.0.attn.q_proj"
    lora = adapters[path]
    assert lora.use_dora and lora.lora_magnitude_vector.shape == (4,)
    # magnitude starts at the row norm of W + s·B·A (peft's DoRA init)
    W = np.asarray(tree["model"]["layers"][0].attn["q_proj"]["weight"], np.float64)
    delta = (8 / 2) * np.asarray(lora.lora_B, np.float64) @ np.asarray(lora.lora_A, np.float64)
    np.testing.assert_allclose(lora.lora_magnitude_vector, np.linalg.norm(W + delta, axis=1), rtol=1e-5)
    norms = pj.dora_weight_norms(tree, adapters)
    merged = pj.merge(tree, adapters)
    restored = pj.unmerge(merged, adapters, weight_norms=norms)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_lora_dropout_applies_only_with_a_key():
    rng = np.random.default_rng(7)
    tree = {"proj": {"weight": jnp.asarray(_rand(rng, 4, 6))}}
    _, adapters = pj.init_lora(tree, LoraConfig(r=2, target_modules=["proj"], lora_dropout=0.5), jax.random.key(0))
    lora = _random_lora(rng, adapters["proj"])
    x = jnp.asarray(_rand(rng, 8, 6))
    plain = pj.dense(x, tree["proj"], lora)
    again = pj.dense(x, tree["proj"], lora)
    dropped = pj.dense(x, tree["proj"], lora, key=jax.random.key(1))
    np.testing.assert_array_equal(plain, again)
    assert not np.allclose(plain, dropped)
    # the base branch never sees dropout: with the adapter switched off the key changes nothing
    np.testing.assert_array_equal(pj.dense(x, tree["proj"]), pj.dense(x, tree["proj"], None, key=jax.random.key(1)))


def test_flax_conv_module_forward_and_merge_match_numpy():
    rng = np.random.default_rng(8)
    kernel, bias = _rand(rng, 2, 3, 3, 5), _rand(rng, 5)  # flax (kh, kw, in, out)
    tree = {"Conv_0": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["Conv_0"])
    _, adapters = pj.init_lora(tree, config, jax.random.key(0), layout="flax")
    lora = _random_lora(rng, adapters["Conv_0"])
    assert lora.lora_A.shape == (2, 3, 2, 3) and lora.lora_B.shape == (5, 2, 1, 1)
    x = _rand(rng, 2, 6, 5, 3)  # (batch, h, w, in): flax's channels-last input

    core_w = kernel.transpose(3, 2, 0, 1).astype(np.float64)  # (out, in, kh, kw)
    A, B = np.asarray(lora.lora_A, np.float64), np.asarray(lora.lora_B, np.float64)
    merged_w = core_w + reference.conv_delta(A, B, 3 / 2)
    x_cf = x.transpose(0, 3, 1, 2).astype(np.float64)
    base = reference.conv(x_cf, core_w, stride=2, padding=1) + bias[:, None, None]
    expected = (base + reference.conv_update(x_cf, A, B, 3 / 2, stride=2, padding=1)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        reference.conv(x_cf, merged_w, stride=2, padding=1).transpose(0, 2, 3, 1) + bias, expected, rtol=1e-10)

    run = jax.jit(lambda x, lora: pj.convolve(x, tree["Conv_0"], lora, layout="flax", stride=2, padding=1))
    np.testing.assert_allclose(run(jnp.asarray(x), lora), expected, rtol=1e-5, atol=1e-5)
    both = pj.LoraAdapters.create({"Conv_0": lora}, config, adapter_name="default", layout=pj.FLAX)
    merged = pj.merge(tree, both)
    np.testing.assert_allclose(merged["Conv_0"]["kernel"], merged_w.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pj.convolve(jnp.asarray(x), merged["Conv_0"], layout="flax", stride=2, padding=1),
                               expected, rtol=1e-5, atol=1e-5)
    restored = pj.unmerge(merged, both)
    np.testing.assert_allclose(restored["Conv_0"]["kernel"], kernel, rtol=1e-5, atol=1e-5)
    # "SAME" spelled the flax way, channels-first forced: the torch convention on a flax kernel
    same = pj.convolve(jnp.asarray(x_cf, jnp.float32), tree["Conv_0"], lora, layout="flax", channels_last=False,
                       padding="SAME")
    expected_same = (reference.conv(x_cf, merged_w, padding="same") + bias[:, None, None])
    np.testing.assert_allclose(same, expected_same, rtol=1e-5, atol=1e-5)


def test_several_active_adapters_add_their_terms_in_order():
    rng = np.random.default_rng(9)
    tree = {"proj": {"weight": jnp.asarray(_rand(rng, 4, 6)), "bias": jnp.asarray(_rand(rng, 4))},
            "embed_tokens": {"weight": jnp.asarray(_rand(rng, 10, 6))}}
    first_config = LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "embed_tokens"])
    second_config = LoraConfig(r=3, lora_alpha=3, target_modules=["proj"], lora_bias=True)
    _, first = pj.init_lora(tree, first_config, jax.random.key(0), adapter_name="first")
    _, second = pj.init_lora(tree, second_config, jax.random.key(1), adapter_name="second")
    first = jax.tree_util.tree_map(lambda v: jnp.asarray(_rand(rng, *v.shape)), first)
    second = jax.tree_util.tree_map(lambda v: jnp.asarray(_rand(rng, *v.shape)), second)
    active = pj.ActiveAdapters((first, second))
    assert len(active.get("proj")) == 2 and len(active.get("embed_tokens")) == 1 and active.get("nope") is None

    x = _rand(rng, 3, 2, 6).astype(np.float64)
    W, b = np.asarray(tree["proj"]["weight"], np.float64), np.asarray(tree["proj"]["bias"], np.float64)
    one, two = (jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), a["proj"]) for a in (first, second))
    expected = (x @ W.T + b + 2.0 * (x @ one.lora_A.T) @ one.lora_B.T
                + 1.0 * ((x @ two.lora_A.T) @ two.lora_B.T + two.lora_B_bias))
    got = jax.jit(lambda x, active: pj.dense(x, tree["proj"], active.get("proj")))(jnp.asarray(x, jnp.float32), active)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    grads = jax.grad(lambda active: pj.dense(jnp.asarray(x, jnp.float32), tree["proj"], active.get("proj")).sum())(
        active)
    assert isinstance(grads, pj.ActiveAdapters) and float(jnp.abs(grads.adapters[1]["proj"].lora_B_bias).min()) > 0

    ids = np.array([[1, 9, 0]])
    E = np.asarray(tree["embed_tokens"]["weight"], np.float64)
    emb = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), first["embed_tokens"])
    np.testing.assert_allclose(pj.embed(jnp.asarray(ids), tree["embed_tokens"], active.get("embed_tokens")),
                               E[ids] + 2.0 * emb.lora_A.T[ids] @ emb.lora_B.T, rtol=1e-5, atol=1e-5)

    merged = pj.merge({"proj": {"weight": tree["proj"]["weight"], "bias": tree["proj"]["bias"]}},
                      pj.ActiveAdapters((dataclasses.replace(first, params={"proj": first["proj"]}), second)))
    np.testing.assert_allclose(pj.dense(jnp.asarray(x, jnp.float32), merged["proj"]), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="distinct names"):
        pj.ActiveAdapters((first, first))


def test_flax_tree_takes_saved_base_weights_in_its_own_orientation():
    rng = np.random.default_rng(10)
    tree = {"Dense_0": {"kernel": jnp.asarray(_rand(rng, 6, 4))}, "lm_head": {"kernel": jnp.asarray(_rand(rng, 4, 9))}}
    config = LoraConfig(r=2, target_modules=["lm_head"])
    _, adapters = pj.init_lora(tree, config, jax.random.key(0), layout="flax")
    head = _rand(rng, 9, 4)  # peft saves the torch module's (out, in) weight
    state = {**pj.adapter_state_dict(adapters), "base_model.model.lm_head.base_layer.weight": head}
    new_tree, loaded = pj.adapters_from_state_dict(state, config, tree, layout="flax", with_base_weights=True)
    np.testing.assert_array_equal(new_tree["lm_head"]["kernel"], head.T)
    assert new_tree["Dense_0"]["kernel"] is tree["Dense_0"]["kernel"] and "lm_head" in loaded
    with pytest.raises(IncompatibleKeysError, match=r"lm_head\.base_layer\.weight.*with_base_weights=True"):
        pj.adapters_from_state_dict(state, config, tree, layout="flax")
    state["base_model.model.lm_head.base_layer.weight"] = _rand(rng, 10, 4)
    with pytest.raises(ShapeMismatchError, match=r"lm_head\.base_layer\.weight.*\(10, 4\).*\(4, 9\)"):
        pj.adapters_from_state_dict(state, config, tree, layout="flax", with_base_weights=True)
