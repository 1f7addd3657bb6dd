"""LoRA ops against real ``peft`` 0.21.2 layers: forward, ``get_delta_weight`` and ``merge_and_unload``.

The same weights and inputs go through peft's ``lora.Linear``/``Embedding``/``Conv*d`` (built by
``get_peft_model`` with ``init_lora_weights=False`` so the adapters are non-zero) and through
``peftcore.methods.lora.ops`` on the torch namespace and on NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers_utils = pytest.importorskip("transformers.pytorch_utils")

from torch import nn  # noqa: E402

from peftcore.errors import MergeError  # noqa: E402
from peftcore.methods.lora import ops  # noqa: E402
from peftcore.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5
NAMESPACES = ["torch", "numpy"]


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build(layer, *, dtype=torch.float32, **config):
    """``get_peft_model`` around one layer named ``layer``; returns (peft model, its LoRA layer)."""
    torch.manual_seed(0)
    model = Wrap(layer).to(dtype)
    lora_config = peft.LoraConfig(target_modules=["layer"], init_lora_weights=False, **config)
    peft_model = peft.get_peft_model(model, lora_config)
    lora_layer = peft_model.base_model.model.layer
    with torch.no_grad():  # a non-zero lora_B bias so it is really checked
        for module in lora_layer.lora_B.values():
            if module.bias is not None:
                module.bias.normal_()
    return peft_model.eval(), lora_layer


def arrays(namespace, *tensors):
    """The tensors as ``namespace`` arrays (torch tensors detached, or float NumPy copies)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif namespace == "torch":
            out.append(t.detach().clone())
        else:
            out.append(t.detach().numpy().copy())
    return out


def peft_np(t):
    return t.detach().float().numpy()


# ------------------------------------------------------------------------------------------- Linear


LINEAR_CONFIGS = [
    dict(r=2, lora_alpha=4),
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=3, lora_alpha=5, lora_bias=True),
    dict(r=4, lora_alpha=16, lora_bias=True, use_rslora=True),
]


def _linear_layers():
    return [
        pytest.param(lambda: nn.Linear(6, 5), False, id="Linear"),
        pytest.param(lambda: transformers_utils.Conv1D(5, 6), True, id="gpt2-Conv1D"),
    ]


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("config", LINEAR_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize(("make_layer", "is_conv1d"), _linear_layers())
def test_linear_and_gpt2_conv1d_match_peft(namespace, config, make_layer, is_conv1d):
    if is_conv1d:
        with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
            peft_model, layer = build(make_layer(), **config)
    else:
        peft_model, layer = build(make_layer(), **config)
    assert layer.fan_in_fan_out is is_conv1d
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    b_bias = layer.lora_B["default"].bias
    s = layer.scaling["default"]
    assert s == ops.scaling(config["r"], config["lora_alpha"], use_rslora=config.get("use_rslora", False))
    x = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(x)
        base_result = base(x)
        expected_delta = layer.get_delta_weight("default")

    x_, a_, b_, bb_, res_ = arrays(namespace, x, a, b, b_bias, base_result)
    args = (res_, x_, a_, b_) + ((bb_,) if bb_ is not None else ())
    assert_close(ops.linear_forward(*args, scaling=s), peft_np(expected), rtol=RTOL)
    delta = ops.delta_weight(a_, b_, scaling=s, fan_in_fan_out=is_conv1d)
    assert_close(delta, peft_np(expected_delta), rtol=RTOL)

    w_, bias_ = arrays(namespace, base.weight, base.bias)
    base_weight = peft_np(base.weight).copy()  # merge_and_unload rewrites it in place
    merged_w = ops.merge(w_, delta, safe=True, name="layer")
    merged_b = ops.merge_bias(bias_, bb_, scaling=s) if bb_ is not None else bias_
    merged = peft_model.merge_and_unload().layer
    assert_close(merged_w, peft_np(merged.weight), rtol=RTOL)
    assert_close(merged_b, peft_np(merged.bias), rtol=RTOL)
    assert_close(ops.unmerge(merged_w, delta), base_weight, rtol=RTOL)


# ------------------------------------------------------------------------------------------- Embedding


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("config", [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=8, use_rslora=True)],
                         ids=["r2", "r4-rslora"])
