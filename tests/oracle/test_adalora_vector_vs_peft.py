"""The AdaLoRA allocator golden vectors (``adalora.allocator_trajectory`` in ``spec/vectors``) replayed through
peft's ``RankAllocator`` in float64: the reference that generated them agrees with peft step for step
(schedule, EMAs, masked ``lora_E``, every new ``rank_pattern``), so a port that matches the vectors matches peft."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402

pytestmark = pytest.mark.oracle

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
CASES = [c for c in json.loads((VECTORS / "manifest.json").read_text())["cases"]
         if c["operation"] == "adalora.allocator_trajectory"]


def _module_path_and_factor(name: str) -> tuple[str, str]:
    module, rest = name.split(".lora_", 1)
    return module, "lora_" + rest.split(".")[0]


def _base_model(shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """``nn.Linear`` modules at the vector's module paths, ``in`` from ``lora_A (r, in)``, ``out`` from ``lora_B``."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        path, factor = _module_path_and_factor(name)
        if factor != "lora_A":
            continue
        out_features = shapes[name.replace(".lora_A.", ".lora_B.")][0]
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, torch.nn.Linear(shape[1], out_features))
    return root


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    # the manifest's rule: |actual - expected| <= rtol·|expected| + rtol·max|expected|
    bound = rtol * np.abs(expected) + rtol * np.max(np.abs(expected), initial=0.0)
    assert actual.shape == expected.shape, what
    assert np.all(np.abs(actual - expected) <= bound), what


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_peft_rank_allocator_reproduces_the_vector(case):
    tensors = load_file(str(VECTORS / case["file"]))
    p = case["params"]
    names, adapter = p["parameter_names"], p["adapter_name"]
    inputs = {n: tensors[f"{case['id']}/inputs/{n}"] for n in case["inputs"]}
    outputs = {n: tensors[f"{case['id']}/outputs/{n}"] for n in case["outputs"]}
    rtol = case["tolerance"]["float64"]["rtol"]
    shapes = {n: inputs[f"params/{n}"].shape[1:] for n in names}
    e_names = [n for n in names if _module_path_and_factor(n)[1] == "lora_E"]
    init_r = shapes[e_names[0]][0]

    config = peft.AdaLoraConfig(
        target_modules=sorted({_module_path_and_factor(n)[0] for n in names}), init_r=init_r,
        **{k: p[k] for k in ("target_r", "tinit", "tfinal", "total_step", "deltaT", "beta1", "beta2")},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_base_model(shapes), config, adapter_name=adapter).double()
    allocator = model.base_model.rankallocator
    lora = {n: q for n, q in model.base_model.model.named_parameters() if "lora_" in n}
    assert sorted(lora) == sorted(names)
    assert (allocator.init_bgt, allocator.target_bgt) == (init_r * len(e_names), p["target_r"] * len(e_names))

    new_masks = 0
    for step in range(p["total_step"]):
        with torch.no_grad():
            for n, q in lora.items():
                q.copy_(torch.from_numpy(inputs[f"params/{n}"][step]))
                q.grad = torch.from_numpy(inputs[f"grads/{n}"][step].copy())
        budget, mask_now = allocator.budget_schedule(step)
        assert (budget, mask_now) == (outputs["budget"][step], outputs["mask_now"][step]), step
        before = copy.deepcopy(model.peft_config[adapter].rank_pattern)
        model.base_model.update_and_allocate(step)
        pattern = model.peft_config[adapter].rank_pattern
        if outputs["new_pattern"][step]:
            assert pattern == {n: outputs[f"masks/{n}"][new_masks].tolist() for n in e_names}, step
            new_masks += 1
        else:
            assert pattern == before, step
        for n in names:
            for ema, theirs in (("exp_avg_ipt", allocator.exp_avg_ipt), ("exp_avg_unc", allocator.exp_avg_unc)):
                # peft forgets its EMAs at total_step - tfinal; the vector stores them as zeros from then on
                value = theirs[n].numpy() if n in theirs else np.zeros(shapes[n])
                _assert_close(value, outputs[f"{ema}/{n}"][step], rtol, f"{ema}/{n} at step {step}")
        for n in e_names:
            _assert_close(lora[n].detach().numpy(), outputs[f"lora_E/{n}"][step], rtol, f"{n} at step {step}")
    assert new_masks == len(outputs[f"masks/{e_names[0]}"])
    assert model.peft_config[adapter].rank_pattern == {n: outputs[f"rank_pattern/{n}"].tolist() for n in e_names}
