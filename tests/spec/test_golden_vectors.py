"""Every golden vector of ``spec/vectors/manifest.json`` on every namespace, in float64 and float32.

This is the check a port to a new array library runs: the manifest names the
operation (a formula of ``spec/``), its positional inputs and scalar parameters;
the safetensors files hold inputs and expected outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from peftcore.methods.adalora import ops as adalora_ops
from peftcore.methods.ia3 import ops as ia3_ops
from peftcore.methods.lora import dora, ops
from peftcore.testing import assert_close

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
TENSORS = {name: load_file(str(VECTORS / name)) for name in {case["file"] for case in MANIFEST["cases"]}}

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
    "ia3.scale_output": ia3_ops.scale_output,
    "ia3.scale_input": ia3_ops.scale_input,
    "ia3.merge_weight": ia3_ops.merge_weight,
}


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
    outputs = call(OPERATIONS[case["operation"]], *inputs, **_params(case["params"]))
    if len(case["outputs"]) == 1:
        outputs = (outputs,)
    assert len(outputs) == len(case["outputs"])
    rtol = case["tolerance"][dtype_name]["rtol"]
    for name, actual in zip(case["outputs"], outputs):
        expected = tensors[f"{case['id']}/outputs/{name}"]
        assert_close(actual, np.asarray(expected), xp=xp, dtype=dtype, rtol=rtol, err_msg=f"{case['id']}:{name}")
