"""(IA)³ in peftcore_torch against real peft 0.21.2 on tiny Llama, GPT-2, BERT and a conv net.

Same parameters give peft's logits; merges, several active adapters, ``add_weighted_adapter`` and
disabling match peft; bad configs and unsupported layers raise named errors.
(Checkpoints both ways: ``tests/oracle/test_torch_ia3_interop.py``.)
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import peft

import peftcore
import peftcore_torch
from peftcore.errors import ConfigError, UnsupportedLayerError
from peftcore.methods.ia3.ops import IA3UnmergeWarning
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) * 7 % 64
UNMERGE = "Unmerge result can be inaccurate"
FAN_IN_FAN_OUT = "fan_in_fan_out is set to False but the target module is `Conv1D`"


class ConvNet(nn.Module):
    """Conv2d (plain and grouped) and Conv3d layers, as the (IA)³ conv paths see them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 4, 3, groups=2)
        self.volume = nn.Conv3d(2, 3, 2)
        self.head = nn.Linear(4 * 7 * 3 + 3 * 2 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planes = self.grouped(torch.relu(self.conv(x)))
        cube = self.volume(x[:, :2].reshape(x.shape[0], 2, 3, 3, 5)[..., :3])
        return self.head(torch.cat([planes.flatten(1), cube.flatten(1)], dim=1))


@pytest.fixture(scope="module")
def bases() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    llama = tiny_llama()
    gpt2 = tiny_gpt2()
    bert = tiny_bert_classifier()
    models = {"llama": llama, "gpt2": gpt2, "bert": bert, "conv": ConvNet()}
    for model in models.values():
        with torch.no_grad():  # biases away from zero, so scaling them (or not) shows
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.uniform_(-0.5, 0.5)
    return {name: model.eval() for name, model in models.items()}


# name: (architecture, IA3Config arguments shared by peft and peftcore)
CASES = {
    "llama-defaults": ("llama", dict(task_type="CAUSAL_LM")),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj", "c_fc"], feedforward_modules=["mlp.c_proj"],
                          fan_in_fan_out=True)),
    "bert-seq-cls": ("bert", dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                  feedforward_modules=["output.dense"], modules_to_save=["classifier"])),
    "conv": ("conv", dict(target_modules=["conv", "grouped", "volume"], feedforward_modules=["grouped", "volume"])),
}


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    if arch == "conv":
        return {"x": torch.linspace(-2, 2, 2 * 3 * 9 * 5).reshape(2, 3, 9, 5)}
    return {"input_ids": IDS}


def _ours(bases, name: str, adapter_name: str = "default") -> peftcore_torch.PeftModel:
    arch, kwargs = CASES[name]
    return peftcore_torch.get_peft_model(copy.deepcopy(bases[arch]),
                                         peftcore.IA3Config(init_ia3_weights=False, **kwargs), adapter_name).eval()


def _theirs_like(bases, name: str, ours: nn.Module) -> peft.PeftModel:
    """peft's model for ``name`` holding exactly ``ours``'s parameters."""
    arch, kwargs = CASES[name]
    theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.IA3Config(init_ia3_weights=False, **kwargs))
    theirs.load_state_dict(ours.state_dict())
    return theirs.eval()


def _out(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(arch))
    return out if isinstance(out, torch.Tensor) else out.logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor) -> None:
    actual, desired = actual.detach().float(), desired.detach().float()
    torch.testing.assert_close(actual, desired, rtol=RTOL, atol=RTOL * max(float(desired.abs().max()), 1e-6))


def _make(bases, name):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT)
        ours = _ours(bases, name)
        return ours, _theirs_like(bases, name, ours)


@pytest.mark.parametrize("name", list(CASES))
def test_same_parameters_give_peft_outputs(bases, name):
    ours, theirs = _make(bases, name)
    arch = CASES[name][0]
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad)
    ours_config, their_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert set(ours_config.target_modules) == set(their_config.target_modules)
    assert set(ours_config.feedforward_modules) == set(their_config.feedforward_modules)
    _assert_close(_out(ours, arch), _out(theirs, arch))
    assert not torch.allclose(_out(ours, arch), _out(bases[arch], arch))


def test_feedforward_layers_scale_their_input_others_their_output(bases):
    ours, _ = _make(bases, "llama-defaults")
    layers = ours.get_base_model().model.layers[0]
    assert layers.mlp.down_proj.is_feedforward and layers.mlp.down_proj.ia3_l["default"].shape == (1, 32)
    assert not layers.self_attn.k_proj.is_feedforward and layers.self_attn.k_proj.ia3_l["default"].shape == (8, 1)


def test_gpt2_conv1d_corrects_fan_in_fan_out_with_peft_warning(bases):
    config = peftcore.IA3Config(target_modules=["c_attn"], feedforward_modules=[])
    with pytest.warns(UserWarning, match=FAN_IN_FAN_OUT):
        peftcore_torch.get_peft_model(copy.deepcopy(bases["gpt2"]), config)
    assert config.fan_in_fan_out is True


@pytest.mark.parametrize("name", list(CASES))
def test_merge_and_unload_matches_peft(bases, name):
    ours, theirs = _make(bases, name)
    arch = CASES[name][0]
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    ours_state, their_state = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(ours_state) == sorted(their_state)
    for key, value in their_state.items():
        _assert_close(ours_state[key], value)
    _assert_close(_out(merged_ours, arch), _out(merged_theirs, arch))


