"""The torch fast paths of the LoRA Linear and Embedding forward: one ``torch.addmm`` for the update, and accumulating
into the base output's own buffer when ``LoraLayer`` knows nothing else holds it.

Each path is checked against the standard Array API path (the same core function on NumPy), a float64
reference, and real peft: values, peft's dtype rule, ``lora_B`` bias, gradients, and the cases where the
base output must not be overwritten.
"""

from __future__ import annotations

import copy
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft
import peftcore
import peftcore_torch
from peftcore._xp import add_lora_product, array_namespace
from peftcore.methods.lora import ops
from tests.reference import lora as ref

LEADS = [(), (5,), (2, 5)]


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _case(lead, *, bias, seed=0):
    rng = np.random.default_rng(seed)
    case = dict(x=rng.normal(size=(*lead, 6)), lora_A=rng.normal(size=(3, 6)), lora_B=rng.normal(size=(4, 3)),
                result=rng.normal(size=(*lead, 4)))
    case["bias"] = rng.normal(size=(4,)) if bias else None
    return case


def _torch(case, dtype):
    return {k: None if v is None else torch.tensor(v, dtype=dtype) for k, v in case.items()}


def _forward(t, *, scaling, **options):
    arrays = [t[k] for k in ("result", "x", "lora_A", "lora_B", "bias") if t[k] is not None]
    return ops.linear_forward(*arrays, scaling=scaling, **options)


def _assert_close(actual, desired, *, rtol=1e-5):
    actual, desired = actual.detach(), torch.as_tensor(desired, dtype=actual.dtype).detach()
    atol = rtol * max(float(desired.abs().max()), 1e-6)
    torch.testing.assert_close(actual, desired, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------- core


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_addmm_path_matches_the_standard_path_and_float64_reference(monkeypatch, lead, bias, donate):
    case = _case(lead, bias=bias)
    expected = case["result"] + ref.linear_update(case["x"], case["lora_A"], case["lora_B"], 0.5, case["bias"])
    standard = _forward({k: None if v is None else v.astype(np.float32) for k, v in case.items()}, scaling=0.5)
    t = _torch(case, torch.float32)
    kept = t["result"].clone()
    calls = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real_addmm(*a, **k))
    with torch.no_grad():
        fused = _forward(t, scaling=0.5, donate_result=donate)
    assert fused.dtype == torch.float32 and tuple(fused.shape) == (*lead, 4)
    _assert_close(fused, expected)
    _assert_close(fused, standard)
    # a bias is added first (a new array): from then on the core accumulates into its own buffer
    in_place = donate or bias
    assert calls == ([] if in_place else [1])
    if donate and not bias:
        assert fused.data_ptr() == t["result"].data_ptr()  # the donated buffer was reused
    if not donate:
        torch.testing.assert_close(t["result"], kept, rtol=0, atol=0)


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_reach_the_factors_the_bias_and_the_input(lead, bias):
    case = _case(lead, bias=bias, seed=1)
    rng = np.random.default_rng(2)
    weight, cotangent, s = rng.normal(size=(4, 6)), rng.normal(size=(*lead, 4)), 0.75
    t = {k: v.requires_grad_(True) if v is not None else None for k, v in _torch(case, torch.float64).items()}
    result = t["x"] @ torch.tensor(weight).T  # the base output, itself differentiable in x
    # a donated result under autograd is not overwritten: the in-place write would cost more in backward
    out = _forward({**t, "result": result}, scaling=s, donate_result=True)
    out.backward(torch.tensor(cotangent))

    x, a, b, g = (np.reshape(v, (-1, v.shape[-1])) for v in (case["x"], case["lora_A"], case["lora_B"], cotangent))
    a, b = case["lora_A"], case["lora_B"]
    g_hidden = s * g @ b  # dL/d(x Aᵀ)
    _assert_close(t["x"].grad.reshape(-1, 6), g @ weight + g_hidden @ a, rtol=1e-10)
    _assert_close(t["lora_A"].grad, g_hidden.T @ x, rtol=1e-10)
    _assert_close(t["lora_B"].grad, s * g.T @ (x @ a.T), rtol=1e-10)
    if bias:
        _assert_close(t["bias"].grad, s * g.sum(axis=0), rtol=1e-10)


