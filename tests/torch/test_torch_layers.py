"""LoraLayer against peft's LoRA layers: same keys, forward, merge and unmerge for every layer kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft
from transformers.pytorch_utils import Conv1D

import peftcore
import peftcore_torch
from peftcore_torch.layers import LoraLayer

pytestmark = pytest.mark.oracle

RTOL = 1e-5


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5), torch.randn(2, 3, 6)
    if kind == "conv1d_gpt2":
        return Conv1D(5, 6), torch.randn(2, 3, 6)
    if kind == "embedding":
        return nn.Embedding(10, 6, padding_idx=1), torch.tensor([[0, 1, 2], [9, 3, 3]])
    if kind == "conv1d":
        return nn.Conv1d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 7)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)
    if kind == "conv3d":
        return nn.Conv3d(2, 4, 2), torch.randn(1, 2, 3, 3, 3)
    raise AssertionError(kind)


CASES = [
    ("linear", {}),
    ("linear", {"use_dora": True}),
    ("linear", {"lora_bias": True}),
    ("linear", {"use_rslora": True}),
    ("conv1d_gpt2", {"fan_in_fan_out": True}),
    ("conv1d_gpt2", {"fan_in_fan_out": True, "use_dora": True}),
    ("embedding", {}),
    ("embedding", {"use_dora": True}),
    ("conv1d", {}),
    ("conv2d", {}),
    ("conv2d", {"use_dora": True}),
    ("conv3d", {}),
]


def _pair(kind: str, extra: dict):
    base, x = _layer(kind)
    kwargs = dict(r=4, lora_alpha=6, target_modules=["layer"], init_lora_weights=False, **extra)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), Holder(copy.deepcopy(base))).eval()
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), Holder(copy.deepcopy(base))).eval()
    # identical key sets are what makes this load strict; it also gives both the same adapter values
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, x


def _assert_close(actual: torch.Tensor, desired: torch.Tensor) -> None:
    atol = RTOL * max(float(desired.abs().max()), 1e-6)
    torch.testing.assert_close(actual, desired, rtol=RTOL, atol=atol)


@pytest.mark.parametrize(("kind", "extra"), CASES, ids=[f"{k}-{'-'.join(e) or 'plain'}" for k, e in CASES])
def test_forward_merge_unmerge_match_peft(kind, extra):
    ours, theirs, x = _pair(kind, extra)
    assert isinstance(ours.layer, LoraLayer)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    original = theirs.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = theirs(x)
        _assert_close(ours(x), expected)
        assert not torch.allclose(expected, theirs.layer.base_layer(x))  # the adapter really contributes

        theirs.layer.merge()
        ours.layer.merge()
        _assert_close(ours.layer.base_layer.weight, theirs.layer.base_layer.weight)
        if extra.get("lora_bias"):
            _assert_close(ours.layer.base_layer.bias, theirs.layer.base_layer.bias)
        _assert_close(ours(x), theirs(x))

        ours.layer.unmerge()
        theirs.layer.unmerge()
        _assert_close(ours.layer.base_layer.weight, original)
        _assert_close(ours(x), expected)


def test_merge_keeps_parameter_objects_and_safe_merge_rejects_nan():
    ours, _, x = _pair("linear", {})
    weight = ours.layer.base_layer.weight
    ours.layer.merge(safe_merge=True)
    assert ours.layer.base_layer.weight is weight and ours.layer.merged
    ours.layer.unmerge()
    with torch.no_grad():
        ours.layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(peftcore.errors.MergeError, match="non-finite"):
        ours.layer.merge(safe_merge=True)
    assert not ours.layer.merged and torch.isfinite(ours.layer.base_layer.weight).all()


def test_two_dora_adapters_merge_like_peft():
    base, x = _layer("linear")
    kwargs = dict(r=4, lora_alpha=6, target_modules=["layer"], init_lora_weights=False, use_dora=True)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), Holder(copy.deepcopy(base)))
    with pytest.warns(UserWarning, match="Already found a `peft_config`"):
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), theirs, adapter_name="second")
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), Holder(copy.deepcopy(base)))
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), ours, adapter_name="second")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.layer.merge(adapter_names=["default", "second"])
    ours.layer.merge(adapter_names=["default", "second"])
    _assert_close(ours.layer.base_layer.weight.detach(), theirs.layer.base_layer.weight.detach())
    ours.layer.unmerge()
    _assert_close(ours.layer.base_layer.weight.detach(), base.weight.detach())


def test_dropout_changes_training_forward_only():
    ours, _, x = _pair("linear", {})
    layer = ours.layer
    layer.lora_dropout["default"] = nn.Dropout(0.5)
    with torch.no_grad():
        evaluated = ours.eval()(x)
        torch.manual_seed(3)
        trained = ours.train()(x)
    assert not torch.allclose(evaluated, trained)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.scaling["default"] * dropped @ lora_A.T @ lora_B.T
    _assert_close(trained, expected.detach())
