"""AdaLoRA in peftcore_jax: init, the layers (Linear, GPT-2 Conv1D, Conv2d; torch and flax layouts), merge,
the orthogonal regulariser, the jitted rank allocator over a whole schedule and pruned files, checked against
the float64 NumPy reference (``tests/reference/adalora.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftcore_jax as pj
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError, UnsupportedLayerError
from peftcore.methods.adalora import AdaLoraConfig
from tests.reference import adalora as reference
from tests.reference import lora as lora_reference

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=9, beta1=0.8, beta2=0.9)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _tree(rng):
    def layer():
        return {"attn": {"q_proj": {"weight": _rand(rng, 6, 5), "bias": _rand(rng, 6)},
                         "v_proj": {"weight": _rand(rng, 4, 5)}},
                "mlp": {"c_fc": {"weight": _rand(rng, 5, 7)}}}  # Conv1D (in, out)
    tree = {"embed_tokens": {"weight": _rand(rng, 9, 5)}, "layers": [layer(), layer()],
            "conv": {"weight": _rand(rng, 3, 2, 2, 2)}}
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _generic(adapters, seed):
    """Every factor (E included) drawn away from peft's init, so no branch is trivially zero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype), adapters)


def _close(actual, expected, rtol=2e-5):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol,
                               atol=rtol * max(np.max(np.abs(expected)), 1.0))


def _f64(mod):
    return (np.asarray(mod.lora_A, np.float64), np.asarray(mod.lora_E, np.float64), np.asarray(mod.lora_B, np.float64))


def test_init_is_peft_init_and_scaling_uses_init_r():
    params = _tree(np.random.default_rng(0))
    config = AdaLoraConfig(target_modules=["q_proj", "conv"], lora_alpha=3, **SCHEDULE)
    adapters = pj.init_adalora(params, config, jax.random.key(0))
    q, conv = adapters["layers.0.attn.q_proj"], adapters["conv"]
    assert (q.lora_A.shape, q.lora_E.shape, q.lora_B.shape) == ((4, 5), (4, 1), (6, 4))
    assert conv.kind == "conv" and conv.lora_A.shape == (4, 2 * 2 * 2) and conv.lora_B.shape == (3, 4)
    assert np.all(np.asarray(q.lora_E) == 0)
    assert q.scaling == pytest.approx(reference.scaling(4, 3))
    # A and B ~ N(0, 0.02²) (peft's reset_lora_parameters): the pooled draws have that spread
    big = pj.init_adalora({"fc": {"weight": jnp.zeros((64, 64))}},
                          AdaLoraConfig(target_modules=["fc"], **{**SCHEDULE, "init_r": 32}), jax.random.key(1))
    assert np.std(np.asarray(big["fc"].lora_A)) == pytest.approx(0.02, rel=0.1)
    assert np.std(np.asarray(big["fc"].lora_B)) == pytest.approx(0.02, rel=0.1)
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        pj.init_adalora(params, AdaLoraConfig(target_modules=["embed_tokens"], **SCHEDULE), jax.random.key(0))


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_dense_adds_the_svd_update_and_merge_matches(layout):
    rng = np.random.default_rng(1)
    weight, bias, x = _rand(rng, 6, 5), _rand(rng, 6), _rand(rng, 2, 3, 5)
    module = {"weight": weight, "bias": bias} if layout == "torch" else {"kernel": weight.T, "bias": bias}
    tree = {"fc": jax.tree_util.tree_map(jnp.asarray, module)}
    config = AdaLoraConfig(target_modules=["fc"], lora_alpha=5, **SCHEDULE)
    adapters = _generic(pj.init_adalora(tree, config, jax.random.key(2), layout=layout), 3)
    mod = adapters["fc"]
    s = reference.scaling(4, 5)
    expected = np.einsum("...i,oi->...o", x, weight) + bias + reference.linear_update(x, *_f64(mod), s)
    _close(pj.dense(jnp.asarray(x), tree["fc"], mod, layout=layout), expected)
    merged = pj.merge(tree, adapters)
    _close(pj.dense(jnp.asarray(x), merged["fc"], layout=layout), expected)
    restored = pj.unmerge(merged, adapters)
    _close(restored["fc"]["weight" if layout == "torch" else "kernel"], module["weight" if layout == "torch" else
                                                                                "kernel"], rtol=1e-5)


