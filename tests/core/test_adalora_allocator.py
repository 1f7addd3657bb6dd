"""``peftcore.methods.adalora.allocator`` against the NumPy reference allocator, step by step over whole schedules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import ConfigError, IncompatibleKeysError
from peftcore.methods.adalora import AdaLoraConfig
from peftcore.methods.adalora import allocator as alloc
from peftcore.testing import assert_close, to_numpy
from tests.reference import adalora as ref

SCHEDULES = st.sampled_from([
    dict(tinit=0, tfinal=0, total_step=6, deltaT=1),
    dict(tinit=2, tfinal=3, total_step=12, deltaT=2),
    dict(tinit=1, tfinal=2, total_step=9, deltaT=3),
])


def _names(i):
    return {c: f"layers.{i}.attn.{c}.default" for c in ("A", "E", "B")}


def _pytree(layers):
    return {_names(i)[c].replace(c, f"lora_{c}"): layer[c] for i, layer in enumerate(layers) for c in ("A", "E", "B")}


@settings(deadline=None, max_examples=3)
@given(seed=st.integers(0, 2**32 - 1), schedule=SCHEDULES, n_layers=st.integers(1, 3))
def test_whole_schedule_matches_reference(xp, call, seed, schedule, n_layers):
    rng = np.random.default_rng(seed)
    init_r, target_r = 4, 2
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, beta1=0.8, beta2=0.7, **schedule)
    layers = [dict(A=rng.normal(size=(init_r, 5)), E=rng.normal(size=(init_r, 1)), B=rng.normal(size=(3, init_r)))
              for _ in range(n_layers)]
    reference = ref.Allocator([{k: v.copy() for k, v in layer.items()} for layer in layers], target_r=target_r,
                              beta1=0.8, beta2=0.7, **schedule)
    params = {k: xp.asarray(v) for k, v in _pytree(layers).items()}
    params["layers.0.attn.base_layer.weight"] = xp.ones((3, 5))
    sched = alloc.make_schedule(params, config=config, adapter_name="default")
    assert sched.init_bgt == init_r * n_layers and sched.target_bgt == target_r * n_layers
    state = alloc.init_state(params, adapter_name="default")
    for step in range(schedule["total_step"] + 3):
        assert alloc.budget_schedule(step, schedule=sched) == ref.budget(step, **reference.schedule)
        grads_np = [{k: rng.normal(size=v.shape) for k, v in layer.items()} for layer in reference.layers]
        grads = {k: xp.asarray(v) for k, v in _pytree(grads_np).items()}
        want = reference.step(step, grads_np)
        state, params, got = call(alloc.update_and_allocate, state, params, grads, step=step, schedule=sched,
                                  adapter_name="default")
        assert (got is None) == (want is None), step
        if want is not None:
            lists = alloc.rank_pattern_to_lists(got, adapter_name="default")
            assert lists == {f"layers.{i}.attn.lora_E": keep for i, keep in enumerate(want)}, step
        for k, v in _pytree(reference.layers).items():
            assert_close(params[k], v, xp=xp, err_msg=f"{k} at step {step}")
        # training moves every factor (masked E entries too) before the next call
        nudges = [{k: 0.1 * rng.normal(size=v.shape) for k, v in layer.items()} for layer in reference.layers]
        for layer, nudge in zip(reference.layers, nudges):
            for k in layer:
                layer[k] += nudge[k]
        params = {k: (params[k] + xp.asarray(v)) for k, v in _pytree(nudges).items()} | {
            "layers.0.attn.base_layer.weight": params["layers.0.attn.base_layer.weight"]}
    assert alloc.budget_schedule(schedule["total_step"] + 1, schedule=sched) == (sched.target_bgt, True)


def _assert_same(got, want, what):
    assert set(got) == set(want), what
    for k, v in want.items():
        np.testing.assert_array_equal(to_numpy(got[k]), to_numpy(v), err_msg=f"{k}: {what}")


@settings(deadline=None, max_examples=2)
@given(seed=st.integers(0, 2**32 - 1), n_layers=st.integers(1, 3), schedule=st.sampled_from([
    dict(tinit=1, tfinal=2, total_step=10, deltaT=2),  # init_r 6 -> 1: several budget levels
    dict(tinit=0, tfinal=0, total_step=4, deltaT=1),
]))
def test_branch_free_allocate_equals_update_and_allocate_at_every_step(xp, call, seed, n_layers, schedule):
    rng = np.random.default_rng(seed)
    init_r, target_r = 6, 1
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, beta1=0.8, beta2=0.7, **schedule)
    layers = [dict(A=rng.normal(size=(init_r, 4)), E=rng.normal(size=(init_r, 1)), B=rng.normal(size=(3, init_r)))
              for _ in range(n_layers)]
    params = {k: xp.asarray(v) for k, v in _pytree(layers).items()}
    params["layers.0.attn.base_layer.weight"] = xp.ones((3, 4))
    sched = alloc.make_schedule(params, config=config, adapter_name="default")
    old_state = alloc.init_state(params, adapter_name="default")
    state = alloc.init_state(params, adapter_name="default", masks=True)
    assert {k: to_numpy(v).tolist() for k, v in state.rank_pattern.items()} == {
        f"layers.{i}.attn.lora_E.default": [True] * init_r for i in range(n_layers)}
    old_params = params
    budgets, masked = set(), 0
    for step in range(schedule["total_step"] + 3):
        grads = {k: xp.asarray(rng.normal(size=tuple(v.shape))) for k, v in params.items()}
        plan = alloc.step_plan(step, schedule=sched, xp=xp)
        old_state, old_params, masks = call(alloc.update_and_allocate, old_state, old_params, grads, step=step,
                                            schedule=sched, adapter_name="default")
        state, params = call(alloc.allocate, state, params, grads, plan, schedule=sched, adapter_name="default")
        _assert_same(params, old_params, f"params at step {step}")
        _assert_same(state.exp_avg_ipt, old_state.exp_avg_ipt, f"EMA at step {step}")
        _assert_same(state.exp_avg_unc, old_state.exp_avg_unc, f"uncertainty at step {step}")
        assert bool(to_numpy(plan.mask)) == (masks is not None), step
        if masks is not None:
            _assert_same(state.rank_pattern, masks, f"masks at step {step}")
            budgets.add(int(to_numpy(plan.k)))
            masked += 1
        if old_state.rank_pattern is None:
            assert all(np.all(to_numpy(m)) for m in state.rank_pattern.values()), step
        else:
            _assert_same(state.rank_pattern, old_state.rank_pattern, f"stored masks at step {step}")
        # training moves every factor (masked E entries too) before the next call
        nudges = {k: xp.asarray(0.1 * rng.normal(size=tuple(v.shape))) for k, v in params.items()}
        params = {k: params[k] + nudges[k] for k in params}
        old_params = {k: old_params[k] + nudges[k] for k in old_params}
    assert masked >= 2 and (schedule["deltaT"] == 1 or len(budgets) >= 2)


def test_step_plan_follows_the_schedule_by_hand(xp):
    # init_bgt 8, target_bgt 4, tinit 1, T = 9 - 2 = 7, deltaT 2: budget(t) = int(4·(1 - (t-1)/6)³ + 4)
    sched = alloc.Schedule(init_bgt=8, target_bgt=4, tinit=1, tfinal=2, total_step=9, deltaT=2, beta1=0.5, beta2=0.5)
    # step: (update, mask, k, reset, reapply); t=2: int(4·(5/6)³ + 4) = 6 -> k = 2; t=4, 6: budget 4 -> k = 4
    expected = {0: (1, 0, 1, 0, 0), 1: (1, 0, 1, 0, 0), 2: (1, 1, 2, 0, 0), 3: (1, 0, 1, 0, 0), 4: (1, 1, 4, 0, 0),
                5: (1, 0, 1, 0, 0), 6: (1, 1, 4, 0, 0), 7: (0, 1, 4, 1, 0), 8: (0, 0, 1, 0, 1), 20: (0, 0, 1, 0, 1)}
    for step, want in expected.items():
        plan = alloc.step_plan(step, schedule=sched, xp=xp)
        assert tuple(int(to_numpy(v)) for v in plan) == want, step
        assert all(v.shape == () for v in plan), step
    with pytest.raises(ConfigError, match="Python int"):
        alloc.step_plan(xp.asarray(3), schedule=sched, xp=xp)
    with pytest.raises(ConfigError, match="init_r > target_r"):
        alloc.step_plan(7, schedule=sched._replace(target_bgt=8), xp=xp)
    alloc.step_plan(6, schedule=sched._replace(target_bgt=8, tinit=6), xp=xp)  # not a masking step: no error


def test_allocate_needs_a_state_with_masks(xp):
    p = {"m.lora_A": xp.ones((2, 3)), "m.lora_E": xp.ones((2, 1)), "m.lora_B": xp.ones((4, 2))}
    sched = alloc.make_schedule(p, config=AdaLoraConfig(init_r=2, target_r=1, total_step=4))
    plan = alloc.step_plan(0, schedule=sched, xp=xp)
    with pytest.raises(ConfigError, match="masks=True"):
        alloc.allocate(alloc.init_state(p), p, p, plan, schedule=sched)
    state, out = alloc.allocate(alloc.init_state(p, masks=True), p, p, plan, schedule=sched)
    np.testing.assert_array_equal(to_numpy(out["m.lora_E"]), np.ones((2, 1)))


def test_importance_emas_follow_the_formula(xp):
    p = {"m.lora_A": xp.asarray([[1.0, -2.0]]), "m.lora_E": xp.asarray([[3.0]]), "m.lora_B": xp.asarray([[0.5]])}
    g = {"m.lora_A": xp.asarray([[2.0, 1.0]]), "m.lora_E": xp.asarray([[-1.0]]), "m.lora_B": xp.asarray([[4.0]])}
    state = alloc.update_importance(alloc.init_state(p), p, g, beta1=0.5, beta2=0.25)
    # I = |p g| = [2, 2]; avg = 0.5 I = [1, 1]; unc = 0.75 |I - avg| = [0.75, 0.75]
    assert_close(state.exp_avg_ipt["m.lora_A"], np.array([[1.0, 1.0]]), xp=xp)
    assert_close(state.exp_avg_unc["m.lora_A"], np.array([[0.75, 0.75]]), xp=xp)
    state = alloc.update_importance(state, p, g, beta1=0.5, beta2=0.25)
    # avg = 0.5 + 1 = 1.5; unc = 0.25·0.75 + 0.75·0.5
    assert_close(state.exp_avg_ipt["m.lora_E"], np.array([[(0.5 * 1.5 + 1.5)]]), xp=xp)
    assert_close(state.exp_avg_unc["m.lora_A"], np.array([[0.5625, 0.5625]]), xp=xp)


def test_ties_at_the_threshold_are_all_masked(xp):
    p = {f"m{i}.lora_{c}": xp.ones((2, 1) if c == "E" else (2, 2)) for i in range(2) for c in "AEB"}
    ones = {k: xp.ones(v.shape) for k, v in p.items()}
    state = alloc.AllocatorState(ones, dict(ones))
    params, masks = alloc.mask_to_budget(state, p, budget=3, init_bgt=4)
    assert all(not any(to_numpy(m)) for m in masks.values())
    assert not np.any(to_numpy(params["m0.lora_E"]))


def test_errors_name_what_is_wrong(xp):
    p = {"m.lora_A": xp.ones((2, 3)), "m.lora_E": xp.ones((2, 1)), "m.lora_B": xp.ones((4, 2))}
    config = AdaLoraConfig(init_r=2, target_r=2, total_step=4)
    sched = alloc.make_schedule(p, config=config)
    state = alloc.init_state(p)
    with pytest.raises(ConfigError, match="init_r > target_r"):
        alloc.update_and_allocate(state, p, p, step=4, schedule=sched)
    with pytest.raises(ConfigError, match="no mask"):
        alloc.update_and_allocate(state, p, None, step=5, schedule=sched)
    with pytest.raises(IncompatibleKeysError, match="m.lora_B"):
        alloc.update_importance(state, p, {"m.lora_A": p["m.lora_A"], "m.lora_E": p["m.lora_E"]}, beta1=0.5, beta2=0.5)
    with pytest.raises(IncompatibleKeysError, match="lacks"):
        alloc.make_schedule({"m.lora_A": p["m.lora_A"]}, config=config)
    with pytest.raises(IncompatibleKeysError, match="rank_pattern has no entry"):
        alloc.apply_rank_pattern(p, rank_pattern={"x.lora_E": [True, True]})


def test_apply_rank_pattern_accepts_saved_lists_without_adapter(xp):
    p = {"m.lora_A.a": xp.ones((2, 3)), "m.lora_E.a": xp.asarray([[2.0], [3.0]]), "m.lora_B.a": xp.ones((4, 2))}
    out = alloc.apply_rank_pattern(p, rank_pattern={"m.lora_E": [False, True]}, adapter_name="a")
    assert_close(out["m.lora_E.a"], np.array([[0.0], [3.0]]), xp=xp)
    assert out["m.lora_A.a"] is p["m.lora_A.a"]


def test_inputs_are_not_mutated(xp):
    rng = np.random.default_rng(4)
    p = {f"m{i}.lora_{c}": xp.asarray(rng.normal(size=(3, 1) if c == "E" else (3, 3))) for i in range(2) for c in "AEB"}
    copies = {k: to_numpy(v).copy() for k, v in p.items()}
    g = {k: xp.asarray(rng.normal(size=v.shape)) for k, v in copies.items()}
    sched = alloc.make_schedule(p, config=AdaLoraConfig(init_r=3, target_r=1, total_step=3))
    state, new, masks = alloc.update_and_allocate(alloc.init_state(p), p, g, step=1, schedule=sched)
    assert masks is not None and not all(bool(np.all(to_numpy(m))) for m in masks.values())
    for k, v in copies.items():
        np.testing.assert_array_equal(to_numpy(p[k]), v)
