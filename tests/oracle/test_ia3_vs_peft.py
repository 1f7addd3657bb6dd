"""(IA)³ against real peft: config parity, and every IA3 layer kind of a tiny model built by ``get_peft_model``
(random vectors, ``init_ia3_weights=False``): forward, merge, unmerge, several active adapters,
``add_weighted_adapter``, and the llama defaults."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from peftcore.config import PeftConfig  # noqa: E402
from peftcore.constants import CONFIG_NAME  # noqa: E402
from peftcore.errors import ConfigError  # noqa: E402
from peftcore.methods.ia3 import IA3Config  # noqa: E402
from peftcore.methods.ia3 import ops  # noqa: E402
from peftcore.methods.ia3.config import weighted_adapter_config  # noqa: E402
from peftcore.testing import assert_close, to_numpy  # noqa: E402

pytestmark = pytest.mark.oracle

RTOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _default(field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _close(ours, theirs, msg=""):
    assert_close(ours, to_numpy(theirs).astype(np.float64), rtol=RTOL, err_msg=msg)


# -- config -------------------------------------------------------------------------------------------


def test_fields_order_and_defaults_equal_peft():
    theirs = [(f.name, _default(f)) for f in dataclasses.fields(peft.IA3Config) if f.name != "runtime_config"]
    ours = [(f.name, _default(f)) for f in dataclasses.fields(IA3Config) if f.name != "unknown_fields"]
    assert ours == theirs


SINGLE = [
    dict(),
    dict(target_modules=["q"], feedforward_modules=["q"], task_type="CAUSAL_LM"),
    dict(target_modules=".*(q|fc)", feedforward_modules=".*fc", fan_in_fan_out=True, init_ia3_weights=False),
    dict(target_modules=["c_attn"], exclude_modules=["lm_head"], modules_to_save=["score", "head"],
         inference_mode=True, base_model_name_or_path="tiny", revision="main"),
]
MULTI = [
    dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], task_type="SEQ_2_SEQ_LM"),
    dict(target_modules=["a", "b"], feedforward_modules=[], exclude_modules=["x", "y"]),
]


@pytest.mark.parametrize("kwargs", SINGLE, ids=lambda k: ",".join(k) or "defaults")
def test_json_is_byte_identical_and_loads_both_ways(kwargs, tmp_path):
    theirs = _quiet(peft.IA3Config, **kwargs)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = IA3Config(**kwargs)
    ours.save_pretrained(tmp_path / "ours")
    text = (tmp_path / "peft" / CONFIG_NAME).read_text()
    assert (tmp_path / "ours" / CONFIG_NAME).read_text() == text
    assert _quiet(PeftConfig.from_pretrained, tmp_path / "peft") == ours
    loaded = _quiet(peft.PeftConfig.from_pretrained, str(tmp_path / "ours"))
    assert type(loaded) is peft.IA3Config and loaded.to_dict() == theirs.to_dict()


@pytest.mark.parametrize("kwargs", MULTI, ids=lambda k: ",".join(k))
def test_json_equals_peft_up_to_set_order(kwargs, tmp_path):
    # peft writes sets in iteration order (varies by process); peftcore sorts them
    _quiet(peft.IA3Config, **kwargs).save_pretrained(str(tmp_path / "peft"))
    IA3Config(**kwargs).save_pretrained(tmp_path / "ours")
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    for data in (theirs, ours):
        for key, value in data.items():
            if isinstance(value, list):
                data[key] = sorted(value)
    assert ours == theirs
    assert _quiet(PeftConfig.from_pretrained, tmp_path / "peft") == IA3Config(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q"], feedforward_modules=["fc"]),
    dict(target_modules=["q", "k"], feedforward_modules=["q", "fc", "w2"]),
    dict(peft_type="LORA"),
], ids=str)
def test_rejected_by_both(kwargs):
    ours_error = pytest.raises(ConfigError)
    if "peft_type" in kwargs:  # peft overwrites a wrong peft_type silently; peftcore refuses it
        with ours_error:
            IA3Config(**kwargs)
        assert _quiet(peft.IA3Config, **kwargs).peft_type == peft.PeftType.IA3
        return
    with pytest.raises(ValueError) as theirs:
        peft.IA3Config(**kwargs)
    with ours_error as ours:
        IA3Config(**kwargs)
    assert str(ours.value).startswith(str(theirs.value))


def test_list_to_set_conversion_equals_peft():
    kwargs = dict(target_modules=["q", "fc", "q"], exclude_modules=["z"], feedforward_modules=["fc"])
    theirs, ours = peft.IA3Config(**kwargs), IA3Config(**kwargs)
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        assert getattr(ours, name) == getattr(theirs, name)


# -- a tiny model with every IA3 layer kind ------------------------------------------------------------


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 5)
        self.fc = torch.nn.Linear(5, 7)
        self.c_attn = Conv1D(4, 6)  # weight (in=6, out=4)
        self.c_fc = Conv1D(3, 4)  # feed-forward through the suffix rule: "c_fc".endswith("fc")
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv_out = torch.nn.Conv2d(4, 6, (2, 3), stride=2, groups=2)
        self.conv3 = torch.nn.Conv3d(2, 3, 2)
        self.conv3_ff = torch.nn.Conv3d(3, 2, (1, 2, 2))


TARGETS = ["q", "fc", "c_attn", "c_fc", "conv", "conv_out", "conv3", "conv3_ff"]
FEEDFORWARD = ["fc", "conv", "conv3_ff"]
INPUTS = {
    "q": (3, 6), "fc": (2, 3, 5), "c_attn": (2, 6), "c_fc": (3, 4), "conv": (2, 4, 5, 5),
    "conv_out": (1, 4, 5, 6), "conv3": (2, 2, 3, 3, 3), "conv3_ff": (1, 3, 2, 4, 3),
}


def _kind(layer):
    base = layer.get_base_layer()
    if isinstance(base, (torch.nn.Conv2d, torch.nn.Conv3d)):
        return dict(kind="conv", groups=base.groups)
    return dict(kind="linear", fan_in_fan_out=isinstance(base, Conv1D))


def _model(seed=0, adapters=("default",)):
    torch.manual_seed(seed)
    base = Tiny()
    config = IA3Config(target_modules=TARGETS, feedforward_modules=FEEDFORWARD, init_ia3_weights=False)
    model = _quiet(peft.get_peft_model, base, peft.IA3Config(**config.to_dict() | {"peft_type": "IA3"}))
    for name in adapters[1:]:
        _quiet(model.add_adapter, name, peft.IA3Config(**config.to_dict()))
    return model, config


def _layers(model):
    return {name: getattr(model.base_model.model, name) for name in TARGETS}


def _our_forward(layer, x, ls, *, config, name, base=None):
    base = layer.get_base_layer() if base is None else base
    l = ops.combine(*ls)
    if ops.is_feedforward(config, name):
        dtype = base.weight.dtype if _kind(layer)["kind"] == "conv" else None
        return base(ops.scale_input(x, l, dtype=dtype))
    return ops.scale_output(base(x), l)


def test_layer_kinds_shapes_and_feedforward_membership_equal_peft():
    model, config = _model()
    for name, layer in _layers(model).items():
        ff = ops.is_feedforward(config, name)
        assert layer.is_feedforward is ff, name
        shape = ops.ia3_shape(layer.get_base_layer().weight.shape, feedforward=ff, **_kind(layer))
        assert tuple(layer.ia3_l["default"].shape) == shape, name
    assert [n for n in TARGETS if ops.is_feedforward(config, n)] == ["fc", "c_fc", "conv", "conv3_ff"]


@torch.no_grad()
@pytest.mark.parametrize("adapters", [("default",), ("default", "other"), ("default", "other", "third")], ids=len)
def test_forward_merge_unmerge_equal_peft(adapters):
    model, config = _model(seed=len(adapters), adapters=adapters)
    model.base_model.set_adapter(list(adapters))
    torch.manual_seed(10)
    inputs = {name: torch.randn(shape) for name, shape in INPUTS.items()}
    originals = {name: copy.deepcopy(layer.get_base_layer()) for name, layer in _layers(model).items()}
    for name, layer in _layers(model).items():
        ls = [layer.ia3_l[a] for a in adapters]
        assert not torch.allclose(ls[0], torch.ones_like(ls[0]))
        _close(_our_forward(layer, inputs[name], ls, config=config, name=name), layer(inputs[name]), f"fwd {name}")

    _quiet(model.merge_adapter)
    for name, layer in _layers(model).items():
        ff, kw = ops.is_feedforward(config, name), _kind(layer)
        weight, bias = originals[name].weight, originals[name].bias
        for a in adapters:
            weight = ops.merge_weight(weight, layer.ia3_l[a], feedforward=ff, **kw)
            bias = ops.merge_bias(bias, layer.ia3_l[a], feedforward=ff)
        base = layer.get_base_layer()
        _close(weight, base.weight, f"merged weight {name}")
        _close(bias, base.bias, f"merged bias {name}")
        # merged layer computes the adapter forward
        _close(layer(inputs[name]), _our_forward(layer, inputs[name], [layer.ia3_l[a] for a in adapters],
                                                 config=config, name=name, base=originals[name]),
               f"merged fwd {name}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.unmerge_adapter()
    assert any(ops.UNMERGE_WARNING in str(w.message) for w in caught)
    for name, layer in _layers(model).items():
        ff, kw = ops.is_feedforward(config, name), _kind(layer)
        merged = originals[name]
        weight, bias = merged.weight, merged.bias
        for a in adapters:
            weight = ops.merge_weight(weight, layer.ia3_l[a], feedforward=ff, **kw)
            bias = ops.merge_bias(bias, layer.ia3_l[a], feedforward=ff)
        for a in reversed(adapters):  # peft pops merged adapters last-in first-out
            with pytest.warns(ops.IA3UnmergeWarning):
                weight = ops.unmerge_weight(weight, layer.ia3_l[a], feedforward=ff, **kw)
            bias = ops.unmerge_bias(bias, layer.ia3_l[a], feedforward=ff)
        base = layer.get_base_layer()
        _close(weight, base.weight, f"unmerged weight {name}")
        _close(bias, base.bias, f"unmerged bias {name}")


@torch.no_grad()
def test_add_weighted_adapter_equals_peft():
    model, config = _model(seed=5, adapters=("default", "other"))
    weights = [0.7, -1.3]
    _quiet(model.add_weighted_adapter, ["default", "other"], weights, "mix")
    for name, layer in _layers(model).items():
        ours = ops.weighted_combination([layer.ia3_l["default"], layer.ia3_l["other"]], weights=weights)
        _close(ours, layer.ia3_l["mix"], name)
    theirs = model.peft_config["mix"]
    ours = weighted_adapter_config([config, config])
    assert theirs.target_modules == ours.target_modules and theirs.feedforward_modules == ours.feedforward_modules


def test_weighted_adapter_config_equals_peft_for_sets_and_regexes():
    torch.manual_seed(0)
    model = _quiet(peft.get_peft_model, Tiny(), peft.IA3Config(target_modules=["q", "fc"], feedforward_modules=["fc"]))
    _quiet(model.add_adapter, "b", peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]))
    _quiet(model.add_weighted_adapter, ["default", "b"], [1.0, 1.0], "mix")
    ours = weighted_adapter_config([IA3Config(target_modules=["q", "fc"], feedforward_modules=["fc"]),
                                    IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])])
    theirs = model.peft_config["mix"]
    assert (ours.target_modules, ours.feedforward_modules) == (theirs.target_modules, theirs.feedforward_modules)
    regex = [dict(target_modules="q|fc", feedforward_modules="fc"),
             dict(target_modules="conv", feedforward_modules="conv")]
    torch.manual_seed(0)
    model = _quiet(peft.get_peft_model, Tiny(), peft.IA3Config(**regex[0]))
    _quiet(model.add_adapter, "b", peft.IA3Config(**regex[1]))
    _quiet(model.add_weighted_adapter, ["default", "b"], [1.0, 1.0], "mix")
    ours = weighted_adapter_config([IA3Config(**regex[0]), IA3Config(**regex[1])])
    theirs = model.peft_config["mix"]
    assert (ours.target_modules, ours.feedforward_modules) == (theirs.target_modules, theirs.feedforward_modules)


def test_llama_defaults_equal_peft():
    llama = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = _quiet(peft.get_peft_model, transformers.LlamaForCausalLM(llama), peft.IA3Config(task_type="CAUSAL_LM"))
    theirs = model.peft_config["default"]
    ours = IA3Config(task_type="CAUSAL_LM").with_model_defaults("llama")
    assert ours.target_modules == theirs.target_modules and ours.feedforward_modules == theirs.feedforward_modules
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert layers
    for name, layer in layers.items():
        assert ops.is_feedforward(ours, name) is layer.is_feedforward, name
        assert torch.equal(layer.ia3_l["default"], torch.ones_like(layer.ia3_l["default"]))
        shape = ops.ia3_shape(layer.get_base_layer().weight.shape, feedforward=layer.is_feedforward)
        assert tuple(layer.ia3_l["default"].shape) == shape
        assert tuple(ops.init_ia3(layer.get_base_layer().weight, feedforward=layer.is_feedforward).shape) == shape