def test_gpt2_conv1d_and_conv2d():
    params = _tree(np.random.default_rng(4))
    config = AdaLoraConfig(target_modules=["c_fc", "conv"], fan_in_fan_out=True, lora_alpha=2, **SCHEDULE)
    adapters = _generic(pj.init_adalora(params, config, jax.random.key(5)), 6)
    s = reference.scaling(4, 2)
    rng = np.random.default_rng(7)
    x, image = _rand(rng, 3, 5), _rand(rng, 2, 2, 5, 5)
    fc = adapters["layers.1.mlp.c_fc"]
    assert fc.fan_in_fan_out and fc.lora_A.shape == (4, 5) and fc.lora_B.shape == (7, 4)
    weight = np.asarray(params["layers"][1]["mlp"]["c_fc"]["weight"], np.float64)
    expected = x @ weight + reference.linear_update(x, *_f64(fc), s)
    _close(pj.dense(jnp.asarray(x), params["layers"][1]["mlp"]["c_fc"], fc), expected)
    merged = pj.merge(params, adapters)
    _close(merged["layers"][1]["mlp"]["c_fc"]["weight"], weight + reference.delta(*_f64(fc), s, fan_in_fan_out=True))

    conv_w = np.asarray(params["conv"]["weight"], np.float64)
    expected = lora_reference.conv(image, conv_w, padding=1) + reference.conv_update(
        image, *_f64(adapters["conv"]), s, weight_shape=conv_w.shape, padding=1)
    _close(pj.convolve(jnp.asarray(image), params["conv"], adapters["conv"], padding=1), expected)
    _close(pj.convolve(jnp.asarray(image), merged["conv"], padding=1), expected)


def test_orth_regularizer_is_a_differentiable_function_of_the_tree():
    params = _tree(np.random.default_rng(8))
    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], **SCHEDULE)
    adapters = _generic(pj.init_adalora(params, config, jax.random.key(9)), 10)
    factors = [(np.asarray(getattr(m, name), np.float64), name == "lora_B")
               for m in adapters.params.values() for name in ("lora_A", "lora_B")]
    value = jax.jit(pj.orth_regularizer)(adapters)
    _close(value, reference.orth_regularizer(factors), rtol=1e-5)
    grads = jax.grad(pj.orth_regularizer)(adapters)
    assert np.any(np.asarray(grads["layers.0.attn.q_proj"].lora_A) != 0)
    assert np.all(np.asarray(grads["layers.0.attn.q_proj"].lora_E) == 0)


def _grads_like(adapters, rng):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters)