def test_merge_unmerge_warns_and_disable_gives_the_base(bases):
    ours, _ = _make(bases, "bert-seq-cls")
    adapted = _out(ours, "bert")
    ours.merge_adapter()
    _assert_close(_out(ours, "bert"), adapted)
    with pytest.warns(IA3UnmergeWarning, match=UNMERGE):
        ours.unmerge_adapter()
    _assert_close(_out(ours, "bert"), adapted)
    ours.merge_adapter()
    with ours.disable_adapter(), pytest.warns(IA3UnmergeWarning, match=UNMERGE):
        disabled = _out(ours, "bert")
    # the classifier copy stays out too: disabled is the base model itself
    _assert_close(disabled, _out(bases["bert"], "bert"))
    _assert_close(_out(ours, "bert"), adapted)


@pytest.mark.parametrize("name", ["llama-defaults", "conv"])
def test_two_active_adapters_multiply_as_in_peft(bases, name):
    arch, kwargs = CASES[name]
    ours = _ours(bases, name)
    ours.add_adapter("other", peftcore.IA3Config(init_ia3_weights=False, **kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.IA3Config(init_ia3_weights=False, **kwargs))
    theirs.add_adapter("other", peft.IA3Config(init_ia3_weights=False, **kwargs))
    theirs.load_state_dict(ours.state_dict())
    single = _out(ours, arch)
    ours.base_model.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    both = _out(ours.eval(), arch)
    _assert_close(both, _out(theirs.eval(), arch))
    assert not torch.allclose(both, single)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    _assert_close(_out(merged_ours, arch), _out(merged_theirs, arch))
    _assert_close(_out(merged_ours, arch), both)


@pytest.mark.parametrize("name", ["llama-defaults", "gpt2"])
def test_add_weighted_adapter_matches_peft(bases, name):
    arch, kwargs = CASES[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FAN_IN_FAN_OUT)
        ours = _ours(bases, name)
        second = dict(kwargs, target_modules=["c_attn"], feedforward_modules=[]) if arch == "gpt2" else kwargs
        ours.add_adapter("other", peftcore.IA3Config(init_ia3_weights=False, **second))
        theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.IA3Config(init_ia3_weights=False, **kwargs))
        theirs.add_adapter("other", peft.IA3Config(init_ia3_weights=False, **second))
    theirs.load_state_dict(ours.state_dict())
    ours.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix")
    theirs.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix")
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_state) == sorted(their_state)
    for key in their_state:
        _assert_close(ours_state[key], their_state[key])
    assert set(ours.peft_config["mix"].target_modules) == set(theirs.peft_config["mix"].target_modules)
    assert set(ours.peft_config["mix"].feedforward_modules) == set(theirs.peft_config["mix"].feedforward_modules)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix" in n)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    _assert_close(_out(ours, arch), _out(theirs, arch))


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ConfigError, match=r"feedforward_modules.*subset.*fc2"):
        peftcore.IA3Config(target_modules=["fc1"], feedforward_modules=["fc2"])


@pytest.mark.parametrize("target, kind", [("embed_tokens", "Embedding"), ("rotary_emb", "LlamaRotaryEmbedding")])
def test_unsupported_layer_is_named(bases, target, kind):
    config = peftcore.IA3Config(target_modules=[target, "q_proj"], feedforward_modules=[])
    with pytest.raises(UnsupportedLayerError, match=rf"{target}.*{kind}"):
        peftcore_torch.get_peft_model(copy.deepcopy(bases["llama"]), config)


def test_conv1d_is_unsupported_as_in_peft():
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    with pytest.raises(UnsupportedLayerError, match=r"'0'.*Conv1d"):
        peftcore_torch.get_peft_model(model, peftcore.IA3Config(target_modules=["0"], feedforward_modules=[]))


def test_missing_defaults_ask_for_targets(bases):
    with pytest.raises(ConfigError, match="Please specify"):
        peftcore_torch.get_peft_model(ConvNet(), peftcore.IA3Config())


def test_mixing_methods_in_one_model_is_refused(bases):
    ours = _ours(bases, "llama-defaults")
    with pytest.raises(ConfigError, match=r"LORA.*\['IA3'\]"):
        ours.add_adapter("lora", peftcore.LoraConfig(target_modules=["q_proj"]))


def test_unload_delete_and_plain_injection(bases, tmp_path):
    ours, _ = _make(bases, "llama-defaults")
    ours.add_adapter("other", peftcore.IA3Config(task_type="CAUSAL_LM"))
    ours.delete_adapter("other")
    assert not any(".other" in key for key in ours.state_dict())
    _assert_close(_out(ours.unload(), "llama"), _out(bases["llama"], "llama"))
    plain = peftcore_torch.inject_adapter_in_model(
        peftcore.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        copy.deepcopy(bases["llama"]))
    state = peftcore_torch.get_peft_model_state_dict(plain)
    assert sorted(state) == sorted(f"model.layers.{i}.{m}.ia3_l" for i in (0, 1)
                                   for m in ("self_attn.k_proj", "mlp.down_proj"))


def test_mixed_adapter_batches_are_lora_only(bases):
    ours, _ = _make(bases, "llama-defaults")
    with pytest.raises(ConfigError, match="mixed-adapter batches"):
        ours(input_ids=IDS, adapter_names=["default", "default"])
