"""``IA3Config``: defaults, ``__post_init__`` rules, model defaults, weighted-adapter config, JSON round trip."""

from __future__ import annotations

import json

import pytest

from peftcore.config import PeftConfig
from peftcore.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from peftcore.errors import ConfigError
from peftcore.mapping import get_config_class, get_method
from peftcore.methods.ia3 import IA3Config
from peftcore.methods.ia3.config import weighted_adapter_config


def test_defaults_and_registration():
    config = IA3Config()
    assert (config.target_modules, config.exclude_modules, config.feedforward_modules) == (None, None, None)
    assert (config.fan_in_fan_out, config.modules_to_save, config.init_ia3_weights) == (False, None, True)
    assert config.peft_type == "IA3" and not config.is_prompt_learning
    spec = get_method("ia3")
    assert spec.config_cls is IA3Config and get_config_class("IA3") is IA3Config and spec.prefix == "ia3_"
    assert spec.parameter_containers == ("ia3_l",) and spec.module_containers == ()


def test_lists_become_sets_and_regexes_stay():
    config = IA3Config(target_modules=["k", "v", "w0", "k"], feedforward_modules=["w0"], exclude_modules=["x"])
    assert config.target_modules == {"k", "v", "w0"} and config.feedforward_modules == {"w0"}
    assert config.exclude_modules == {"x"}
    config = IA3Config(target_modules=".*(k|w0)", feedforward_modules=["nowhere"])  # no check for a regex
    assert config.target_modules == ".*(k|w0)" and config.feedforward_modules == {"nowhere"}


def test_feedforward_must_be_subset_of_targets():
    with pytest.raises(ConfigError, match=r"should be a subset of `target_modules`.*\['fc2'\]"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["fc2", "v"])
    with pytest.raises(ConfigError, match="configures peft_type 'IA3'"):
        IA3Config(peft_type="LORA")


@pytest.mark.parametrize("model_type", ["llama", "t5", "gpt2", "bert"])
def test_model_defaults_come_from_constants(model_type):
    original = IA3Config(task_type="CAUSAL_LM")
    config = original.with_model_defaults(model_type)
    assert config.target_modules == set(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type])
    assert config.feedforward_modules == set(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    assert original.target_modules is None and config.task_type == "CAUSAL_LM"
    given = IA3Config(target_modules=["q"], feedforward_modules=[])
    assert given.with_model_defaults(model_type) is given


def test_model_defaults_unknown_model_type():
    with pytest.raises(ConfigError, match="Please specify `target_modules`"):
        IA3Config().with_model_defaults("no-such-model")
    with pytest.raises(ConfigError, match="Please specify `feedforward_modules`"):
        IA3Config(target_modules=["q"]).with_model_defaults("no-such-model")


def test_weighted_adapter_config_unions_like_peft():
    a = IA3Config(target_modules=["k", "fc"], feedforward_modules=["fc"], init_ia3_weights=False)
    b = IA3Config(target_modules=["v", "w2"], feedforward_modules=["w2"])
    combined = weighted_adapter_config([a, b])
    assert combined.target_modules == {"k", "fc", "v", "w2"} and combined.feedforward_modules == {"fc", "w2"}
    assert combined.init_ia3_weights is False  # the rest is the first config's
    r = weighted_adapter_config([IA3Config(target_modules="a|b", feedforward_modules="b"),
                                 IA3Config(target_modules="c", feedforward_modules="c")])
    assert (r.target_modules, r.feedforward_modules) == ("(a|b)|(c)", "(b)|(c)")
    with pytest.raises(ConfigError, match="same type"):
        weighted_adapter_config([a, IA3Config(target_modules="k", feedforward_modules="k")])
    with pytest.raises(ConfigError, match="with_model_defaults"):
        weighted_adapter_config([IA3Config(), IA3Config()])


def test_json_round_trip(tmp_path):
    config = IA3Config(target_modules=["v", "k", "w0"], feedforward_modules=["w0"], fan_in_fan_out=True,
                       modules_to_save=["classifier"], init_ia3_weights=False, task_type="SEQ_2_SEQ_LM")
    data = json.loads(config.to_json_string())
    assert data["target_modules"] == ["k", "v", "w0"] and data["feedforward_modules"] == ["w0"]
    assert data["peft_type"] == "IA3" and data["init_ia3_weights"] is False
    assert PeftConfig.from_dict(data) == config
    config.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path) == config
