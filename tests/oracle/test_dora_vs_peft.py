"""DoRA against real ``peft`` 0.21.2 DoRA layers: magnitude init, forward (eval and dropout), gradients, merge.

peft's layers are built by ``get_peft_model`` with ``use_dora=True, init_lora_weights=False`` (non-zero B), and
the magnitude is then moved off its initial value so ``g = m/‖W'+sBA‖ ≠ 1``. With dropout in train mode peft
recomputes the base output on the dropped input; its dropout is swapped for a fixed mask so ours sees the same
input. Gradients of m, A, B come from torch autograd through ``peftcore.methods.lora.dora`` on torch tensors.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers_utils = pytest.importorskip("transformers.pytorch_utils")

from torch import nn  # noqa: E402

from peftcore.methods.lora import dora, ops  # noqa: E402
from peftcore.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5
NAMESPACES = ["torch", "numpy"]
DROPOUT = 0.4


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class FixedDropout(nn.Module):
    """Dropout with a known mask (already divided by 1 − p), so both sides see the same dropped input."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


def build(layer, *, dtype=torch.float32, warns=None, **config):
    """``get_peft_model`` around one DoRA layer; returns (peft model, its LoRA layer), magnitude moved off init."""
    torch.manual_seed(0)
    lora_config = peft.LoraConfig(target_modules=["layer"], use_dora=True, init_lora_weights=False, **config)
    if warns is None:
        peft_model = peft.get_peft_model(Wrap(layer).to(dtype), lora_config)
    else:
        with pytest.warns(UserWarning, match=warns):
            peft_model = peft.get_peft_model(Wrap(layer).to(dtype), lora_config)
    return peft_model, peft_model.base_model.model.layer


def move_magnitude(layer, adapter="default"):
    """Scale the magnitude by fixed factors in [0.6, 1.4]; returns peft's initial magnitude (NumPy)."""
    magnitude = layer.lora_magnitude_vector[adapter].weight
    initial = peft_np(magnitude).copy()
    with torch.no_grad():
        magnitude.mul_(torch.linspace(0.6, 1.4, magnitude.numel()).reshape(magnitude.shape))
    return initial


def arrays(namespace, *tensors):
    """The tensors as ``namespace`` arrays (detached torch copies, or NumPy copies)."""
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


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def factors(layer, kind, adapter="default"):
    if kind == "embedding":
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def peft_run(peft_model, layer, kind, x, *, mode, cotangent):
    """peft's output and its gradients wrt (m, A, B); ``mode`` 'eval' or 'dropout' (train with a fixed mask)."""
    if mode == "dropout":
        mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) > DROPOUT) / (1 - DROPOUT)
        layer.lora_dropout["default"] = FixedDropout(mask.to(x.dtype))
        peft_model.train()
    else:
        peft_model.eval()
    out = peft_model(x)
    (out * cotangent).sum().backward()
    a, b = factors(layer, kind)
    grads = [layer.lora_magnitude_vector["default"].weight.grad, a.grad, b.grad]
    dropped = x * layer.lora_dropout["default"].mask if mode == "dropout" else x
    return out, [peft_np(g) for g in grads], dropped


def check_against_peft(ours, peft_model, layer, kind, x, mode):
    """Run ``ours(result, x_lora, m, A, B, namespace, recompute_base)`` on torch (with grads) and NumPy."""
    base = layer.get_base_layer()
    with torch.no_grad():
        base_result = base(x)
    magnitude = layer.lora_magnitude_vector["default"].weight
    a, b = factors(layer, kind)
    params = (magnitude.detach().clone(), a.detach().clone(), b.detach().clone())
    cotangent = torch.randn(base_result.shape, generator=torch.Generator().manual_seed(5))
    expected, expected_grads, dropped = peft_run(peft_model, layer, kind, x, mode=mode, cotangent=cotangent)
    recompute = mode == "dropout"

    m_, a_, b_ = leaves(*params)
    got = ours(base_result, dropped.detach(), m_, a_, b_, "torch", recompute)
    assert_close(got, peft_np(expected), rtol=RTOL, err_msg="torch forward")
    (got * cotangent).sum().backward()
    for name, ours_grad, want in zip(("magnitude", "A", "B"), (m_.grad, a_.grad, b_.grad), expected_grads):
        assert_close(ours_grad, want, rtol=RTOL, err_msg=f"gradient wrt {name}")

    got = ours(*arrays("numpy", base_result, dropped), *arrays("numpy", *params), "numpy", recompute)
    assert_close(got, peft_np(expected), rtol=RTOL, err_msg="numpy forward")


