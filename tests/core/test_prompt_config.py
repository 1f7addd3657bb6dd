"""Prompt-learning configs (peft's fields and checks), ``prepare_config`` and prompt tuning's text init."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftcore import PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftcore.config import TaskType
from peftcore.errors import ConfigError, ShapeMismatchError
from peftcore.mapping import get_method
from peftcore.methods.p_tuning import PromptEncoderReparameterizationType
from peftcore.methods.prompt_learning import PromptLearningConfig, prepare_config
from peftcore.methods.prompt_tuning import (
    PromptTuningInit,
    embeddings_for_token_ids,
    text_init_token_ids,
    tokenize_init_text,
)
from peftcore.testing import assert_close
from tests.reference import prompt as ref

LLAMA_GQA = dict(model_type="llama", num_hidden_layers=3, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=None)
GPT2 = dict(model_type="gpt2", n_layer=2, n_embd=12, n_head=3)
T5 = dict(model_type="t5", num_layers=2, d_model=8, num_heads=2, num_decoder_layers=3)
BART = dict(model_type="bart", num_hidden_layers=2, d_model=8, encoder_attention_heads=4)


@pytest.mark.parametrize("cls, peft_type", [(PromptTuningConfig, "PROMPT_TUNING"), (PrefixTuningConfig, "PREFIX_TUNING"),
                                            (PromptEncoderConfig, "P_TUNING")])
def test_registered_and_round_trip(tmp_path, cls, peft_type):
    spec = get_method(peft_type)
    assert spec.config_cls is cls and spec.parameter_containers == ("prompt_embeddings",)
    assert spec.prefix == peft_type.lower() + "_"
    config = cls(num_virtual_tokens=4, task_type="CAUSAL_LM")
    assert config.is_prompt_learning and not PeftConfig().is_prompt_learning
    data = json.loads(config.to_json_string())
    assert data["peft_type"] == peft_type and data["num_virtual_tokens"] == 4 and data["token_dim"] is None
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded == config


def test_enum_fields_and_peft_checks():
    config = PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB")
    assert config.prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB and config.to_dict()["prompt_tuning_init"] == "SAMPLE_VOCAB"
    assert PromptTuningConfig().prompt_tuning_init == "RANDOM"
    with pytest.raises(ConfigError, match="tokenizer_name_or_path can't be None"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text can't be None"):
        PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok")
    with pytest.raises(ConfigError, match="tokenizer_kwargs only valid"):
        PromptTuningConfig(tokenizer_kwargs={"x": 1})
    with pytest.raises(ConfigError, match="prompt_tuning_init must be one of"):
        PromptTuningConfig(prompt_tuning_init="WORDS")
    p = PromptEncoderConfig(encoder_reparameterization_type="LSTM")
    assert p.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM
    assert (p.encoder_num_layers, p.encoder_dropout, p.encoder_hidden_size) == (2, 0.0, None)
    with pytest.raises(ConfigError, match="MLP \\(recommended\\) or LSTM"):
        PromptEncoderConfig(encoder_reparameterization_type="GRU")
    with pytest.raises(ConfigError, match="init_weights"):
        PrefixTuningConfig(init_weights="ones")
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="configures peft_type 'P_TUNING'"):
        PromptEncoderConfig.from_dict({"peft_type": "PREFIX_TUNING"})
    with pytest.raises(ConfigError, match="prepare_config"):
        PromptTuningConfig(num_virtual_tokens=3).total_virtual_tokens


@pytest.mark.parametrize("model, expected", [
    (GPT2, dict(num_layers=2, token_dim=12, num_attention_heads=3)),
    (T5, dict(num_layers=2, token_dim=8, num_attention_heads=2)),
    (BART, dict(num_layers=2, token_dim=8, num_attention_heads=4)),
    (LLAMA_GQA, dict(num_layers=3, token_dim=16, num_attention_heads=4)),
    ({"text_config": GPT2, "num_hidden_layers": 9}, dict(num_layers=2, token_dim=12, num_attention_heads=3)),
])
def test_prepare_config_reads_peft_keys(model, expected):
    for cls in (PromptTuningConfig, PromptEncoderConfig):
        config = cls(num_virtual_tokens=2)
        got = prepare_config(config, model)
        assert {k: getattr(got, k) for k in expected} == expected
        assert config.token_dim is None  # the input is not touched
        assert got.num_transformer_submodules == 1
    assert prepare_config(PromptEncoderConfig(num_virtual_tokens=2), model).encoder_hidden_size == expected["token_dim"]


def test_prepare_config_submodules_follow_task_type():
    assert prepare_config(PromptTuningConfig(task_type="SEQ_2_SEQ_LM"), T5).num_transformer_submodules == 2
    assert prepare_config(PromptTuningConfig(), T5, task_type=TaskType.SEQ_2_SEQ_LM).num_transformer_submodules == 2
    assert prepare_config(PromptTuningConfig(task_type="SEQ_CLS"), T5).num_transformer_submodules == 1
    assert prepare_config(PromptTuningConfig(num_transformer_submodules=1, task_type="SEQ_2_SEQ_LM"),
                          T5).num_transformer_submodules == 1


def test_prepare_config_grouped_query_attention_only_for_prefix_tuning():
    prefix = prepare_config(PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True), LLAMA_GQA)
    # head_dim 16 // 4 = 4, two key/value heads: the prefix is 2 * 4 wide per layer, and so is the encoder default
    assert (prefix.token_dim, prefix.num_attention_heads, prefix.encoder_hidden_size) == (8, 2, 8)
    assert prepare_config(prefix, LLAMA_GQA) == prefix  # idempotent: peft re-runs it when loading
    explicit_head_dim = prepare_config(PrefixTuningConfig(num_virtual_tokens=2, token_dim=99),
                                       {**LLAMA_GQA, "head_dim": 5})
    assert (explicit_head_dim.token_dim, explicit_head_dim.num_attention_heads) == (10, 2)  # overrides, as peft
    widest = prepare_config(PrefixTuningConfig(), {**LLAMA_GQA, "global_head_dim": 6, "num_global_key_value_heads": 1})
    assert (widest.token_dim, widest.num_attention_heads) == (6, 1)
    per_layer = {**LLAMA_GQA, "head_dim": 4, "per_layer_config": {"1": {"head_dim": 8, "num_key_value_heads": 1}}}
    assert prepare_config(PrefixTuningConfig(), per_layer).token_dim == 8
    prompt = prepare_config(PromptTuningConfig(), LLAMA_GQA)
    assert (prompt.token_dim, prompt.num_attention_heads) == (16, 4)


def test_prepare_config_errors():
    with pytest.raises(ConfigError, match="Please specify `num_layers`"):
        prepare_config(PromptTuningConfig(), {"hidden_size": 4, "num_attention_heads": 2})
    with pytest.raises(ConfigError, match="Please specify `token_dim`"):
        prepare_config(PromptTuningConfig(), {"num_layers": 1, "num_attention_heads": 2})
    with pytest.raises(ConfigError, match="Please specify `num_attention_heads`"):
        prepare_config(PromptTuningConfig(), {"num_layers": 1, "hidden_size": 2})
    with pytest.raises(ConfigError, match="mapping or a transformers config"):
        prepare_config(PromptTuningConfig(), 3)
    with pytest.raises(ConfigError, match="prompt-learning configs"):
        prepare_config(PeftConfig(), GPT2)
    assert prepare_config(PromptTuningConfig(token_dim=5, num_layers=1, num_attention_heads=1), {}).token_dim == 5


def test_prepare_config_prefers_the_num_hidden_layers_attribute():
    class ModelConfig:  # a transformers config: the attribute, not the dict, gives the layer count
        num_hidden_layers = 4

        def to_dict(self):
            return {"num_layers": 7, "hidden_size": 4, "num_attention_heads": 2}

    assert prepare_config(PromptLearningConfig(), ModelConfig()).num_layers == 4


@pytest.mark.parametrize("ids, total", [([5, 6, 7], 2), ([5, 6, 7], 3), ([5, 6, 7], 8), ([9], 4)])
def test_text_init_token_ids(ids, total):
    assert text_init_token_ids(ids, total_virtual_tokens=total) == ref.text_init_ids(ids, total)

    def tokenizer(text):
        assert text == "some text"
        return {"input_ids": ids}

    assert tokenize_init_text(tokenizer, "some text", total_virtual_tokens=total) == ref.text_init_ids(ids, total)


def test_text_init_errors():
    with pytest.raises(ConfigError, match="no tokens"):
        text_init_token_ids([], total_virtual_tokens=2)
    with pytest.raises(ConfigError, match="'input_ids'"):
        tokenize_init_text(lambda text: [1, 2], "x", total_virtual_tokens=2)


def test_embeddings_for_token_ids(xp, call):
    table = np.arange(20, dtype=np.float64).reshape(5, 4) / 3
    ids = [3, 0, 3, 4]
    got = call(embeddings_for_token_ids, xp.asarray(table), xp.asarray(np.asarray(ids, dtype=np.int64)))
    assert_close(got, table[ids], xp=xp, dtype=xp.float32)
    with pytest.raises(ShapeMismatchError, match="one-dimensional"):
        embeddings_for_token_ids(xp.asarray(table), xp.asarray(np.zeros((1, 2), dtype=np.int64)))
