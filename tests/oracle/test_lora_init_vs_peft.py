"""LoRA initialisations against real ``peft`` on tiny torch layers.

Two kinds of evidence:
* replay: a sampler drawing from torch's global generator, advanced past the draws peft makes for
  its adapter modules, reproduces peft's random inits exactly (same formulas, bounds and draw order);
* independent: PiSSA/OLoRA from NumPy's LAPACK and the random inits from a NumPy generator agree
  with peft (decompositions to fp32 rel err 1e-5 on sign-free quantities; draws statistically).
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest

from peftcore.errors import ConfigError
from peftcore.methods.lora.init import init_conv, init_embedding, init_linear
from peftcore.random import NumpySampler
from peftcore.testing import assert_close, to_numpy
from tests.reference import init as reference

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5


class TorchSampler:
    """Draws from torch's global generator with the calls torch's own initialisers make."""

    def uniform(self, shape, *, low, high, dtype):
        return torch.empty(shape, dtype=dtype).uniform_(low, high)

    def normal(self, shape, *, std, dtype):
        return torch.empty(shape, dtype=dtype).normal_(0.0, std)


class Tiny(nn.Module):
    def __init__(self, *, in_features=10, out_features=12, kernel=3, groups=1):
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)
        self.c1d = Conv1D(out_features, in_features)  # weight (in, out)
        self.emb = nn.Embedding(9, 5)
        self.conv = nn.Conv2d(4, 6, kernel, groups=groups)

    def forward(self, x):
        return self.lin(x)


def _peft(model, target, seed=0, **config):
    torch.manual_seed(seed)
    config.setdefault("fan_in_fan_out", target == "c1d")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=[target], **config))
    return getattr(wrapped.base_model.model, target)


def _factors(layer):
    if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"].detach(), layer.lora_embedding_B["default"].detach(), None
    bias = layer.lora_B["default"].bias
    return (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
            None if bias is None else bias.detach())


def _np(tensor):
    return tensor.detach().to(torch.float64).numpy()


def _scaling(r, lora_alpha, use_rslora):
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _separated(out_features, in_features, seed):
    k = min(out_features, in_features)
    return reference.with_spectrum(np.random.default_rng(seed), out_features, in_features, 1.0 + np.arange(k)[::-1])


# ------------------------------------------------------------------------------------------ replay


@pytest.mark.parametrize("mode", [True, False, "gaussian", "orthogonal", "pissa_niter_2"])
@pytest.mark.parametrize("target", ["lin", "c1d"])
def test_linear_inits_replay_peft_exactly(mode, target):
    model = Tiny()
    lora_bias = mode in (True, False)
    layer = _peft(model, target, r=4, lora_alpha=8, init_lora_weights=mode, lora_bias=lora_bias)
    peft_A, peft_B, peft_bias = _factors(layer)
    torch.manual_seed(0)
    if mode is not False:  # peft's adapter modules draw their torch defaults before the reset
        nn.Linear(10, 4, bias=False), nn.Linear(4, 12, bias=lora_bias)
    ours = init_linear(getattr(model, target).weight.detach(), r=4, init_lora_weights=mode, sampler=TorchSampler(),
                       scaling=2.0, fan_in_fan_out=target == "c1d", lora_bias=lora_bias)
    assert_close(ours.lora_A, _np(peft_A), rtol=RTOL, dtype=peft_A.dtype)
    assert_close(ours.lora_B, _np(peft_B), rtol=RTOL, dtype=peft_B.dtype)
    assert_close(ours.weight, _np(layer.base_layer.weight), rtol=RTOL)
    if lora_bias:
        assert_close(ours.lora_B_bias, _np(peft_bias), rtol=RTOL)


@pytest.mark.parametrize("mode", [True, False, "gaussian", "pissa", "olora"])
def test_embedding_inits_replay_peft_exactly(mode):
    model = Tiny()
    layer = _peft(model, "emb", r=4, lora_alpha=8, init_lora_weights=mode)
    peft_A, peft_B, _ = _factors(layer)
    torch.manual_seed(0)
    if mode is not False:  # peft draws randn A and B, then resets them
        torch.randn(4, 9), torch.randn(5, 4)
    ours = init_embedding(model.emb.weight.detach(), r=4, init_lora_weights=mode, sampler=TorchSampler(), scaling=2.0)
    assert_close(ours.lora_A, _np(peft_A), rtol=RTOL, dtype=peft_A.dtype)
    assert_close(ours.lora_B, _np(peft_B), rtol=RTOL, dtype=peft_B.dtype)
    assert_close(ours.weight, _np(layer.base_layer.weight), rtol=0, atol=0)


@pytest.mark.parametrize("mode", [True, False, "gaussian"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_inits_replay_peft_exactly(mode, groups):
    model = Tiny(groups=groups)
    lora_bias = mode in (True, False)
    expect = pytest.warns(UserWarning, match="groups > 1") if groups > 1 else contextlib.nullcontext()
    with expect:
        layer = _peft(model, "conv", r=4, lora_alpha=8, init_lora_weights=mode, lora_bias=lora_bias)
    peft_A, peft_B, peft_bias = _factors(layer)
    torch.manual_seed(0)
    if mode is not False:
        nn.Conv2d(4, 4, 3, bias=False), nn.Conv2d(4, 6, 1, groups=groups, bias=lora_bias)
    ours = init_conv(model.conv.weight.detach(), r=4, init_lora_weights=mode, sampler=TorchSampler(), scaling=2.0,
                     groups=groups, lora_bias=lora_bias)
    assert_close(ours.lora_A, _np(peft_A), rtol=RTOL, dtype=peft_A.dtype)
    assert_close(ours.lora_B, _np(peft_B), rtol=RTOL, dtype=peft_B.dtype)
    if lora_bias:
        assert_close(ours.lora_B_bias, _np(peft_bias), rtol=RTOL)


@pytest.mark.parametrize("mode", [True, "gaussian", "orthogonal", "pissa", "olora"])
def test_bf16_base_gives_float32_adapters_like_peft(mode):
    model = Tiny().to(torch.bfloat16)
    layer = _peft(model, "lin", r=4, lora_alpha=8, init_lora_weights=mode)
    peft_A, peft_B, _ = _factors(layer)
    assert peft_A.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    torch.manual_seed(0)
    nn.Linear(10, 4, bias=False), nn.Linear(4, 12, bias=False)
    ours = init_linear(model.lin.weight.detach(), r=4, init_lora_weights=mode, sampler=TorchSampler(), scaling=2.0)
    assert_close(ours.lora_A, _np(peft_A), rtol=RTOL, dtype=torch.float32)
    assert_close(ours.lora_B, _np(peft_B), rtol=RTOL, dtype=torch.float32)
    assert_close(ours.weight, _np(layer.base_layer.weight), dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------ PiSSA / OLoRA


def _namespaces():
    import array_api_compat.numpy as xnp

    return [pytest.param(lambda w: xnp.asarray(w), id="numpy"), pytest.param(torch.asarray, id="torch")]


@pytest.mark.parametrize("to_backend", _namespaces())
@pytest.mark.parametrize(
    ("mode", "target", "use_rslora"),
    # peft's olora ignores fan_in_fan_out, so Conv1D olora is covered by test_olora_conv1d_deviation.
    [("pissa", "lin", False), ("pissa", "lin", True), ("pissa", "c1d", False), ("olora", "lin", False),
     ("olora", "lin", True)],
)
def test_pissa_olora_match_peft(to_backend, mode, target, use_rslora):
    model = Tiny()
    base = _separated(12, 10, seed=3).astype(np.float32)
    stored = base.T if target == "c1d" else base
    with torch.no_grad():
        getattr(model, target).weight.copy_(torch.from_numpy(np.ascontiguousarray(stored)))
    r, lora_alpha = 4, 6
    layer = _peft(model, target, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, init_lora_weights=mode)
    peft_A, peft_B, _ = _factors(layer)
    ours = init_linear(to_backend(stored.copy()), r=r, init_lora_weights=mode, sampler=NumpySampler(0),
                       scaling=_scaling(r, lora_alpha, use_rslora), fan_in_fan_out=target == "c1d")
    assert_close(ours.weight, _np(layer.base_layer.weight), rtol=RTOL, dtype="float32")
    assert_close(ours.lora_B @ ours.lora_A, _np(peft_B @ peft_A), rtol=RTOL)
    # Factors agree up to the sign of each rank-one component.
    assert_close(abs(ours.lora_A), np.abs(_np(peft_A)), rtol=RTOL)
    assert_close(abs(ours.lora_B), np.abs(_np(peft_B)), rtol=RTOL)


@pytest.mark.parametrize("to_backend", _namespaces())
def test_pissa_niter_matches_peft_on_a_low_rank_weight(to_backend):
    model = Tiny()
    rng = np.random.default_rng(5)
    low_rank = reference.with_spectrum(rng, 12, 10, [3.0, 2.0, 1.0]).astype(np.float32)
    with torch.no_grad():
        model.lin.weight.copy_(torch.from_numpy(low_rank))
    layer = _peft(model, "lin", r=4, lora_alpha=8, init_lora_weights="pissa_niter_1")
    peft_A, peft_B, _ = _factors(layer)
    ours = init_linear(to_backend(low_rank.copy()), r=4, init_lora_weights="pissa_niter_1", sampler=NumpySampler(1),
                       scaling=2.0)
    assert_close(ours.lora_B @ ours.lora_A, _np(peft_B @ peft_A), rtol=RTOL)
    assert_close(ours.weight, _np(layer.base_layer.weight), rtol=0, atol=RTOL * np.abs(low_rank).max())


def test_olora_conv1d_deviation():
    """peft factors a Conv1D's stored ``(in, out)`` weight; peftcore factors ``W' (out, in)``.

    peft's result changes the layer's output at init (and fails for in != out); ours keeps it. If this
    test fails, peft has fixed olora for fan_in_fan_out and peftcore matches it again.
    """
    model = Tiny(in_features=6, out_features=6)
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model.c1d(x)
    layer = _peft(model, "c1d", r=2, lora_alpha=4, init_lora_weights="olora")
    with torch.no_grad():
        assert not torch.allclose(layer(x), before, atol=1e-4)
    ours = init_linear(model.c1d.weight.detach(), r=2, init_lora_weights="olora", sampler=NumpySampler(0),
                       scaling=2.0, fan_in_fan_out=True)
    restored = ours.weight + 2.0 * (ours.lora_B @ ours.lora_A).T
    assert_close(restored, _np(model.c1d.weight), rtol=RTOL)


# ------------------------------------------------------------------------------------------ statistics


def _same_distribution(ours, theirs, label, *, bound=None):
    ours, theirs = to_numpy(ours).ravel(), _np(theirs).ravel()
    distance = reference.ks_two_sample(ours, theirs)
    assert distance < reference.ks_critical(ours.size, theirs.size), f"{label}: KS distance {distance}"
    if bound is not None:
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound, f"{label}: bound {bound}"


@pytest.mark.parametrize("mode", [True, False, "gaussian"])
def test_linear_random_inits_match_peft_statistically(mode):
    in_features, out_features, r = 256, 300, 16
    model = Tiny(in_features=in_features, out_features=out_features)
    lora_bias = mode in (True, False)
    layer = _peft(model, "lin", seed=1, r=r, lora_alpha=16, init_lora_weights=mode, lora_bias=lora_bias)
    peft_A, peft_B, peft_bias = _factors(layer)
    ours = init_linear(model.lin.weight.detach().numpy(), r=r, init_lora_weights=mode, sampler=NumpySampler(2),
                       scaling=1.0, lora_bias=lora_bias)
    assert ours.lora_A.shape == tuple(peft_A.shape) and ours.lora_B.shape == tuple(peft_B.shape)
    assert ours.lora_A.dtype == np.float32 and ours.lora_B.dtype == np.float32
    _same_distribution(ours.lora_A, peft_A, "lora_A",
                       bound=None if mode == "gaussian" else reference.kaiming_bound(in_features))
    if mode is False:
        _same_distribution(ours.lora_B, peft_B, "lora_B", bound=1 / math.sqrt(r))
        _same_distribution(ours.lora_B_bias, peft_bias, "lora_B_bias", bound=1 / math.sqrt(r))
    else:
        assert not np.any(ours.lora_B) and not torch.any(peft_B)
        if lora_bias:
            assert not np.any(ours.lora_B_bias) and not torch.any(peft_bias)


@pytest.mark.parametrize("mode", [True, False])
def test_embedding_and_conv_random_inits_match_peft_statistically(mode):
    model = Tiny()
    model.emb = nn.Embedding(500, 300)
    model.conv = nn.Conv2d(64, 300, 3)
    emb = _peft(model, "emb", seed=3, r=16, lora_alpha=16, init_lora_weights=mode)
    conv = _peft(model, "conv", seed=4, r=16, lora_alpha=16, init_lora_weights=mode)
    ours_emb = init_embedding(model.emb.weight.detach().numpy(), r=16, init_lora_weights=mode,
                              sampler=NumpySampler(5), scaling=1.0)
    ours_conv = init_conv(model.conv.weight.detach().numpy(), r=16, init_lora_weights=mode, sampler=NumpySampler(6),
                          scaling=1.0)
    emb_A, emb_B, _ = _factors(emb)
    conv_A, conv_B, _ = _factors(conv)
    _same_distribution(ours_emb.lora_B, emb_B, "lora_embedding_B")
    _same_distribution(ours_conv.lora_A, conv_A, "conv lora_A", bound=reference.kaiming_bound(64 * 9))
    if mode:
        assert not np.any(ours_emb.lora_A) and not torch.any(emb_A)
        assert not np.any(ours_conv.lora_B) and not torch.any(conv_B)
    else:
        _same_distribution(ours_emb.lora_A, emb_A, "lora_embedding_A")
        _same_distribution(ours_conv.lora_B, conv_B, "conv lora_B", bound=1 / math.sqrt(16))


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("target", "mode", "r"), [("conv", "pissa", 4), ("conv", "olora", 4), ("lin", "orthogonal", 3)]
)
def test_refused_where_peft_refuses(target, mode, r):
    model = Tiny()
    with pytest.raises(ValueError):
        _peft(model, target, r=r, init_lora_weights=mode)
    init = init_conv if target == "conv" else init_linear
    with pytest.raises(ConfigError):
        init(getattr(model, target).weight.detach(), r=r, init_lora_weights=mode, sampler=NumpySampler(0), scaling=1.0)