def test_add_lora_product_leaves_c_alone_under_autograd_even_when_donated():
    c = torch.randn(2, 3, 4)
    x, a, b = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 5), torch.randn(4, 2)
    kept = c.clone()
    out = add_lora_product(c, x, a, b, alpha=2.0, xp=array_namespace(c), donate_c=True)
    torch.testing.assert_close(c, kept, rtol=0, atol=0)
    torch.testing.assert_close(out, c + 2.0 * (x @ a.T @ b.T), rtol=1e-6, atol=1e-6)
    assert out.grad_fn is not None


def test_add_lora_product_never_writes_into_a_non_contiguous_c():
    c = torch.randn(4, 3).T  # (3, 4), a transposed view: its 2-d reshape would be a copy
    x, a, b = torch.randn(3, 5), torch.randn(2, 5), torch.randn(4, 2)
    kept = c.clone()
    with torch.no_grad():
        out = add_lora_product(c, x, a, b, alpha=0.5, xp=array_namespace(c), donate_c=True)
    torch.testing.assert_close(out, kept + 0.5 * (x @ a.T @ b.T), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- layer


def _pair(base: nn.Module, **extra):
    kwargs = dict(r=3, lora_alpha=6, target_modules=["layer"], init_lora_weights=False, **extra)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), Holder(copy.deepcopy(base))).eval()
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), Holder(copy.deepcopy(base))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _assert_same_gradients(ours, theirs, got, expected):
    """Backpropagate the same loss through both outputs; every trainable parameter gets peft's gradient."""
    got.square().sum().backward()
    expected.square().sum().backward()
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            _assert_close(dict(ours.named_parameters())[name].grad, param.grad)


def _donations(monkeypatch):
    """The ``donate_result`` flags LoraLayer passes to ``ops.linear_forward``."""
    seen = []
    real = ops.linear_forward

    def spy(*arrays, **options):
        seen.append(options.get("donate_result", False))
        return real(*arrays, **options)

    monkeypatch.setattr(ops, "linear_forward", spy)
    return seen


@pytest.mark.oracle
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(6, 4), lambda: Conv1D(4, 6)], ids=["linear", "conv1d_gpt2"])
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_layer_matches_peft_on_every_path(monkeypatch, make_base, lora_bias, mode):
    torch.manual_seed(0)
    base = make_base()
    ours, theirs = _pair(base, lora_bias=lora_bias, fan_in_fan_out=isinstance(base, Conv1D))
    x = torch.randn(2, 5, 6)
    donations = _donations(monkeypatch)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with context():
        got, expected = ours(x), theirs(x)
    _assert_close(got, expected)
    assert donations == [True]  # a plain base's output is fresh: the layer hands it to the core
    if mode == "grad":
        _assert_same_gradients(ours, theirs, got, expected)


@pytest.mark.oracle
def test_two_active_adapters_accumulate_like_peft_without_grad():
    torch.manual_seed(1)
    base = nn.Linear(6, 4)
    kwargs = dict(r=3, lora_alpha=6, target_modules=["layer"], init_lora_weights=False)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), Holder(copy.deepcopy(base)))
    with pytest.warns(UserWarning, match="Already found a `peft_config`"):
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), theirs, adapter_name="second")
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), Holder(copy.deepcopy(base)))
    ours = peftcore_torch.inject_adapter_in_model(peftcore.LoraConfig(**kwargs), ours, adapter_name="second")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.layer.set_adapter(["default", "second"])
    ours.layer.set_adapter(["default", "second"])
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = theirs(x)
        assert not torch.allclose(expected, theirs.layer.base_layer(x) + 0)  # both adapters contribute
        _assert_close(ours(x), expected)


@pytest.mark.oracle
@pytest.mark.parametrize("lora_bias", [False, True])
def test_bfloat16_base_with_float32_adapters_follows_peft(lora_bias):
    torch.manual_seed(2)
    base = nn.Linear(6, 4, dtype=torch.bfloat16)
    ours, theirs = _pair(base, lora_bias=lora_bias)
    layer = ours.layer
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert lora_A.dtype == torch.float32  # autocast_adapter_dtype, as peft
    x = torch.randn(2, 5, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = ours(x), theirs(x)
        base_out = layer.base_layer(x)
        update = layer.scaling["default"] * (x.float() @ lora_A.T @ lora_B.T)
        if lora_bias:
            update = update + layer.scaling["default"] * layer.lora_B["default"].bias
        # peft's rule: base (bf16) promoted to float32, float32 update added, the sum rounded once to bf16
        exact = (base_out.float() + update).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2**-8, atol=2**-8 * float(expected.abs().max()))
    torch.testing.assert_close(got, exact, rtol=2**-8, atol=2**-8 * float(exact.abs().max()))