def test_jitted_allocator_follows_the_reference_schedule_and_compiles_once(tmp_path):
    params = _tree(np.random.default_rng(11))
    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], **SCHEDULE)
    adapters = _generic(pj.init_adalora(params, config, jax.random.key(12)), 13)
    paths = list(adapters.params)
    ref = reference.Allocator([{k: np.array(v, np.float64) for k, v in zip("AEB", _f64(adapters[p]))} for p in paths],
                              **{k: SCHEDULE[k] for k in ("target_r", "tinit", "tfinal", "total_step", "deltaT",
                                                          "beta1", "beta2")})
    schedule = pj.allocator_schedule(adapters)
    assert (schedule.init_bgt, schedule.target_bgt) == (4 * len(paths), 2 * len(paths))
    # committed from the start, as the step's outputs are (uncommitted inputs would be a second jit signature)
    adapters, state = jax.device_put((adapters, pj.allocator_init(adapters)), jax.devices()[0])
    traces = []

    def allocate(state, adapters, grads, plan, schedule):  # a function of its own: jit caches per function
        traces.append(1)
        return pj.allocator_step(state, adapters, grads, plan, schedule=schedule)

    step_fn = jax.jit(allocate, static_argnames=("schedule",))
    rng = np.random.default_rng(14)
    budgets = set()
    for step in range(SCHEDULE["total_step"] + 3):
        grads = _grads_like(adapters, rng)
        pattern = ref.step(step, [{k: np.asarray(getattr(grads[p], f"lora_{k}"), np.float64) for k in "AEB"}
                                  for p in paths])
        plan = pj.allocator_plan(step, schedule=schedule)
        assert bool(plan.mask) == (pattern is not None), step
        if pattern is not None:
            budgets.add(int(plan.k))
        state, adapters = step_fn(state, adapters, grads, plan, schedule=schedule)
        if pattern is not None:
            ours = pj.with_rank_pattern(adapters, state).config.rank_pattern
            assert ours == {f"{p}.lora_E": [bool(k) for k in keep] for p, keep in zip(paths, pattern)}, step
        for p, layer in zip(paths, ref.layers):
            assert np.array_equal(np.asarray(adapters[p].lora_E) == 0, layer["E"] == 0), (step, p)
    assert len(budgets) >= 2  # masking at more than one budget level, the final step included
    # the schedule is data: one trace and one compilation for every step
    assert step_fn._cache_size() == 1 and len(traces) == 1

    # pruned files: only kept triplets are saved, each layer comes back at its kept rank with the same output
    pruned = pj.with_rank_pattern(adapters, state)
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in pruned.config.rank_pattern.items()}
    assert sum(kept.values()) == schedule.target_bgt
    pj.save_adapter(tmp_path, pruned)
    loaded = pj.load_adapter(tmp_path, params)
    x = jnp.asarray(_rand(rng, 2, 5))
    for path, r in kept.items():
        assert loaded[path].r == r
        if r:  # peft keeps ranknum = init_r for a pruned layer (a rank-0 one gets 0, and has no update)
            assert loaded[path].scaling == adapters[path].scaling
        module = params["layers"][int(path.split(".")[1])]["attn"][path.split(".")[-1]]
        _close(pj.dense(x, module, loaded[path]), pj.dense(x, module, adapters[path]), rtol=1e-5)
    # saving what was loaded keeps it pruned (peft's rank_pattern stays in the config)
    pj.save_adapter(tmp_path / "again", loaded)
    again = pj.load_adapter(tmp_path / "again", params)
    assert {p: m.r for p, m in again.params.items()} == kept


def test_allocator_errors_name_the_problem():
    params = _tree(np.random.default_rng(15))
    adapters = pj.init_adalora(params, AdaLoraConfig(target_modules=["q_proj"], **SCHEDULE), jax.random.key(0))
    schedule = pj.allocator_schedule(adapters)
    state = pj.allocator_init(adapters)
    with pytest.raises(ConfigError, match="Python int"):
        pj.allocator_plan(jnp.asarray(3), schedule=schedule)
    with pytest.raises(ConfigError, match="init_r > target_r"):
        final = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
        pj.allocator_plan(final, schedule=schedule._replace(target_bgt=schedule.init_bgt))
    with pytest.raises(IncompatibleKeysError, match="gradients"):
        pj.allocator_step(state, adapters, None, pj.allocator_plan(0, schedule=schedule), schedule=schedule)
    with pytest.raises(ConfigError, match="no rank pattern"):
        pj.with_rank_pattern(adapters, state)
    # steps that do not mask leave the masks all True: still no rank pattern to save
    state, _ = pj.allocator_step(state, adapters, adapters, pj.allocator_plan(0, schedule=schedule),
                                 schedule=schedule)
    with pytest.raises(ConfigError, match="no rank pattern"):
        pj.with_rank_pattern(adapters, state)
    bad = pj.adapter_state_dict(adapters)
    key = "base_model.model.layers.0.attn.q_proj.lora_E"
    bad[key] = jnp.zeros((3, 1))
    with pytest.raises(ShapeMismatchError, match="q_proj.lora_E"):
        pj.adapters_from_state_dict(bad, adapters.config, params)


