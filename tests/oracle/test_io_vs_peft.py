"""Adapter folders cross-checked with real peft: peft writes, we read; we write, peft reads; same bytes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import array_api_compat.torch as torch_xp  # noqa: E402

from peftcore import LoraConfig  # noqa: E402
from peftcore.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME  # noqa: E402
from peftcore.io import load_adapter, load_state_dict, read_metadata, save_adapter, save_state_dict  # noqa: E402

pytestmark = pytest.mark.oracle

LORA_KWARGS = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    init_lora_weights=False,
    use_dora=True,
    task_type="CAUSAL_LM",
)


def _base_model(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _peft_model(kwargs=LORA_KWARGS, *, dtype=torch.float32, **extra):
    model = _base_model(dtype)
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(**kwargs), **extra).eval()


def _logits(model) -> np.ndarray:
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _peft_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}


def _json(path):
    data = json.loads(path.read_text())
    sets = ("target_modules", "exclude_modules")
    return {k: sorted(v) if k in sets and isinstance(v, list) else v for k, v in data.items()}


def test_peft_written_adapter_loads_here_with_same_tensors_and_config(tmp_path):
    model = _peft_model()
    model.save_pretrained(tmp_path)
    loaded = load_adapter(tmp_path)
    expected = _peft_state_dict(model)
    assert sorted(loaded.state_dict) == sorted(expected)
    assert any(k.endswith("lora_magnitude_vector") for k in expected)
    for key, value in expected.items():
        assert loaded.state_dict[key].dtype == np.float32
        np.testing.assert_array_equal(loaded.state_dict[key], value, err_msg=key)
    assert loaded.config == LoraConfig(**LORA_KWARGS, inference_mode=True)
    assert loaded.config.unknown_fields == {}
    assert loaded.metadata == {"format": "pt"}
    # and into torch directly, as the exact tensors peft holds
    as_torch = load_adapter(tmp_path, xp=torch_xp).state_dict
    for key, value in peft.get_peft_model_state_dict(model).items():
        assert torch.equal(as_torch[key], value.detach()), key


def test_our_adapter_loads_in_peft_without_missing_keys_and_same_logits(tmp_path):
    reference = _peft_model()
    expected_logits = _logits(reference)
    state_dict = _peft_state_dict(reference)
    save_adapter(tmp_path, LoraConfig(**LORA_KWARGS), state_dict)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = peft.PeftModel.from_pretrained(_base_model(), tmp_path).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert key_warnings == []  # peft warns "Found missing adapter keys" / unexpected keys
    assert _rel_err(_logits(reloaded), expected_logits) <= 1e-5
    assert peft.PeftConfig.from_pretrained(tmp_path).to_dict() == reference.peft_config["default"].to_dict() | {
        "inference_mode": True
    }

    fresh = _peft_model({**LORA_KWARGS, "init_lora_weights": True})
    result = peft.set_peft_model_state_dict(fresh, load_state_dict(tmp_path / SAFETENSORS_WEIGHTS_NAME, xp=torch_xp))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert _rel_err(_logits(fresh), expected_logits) <= 1e-5


def test_same_files_as_peft_byte_for_byte(tmp_path):
    kwargs = {**LORA_KWARGS, "target_modules": ["q_proj"]}  # one module: peft's set order is then fixed
    model = _peft_model(kwargs)
    model.save_pretrained(tmp_path / "peft")
    state_dict = peft.get_peft_model_state_dict(model)  # torch tensors, straight from peft
    save_adapter(tmp_path / "ours", LoraConfig(**kwargs), state_dict)
    for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name
    assert read_metadata(tmp_path / "ours" / SAFETENSORS_WEIGHTS_NAME) == read_metadata(
        tmp_path / "peft" / SAFETENSORS_WEIGHTS_NAME
    ) == {"format": "pt"}


def test_config_with_several_targets_matches_up_to_set_order(tmp_path):
    model = _peft_model()
    model.save_pretrained(tmp_path / "peft")
    save_adapter(tmp_path / "ours", LoraConfig(**LORA_KWARGS), _peft_state_dict(model))
    ours, theirs = tmp_path / "ours" / CONFIG_NAME, tmp_path / "peft" / CONFIG_NAME
    assert _json(ours) == _json(theirs)
    assert json.loads(ours.read_text())["target_modules"] == ["q_proj", "v_proj"]  # we write sets sorted
    # the weights file does not depend on set order: byte-identical
    assert (tmp_path / "ours" / SAFETENSORS_WEIGHTS_NAME).read_bytes() == (
        tmp_path / "peft" / SAFETENSORS_WEIGHTS_NAME
    ).read_bytes()


def test_named_adapter_folder_matches_peft(tmp_path):
    model = _peft_model()
    model.add_adapter("other", peft.LoraConfig(**{**LORA_KWARGS, "r": 2}))
    model.save_pretrained(tmp_path / "peft", selected_adapters=["other"])
    assert (tmp_path / "peft" / "other" / CONFIG_NAME).is_file()
    loaded = load_adapter(tmp_path / "peft", adapter_name="other")
    assert loaded.config.r == 2
    expected = _peft_state_dict_for(model, "other")
    assert sorted(loaded.state_dict) == sorted(expected)
    save_adapter(tmp_path / "ours", loaded.config, loaded.state_dict, adapter_name="other")
    assert (tmp_path / "ours" / "other" / SAFETENSORS_WEIGHTS_NAME).read_bytes() == (
        tmp_path / "peft" / "other" / SAFETENSORS_WEIGHTS_NAME
    ).read_bytes()


def _peft_state_dict_for(model, adapter_name):
    return {
        k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model, adapter_name=adapter_name).items()
    }


def test_bfloat16_adapter_round_trips_with_peft(tmp_path):
    model = _peft_model(dtype=torch.bfloat16, autocast_adapter_dtype=False)
    state_dict = peft.get_peft_model_state_dict(model)
    assert {v.dtype for v in state_dict.values()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "peft")
    save_adapter(tmp_path / "ours", LoraConfig(**LORA_KWARGS), state_dict)
    assert (tmp_path / "ours" / SAFETENSORS_WEIGHTS_NAME).read_bytes() == (
        tmp_path / "peft" / SAFETENSORS_WEIGHTS_NAME
    ).read_bytes()
    as_torch = load_adapter(tmp_path / "peft", xp=torch_xp).state_dict
    as_numpy = load_adapter(tmp_path / "peft", dtype="float32").state_dict
    for key, value in state_dict.items():
        assert as_torch[key].dtype == torch.bfloat16 and torch.equal(as_torch[key], value), key
        np.testing.assert_array_equal(as_numpy[key], value.float().numpy(), err_msg=key)


def test_tensors_that_require_grad_and_views_are_saved(tmp_path):
    weight = torch.randn(3, 4, requires_grad=True)
    save_state_dict(tmp_path / "w.safetensors", {"w": weight * 2, "t": weight.detach().T, "s": weight.detach()[:, ::2]})
    from safetensors.torch import load_file

    back = load_file(tmp_path / "w.safetensors")
    assert torch.equal(back["w"], weight.detach() * 2)
    assert torch.equal(back["t"], weight.detach().T)
    assert torch.equal(back["s"], weight.detach()[:, ::2])
