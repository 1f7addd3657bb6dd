"""peftcore's key grammar against the keys real peft models hold in memory and write to disk."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from peft.tuners.lora import LoraModel  # noqa: E402
from peft.tuners.tuners_utils import (  # noqa: E402
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    _remove_adapter_name_from_state_dict_key,
)

from peftcore.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME  # noqa: E402
from peftcore.errors import IncompatibleKeysError  # noqa: E402
from peftcore.naming import (  # noqa: E402
    adapter_subfolder,
    checkpoint_key,
    insert_adapter_name,
    model_key,
    parse_checkpoint_key,
    parse_model_key,
    remove_adapter_name,
)

pytestmark = pytest.mark.oracle

# adapter name -> LoraConfig kwargs; every LoRA container appears: lora_A/B (+ lora_B.bias), DoRA's
# magnitude on a Linear and on an Embedding, the embedding parameter containers
MULTI_ADAPTERS = {
    "default": {"target_modules": ["q_proj", "v_proj", "model.embed_tokens"], "use_dora": True,
                "layers_to_transform": [0]},
    "other": {"target_modules": ["k_proj", "down_proj"], "lora_bias": True, "layers_to_transform": [1]},
}
# an adapter named like a base-model path component ("model") that sits right before the container
# in none of the keys; alone in its model, since peft's multi-adapter filter would confuse it
SOLO_ADAPTERS = {"model": {"target_modules": ["o_proj", "lm_head", "embed_tokens"], "use_dora": True}}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def _build(adapters: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias on bias-free layers, transformers deprecations
        names = list(adapters)
        model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, peft.LoraConfig(**adapters[name]))
    return model


@pytest.fixture(scope="module")
def peft_models():
    return {"multi": _build(MULTI_ADAPTERS), "solo": _build(SOLO_ADAPTERS)}


CASES = [("multi", name) for name in MULTI_ADAPTERS] + [("solo", name) for name in SOLO_ADAPTERS]


def _peft_model_keys(model, adapter: str) -> set[str]:
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter)
    return set(_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes))


def _saved(model, adapter: str, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model_state_dict(model, adapter_name=adapter, **kwargs)


@pytest.mark.parametrize(("which", "adapter"), CASES)
def test_saved_keys_round_trip_to_model_keys(peft_models, which, adapter):
    model = peft_models[which]
    saved = _saved(model, adapter, save_embedding_layers=False)
    model_keys = _peft_model_keys(model, adapter)
    assert saved and model_keys
    containers = set()
    for key in saved:
        module_path, container, param = parse_checkpoint_key(key)
        containers.add(container)
        assert checkpoint_key(module_path, container, param) == key
        in_memory = insert_adapter_name(key, adapter)
        assert in_memory in model_keys
        assert model_key(module_path, container, adapter, param) == in_memory
        assert parse_model_key(in_memory) == (module_path, container, adapter,
                                              "weight" if container == "lora_magnitude_vector" else param)
    assert {insert_adapter_name(key, adapter) for key in saved} == model_keys
    assert {remove_adapter_name(key, adapter) for key in model_keys} == set(saved)
    if which == "multi":
        expected = {"default": {"lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B"},
                    "other": {"lora_A", "lora_B"}}[adapter]
        assert containers == expected


@pytest.mark.parametrize(("which", "adapter"), CASES)
def test_remove_adapter_name_equals_peft_on_every_model_key(peft_models, which, adapter):
    model = peft_models[which]
    dora_suffix = f"lora_magnitude_vector.{adapter}.weight"
    for key in model.state_dict():
        peft_key = key[: -len(".weight")] if key.endswith(dora_suffix) else key
        assert remove_adapter_name(key, adapter) == _remove_adapter_name_from_state_dict_key(peft_key, adapter)


@pytest.mark.parametrize(("which", "adapter"), CASES)
def test_insert_equals_peft_load_remap(peft_models, which, adapter):
    model = peft_models[which]
    saved = _saved(model, adapter, save_embedding_layers=True)  # adds pass-through base embedding weights
    remapped = LoraModel._remap_adapter_state_dict_for_load(model, model.peft_config[adapter], adapter, saved)
    assert {insert_adapter_name(key, adapter, strict=False) for key in saved} == set(remapped)
    assert any(key.endswith("base_layer.weight") for key in saved)


def test_parse_model_key_selects_exactly_one_adapters_entries(peft_models):
    model = peft_models["multi"]
    by_adapter = {name: set() for name in MULTI_ADAPTERS}
    for key in model.state_dict():
        try:
            parsed = parse_model_key(key)
        except IncompatibleKeysError:
            continue
        by_adapter[parsed.adapter_name].add(key)
    for name in MULTI_ADAPTERS:
        assert by_adapter[name] == _peft_model_keys(model, name)


def test_base_model_keys_are_not_adapter_keys(peft_models):
    model = peft_models["solo"]
    base_keys = set(model.state_dict()) - _peft_model_keys(model, "model")
    assert base_keys
    for key in base_keys:
        with pytest.raises(IncompatibleKeysError):
            parse_model_key(key)
        if "lora_" not in key:
            assert insert_adapter_name(key, "model", strict=False) == key


def test_save_pretrained_layout(peft_models, tmp_path):
    model = peft_models["multi"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    for adapter in MULTI_ADAPTERS:
        folder = tmp_path / adapter_subfolder(adapter)
        assert (folder / CONFIG_NAME).is_file()
        on_disk = set(safetensors_torch.load_file(folder / SAFETENSORS_WEIGHTS_NAME))
        assert on_disk == {remove_adapter_name(key, adapter) for key in _peft_model_keys(model, adapter)}
