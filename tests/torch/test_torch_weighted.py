"""``add_weighted_adapter`` on tiny Llama and GPT-2 against real peft 0.21.2.

Both sides hold the same adapters (peft's tensors copied into ours); after each combination the new
adapter's config and tensors, the logits with it active and its checkpoint (loaded by peft) must agree.
``cat``/``linear`` tensors are compared exactly (same operations in the same order); for ``svd`` the
products ``B·A`` are compared, since singular vectors are only defined up to sign.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft

import peftcore
import peftcore_torch
from peftcore.errors import ConfigError, ShapeMismatchError
from tests.tiny_models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.oracle

RTOL = 1e-5
IDS = torch.arange(12).reshape(2, 6) * 7 % 64
EMBED_WARNING = "Setting `save_embedding_layers` to `True`"

# architecture -> {adapter: LoraConfig kwargs}; "y" reaches modules "x" does not, "z" has another rank
ADAPTERS = {
    "llama": {
        "x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "y": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "embed_tokens"]),
        "z": dict(r=2, lora_alpha=3, target_modules=["v_proj", "down_proj"], rank_pattern={"down_proj": 3},
                  use_rslora=True),
    },
    "gpt2": {
        "x": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        "y": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "z": dict(r=2, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True),
    },
}


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = tiny_llama()
    gpt2 = tiny_gpt2()
    return {"llama": llama.eval(), "gpt2": gpt2.eval()}


def _pair(bases, arch: str) -> tuple[peftcore_torch.PeftModel, peft.PeftModel]:
    """Our model and peft's with adapters x, y, z holding identical tensors (init_lora_weights=False)."""
    specs = ADAPTERS[arch]
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.LoraConfig(init_lora_weights=False, **specs["x"]),
                                 adapter_name="x")
    ours = peftcore_torch.get_peft_model(copy.deepcopy(bases[arch]),
                                         peftcore.LoraConfig(init_lora_weights=False, **specs["x"]), adapter_name="x")
    for name in ("y", "z"):
        theirs.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **specs[name]))
        ours.add_adapter(name, peftcore.LoraConfig(init_lora_weights=False, **specs[name]))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _logits(model, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_close(actual: torch.Tensor, desired: torch.Tensor, rtol: float = RTOL) -> None:
    actual, desired = actual.detach().double(), desired.detach().double()
    torch.testing.assert_close(actual, desired, rtol=rtol, atol=rtol * max(float(desired.abs().max()), 1e-6))


def _new_adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if f".{name}." in k or k.endswith(f".{name}")}


