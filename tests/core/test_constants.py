"""Constants: file names, default-target lookups and their errors."""

from __future__ import annotations

import pytest

from peftcore import constants
from peftcore.constants import get_feedforward_modules, get_target_modules
from peftcore.errors import ConfigError, UnknownPeftTypeError


def test_file_names():
    assert constants.CONFIG_NAME == "adapter_config.json"
    assert constants.SAFETENSORS_WEIGHTS_NAME == "adapter_model.safetensors"
    assert constants.WEIGHTS_NAME == "adapter_model.bin"
    assert constants.INCLUDE_LINEAR_LAYERS_SHORTHAND == "all-linear"
    assert constants.EMBEDDING_LAYER_NAMES == ["embed_tokens", "lm_head"]
    assert constants.SEQ_CLS_HEAD_NAMES == ["score", "classifier"]


@pytest.mark.parametrize(
    ("method", "model_type", "expected"),
    [
        ("lora", "llama", ["q_proj", "v_proj"]),
        ("LORA", "gpt2", ["c_attn"]),
        ("lora", "bert", ["query", "value"]),
        ("lora", "t5", ["q", "v"]),
        ("adalora", "t5", ["q", "k", "v", "o", "wi", "wo"]),
        ("ia3", "llama", ["k_proj", "v_proj", "down_proj"]),
        ("IA3", "gpt2", ["c_attn", "mlp.c_proj"]),
        ("ln_tuning", "llama", ["input_layernorm", "post_attention_layernorm", "norm"]),
        ("LNTUNING", "gpt2", ["ln_1", "ln_2", "ln_f"]),
        ("vera", "phi", ["q_proj", "v_proj"]),
        ("fourierft", "gpt2", ["mlp.c_proj"]),
        ("frod", "vit", ["query", "value"]),
        ("osf", "gpt2", ["c_attn", "c_proj"]),
    ],
)
def test_get_target_modules(method, model_type, expected):
    assert get_target_modules(method, model_type) == expected


def test_lora_phi_differs_from_vera_phi():
    assert get_target_modules("lora", "phi") == ["q_proj", "v_proj", "fc1", "fc2"]
    assert get_target_modules("vera", "phi") == ["q_proj", "v_proj"]


def test_regex_default_is_returned_as_string():
    assert get_target_modules("lora", "gemma4") == r".*language_model\..*\.(q_proj|v_proj)"


def test_lookup_returns_a_copy():
    got = get_target_modules("lora", "llama")
    got.append("k_proj")
    assert get_target_modules("lora", "llama") == ["q_proj", "v_proj"]
    assert get_target_modules("boft", "llama") == ["q_proj", "v_proj"]


def test_copied_tables_do_not_share_lists():
    constants.TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING["llama"].append("zzz")
    try:
        assert constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"] == ["q_proj", "v_proj"]
    finally:
        constants.TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING["llama"].remove("zzz")


def test_missing_model_type_names_method_and_type():
    with pytest.raises(ConfigError, match=r"Please specify `target_modules`.*ADALORA.*'mistral'"):
        get_target_modules("adalora", "mistral")


def test_unknown_method():
    with pytest.raises(UnknownPeftTypeError, match="'prompt_tuning'"):
        get_target_modules("prompt_tuning", "llama")
    with pytest.raises(UnknownPeftTypeError):
        get_target_modules(3, "llama")


def test_feedforward_modules():
    assert get_feedforward_modules("llama") == ["down_proj"]
    assert get_feedforward_modules("mt5") == []
    with pytest.raises(ConfigError, match=r"feedforward_modules.*'nope'"):
        get_feedforward_modules("nope")


def test_feedforward_subset_of_targets():
    # peft requires feedforward_modules to be a subset of target_modules for IA3
    for model_type, ff in constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.items():
        assert set(ff) <= set(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]), model_type


def test_every_mapping_is_a_plain_dict_of_lists_or_regex():
    for name, table in constants.TARGET_MODULES_MAPPINGS.items():
        assert type(table) is dict, name
        for value in table.values():
            assert isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    assert constants.TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING == {}
