"""``AdaLoraConfig``: defaults, validation, registry and JSON round trip (no peft needed)."""

from __future__ import annotations

import json
import warnings

import pytest

from peftcore.config import PeftConfig
from peftcore.errors import ConfigError
from peftcore.mapping import get_method
from peftcore.methods.adalora import AdaLoraConfig
from peftcore.methods.lora import LoraConfig


def test_defaults_and_registration():
    config = AdaLoraConfig(total_step=10)
    assert isinstance(config, LoraConfig)
    assert (config.target_r, config.init_r, config.tinit, config.tfinal, config.deltaT) == (8, 12, 0, 0, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.rank_pattern) == (0.85, 0.85, 0.5, None)
    assert config.peft_type == "ADALORA"
    spec = get_method("adalora")
    assert spec.config_cls is AdaLoraConfig and spec.prefix == "lora_"
    assert spec.parameter_containers == ("lora_A", "lora_B", "lora_E") and spec.module_containers == ()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), "total_step"),
        (dict(total_step=0), "total_step"),
        (dict(total_step=10, tinit=5, tfinal=5), "budgeting phase"),
        (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
        (dict(total_step=10, use_dora=True), "DoRA"),
        (dict(total_step=10, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "LOFTQ"),
        (dict(total_step=10, rank_pattern={"m.lora_E": [True, 2]}), "bools"),
        (dict(total_step=10, rank_pattern=[True]), "dict"),
        (dict(total_step=10, layers_pattern="layers"), "layers_to_transform"),
    ],
)
def test_rejected_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaLoraConfig(**kwargs)


def test_r_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="`r` is not used in AdaLora"):
        AdaLoraConfig(r=4, total_step=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLoraConfig(total_step=10)


def test_rank_pattern_round_trips_through_json():
    config = AdaLoraConfig(total_step=10, init_r=3, rank_pattern={"m.lora_E": [True, False, True]})
    data = json.loads(config.to_json_string())
    assert data["rank_pattern"] == {"m.lora_E": [True, False, True]} and data["peft_type"] == "ADALORA"
    assert PeftConfig.from_dict(data) == config
    assert json.loads(AdaLoraConfig(total_step=10).to_json_string())["rank_pattern"] is None
