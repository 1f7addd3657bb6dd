"""Every golden vector of ``spec/vectors/manifest.json`` on every namespace, in float64 and float32.

This is the check a port to a new array library runs: the manifest names the
operation (a formula of ``spec/``), its positional inputs and scalar parameters;
the safetensors files hold inputs and expected outputs. An AdaLoRA allocator
trajectory replays ``update_and_allocate`` step by step (``_allocator_trajectory``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from peftcore._xp import array_namespace
from peftcore.methods.adalora import AdaLoraConfig, allocator
from peftcore.methods.adalora import ops as adalora_ops
from peftcore.methods.ia3 import ops as ia3_ops
from peftcore.methods import prompt_learning
from peftcore.methods.lora import dora, ops
from peftcore.methods.p_tuning import ops as p_tuning_ops
from peftcore.methods.prefix_tuning import ops as prefix_ops
from peftcore.testing import assert_close, to_numpy

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
TENSORS = {name: load_file(str(VECTORS / name)) for name in {case["file"] for case in MANIFEST["cases"]}}


def _allocator_trajectory(*arrays, parameter_names, target_r, tinit, tfinal, total_step, deltaT, beta1, beta2,
                          adapter_name):
    """``update_and_allocate(t)`` for ``t = 0..total_step-1`` on ``params[t]``, ``grads[t]`` (stacked over steps).

    Outputs, in the manifest's order: per step ``budget``, ``mask_now`` (the schedule), ``new_pattern``; per
    step and parameter both EMAs; per step the masked ``lora_E``; the masks of the steps that set a new
    ``rank_pattern``; the final ``rank_pattern``.
    """
    xp = array_namespace(*arrays)
    names = list(parameter_names)
    e_names = [n for n in names if ".lora_E." in n]
    params_by_step, grads_by_step = dict(zip(names, arrays[: len(names)])), dict(zip(names, arrays[len(names) :]))
    config = AdaLoraConfig(target_r=target_r, init_r=int(params_by_step[e_names[0]].shape[1]), tinit=tinit,
                           tfinal=tfinal, total_step=total_step, deltaT=deltaT, beta1=beta1, beta2=beta2)
    first = {n: p[0, ...] for n, p in params_by_step.items()}
    schedule = allocator.make_schedule(first, config=config, adapter_name=adapter_name)
    state = allocator.init_state(first, adapter_name=adapter_name)
    rows = {key: [] for key in ("budget", "mask_now", "new_pattern", "exp_avg_ipt", "exp_avg_unc", "lora_E", "masks")}
    for step in range(total_step):
        params = {n: p[step, ...] for n, p in params_by_step.items()}
        grads = {n: g[step, ...] for n, g in grads_by_step.items()}
        budget, mask_now = allocator.budget_schedule(step, schedule=schedule)
        state, params, pattern = allocator.update_and_allocate(state, params, grads, step=step, schedule=schedule,
                                                               adapter_name=adapter_name)
        rows["budget"].append(budget)
        rows["mask_now"].append(mask_now)
        rows["new_pattern"].append(pattern is not None)
        rows["exp_avg_ipt"].append(state.exp_avg_ipt)
        rows["exp_avg_unc"].append(state.exp_avg_unc)
        rows["lora_E"].append(params)
        if pattern is not None:
            rows["masks"].append(pattern)
    per_step = [xp.asarray(rows["budget"], dtype=xp.int64)]
    per_step += [xp.asarray(rows[key], dtype=xp.bool) for key in ("mask_now", "new_pattern")]
    stacked = [xp.stack([row[n] for row in rows[key]]) for key, keys in
               (("exp_avg_ipt", names), ("exp_avg_unc", names), ("lora_E", e_names), ("masks", e_names)) for n in keys]
    return (*per_step, *stacked, *(state.rank_pattern[n] for n in e_names))


OPERATIONS = {
    "lora.linear_forward": ops.linear_forward,
    "lora.delta_weight": ops.delta_weight,
    "lora.merge": ops.merge,
    "lora.unmerge": ops.unmerge,
    "lora.embedding_forward": ops.embedding_forward,
    "lora.embedding_delta_weight": ops.embedding_delta_weight,
    "lora.conv_forward": ops.conv_forward,
    "lora.conv_delta_weight": ops.conv_delta_weight,
    "dora.magnitude_init": dora.magnitude_init,
    "dora.linear_forward": dora.linear_forward,
    "dora.merge": dora.merge,
    "dora.unmerge": dora.unmerge,
    "dora.embedding_magnitude_init": dora.embedding_magnitude_init,
    "dora.embedding_forward": dora.embedding_forward,
    "dora.conv_magnitude_init": dora.conv_magnitude_init,
    "dora.conv_forward": dora.conv_forward,
    "dora.conv_merge": dora.conv_merge,
    "dora.conv_unmerge": dora.conv_unmerge,
    "adalora.delta_weight": adalora_ops.delta_weight,
    "adalora.linear_forward": adalora_ops.linear_forward,
    "adalora.conv_forward": adalora_ops.conv_forward,
    "adalora.allocator_trajectory": _allocator_trajectory,
    "ia3.scale_output": ia3_ops.scale_output,
    "ia3.scale_input": ia3_ops.scale_input,
    "ia3.merge_weight": ia3_ops.merge_weight,
    "prompt_learning.prepend_virtual_tokens": prompt_learning.prepend_virtual_tokens,
    "prompt_learning.extend_labels": prompt_learning.extend_labels,
    "prompt_learning.extend_attention_mask": prompt_learning.extend_attention_mask,
    "prompt_learning.past_key_values_layout": prompt_learning.past_key_values_layout,
    "prefix_tuning.prefix_projection": prefix_ops.prefix_projection,
    "p_tuning.mlp_head": p_tuning_ops.mlp_head,
    "p_tuning.lstm": lambda x, *params, num_layers: p_tuning_ops.lstm(
        x, dict(zip(p_tuning_ops.lstm_parameter_names(num_layers), params)), num_layers=num_layers),
    "p_tuning.lstm_mlp_head": p_tuning_ops.lstm_mlp_head,
}


def _flat(outputs) -> tuple:
    # operations returning nested tuples (the per-layer key/value prefix) list their outputs flattened
    if not isinstance(outputs, tuple):
        return (outputs,)
    return tuple(leaf for item in outputs for leaf in _flat(item))


def _params(params: dict) -> dict:
    # JSON has no tuples; per-dimension stride/padding come back as lists
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def test_manifest_is_complete():
    assert {c["operation"] for c in MANIFEST["cases"]} == set(OPERATIONS)
    ids = [c["id"] for c in MANIFEST["cases"]]
    assert len(ids) == len(set(ids))
    for case in MANIFEST["cases"]:
        tensors = TENSORS[case["file"]]
        for name in [n for n in case["inputs"] if n] :
            assert f"{case['id']}/inputs/{name}" in tensors
        for name in case["outputs"]:
            assert f"{case['id']}/outputs/{name}" in tensors


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["id"])
def test_golden_vector(case, dtype_name, xp, call):
    tensors = TENSORS[case["file"]]
    dtype = getattr(xp, dtype_name)

    def as_input(name):
        if name is None:
            return None
        value = tensors[f"{case['id']}/inputs/{name}"]
        array = xp.asarray(value)
        return array if value.dtype.kind in "iu" else xp.astype(array, dtype)

    inputs = [as_input(name) for name in case["inputs"]]
    while inputs and inputs[-1] is None:
        inputs.pop()
    outputs = _flat(call(OPERATIONS[case["operation"]], *inputs, **_params(case["params"])))
    assert len(outputs) == len(case["outputs"])
    rtol = case["tolerance"][dtype_name]["rtol"]
    for name, actual in zip(case["outputs"], outputs):
        expected = tensors[f"{case['id']}/outputs/{name}"]
        if expected.dtype.kind in "iub":  # integer outputs (labels, masks, budgets) and bool masks: exactly
            want = xp.bool if expected.dtype.kind == "b" else xp.int64
            assert actual.dtype == want, f"{case['id']}:{name}: dtype {actual.dtype}"
            np.testing.assert_array_equal(np.asarray(to_numpy(actual)), expected, err_msg=f"{case['id']}:{name}")
            continue
        assert_close(actual, np.asarray(expected), xp=xp, dtype=dtype, rtol=rtol, err_msg=f"{case['id']}:{name}")