@pytest.mark.parametrize("max_norm", [None, 1.5], ids=["plain", "max_norm"])
def test_embedding_matches_peft(namespace, config, max_norm):
    peft_model, layer = build(nn.Embedding(10, 6, padding_idx=0, max_norm=max_norm), **config)
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    s = layer.scaling["default"]
    base = layer.get_base_layer()
    indices = torch.tensor([[0, 3, 9, 3], [5, 0, 1, 2]])
    # peft's max_norm renormalises lora_embedding_A in place: take our inputs first
    idx_, a_, b_ = arrays(namespace, indices, a, b)
    expected_delta = layer.get_delta_weight("default")
    with torch.no_grad():
        base_result = base(indices)
        expected = peft_model(indices)
    (res_,) = arrays(namespace, base_result)
    got = ops.embedding_forward(res_, idx_, a_, b_, scaling=s, max_norm=max_norm, padding_idx=0)
    assert_close(got, peft_np(expected), rtol=RTOL)

    delta = ops.embedding_delta_weight(a_, b_, scaling=s)
    assert_close(delta, peft_np(expected_delta), rtol=RTOL)
    if max_norm is None:
        (w_,) = arrays(namespace, base.weight)
        merged = peft_model.merge_and_unload().layer
        assert_close(ops.merge(w_, delta), peft_np(merged.weight), rtol=RTOL)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_embedding_embed_scale_matches_peft(namespace):
    class ScaledEmbedding(nn.Embedding):  # like Gemma3TextScaledWordEmbedding
        def __init__(self, *args, embed_scale, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

        def forward(self, input_ids):
            return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)

    peft_model, layer = build(ScaledEmbedding(10, 6, embed_scale=2.5), r=2, lora_alpha=4)
    indices = torch.tensor([[1, 4, 9]])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    with torch.no_grad():
        base_result, expected = layer.get_base_layer()(indices), peft_model(indices)
    idx_, a_, b_, res_ = arrays(namespace, indices, a, b, base_result)
    got = ops.embedding_forward(res_, idx_, a_, b_, scaling=layer.scaling["default"], embed_scale=2.5)
    assert_close(got, peft_np(expected), rtol=RTOL)


# ------------------------------------------------------------------------------------------- Conv


CONV_CASES = [
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9), id="Conv1d-stride-pad"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3), (2, 4, 6, 5), id="Conv2d"),
    pytest.param(lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2)), (2, 4, 7, 5), id="Conv2d-asym"),
    pytest.param(lambda: nn.Conv2d(4, 6, 1), (2, 4, 5, 5), id="Conv2d-1x1"),
    pytest.param(lambda: nn.Conv2d(4, 6, 4, padding="same"), (1, 4, 6, 5), id="Conv2d-same-even"),
    pytest.param(lambda: nn.Conv3d(4, 6, 3, padding=1), (1, 4, 4, 5, 3), id="Conv3d-pad"),
    pytest.param(lambda: nn.Conv3d(4, 6, 2, stride=2, bias=False), (1, 4, 5, 4, 4), id="Conv3d-stride-nobias"),
]


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("config", [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=8, use_rslora=True, lora_bias=True)],
                         ids=["r2", "r4-rslora-lora_bias"])
