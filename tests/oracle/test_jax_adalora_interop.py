"""AdaLoRA adapters move between peft (torch) and peftcore_jax with the same outputs (fp32 rel err <= 1e-5).

A tiny Llama (transformers) and the same weights as a JAX tree (``examples/jax_llama.py``): peft's adapters,
unpruned and pruned by its rank allocator, load here at the kept ranks and give peft's logits factored and
merged; ours, pruned by our allocator, load in peft with no missing or unexpected keys and the same logits.
Our allocator step under ``jax.jit`` gives peft's ``RankAllocator`` masks and ``rank_pattern`` step for step
for the same parameters and gradients; the orthogonal regulariser equals peft's loss term.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peftcore_jax as pj  # noqa: E402
from peftcore.methods.adalora import AdaLoraConfig  # noqa: E402

from tests.oracle.jax_torch_llama import IDS, fp32_jax, llama  # noqa: E402,F401  (fixtures)
from tests.oracle.jax_torch_llama import jax_logits as _jax_logits  # noqa: E402
from tests.oracle.jax_torch_llama import rel_err as _rel_err  # noqa: E402
from tests.oracle.jax_torch_llama import tiny_llama as _base  # noqa: E402
from tests.oracle.jax_torch_llama import torch_logits as _torch_logits  # noqa: E402

pytestmark = pytest.mark.oracle

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=2, total_step=10, beta1=0.8, beta2=0.9)


def _peft_config(**extra):
    return peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=4, **SCHEDULE, **extra)


def _peft_model(seed=1):
    """peft AdaLoRA with generic (non-zero E) factors of moderate size."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_base(), _peft_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


@contextlib.contextmanager
def _peft_io():
    """peft's false alarms on AdaLoRA files: a layer pruned to rank 0 (``(0, in)`` factors) read as an
    un-gathered ZeRO-3 shard, and its own ``rank_pattern`` (masks, keyed ``<module>.lora_E``) checked as LoRA's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*invalid shape", category=peft.utils.warning.PeftWarning)
        warnings.filterwarnings("ignore", message="The following rank_pattern keys", category=RuntimeWarning)
        yield


def _grads(model, rng):
    """Fixed random gradients on every factor (peft reads ``p.grad``), and the same as an Adapters tree."""
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            g = rng.standard_normal(tuple(p.shape)).astype(np.float32)
            p.grad = torch.from_numpy(g)
            grads[name] = g
    return grads


def _as_adapters(grads, adapters):
    """``{peft parameter name: grad}`` shaped as ``adapters`` (a pytree like jax.grad's)."""
    by_path = {}
    for name, g in grads.items():
        body = name.removeprefix("base_model.model.").removesuffix(".default")
        path, _, container = body.rpartition(".")
        by_path.setdefault(path, {})[container] = jnp.asarray(g)
    params = {path: pj.AdaLoraParams(d["lora_A"], d["lora_E"], d["lora_B"], kind=adapters[path].kind,
                                     scaling=adapters[path].scaling, dropout=adapters[path].dropout)
              for path, d in by_path.items()}
    return pj.Adapters(params, adapters.config_json, adapters.adapter_name, adapters.layout)


def test_peft_adapter_loads_with_peft_logits_factored_and_merged(llama, tmp_path):
    params, spec = llama
    model = _peft_model()
    model.save_pretrained(tmp_path)
    expected = _torch_logits(model)
    assert _rel_err(_jax_logits(params, spec), expected) > 1e-3

    adapters = pj.load_adapter(tmp_path, params)
    assert adapters.peft_type == "ADALORA"
    assert set(pj.adapter_state_dict(adapters)) == set(peft.get_peft_model_state_dict(model))
    assert _rel_err(_jax_logits(params, spec, adapters), expected) <= 1e-5
    merged = pj.merge(params, adapters)
    assert _rel_err(_jax_logits(merged, spec), expected) <= 1e-5
    with torch.no_grad():
        merged_torch = _torch_logits(model.merge_and_unload())
    assert _rel_err(_jax_logits(merged, spec), merged_torch) <= 1e-5


def test_allocator_under_jit_matches_peft_step_for_step_and_pruned_files_round_trip(llama, tmp_path):
    params, spec = llama
    model = _peft_model()
    adapters = pj.adapters_from_state_dict(
        {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()},
        AdaLoraConfig(target_modules=TARGETS, lora_alpha=4, **SCHEDULE), params)
    schedule = pj.allocator_schedule(adapters)
    # committed from the start, as the step's outputs are (uncommitted inputs would be a second jit signature)
    adapters, state = jax.device_put((adapters, pj.allocator_init(adapters)), jax.devices()[0])

    def allocate(state, adapters, grads, plan, schedule):  # a function of its own: jit caches per function
        return pj.allocator_step(state, adapters, grads, plan, schedule=schedule)

    step_fn = jax.jit(allocate, static_argnames=("schedule",))
    rng = np.random.default_rng(2)
    masked_steps = 0
    for step in range(SCHEDULE["total_step"] + 2):
        grads = _grads(model, rng)
        before = model.peft_config["default"].rank_pattern
        model.base_model.update_and_allocate(step)
        plan = pj.allocator_plan(step, schedule=schedule)
        state, adapters = step_fn(state, adapters, _as_adapters(grads, adapters), plan, schedule=schedule)
        theirs = model.peft_config["default"].rank_pattern
        assert bool(plan.mask) == (theirs is not before), step  # peft assigns a new pattern exactly when it masks
        if bool(plan.mask):
            masked_steps += 1
            ours = {f"{k}.default": v for k, v in pj.with_rank_pattern(adapters, state).config.rank_pattern.items()}
            assert ours == theirs, f"step {step}"
        for name, p in model.named_parameters():
            if ".lora_E." in name:
                path = name.removeprefix("base_model.model.").removesuffix(".lora_E.default")
                np.testing.assert_array_equal(np.asarray(adapters[path].lora_E), p.detach().numpy())
    assert masked_steps >= 3
    assert step_fn._cache_size() == 1  # one compilation for the whole schedule

    # peft prunes its adapter at save; ours prunes the same triplets and loads at the kept ranks
    with _peft_io():
        model.save_pretrained(tmp_path / "peft")
        theirs_state = peft.get_peft_model_state_dict(model)
    ours = pj.with_rank_pattern(adapters, state)
    pj.save_adapter(tmp_path / "ours", ours)
    ours_state = pj.adapter_state_dict(ours)
    assert set(ours_state) == set(theirs_state)
    for key, value in ours_state.items():
        np.testing.assert_array_equal(np.asarray(value), theirs_state[key].numpy())
    kept = {k: sum(v) for k, v in ours.config.rank_pattern.items()}
    assert min(kept.values()) < SCHEDULE["init_r"]

    with _peft_io():
        reloaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "peft").eval()
    expected = _torch_logits(reloaded)
    from_peft = pj.load_adapter(tmp_path / "peft", params)
    for name, r in kept.items():
        assert from_peft[name.removesuffix(".lora_E")].r == r
    assert _rel_err(_jax_logits(params, spec, from_peft), expected) <= 1e-5
    assert _rel_err(_jax_logits(pj.merge(params, from_peft), spec), expected) <= 1e-5
    assert _rel_err(_jax_logits(params, spec, ours), expected) <= 1e-5  # masked E: the pruned output

    with _peft_io():
        loaded = peft.get_peft_model(_base(), _peft_config())
        result = loaded.load_adapter(tmp_path / "ours", adapter_name="other")
        ours_in_peft = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if ".other" in k]
    assert _rel_err(_torch_logits(ours_in_peft), expected) <= 1e-5