class _SubclassedLinear(nn.Linear):
    pass


def _with_forward_override(layer: nn.Linear) -> nn.Linear:
    layer.forward = types.MethodType(nn.Linear.forward, layer)  # as accelerate's hooks do
    return layer


@pytest.mark.parametrize(
    "make_base",
    [lambda: _SubclassedLinear(6, 4), lambda: _with_forward_override(nn.Linear(6, 4))],
    ids=["subclass", "instance-forward"],
)
def test_unknown_bases_keep_their_output(monkeypatch, make_base):
    torch.manual_seed(3)
    ours = _pair(make_base())[0].layer
    donations = _donations(monkeypatch)
    x = torch.randn(5, 6)
    with torch.no_grad():
        got = ours(x)
        expected = ours.base_layer(x) + ops.linear_update(x, *ours._factors("default"), scaling=2.0)
    _assert_close(got, expected)
    assert donations == [False]


@pytest.mark.parametrize("where", ["module", "global"])
def test_a_forward_hook_sees_the_base_output_unchanged(monkeypatch, where):
    torch.manual_seed(4)
    ours = _pair(nn.Linear(6, 4))[0].layer
    donations = _donations(monkeypatch)
    captured = []

    def hook(module, args, output):
        if module is ours.base_layer:
            captured.append(output)

    register = ours.base_layer.register_forward_hook if where == "module" else nn.modules.module.register_module_forward_hook
    handle = register(hook)
    try:
        x = torch.randn(5, 6)
        with torch.no_grad():
            ours(x)
    finally:
        handle.remove()
    assert donations == [False]
    with torch.no_grad():
        torch.testing.assert_close(captured[0], ours.base_layer(x), rtol=0, atol=0)
        assert ours._base_output_is_private(ours.base_layer)  # hooks removed: the fast path is back


@pytest.mark.oracle
def test_a_pre_hook_on_the_base_changes_only_the_base_input_as_in_peft(monkeypatch):
    torch.manual_seed(5)
    ours, theirs = _pair(nn.Linear(6, 4))
    for model in (ours, theirs):  # a hook-free base is called without Module.__call__: hooks must stop that
        model.layer.base_layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    donations = _donations(monkeypatch)
    x = torch.randn(3, 6)
    with torch.no_grad():
        got, expected = ours(x), theirs(x)
        lora_A, lora_B, _ = ours.layer._factors("default")
        by_hand = ours.layer.base_layer.forward(2 * x) + 2.0 * (x @ lora_A.T @ lora_B.T)
    _assert_close(got, expected)
    _assert_close(got, by_hand)
    assert donations == [False]


def test_jit_trace_records_the_base_as_a_submodule_call():
    torch.manual_seed(6)
    ours = _pair(nn.Linear(6, 4))[0]
    x = torch.randn(3, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        eager = ours(x)
        traced = torch.jit.trace(ours, x, check_trace=False)
    torch.testing.assert_close(traced(x), eager)
    # under the tracer the base goes through Module.__call__ (kept as a call, not inlined) and is not overwritten
    assert "(base_layer).forward(" in traced.layer.code
    assert "addmm_" not in traced.layer.code


@pytest.mark.oracle
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_to_bfloat16_follows_peft(grad):
    torch.manual_seed(7)
    ours, theirs = _pair(nn.Linear(6, 4))
    x = torch.randn(2, 5, 6)
    # autocast runs x·Aᵀ in bfloat16 while the running result is float32: the fused path must step aside
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours(x), theirs(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    got, expected = got.detach(), expected.detach()
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7 * float(expected.abs().max()))


@pytest.mark.oracle
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_embedding_accumulates_into_its_fresh_output_and_matches_peft(monkeypatch, mode):
    torch.manual_seed(8)
    ours, theirs = _pair(nn.Embedding(10, 6, padding_idx=2))
    seen = []
    real = ops.embedding_forward
    monkeypatch.setattr(ops, "embedding_forward",
                        lambda *a, **k: seen.append(k.get("donate_result", False)) or real(*a, **k))
    x = torch.tensor([[0, 2, 9], [4, 4, 1]])
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with context():
        got, expected = ours(x), theirs(x)
        base = ours.layer.base_layer(x)
    _assert_close(got, expected)
    assert not torch.allclose(got, base)  # the adapter contributes; the base output was not overwritten
    assert seen == [True]
    if mode == "grad":
        _assert_same_gradients(ours, theirs, got, expected)