@pytest.mark.parametrize(("make_layer", "input_shape"), CONV_CASES)
def test_conv_matches_peft(namespace, config, make_layer, input_shape):
    conv = make_layer()
    if config.get("lora_bias") and conv.bias is None:
        with pytest.warns(peft.utils.warning.PeftWarning, match="has no bias"):
            peft_model, layer = build(conv, **config)
    else:
        peft_model, layer = build(conv, **config)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    b_bias = layer.lora_B["default"].bias
    s = layer.scaling["default"]
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, base_result = peft_model(x), base(x)
        expected_delta = layer.get_delta_weight("default")
    x_, a_, b_, bb_, res_ = arrays(namespace, x, a, b, b_bias, base_result)
    args = (res_, x_, a_, b_) + ((bb_,) if bb_ is not None else ())
    got = ops.conv_forward(*args, scaling=s, stride=base.stride, padding=base.padding)
    assert_close(got, peft_np(expected), rtol=RTOL)
    delta = ops.conv_delta_weight(a_, b_, scaling=s)
    assert_close(delta, peft_np(expected_delta), rtol=RTOL)

    if bb_ is not None and base.bias is None:
        with pytest.raises(MergeError, match="no bias"):
            ops.merge_bias(None, bb_, scaling=s, name="layer")
        return
    w_, bias_ = arrays(namespace, base.weight, base.bias)
    merged_w = ops.merge(w_, delta)
    merged = peft_model.merge_and_unload().layer
    assert_close(merged_w, peft_np(merged.weight), rtol=RTOL)
    if bb_ is not None:
        assert_close(ops.merge_bias(bias_, bb_, scaling=s), peft_np(merged.bias), rtol=RTOL)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize(
    ("make_layer", "input_shape"),
    [
        pytest.param(lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1), (2, 4, 7), id="Conv1d"),
        pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), (2, 4, 7, 6), id="Conv2d"),
        pytest.param(lambda: nn.Conv3d(6, 6, 2, groups=3), (1, 6, 3, 4, 3), id="Conv3d-depthwise-ish"),
    ],
)
def test_grouped_conv_forward_matches_peft_and_merge_is_refused(namespace, make_layer, input_shape):
    conv = make_layer()
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model, layer = build(conv, r=conv.groups * 2, lora_alpha=8, lora_bias=True)
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, base_result = peft_model(x), base(x)
    x_, a_, b_, bb_, res_, w_ = arrays(namespace, x, a, b, layer.lora_B["default"].bias, base_result, base.weight)
    s = layer.scaling["default"]
    got = ops.conv_forward(res_, x_, a_, b_, bb_, scaling=s, stride=base.stride, padding=base.padding,
                           groups=base.groups)
    assert_close(got, peft_np(expected), rtol=RTOL)
    delta = ops.conv_delta_weight(a_, b_, scaling=s, groups=base.groups)
    with pytest.raises(MergeError, match="groups > 1"):
        ops.merge(w_, delta, name="layer")
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft_model.merge_and_unload()


# ------------------------------------------------------------------------------------------- bf16 base


def _within_one_bf16_ulp(actual, expected):
    actual, expected = actual.float(), expected.float()
    # spacing of bf16 at |expected|: 2^(exponent - 7)
    ulp = torch.ldexp(torch.ones_like(expected), torch.frexp(expected.abs().clamp_min(1e-30)).exponent - 8)
    assert bool(((actual - expected).abs() <= ulp).all()), (actual - expected).abs().max()


@pytest.mark.parametrize(
    ("kind", "make_layer", "make_input"),
    [
        pytest.param("linear", lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 6, generator=g), id="Linear"),
        pytest.param("conv", lambda: nn.Conv2d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 5, 5, generator=g),
                     id="Conv2d"),
        pytest.param("embedding", lambda: nn.Embedding(10, 6), lambda g: torch.tensor([[1, 2, 9]]), id="Embedding"),
    ],
)
def test_bf16_base_with_float32_adapter_matches_peft(kind, make_layer, make_input):
    peft_model, layer = build(make_layer(), dtype=torch.bfloat16, r=4, lora_alpha=8,
                              **({"lora_bias": True} if kind != "embedding" else {}))
    base = layer.get_base_layer()
    x = make_input(torch.Generator().manual_seed(4))
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    s = layer.scaling["default"]
    with torch.no_grad():
        expected, base_result = peft_model(x), base(x)
        expected_delta = layer.get_delta_weight("default")
        if kind == "embedding":
            a, b, bb = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], None
            got = ops.embedding_forward(base_result, x, a, b, scaling=s)
            delta = ops.embedding_delta_weight(a, b, scaling=s)
        else:
            a, b, bb = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias)
            if kind == "linear":
                got = ops.linear_forward(base_result, x, a, b, bb, scaling=s)
                delta = ops.delta_weight(a, b, scaling=s)
            else:
                got = ops.conv_forward(base_result, x, a, b, bb, scaling=s, stride=base.stride, padding=base.padding)
                delta = ops.conv_delta_weight(a, b, scaling=s)
    assert a.dtype == torch.float32 and expected.dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16
    _within_one_bf16_ulp(got, expected)
    assert delta.dtype == torch.float32
    assert_close(delta, peft_np(expected_delta), rtol=RTOL)

    weight = base.weight.detach().clone()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
    merged = peft_model.merge_and_unload().layer
    # peft merges Linear/Conv with `W += ΔW` (float32 add, bf16 store) and Embedding with ΔW cast first
    ours = ops.merge(weight, delta.to(torch.bfloat16) if kind == "embedding" else delta)
    assert ours.dtype == torch.bfloat16
    _within_one_bf16_ulp(ours, merged.weight)
    if bb is not None:
        _within_one_bf16_ulp(ops.merge_bias(bias, bb, scaling=s), merged.bias)