def test_our_fresh_adapter_loads_in_peft_with_same_keys_and_logits(llama, tmp_path):
    params, spec = llama
    adapters = pj.init_adalora(params, AdaLoraConfig(target_modules=TARGETS, lora_alpha=4, init_lora_weights=False,
                                                     **SCHEDULE), jax.random.key(0))
    adapters = jax.tree_util.tree_map(lambda x: 0.3 * x, adapters)
    pj.save_adapter(tmp_path, adapters)
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path).eval()
    state = peft.get_peft_model_state_dict(loaded)
    assert set(state) == set(peft.get_peft_model_state_dict(_peft_model()))
    for key, value in pj.adapter_state_dict(adapters).items():
        np.testing.assert_array_equal(state[key].numpy(), np.asarray(value))
    assert _rel_err(_jax_logits(params, spec, adapters), _torch_logits(loaded)) <= 1e-5


def test_orth_regularizer_equals_peft_loss_term(llama):
    params, _ = llama
    model = _peft_model()
    labels = torch.as_tensor(IDS)
    config = model.peft_config["default"]
    losses = []
    for weight in (0.0, 1.0):
        config.orth_reg_weight = weight
        with torch.no_grad():
            # AdaLoraModel.forward adds the term (a PeftModel without task_type would bypass it)
            losses.append(float(model.base_model(input_ids=labels, labels=labels).loss.double()))
    theirs = losses[1] - losses[0]
    adapters = pj.adapters_from_state_dict(
        {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()},
        AdaLoraConfig(target_modules=TARGETS, lora_alpha=4, **SCHEDULE), params)
    ours = float(jax.jit(pj.orth_regularizer)(adapters))
    assert abs(ours - theirs) <= 1e-5 * abs(theirs) + 1e-6