def _products(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``{module: B·A}`` of adapter ``name`` (Embedding factors are stored the same way round)."""
    products = {}
    for key, lora_A in tensors.items():
        for a_name, b_name in ((f"lora_A.{name}.weight", f"lora_B.{name}.weight"),
                               (f"lora_embedding_A.{name}", f"lora_embedding_B.{name}")):
            if key.endswith(a_name):
                module = key[: -len(a_name)]
                products[module] = tensors[module + b_name].double() @ lora_A.double()
    return products


def _check_config(ours, theirs, name: str) -> None:
    mine, reference = ours.peft_config[name], theirs.peft_config[name]
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out",
                  "init_lora_weights"):
        assert getattr(mine, field) == getattr(reference, field), field
    assert set(mine.target_modules) == set(reference.target_modules)


COMBINATIONS = [
    ("cat", ["x", "y", "z"], [1.0, 0.5, 0.7]),
    ("cat", ["x", "y", "z"], [1.0, -0.6, -1.5]),
    ("linear", ["x", "y"], [0.8, 0.4]),
    ("linear", ["x", "y"], [1.0, -0.5]),
    ("linear", ["y"], [-0.7]),
    ("svd", ["x", "y", "z"], [1.0, 0.5, 0.7]),
    ("svd", ["x", "y", "z"], [-1.0, 0.5, -0.25]),
    ("svd", ["z", "x"], [1.2, -0.3]),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("combination_type", "adapters", "weights"), COMBINATIONS)
def test_weighted_adapter_equals_peft(bases, arch, combination_type, adapters, weights, tmp_path):
    ours, theirs = _pair(bases, arch)
    theirs.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type)
    ours.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type)
    _check_config(ours, theirs, "mix")
    assert ours.active_adapters == ["x"]
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad)

    mine, reference = _new_adapter_tensors(ours, "mix"), _new_adapter_tensors(theirs, "mix")
    assert sorted(mine) == sorted(reference) and mine
    if combination_type == "svd" and len(adapters) > 1:
        mine_products, reference_products = _products(mine, "mix"), _products(reference, "mix")
        assert sorted(mine_products) == sorted(reference_products)
        for module, product in reference_products.items():
            _assert_close(mine_products[module], product)
    else:
        for key, value in reference.items():
            assert torch.equal(mine[key], value), key

    expected = _logits(theirs, "mix")
    _assert_close(_logits(ours, "mix"), expected)
    assert not torch.allclose(expected, _logits(theirs, "x"))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EMBED_WARNING)
        ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    folder = tmp_path / "mix"
    loaded = peft.get_peft_model(copy.deepcopy(bases[arch]), peft.PeftConfig.from_pretrained(folder))
    result = peft.set_peft_model_state_dict(loaded, peft.utils.load_peft_weights(str(folder)))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    _assert_close(_logits(loaded.eval(), "default"), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("svd_rank", "svd_clamp", "full_matrices"), [(2, None, False), (6, 0.9, True),
                                                                     (None, 0.5, False)])
def test_svd_rank_and_clamp_equal_peft(bases, arch, svd_rank, svd_clamp, full_matrices):
    ours, theirs = _pair(bases, arch)
    options = dict(combination_type="svd", svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=full_matrices)
    theirs.add_weighted_adapter(["x", "y", "z"], [0.9, -0.4, 0.6], "mix", **options)
    ours.add_weighted_adapter(["x", "y", "z"], [0.9, -0.4, 0.6], "mix", **options)
    _check_config(ours, theirs, "mix")
    mine, reference = _new_adapter_tensors(ours, "mix"), _new_adapter_tensors(theirs, "mix")
    # the same torch SVD of the same ΔW: even the signs (and so the clamp quantile) agree
    mine_products, reference_products = _products(mine, "mix"), _products(reference, "mix")
    for module, product in reference_products.items():
        _assert_close(mine_products[module], product)
    _assert_close(_logits(ours, "mix"), _logits(theirs, "mix"))


def test_svd_driver_reaches_torch(bases):
    ours, _ = _pair(bases, "llama")
    # cuSOLVER drivers only exist for CUDA tensors: torch's own refusal proves the driver was passed on
    with pytest.raises(RuntimeError, match="driver"):
        ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", svd_driver="gesvd")
    assert "mix" not in ours.peft_config
    assert not any(".mix." in k for k in ours.state_dict())


def test_existing_adapter_name_is_left_alone_like_peft(bases):
    ours, theirs = _pair(bases, "llama")
    before = {k: v.clone() for k, v in _new_adapter_tensors(ours, "y").items()}
    theirs.add_weighted_adapter(["x"], [2.0], "y")
    ours.add_weighted_adapter(["x"], [2.0], "y")
    for key, value in before.items():
        assert torch.equal(ours.state_dict()[key], value)
        assert torch.equal(theirs.state_dict()[key], value)


def test_bad_combinations_are_refused_like_peft(bases):
    ours, theirs = _pair(bases, "llama")
    for model in (ours, theirs):
        with pytest.raises(ValueError, match="Adapter nope does not exist"):
            model.add_weighted_adapter(["x", "nope"], [1.0, 1.0], "mix")
        with pytest.raises(ValueError, match="same r value"):
            model.add_weighted_adapter(["x", "z"], [1.0, 1.0], "mix", combination_type="linear")
        with pytest.raises(ValueError, match="Invalid combination_type"):
            model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", combination_type="sum")
        model.add_adapter("regex", type(model.peft_config["x"])(r=4, target_modules=r".*\.o_proj"))
        with pytest.raises(ValueError, match="mix of list/set and string"):
            model.add_weighted_adapter(["x", "regex"], [1.0, 1.0], "mix", combination_type="cat")
        assert "mix" not in model.peft_config
    with pytest.raises(ConfigError, match="one weight per adapter"):
        ours.add_weighted_adapter(["x", "y"], [1.0], "mix")


def test_regex_targets_are_joined_like_peft(bases):
    ours, theirs = _pair(bases, "llama")
    for model in (ours, theirs):
        config_class = type(model.peft_config["x"])
        model.add_adapter("r1", config_class(r=2, target_modules=r".*\.q_proj", init_lora_weights=False))
        model.add_adapter("r2", config_class(r=2, target_modules=r".*\.o_proj", init_lora_weights=False))
    ours.load_state_dict(theirs.state_dict())
    theirs.add_weighted_adapter(["r1", "r2"], [1.0, -1.0], "mix", combination_type="cat")
    ours.add_weighted_adapter(["r1", "r2"], [1.0, -1.0], "mix", combination_type="cat")
    assert ours.peft_config["mix"].target_modules == theirs.peft_config["mix"].target_modules
    _assert_close(_logits(ours, "mix"), _logits(theirs, "mix"))


def test_dora_and_lora_bias_adapters_are_refused(bases):
    ours, _ = _pair(bases, "llama")
    ours.add_adapter("dora", peftcore.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA"):
        ours.add_weighted_adapter(["x", "dora"], [1.0, 1.0], "mix", combination_type="cat")
    ours.add_adapter("biased", peftcore.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ConfigError, match="lora_bias"):
        ours.add_weighted_adapter(["biased"], [1.0], "mix")
    assert "mix" not in ours.peft_config


def test_conv_layers_combine_exactly_with_cat(tmp_path):
    """Conv2d (3x3) and Conv1d adapters: cat reproduces Σ w_i ΔW_i; svd at full rank does too."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv2 = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.conv1 = torch.nn.Conv1d(3, 5, 2)

        def forward(self, x):
            return self.conv2(x).sum() + self.conv1(x[:, :, 0]).sum()

    torch.manual_seed(0)
    ours = peftcore_torch.get_peft_model(Net(), peftcore.LoraConfig(r=2, lora_alpha=4, target_modules=["conv2", "conv1"],
                                                                    init_lora_weights=False), adapter_name="x")
    ours.add_adapter("y", peftcore.LoraConfig(r=3, lora_alpha=3, target_modules=["conv2", "conv1"],
                                              init_lora_weights=False))
    for combination_type, rank in (("cat", None), ("svd", 5)):
        name = f"mix_{combination_type}"
        ours.add_weighted_adapter(["x", "y"], [0.5, -2.0], name, combination_type=combination_type, svd_rank=rank)
        for module in ("conv2", "conv1"):
            layer = ours.get_base_model().get_submodule(module)
            expected = 0.5 * layer.delta_weight("x") - 2.0 * layer.delta_weight("y")
            _assert_close(layer.delta_weight(name), expected, rtol=1e-4 if combination_type == "svd" else RTOL)


def test_grouped_conv_is_refused_for_svd():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, groups=2))
    ours = peftcore_torch.get_peft_model(net, peftcore.LoraConfig(r=2, target_modules=["0"]), adapter_name="x")
    ours.add_adapter("y", peftcore.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ShapeMismatchError, match="grouped conv"):
        ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "mix", combination_type="svd")
    assert "mix" not in ours.peft_config