# ------------------------------------------------------------------------------------------- Linear


LINEAR_LAYERS = [
    pytest.param(lambda: nn.Linear(6, 5), False, id="Linear"),
    pytest.param(lambda: nn.Linear(6, 5, bias=False), False, id="Linear-nobias"),
    pytest.param(lambda: transformers_utils.Conv1D(5, 6), True, id="gpt2-Conv1D"),
]
LINEAR_CONFIGS = [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=8, use_rslora=True)]


def _build_linear(make_layer, is_conv1d, **config):
    return build(make_layer(), warns="fan_in_fan_out" if is_conv1d else None, lora_dropout=DROPOUT, **config)


@pytest.mark.parametrize("mode", ["eval", "dropout"])
@pytest.mark.parametrize("config", LINEAR_CONFIGS, ids=["r2", "r4-rslora"])
@pytest.mark.parametrize(("make_layer", "is_conv1d"), LINEAR_LAYERS)
def test_linear_forward_and_gradients_match_peft(make_layer, is_conv1d, config, mode):
    peft_model, layer = _build_linear(make_layer, is_conv1d, **config)
    move_magnitude(layer)
    base, s = layer.get_base_layer(), layer.scaling["default"]
    x = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(1))

    def ours(result, x_lora, m, a, b, namespace, recompute_base):
        w, bias = arrays(namespace, base.weight, base.bias)
        return dora.linear_forward(result, x_lora, a, b, m, w, bias, scaling=s, fan_in_fan_out=is_conv1d,
                                   recompute_base=recompute_base)

    check_against_peft(ours, peft_model, layer, "linear", x, mode)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize(("make_layer", "is_conv1d"), LINEAR_LAYERS)
def test_linear_magnitude_and_merge_match_peft(namespace, make_layer, is_conv1d):
    peft_model, layer = _build_linear(make_layer, is_conv1d, r=3, lora_alpha=6)
    base = layer.get_base_layer()
    w_, a_, b_ = arrays(namespace, base.weight, *factors(layer, "linear"))
    s = layer.scaling["default"]
    initial = move_magnitude(layer)
    assert_close(dora.magnitude_init(w_, a_, b_, scaling=s, fan_in_fan_out=is_conv1d), initial, rtol=RTOL)

    (m_,) = arrays(namespace, layer.lora_magnitude_vector["default"].weight)
    delta = ops.delta_weight(a_, b_, scaling=s, fan_in_fan_out=is_conv1d)
    merged, norm = dora.merge(w_, delta, m_, safe=True, name="layer", fan_in_fan_out=is_conv1d)
    restored = dora.unmerge(merged, delta, m_, norm, fan_in_fan_out=is_conv1d)
    peft_model.merge_adapter()
    assert_close(merged, peft_np(base.weight), rtol=RTOL, err_msg="merge_adapter")
    peft_model.unmerge_adapter()
    assert_close(restored, peft_np(base.weight), rtol=RTOL, err_msg="unmerge_adapter")
    unloaded = peft_model.merge_and_unload().layer
    assert_close(merged, peft_np(unloaded.weight), rtol=RTOL, err_msg="merge_and_unload")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_two_merged_dora_adapters_match_peft(namespace):
    peft_model, layer = build(nn.Linear(6, 5), r=2, lora_alpha=4)
    peft_model.add_adapter("other", peft.LoraConfig(target_modules=["layer"], use_dora=True, init_lora_weights=False,
                                                    r=3, lora_alpha=3))
    move_magnitude(layer)
    move_magnitude(layer, "other")
    base = layer.get_base_layer()
    (w_,) = arrays(namespace, base.weight)
    current = w_
    for adapter in ("default", "other"):
        a_, b_, m_ = arrays(namespace, *factors(layer, "linear", adapter), layer.lora_magnitude_vector[adapter].weight)
        delta = ops.delta_weight(a_, b_, scaling=layer.scaling[adapter])
        # the second adapter's norm is taken on the base weight, as peft 0.21 does
        current, _ = dora.merge(current, delta, m_, w_)
    merged = peft_model.merge_and_unload(adapter_names=["default", "other"]).layer
    assert_close(current, peft_np(merged.weight), rtol=RTOL)


