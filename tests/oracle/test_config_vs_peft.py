"""``LoraConfig`` against peft's: fields, defaults, JSON bytes, file round trips both ways, validation parity."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

peft = pytest.importorskip("peft")
pytest.importorskip("torch")

from peft.tuners.lora import config as peft_lora_config  # noqa: E402

from peftcore import LoraConfig, PeftConfig, UnknownConfigFieldsWarning  # noqa: E402
from peftcore.constants import CONFIG_NAME  # noqa: E402
from peftcore.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.oracle

# peft-only: runtime settings, never serialised; peftcore-only: keys of newer peft versions, kept
PEFT_ONLY_FIELDS = {"runtime_config"}
OURS_ONLY_FIELDS = {"unknown_fields"}


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _warnings_of(fn, *args, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, sorted(str(w.message) for w in caught if issubclass(w.category, UserWarning))


def _peft_text(kwargs, tmp_path) -> str:
    _quiet(peft.LoraConfig, **kwargs).save_pretrained(str(tmp_path))
    return (tmp_path / CONFIG_NAME).read_text()


def _normalised(text: str) -> dict:
    data = json.loads(text)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    return data


# -- fields and defaults ----------------------------------------------------------------------


def test_field_names_order_and_defaults_equal_peft():
    theirs = [(f.name, _default(f)) for f in dataclasses.fields(peft.LoraConfig) if f.name not in PEFT_ONLY_FIELDS]
    ours = [(f.name, _default(f)) for f in dataclasses.fields(LoraConfig) if f.name not in OURS_ONLY_FIELDS]
    assert ours == theirs
    assert LoraConfig.field_names() == tuple(name for name, _ in theirs)


def test_default_json_equals_peft(tmp_path):
    assert LoraConfig().to_json_string() == _peft_text({}, tmp_path)
    assert set(json.loads(LoraConfig().to_json_string())) == set(peft.LoraConfig().to_dict())


@pytest.mark.parametrize(
    ("init", "field", "peft_cls"),
    [("eva", "eva_config", peft_lora_config.EvaConfig), ("corda", "corda_config", peft_lora_config.CordaConfig)],
)
def test_filled_in_sub_config_defaults_equal_peft(init, field, peft_cls):
    ours = _quiet(LoraConfig, init_lora_weights=init)
    assert getattr(ours, field) == dataclasses.asdict(peft_cls())


# -- JSON text --------------------------------------------------------------------------------

# configs with at most one target module: peft writes sets in set order, so only these compare as bytes
SINGLE_TARGET_CONFIGS = [
    {},
    dict(r=16, lora_alpha=32, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    dict(r=4, lora_alpha=8.5, lora_dropout=0.05, bias="lora_only", use_rslora=True, target_modules="all-linear"),
    dict(target_modules=r".*\.(q|v)_proj", use_dora=True, fan_in_fan_out=True, task_type="SEQ_CLS"),
    dict(target_modules=["c_attn"], exclude_modules=["lm_head"], modules_to_save=["classifier", "score"]),
    dict(target_modules=["q"], layers_to_transform=[0, 1], layers_pattern="layers", init_lora_weights=False),
    dict(rank_pattern={"q": 2, "model.layers.0.v": 4}, alpha_pattern={"q": 3.5}, init_lora_weights="gaussian"),
    dict(init_lora_weights="pissa_niter_4", base_model_name_or_path="org/model", revision="v1"),
    dict(init_lora_weights="olora", layer_replication=[[0, 2], [1, 3]]),
    dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
    dict(init_lora_weights="eva"),
    dict(init_lora_weights="corda"),
    dict(lora_bias=True, trainable_token_indices={"embed_tokens": [1, 2, 3]}),
    dict(trainable_token_indices=[0, 5], ensure_weight_tying=True, target_modules=["lm_head"]),
    dict(alora_invocation_tokens=[7, 8], task_type="CAUSAL_LM", use_qalora=True, qalora_group_size=32),
    dict(megatron_config={"num_layers": 2}, megatron_core="megatron.core", target_parameters=["experts.w"]),
    dict(inference_mode=True, auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "x"}),
    dict(target_modules=["v_proj"], peft_version="0.13.0"),
    # complete sub-configs (what peft itself writes) travel unchanged
    dict(velora_config={"num_groups": 8, "scale": 1.0, "init_type": "random"}),
    dict(kasa_config={"beta": 0.1, "gamma": 0.001}),
]
MULTI_TARGET_CONFIGS = [
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], exclude_modules=["a", "b"]),
    dict(target_modules=["fc1", "fc2"], use_dora=True, task_type="TOKEN_CLS", modules_to_save=["x"]),
]


@pytest.mark.parametrize("kwargs", SINGLE_TARGET_CONFIGS, ids=lambda k: ",".join(k) or "defaults")
def test_json_text_is_byte_identical_to_peft(kwargs, tmp_path):
    ours = _quiet(LoraConfig, **kwargs)
    assert ours.to_json_string() == _peft_text(kwargs, tmp_path)
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / CONFIG_NAME).read_text() == (tmp_path / CONFIG_NAME).read_text()


@pytest.mark.parametrize("kwargs", MULTI_TARGET_CONFIGS, ids=lambda k: ",".join(k))
def test_json_equals_peft_up_to_set_order(kwargs, tmp_path):
    ours_text = _quiet(LoraConfig, **kwargs).to_json_string()
    theirs_text = _peft_text(kwargs, tmp_path)
    assert _normalised(ours_text) == _normalised(theirs_text)
    # the one deliberate difference: peftcore writes sets sorted, so its files are reproducible
    assert json.loads(ours_text)["target_modules"] == sorted(kwargs["target_modules"])


@pytest.mark.parametrize(
    "kwargs", SINGLE_TARGET_CONFIGS + MULTI_TARGET_CONFIGS, ids=lambda k: ",".join(k) or "defaults"
)
def test_files_load_both_ways(kwargs, tmp_path):
    expected = _quiet(LoraConfig, **kwargs)
    _quiet(peft.LoraConfig, **kwargs).save_pretrained(str(tmp_path / "peft"))
    loaded_here = _quiet(PeftConfig.from_pretrained, tmp_path / "peft")
    assert loaded_here == expected and loaded_here.unknown_fields == {}

    expected.save_pretrained(tmp_path / "ours")
    loaded_there = _quiet(peft.PeftConfig.from_pretrained, str(tmp_path / "ours"))
    assert type(loaded_there) is peft.LoraConfig
    peft_expected = _quiet(peft.LoraConfig, **kwargs)
    assert _normalised(json.dumps(loaded_there.to_dict(), default=sorted, sort_keys=True)) == _normalised(
        json.dumps(peft_expected.to_dict(), default=sorted, sort_keys=True)
    )


# -- warnings ---------------------------------------------------------------------------------

WARNING_CASES = [
    dict(init_lora_weights="eva"),
    dict(init_lora_weights="corda"),
    dict(loftq_config={"loftq_bits": 4}),
    dict(eva_config={"rho": 2.0}),
    dict(corda_config={"corda_method": "kpm"}),
    dict(alora_invocation_tokens=[1]),
    dict(use_rslora=True, alpha_pattern={"q": 2}, init_lora_weights="olora"),
]


@pytest.mark.parametrize("kwargs", WARNING_CASES, ids=lambda k: ",".join(k))
def test_same_warnings_as_peft(kwargs):
    _, ours = _warnings_of(LoraConfig, **kwargs)
    _, theirs = _warnings_of(peft.LoraConfig, **kwargs)
    assert ours == theirs and len(ours) == 1


def test_unknown_keys_peft_drops_and_we_keep(tmp_path):
    data = {**LoraConfig(r=4).to_dict(), "field_from_the_future": [1, 2]}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    theirs, peft_warnings = _warnings_of(peft.PeftConfig.from_pretrained, str(tmp_path))
    assert any("field_from_the_future" in w for w in peft_warnings)
    assert "field_from_the_future" not in theirs.to_dict()
    with pytest.warns(UnknownConfigFieldsWarning, match="field_from_the_future"):
        ours = PeftConfig.from_pretrained(tmp_path)
    assert ours.to_dict()["field_from_the_future"] == [1, 2]
    assert ours == LoraConfig(r=4)


# -- validation parity ------------------------------------------------------------------------

# rejected by both: ValueError in peft, ConfigError (a ValueError) here
REJECTED_BY_BOTH = [
    dict(task_type="NOPE"),
    dict(task_type="causal_lm"),
    dict(target_modules=".*q", layers_to_transform=[0]),
    dict(target_modules=".*q", layers_pattern="layers"),
    dict(layers_pattern="layers"),
    dict(use_dora=True, megatron_config={"num_layers": 1}),
    dict(init_lora_weights="loftq"),
    dict(init_lora_weights="loftq", loftq_config={}),
    dict(lora_bias=True, init_lora_weights="gaussian"),
    dict(lora_bias=True, init_lora_weights="pissa"),
    dict(lora_bias=True, use_dora=True),
]

# peft raises TypeError; peftcore raises ConfigError (a ValueError, not a TypeError)
TYPE_ERRORS_IN_PEFT = [
    dict(target_parameters="weight"),
    dict(eva_config=[1]),
    dict(velora_config="x"),
]

# peftcore rejects at construction what peft accepts in the config and rejects only later, at layer
# creation (r, init_lora_weights: LoraLayer.update_layer / reset_lora_parameters; bias:
# _mark_only_adapters_as_trainable), or never
STRICTER_HERE = [
    dict(r=0),
    dict(r=-1),
    dict(r=2.5),
    dict(init_lora_weights="foo"),
    dict(init_lora_weights="pissa_niter_"),
    dict(bias="some"),
    dict(lora_alpha="8"),
    dict(lora_dropout=1.5),
    dict(lora_dropout=-0.5),
    dict(rank_pattern={"q": 0}),
    dict(alpha_pattern={"q": "x"}),
    dict(peft_type="IA3"),  # peft silently overwrites peft_type with LORA
    dict(megatron_config=[1]),
    dict(loftq_config=5),
]

# peft validates sub-config values through its sub-config dataclasses; peftcore keeps the dicts
# unchecked (reported to the lead; the features they configure are not implemented here)
SUB_CONFIG_REJECTED = [
    dict(eva_config={"rho": 0.5}),
    dict(velora_config={"num_groups": 0}),
    dict(kasa_config={"beta": -1}),
    dict(arrow_config={"top_k": 0}),
    dict(monteclora_config={"num_samples": 0}),
    dict(use_bdlora={"target_modules_bd_a": ["q"], "target_modules_bd_b": ["q"]}),
]


@pytest.mark.parametrize("kwargs", REJECTED_BY_BOTH, ids=str)
def test_rejected_by_both_with_the_same_message(kwargs):
    with pytest.raises(ValueError) as theirs:
        _quiet(peft.LoraConfig, **kwargs)
    with pytest.raises(ConfigError) as ours:
        _quiet(LoraConfig, **kwargs)
    # same leading sentence (peft quotes task types slightly differently)
    their_head = str(theirs.value).split(".")[0].replace("'", "")
    our_head = str(ours.value).split(".")[0].replace("'", "")
    assert their_head == our_head


@pytest.mark.parametrize("kwargs", TYPE_ERRORS_IN_PEFT, ids=str)
def test_type_errors_in_peft_are_config_errors_here(kwargs):
    with pytest.raises(TypeError):
        _quiet(peft.LoraConfig, **kwargs)
    with pytest.raises(ConfigError):
        _quiet(LoraConfig, **kwargs)


@pytest.mark.parametrize("kwargs", STRICTER_HERE, ids=str)
def test_peftcore_is_intentionally_stricter(kwargs):
    _quiet(peft.LoraConfig, **kwargs)  # accepted by peft's config
    with pytest.raises(ConfigError):
        _quiet(LoraConfig, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(init_lora_weights="foo")], ids=str)
def test_peft_rejects_the_stricter_cases_once_layers_are_built(kwargs):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError):
        _quiet(peft.get_peft_model, model, peft.LoraConfig(target_modules=["0"], **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    SUB_CONFIG_REJECTED,
    ids=str,
)
def test_sub_config_values_rejected_like_peft(kwargs):
    with pytest.raises(ValueError):
        _quiet(peft.LoraConfig, **kwargs)
    with pytest.raises(ConfigError):
        _quiet(LoraConfig, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kasa_config={"beta": 0.1}),
        dict(init_lora_weights="eva", eva_config={"rho": 3.0}),
        dict(arrow_config={"top_k": 2}),
        dict(use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2}),
    ],
    ids=str,
)
def test_partial_sub_configs_written_complete_like_peft(kwargs, tmp_path):
    assert _quiet(LoraConfig, **kwargs).to_json_string() == _peft_text(kwargs, tmp_path)