def test_active_adapters_add_their_updates_in_turn():
    params = _tree(np.random.default_rng(16))
    config = AdaLoraConfig(target_modules=["q_proj"], **SCHEDULE)
    a = _generic(pj.init_adalora(params, config, jax.random.key(1), adapter_name="a"), 17)
    b = _generic(pj.init_adalora(params, config, jax.random.key(2), adapter_name="b"), 18)
    both = pj.ActiveAdapters((a, b))
    path, module = "layers.0.attn.q_proj", params["layers"][0]["attn"]["q_proj"]
    x = _rand(np.random.default_rng(19), 3, 5)
    s = reference.scaling(4, config.lora_alpha)
    expected = (np.einsum("...i,oi->...o", x, np.asarray(module["weight"], np.float64)) + np.asarray(module["bias"])
                + reference.linear_update(x, *_f64(a[path]), s) + reference.linear_update(x, *_f64(b[path]), s))
    _close(pj.dense(jnp.asarray(x), module, both.get(path)), expected)
    _close(pj.dense(jnp.asarray(x), pj.merge(params, both)["layers"][0]["attn"]["q_proj"]), expected)


def test_flax_conv_kernel_is_read_in_torch_order():
    rng = np.random.default_rng(20)
    weight, image = _rand(rng, 3, 2, 2, 2), _rand(rng, 2, 2, 5, 5)
    tree = {"Conv_0": {"kernel": jnp.asarray(np.transpose(weight, (2, 3, 1, 0)))}}  # (kh, kw, in, out)
    config = AdaLoraConfig(target_modules=["Conv_0"], lora_alpha=2, **SCHEDULE)
    adapters = _generic(pj.init_adalora(tree, config, jax.random.key(21), layout="flax"), 22)
    mod = adapters["Conv_0"]
    assert mod.lora_A.shape == (4, 2 * 2 * 2) and mod.lora_B.shape == (3, 4)
    expected = lora_reference.conv(image, weight.astype(np.float64), padding=1) + reference.conv_update(
        image, *_f64(mod), reference.scaling(4, 2), weight_shape=weight.shape, padding=1)
    got = pj.convolve(jnp.asarray(np.moveaxis(image, 1, -1)), tree["Conv_0"], mod, layout="flax", padding=1)
    _close(jnp.moveaxis(got, -1, 1), expected)
    merged = pj.merge(tree, adapters)
    got = pj.convolve(jnp.asarray(np.moveaxis(image, 1, -1)), merged["Conv_0"], layout="flax", padding=1)
    _close(jnp.moveaxis(got, -1, 1), expected)


def test_dropout_applies_to_the_branch_input_only_with_a_key():
    params = _tree(np.random.default_rng(23))
    config = AdaLoraConfig(target_modules=["q_proj"], lora_dropout=0.5, **SCHEDULE)
    adapters = _generic(pj.init_adalora(params, config, jax.random.key(0)), 24)
    path, module = "layers.0.attn.q_proj", params["layers"][0]["attn"]["q_proj"]
    mod = adapters[path]
    assert mod.dropout == 0.5
    x = jnp.asarray(_rand(np.random.default_rng(25), 6, 5))
    plain = pj.dense(x, module, mod)
    dropped = pj.dense(x, module, mod, key=jax.random.key(3))
    assert not np.allclose(np.asarray(plain), np.asarray(dropped))
    # the base output is untouched: removing the branch leaves the same base in both
    base = pj.dense(x, module)
    keep = jax.random.bernoulli(jax.random.key(3), 0.5, x.shape)
    x_dropped = np.where(np.asarray(keep), np.asarray(x, np.float64) / 0.5, 0.0)
    expected = np.asarray(base, np.float64) + reference.linear_update(x_dropped, *_f64(mod), mod.scaling)
    _close(dropped, expected)


def test_core_pruning_runs_on_float32_jax_without_x64():
    # the gather indices take JAX's default integer type; an int64 request would warn (an error here)
    from peftcore.methods.adalora import ops as core_ops

    a, e, b = jnp.ones((4, 3)), jnp.arange(4.0)[:, None], jnp.ones((5, 4))
    pruned = core_ops.prune_triplet(a, e, b, keep=[False, True, False, True])
    assert [t.shape for t in pruned] == [(2, 3), (2, 1), (5, 2)]
    assert pruned.lora_E[:, 0].tolist() == [1.0, 3.0]