# ----------------------------------------------------------------------------------------- Embedding


def _embedding(*, embed_scale=None, max_norm=None):
    class ScaledEmbedding(nn.Embedding):  # like Gemma3TextScaledWordEmbedding
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

        def forward(self, input_ids):
            return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)

    cls = nn.Embedding if embed_scale is None else ScaledEmbedding
    return cls(10, 6, padding_idx=0, max_norm=max_norm)


INDICES = torch.tensor([[0, 3, 9, 3], [5, 0, 1, 2]])


@pytest.mark.parametrize("embed_scale", [None, 2.5], ids=["plain", "embed_scale"])
def test_embedding_forward_and_gradients_match_peft(embed_scale):
    peft_model, layer = build(_embedding(embed_scale=embed_scale), r=3, lora_alpha=6)
    move_magnitude(layer)
    base, s = layer.get_base_layer(), layer.scaling["default"]

    def ours(result, indices, m, a, b, namespace, recompute_base):
        (w,) = arrays(namespace, base.weight)
        return dora.embedding_forward(result, indices, a, b, m, w, scaling=s, embed_scale=embed_scale, padding_idx=0)

    check_against_peft(ours, peft_model, layer, "embedding", INDICES, "eval")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_embedding_max_norm_forward_matches_peft(namespace):
    peft_model, layer = build(_embedding(max_norm=1.2), r=3, lora_alpha=6)
    move_magnitude(layer)
    base, s = layer.get_base_layer(), layer.scaling["default"]
    # max_norm lookups renormalise their table in place: peft's norm sees A before its lookup and W after the
    # base lookup, so take A before anything runs and W after
    a_, b_, m_ = arrays(namespace, *factors(layer, "embedding"), layer.lora_magnitude_vector["default"].weight)
    with torch.no_grad():
        res_, idx_ = arrays(namespace, base(INDICES), INDICES)
        expected = peft_model.eval()(INDICES)
    (w_,) = arrays(namespace, base.weight)
    got = dora.embedding_forward(res_, idx_, a_, b_, m_, w_, scaling=s, max_norm=1.2, padding_idx=0)
    assert_close(got, peft_np(expected), rtol=RTOL)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_embedding_magnitude_and_merge_match_peft(namespace):
    peft_model, layer = build(_embedding(), r=3, lora_alpha=6)
    base, s = layer.get_base_layer(), layer.scaling["default"]
    w_, a_, b_ = arrays(namespace, base.weight, *factors(layer, "embedding"))
    initial = move_magnitude(layer)
    assert_close(dora.embedding_magnitude_init(w_, a_, b_, scaling=s), initial, rtol=RTOL)

    (m_,) = arrays(namespace, layer.lora_magnitude_vector["default"].weight)
    delta = ops.embedding_delta_weight(a_, b_, scaling=s)
    merged, norm = dora.embedding_merge(w_, delta, m_, safe=True, name="layer")
    restored = dora.embedding_unmerge(merged, delta, m_, norm)
    peft_model.merge_adapter()
    assert_close(merged, peft_np(base.weight), rtol=RTOL, err_msg="merge_adapter")
    peft_model.unmerge_adapter()
    assert_close(restored, peft_np(base.weight), rtol=RTOL, err_msg="unmerge_adapter")
    unloaded = peft_model.merge_and_unload().layer
    assert_close(merged, peft_np(unloaded.weight), rtol=RTOL, err_msg="merge_and_unload")


# ---------------------------------------------------------------------------------------------- Conv


CONV_CASES = [
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9), id="Conv1d-stride-pad"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3), (2, 4, 6, 5), id="Conv2d"),
    pytest.param(lambda: nn.Conv2d(4, 6, (3, 2), padding="same", dilation=2, bias=False), (2, 4, 7, 6),
                 id="Conv2d-same-dilated-nobias"),
    pytest.param(lambda: nn.Conv3d(4, 6, 2, stride=2, padding=1), (1, 4, 5, 4, 4), id="Conv3d-stride-pad"),
]
GROUPED_CASES = [
    pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 5, 5), id="Conv2d-groups2"),
    pytest.param(lambda: nn.Conv1d(6, 6, 3, groups=3), (2, 6, 7), id="Conv1d-groups3"),
]


def _conv_ours(base, s):
    def ours(result, x_lora, m, a, b, namespace, recompute_base):
        w, bias = arrays(namespace, base.weight, base.bias)
        return dora.conv_forward(result, x_lora, a, b, m, w, bias, scaling=s, stride=base.stride, padding=base.padding,
                                 dilation=base.dilation, groups=base.groups, recompute_base=recompute_base)

    return ours


