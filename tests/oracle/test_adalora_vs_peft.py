"""AdaLoRA against real peft: config parity, SVD layers, orthogonal regulariser, the rank allocator over a
whole schedule, and save pruning / load resizing."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from peftcore.config import PeftConfig  # noqa: E402
from peftcore.constants import CONFIG_NAME  # noqa: E402
from peftcore.errors import ConfigError  # noqa: E402
from peftcore.methods.adalora import AdaLoraConfig  # noqa: E402
from peftcore.methods.adalora import allocator as alloc  # noqa: E402
from peftcore.methods.adalora import ops  # noqa: E402
from peftcore.random import NumpySampler  # noqa: E402
from peftcore.testing import assert_close  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5
INIT_R, TARGET_R, ALPHA = 4, 2, 16.0
SCHEDULE = dict(tinit=2, tfinal=3, total_step=12, deltaT=2, beta1=0.8, beta2=0.7)
TARGETS = ["q", "v", "c1", "conv"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _warnings_of(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return sorted(str(w.message) for w in caught if issubclass(w.category, UserWarning))


def _default(field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


# -- config -------------------------------------------------------------------------------------------


def test_fields_order_and_defaults_equal_peft():
    theirs = [(f.name, _default(f)) for f in dataclasses.fields(peft.AdaLoraConfig) if f.name != "runtime_config"]
    ours = [(f.name, _default(f)) for f in dataclasses.fields(AdaLoraConfig) if f.name != "unknown_fields"]
    assert ours == theirs


CONFIGS = [
    dict(total_step=100),
    dict(total_step=1000, init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5, lora_alpha=32,
         target_modules=["q"], task_type="SEQ_2_SEQ_LM", lora_dropout=0.1),
    dict(total_step=50, beta1=0.9, beta2=0.95, orth_reg_weight=0.0, target_modules="all-linear", r=4),
    dict(total_step=10, rank_pattern={"model.q.lora_E": [True, False, True]}, inference_mode=True),
    dict(total_step=10, init_lora_weights=False, fan_in_fan_out=True, target_modules=["c_attn"]),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(k))
def test_json_is_byte_identical_and_loads_both_ways(kwargs, tmp_path):
    theirs = _quiet(peft.AdaLoraConfig, **kwargs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = _quiet(AdaLoraConfig, **kwargs)
    ours.save_pretrained(tmp_path / "ours")
    text = (tmp_path / "peft" / CONFIG_NAME).read_text()
    assert (tmp_path / "ours" / CONFIG_NAME).read_text() == text
    assert _quiet(PeftConfig.from_pretrained, tmp_path / "peft") == ours
    loaded = _quiet(peft.PeftConfig.from_pretrained, str(tmp_path / "ours"))
    assert type(loaded) is peft.AdaLoraConfig and loaded.to_dict() == theirs.to_dict()


@pytest.mark.parametrize("kwargs", [
    dict(total_step=10, r=4),
    dict(total_step=10, r=16, init_lora_weights="eva"),
    dict(total_step=10, use_rslora=True, rank_pattern={"m.lora_E": [True]}, init_lora_weights="olora"),
], ids=str)
def test_same_warnings_as_peft(kwargs):
    ours = _warnings_of(AdaLoraConfig, **kwargs)
    assert ours and ours == _warnings_of(peft.AdaLoraConfig, **kwargs)


REJECTED = [
    dict(),
    dict(total_step=0),
    dict(total_step=-3),
    dict(total_step=10, tinit=6, tfinal=4),
    dict(total_step=10, orth_reg_weight=-1.0),
    dict(total_step=10, use_dora=True),
    dict(total_step=10, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
    dict(total_step=10, layers_pattern="layers"),
    dict(total_step=10, target_modules=".*q", layers_to_transform=[0]),
]


@pytest.mark.parametrize("kwargs", REJECTED, ids=str)
def test_rejected_by_both_with_the_same_message(kwargs):
    with pytest.raises(ValueError) as theirs:
        _quiet(peft.AdaLoraConfig, **kwargs)
    with pytest.raises(ConfigError) as ours:
        _quiet(AdaLoraConfig, **kwargs)
    assert str(theirs.value).replace("PeftType.", "").split(".")[0] == str(ours.value).split(".")[0]


# -- a tiny model with every supported layer ------------------------------------------------------------


class _Output:
    def __init__(self, loss):
        self.loss = loss


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 5)
        self.v = torch.nn.Linear(5, 6)
        self.c1 = Conv1D(4, 6)  # weight (in=6, out=4)
        self.conv = torch.nn.Conv2d(2, 3, (3, 2), stride=2, padding=1, dilation=(1, 2))

    def forward(self, x, img):
        h = self.c1(self.v(self.q(x)))
        return _Output((h**2).mean() + (self.conv(img) ** 2).mean())


def _peft_model(seed=0, **overrides):
    torch.manual_seed(seed)
    base = Tiny()
    for p in base.parameters():
        torch.nn.init.normal_(p)
    pristine = copy.deepcopy(base)
    kwargs = dict(target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, **SCHEDULE)
    kwargs.update(overrides)
    model = _quiet(peft.get_peft_model, base, peft.AdaLoraConfig(**kwargs))
    return model, pristine


def _randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))


def _factors(layer):
    return [getattr(layer, c)["default"].detach() for c in ("lora_A", "lora_E", "lora_B")]


@pytest.mark.parametrize("name", ["q", "c1"])
def test_svd_linear_and_conv1d_forward_delta_merge(name):
    model, _ = _peft_model()
    _randomise(model, 1)
    layer = getattr(model.base_model.model, name)
    fan_in_fan_out = name == "c1"
    assert layer.fan_in_fan_out is fan_in_fan_out
    a, e, b = _factors(layer)
    s = ops.scaling(INIT_R, ALPHA)
    x = torch.randn(2, 3, a.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(x)
        ours = ops.linear_forward(layer.base_layer(x), x, a, e, b, scaling=s)
        assert_close(ours, expected.numpy(), rtol=RTOL)
        delta = ops.delta_weight(a, e, b, scaling=s, fan_in_fan_out=fan_in_fan_out)
        assert_close(delta, layer.get_delta_weight("default").numpy(), rtol=RTOL)
        weight = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert_close(ops.merge(weight, delta), layer.base_layer.weight.numpy(), rtol=RTOL)
        assert_close(layer(x), expected.numpy(), rtol=RTOL)
        layer.unmerge()
        assert_close(ops.unmerge(ops.merge(weight, delta), delta), layer.base_layer.weight.numpy(), rtol=RTOL)


def test_svd_conv2d_forward_delta_merge():
    model, _ = _peft_model()
    _randomise(model, 3)
    layer = model.base_model.model.conv
    base = layer.base_layer
    a, e, b = _factors(layer)
    s = ops.scaling(INIT_R, ALPHA)
    x = torch.randn(2, 2, 7, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(scaling=s, weight_shape=tuple(base.weight.shape))
    with torch.no_grad():
        expected = layer(x)
        ours = ops.conv_forward(base(x), x, a, e, b, stride=base.stride, padding=base.padding,
                                dilation=base.dilation, groups=base.groups, **kw)
        assert_close(ours, expected.numpy(), rtol=RTOL)
        delta = ops.conv_delta_weight(a, e, b, **kw)
        assert_close(delta, layer.get_delta_weight("default").numpy(), rtol=RTOL)
        weight = base.weight.detach().clone()
        layer.merge()
        assert_close(ops.merge(weight, delta), base.weight.numpy(), rtol=RTOL)


@pytest.mark.parametrize("alpha", [0.0, -2.0])
def test_non_positive_alpha_scales_by_rank(alpha):
    model, _ = _peft_model(lora_alpha=alpha)
    _randomise(model, 5)
    layer = model.base_model.model.q
    a, e, b = _factors(layer)
    delta = ops.delta_weight(a, e, b, scaling=ops.scaling(INIT_R, alpha))
    assert_close(delta, layer.get_delta_weight("default").detach().numpy(), rtol=RTOL)


def test_init_matches_peft_distribution():
    model, _ = _peft_model(init_r=30)
    a, e, b = _factors(model.base_model.model.q)
    assert not torch.any(e)
    ours = ops.init_svd(6, 5, r=30, init_lora_weights=True, sampler=NumpySampler(0), dtype=np.float32)
    assert tuple(ours.lora_A.shape) == tuple(a.shape) and tuple(ours.lora_B.shape) == tuple(b.shape)
    assert float(a.std()) == pytest.approx(0.02, rel=0.3) and float(np.std(ours.lora_A)) == pytest.approx(0.02, rel=0.3)


def test_orth_regulariser_equals_peft_loss_term():
    model, _ = _peft_model(orth_reg_weight=0.7)
    _randomise(model, 6)
    gen = torch.Generator().manual_seed(7)
    x, img = torch.randn(2, 6, generator=gen), torch.randn(1, 2, 6, 6, generator=gen)
    with torch.no_grad():
        total = model(x=x, img=img).loss
        inner = model.base_model.model(x, img).loss
        params = dict(model.base_model.model.named_parameters())
        reg = ops.orth_regularizer(params, adapter_name="default")
    assert_close(inner + 0.7 * reg, total.numpy(), rtol=RTOL)


# -- the rank allocator over a whole schedule, then save and load -----------------------------------------


def test_allocator_matches_peft_step_for_step_then_save_and_load(tmp_path):
    model, pristine = _peft_model(seed=8)
    _randomise(model, 9)
    inner = model.base_model.model
    lora = {n: p for n, p in inner.named_parameters() if "lora_" in n}
    ours = {n: p.detach().clone() for n, p in lora.items()}
    config = AdaLoraConfig(target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, **SCHEDULE)
    schedule = alloc.make_schedule(ours, config=config, adapter_name="default")
    allocator = model.base_model.rankallocator
    assert (schedule.init_bgt, schedule.target_bgt) == (allocator.init_bgt, allocator.target_bgt) == (16, 8)
    state = alloc.init_state(ours, adapter_name="default")
    gen = torch.Generator().manual_seed(10)
    masked_steps = []
    for step in range(SCHEDULE["total_step"] + 4):
        assert alloc.budget_schedule(step, schedule=schedule) == allocator.budget_schedule(step), step
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in lora.items()}
        for n, p in lora.items():
            p.grad = grads[n].clone()
        before = copy.deepcopy(model.peft_config["default"].rank_pattern)
        model.base_model.update_and_allocate(step)
        state, ours, pattern = alloc.update_and_allocate(state, ours, grads, step=step, schedule=schedule,
                                                         adapter_name="default")
        peft_pattern = model.peft_config["default"].rank_pattern
        if pattern is None:
            assert peft_pattern == before, step
        else:
            masked_steps.append(step)
            assert alloc.rank_pattern_to_lists(pattern) == peft_pattern, step
        for n, p in lora.items():
            assert torch.equal(ours[n], p.detach()), (n, step)
        nudge = {n: 0.05 * torch.randn(p.shape, generator=gen) for n, p in lora.items()}
        with torch.no_grad():
            for n, p in lora.items():
                p.add_(nudge[n])
                p.grad = None
        ours = {n: ours[n] + nudge[n] for n in ours}
    # budgeting steps 4, 6, 8 (deltaT=2), the final allocation at 9
    assert masked_steps == [4, 6, 8, 9]
    final = alloc.rank_pattern_to_lists(state.rank_pattern, adapter_name="default")
    assert sum(sum(keep) for keep in final.values()) <= schedule.target_bgt

    # the last step re-applied the mask after peft's; re-apply ours to the nudged values likewise
    with torch.no_grad():
        model.base_model.update_and_allocate(SCHEDULE["total_step"] + 4)
    ours = alloc.apply_rank_pattern(ours, rank_pattern=final, adapter_name="default")
    _quiet(model.save_pretrained, str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = ops.prune_state_dict({f"base_model.model.{n}": v for n, v in ours.items()}, rank_pattern=final,
                                    adapter_name="default", prefix="base_model.model.")
    assert set(saved) == {k.removesuffix(".default") for k in expected}
    for key, value in expected.items():
        assert torch.equal(saved[key.removesuffix(".default")], value), key
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert written["rank_pattern"] == final
    assert AdaLoraConfig.from_dict(written).rank_pattern == final

    loaded = _quiet(peft.PeftModel.from_pretrained, pristine, str(tmp_path))
    ranks = ops.kept_ranks(final)
    x = torch.randn(3, 6, generator=gen)
    for module, rank in ranks.items():
        layer = getattr(loaded.base_model.model, module)
        a, e, b = _factors(layer)
        assert a.shape[0] == rank and float(layer.ranknum["default"]) == INIT_R
        assert torch.equal(a, expected[f"base_model.model.{module}.lora_A.default"])
    q = loaded.base_model.model.q
    with torch.no_grad():
        got = ops.linear_forward(q.base_layer(x), x, *_factors(q), scaling=ops.scaling(INIT_R, ALPHA))
        assert_close(got, q(x).numpy(), rtol=RTOL)