@pytest.mark.parametrize("mode", ["eval", "dropout"])
@pytest.mark.parametrize(("make_layer", "input_shape"), CONV_CASES + GROUPED_CASES)
def test_conv_forward_and_gradients_match_peft(make_layer, input_shape, mode):
    conv = make_layer()
    r = 2 * conv.groups
    peft_model, layer = build(conv, warns="groups > 1" if conv.groups > 1 else None, r=r, lora_alpha=2 * r,
                              lora_dropout=DROPOUT)
    move_magnitude(layer)
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(2))
    check_against_peft(_conv_ours(layer.get_base_layer(), layer.scaling["default"]), peft_model, layer, "conv", x,
                       mode)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize(("make_layer", "input_shape"), CONV_CASES + GROUPED_CASES)
def test_conv_magnitude_and_merge_match_peft(namespace, make_layer, input_shape):
    conv = make_layer()
    r = 2 * conv.groups
    peft_model, layer = build(conv, warns="groups > 1" if conv.groups > 1 else None, r=r, lora_alpha=3 * r)
    base, s = layer.get_base_layer(), layer.scaling["default"]
    w_, a_, b_ = arrays(namespace, base.weight, *factors(layer, "conv"))
    initial = move_magnitude(layer)
    # for groups > 1 this is peft's reshaped B·A product, reproduced as is
    assert_close(dora.conv_magnitude_init(w_, a_, b_, scaling=s), initial, rtol=RTOL)
    if conv.groups > 1:
        return  # peft refuses to merge grouped convs; ops.conv_delta_weight/dora.conv_merge refuse too

    (m_,) = arrays(namespace, layer.lora_magnitude_vector["default"].weight)
    delta = ops.conv_delta_weight(a_, b_, scaling=s)
    merged, norm = dora.conv_merge(w_, delta, m_, safe=True, name="layer")
    restored = dora.conv_unmerge(merged, delta, m_, norm)
    peft_model.merge_adapter()
    assert_close(merged, peft_np(base.weight), rtol=RTOL, err_msg="merge_adapter")
    peft_model.unmerge_adapter()
    assert_close(restored, peft_np(base.weight), rtol=RTOL, err_msg="unmerge_adapter")
    unloaded = peft_model.merge_and_unload().layer
    assert_close(merged, peft_np(unloaded.weight), rtol=RTOL, err_msg="merge_and_unload")


# ----------------------------------------------------------------------------------------- bf16 base


def _within_one_bf16_ulp(actual, expected):
    actual, expected = actual.float(), expected.float()
    ulp = torch.ldexp(torch.ones_like(expected), torch.frexp(expected.abs().clamp_min(1e-30)).exponent - 8)
    assert bool(((actual - expected).abs() <= ulp).all()), (actual - expected).abs().max()


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_bf16_base_with_float32_adapter_matches_peft(kind):
    make = {"linear": lambda: nn.Linear(6, 5), "conv": lambda: nn.Conv2d(4, 6, 3, padding=1),
            "embedding": lambda: nn.Embedding(10, 6)}[kind]
    peft_model, layer = build(make(), dtype=torch.bfloat16, r=4, lora_alpha=8)
    move_magnitude(layer)
    base, s = layer.get_base_layer(), layer.scaling["default"]
    a, b = factors(layer, kind)
    m = layer.lora_magnitude_vector["default"].weight
    g = torch.Generator().manual_seed(4)
    x = {"linear": lambda: torch.randn(3, 6, generator=g), "conv": lambda: torch.randn(2, 4, 5, 5, generator=g),
         "embedding": lambda: INDICES}[kind]()
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    with torch.no_grad():
        expected, result = peft_model.eval()(x), base(x)
        if kind == "linear":
            got = dora.linear_forward(result, x, a, b, m, base.weight, base.bias, scaling=s)
        elif kind == "conv":
            got = dora.conv_forward(result, x, a, b, m, base.weight, base.bias, scaling=s, stride=base.stride,
                                    padding=base.padding)
        else:
            got = dora.embedding_forward(result, x, a, b, m, base.weight, scaling=s)
    assert a.dtype == m.dtype == torch.float32 and expected.dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16
    _within_one_bf16_ulp(got, expected)
