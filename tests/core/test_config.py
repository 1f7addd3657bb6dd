"""``PeftConfig`` / ``LoraConfig``: defaults, validation, serialisation, unknown keys, the registry.

Expected defaults and messages are transcribed from peft 0.21.2's ``LoraConfig``
(``peft/tuners/lora/config.py``) and ``spec/config.md``, not from peftcore's output.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore import (
    PEFT_FORMAT_VERSION,
    LoraConfig,
    PeftConfig,
    PeftType,
    TaskType,
    UnknownConfigFieldsWarning,
    get_config_class,
    get_method,
    get_peft_config,
    get_prefix,
)
from peftcore.constants import CONFIG_NAME
from peftcore.errors import AdapterFileError, AdapterNotFoundError, ConfigError, UnknownPeftTypeError

# peft 0.21.2 LoraConfig defaults (spec/config.md, section "Fields"); runtime_config is never serialised
LORA_DEFAULTS = {
    "task_type": None,
    "peft_type": "LORA",
    "auto_mapping": None,
    "peft_version": "0.21.2",
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

EVA_DEFAULTS = {
    "rho": 2.0,
    "tau": 0.99,
    "use_label_mask": True,
    "label_mask_value": -100,
    "whiten": False,
    "adjust_scaling_factors": True,
}
CORDA_DEFAULTS = {
    "cache_file": None,
    "covariance_file": None,
    "corda_method": "ipm",
    "verbose": False,
    "use_float16_for_covariance": False,
    "prune_temporary_fields": True,
}


def _write(path, text: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(text)
    return path


# -- defaults and normalisation ---------------------------------------------------------------


def test_defaults_match_peft():
    config = LoraConfig()
    assert config.to_dict() == LORA_DEFAULTS
    assert LoraConfig.field_names() == tuple(LORA_DEFAULTS)
    assert config.peft_type is PeftType.LORA and config.unknown_fields == {}
    assert PEFT_FORMAT_VERSION == "0.21.2"
    assert config.is_prompt_learning is False


def test_task_and_peft_type_accept_strings_and_enums():
    assert LoraConfig(task_type="CAUSAL_LM").task_type is TaskType.CAUSAL_LM
    assert LoraConfig(task_type=TaskType.SEQ_CLS).task_type is TaskType.SEQ_CLS
    assert LoraConfig(peft_type="lora").peft_type is PeftType.LORA
    assert LoraConfig(peft_type=PeftType.LORA).peft_type is PeftType.LORA
    assert str(TaskType.CAUSAL_LM) == "CAUSAL_LM" and str(PeftType.LORA) == "LORA"
    assert LoraConfig(task_type="TOKEN_CLS") == LoraConfig(task_type=TaskType.TOKEN_CLS)


def test_explicit_peft_version_is_kept():
    assert LoraConfig(peft_version="0.13.0").peft_version == "0.13.0"


@pytest.mark.parametrize(
    ("given_targets", "expected"),
    [
        (["q_proj", "v_proj", "q_proj"], {"q_proj", "v_proj"}),
        (("v_proj", "q_proj"), {"q_proj", "v_proj"}),
        ({"k"}, {"k"}),
        (".*attn.*", ".*attn.*"),
        ("all-linear", "all-linear"),
        (None, None),
    ],
)
def test_target_and_exclude_modules_become_sets_unless_a_string(given_targets, expected):
    config = LoraConfig(target_modules=given_targets, exclude_modules=given_targets)
    assert config.target_modules == expected and config.exclude_modules == expected
    written = json.loads(config.to_json_string())
    as_json = sorted(expected) if isinstance(expected, set) else expected
    assert written["target_modules"] == as_json and written["exclude_modules"] == as_json


def test_sets_are_written_as_sorted_lists():
    config = LoraConfig(target_modules=["v_proj", "q_proj", "k_proj", "o_proj"])
    assert json.loads(config.to_json_string())["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_pissa_niter():
    assert LoraConfig(init_lora_weights="pissa_niter_16").pissa_niter == 16
    assert LoraConfig(init_lora_weights="pissa").pissa_niter is None
    assert LoraConfig().pissa_niter is None


@pytest.mark.parametrize(
    "mode", ["gaussian", "olora", "pissa", "pissa_niter_4", "orthogonal", "mica", "lora_ga", False]
)
def test_every_init_mode_peft_knows_is_accepted(mode):
    assert LoraConfig(init_lora_weights=mode).init_lora_weights == mode


# -- sub-configs ------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoftQ:  # stands in for peft's LoftQConfig dataclass
    loftq_bits: int = 4
    loftq_iter: int = 1


@pytest.mark.parametrize(
    "name", ["eva_config", "corda_config", "lora_ga_config", "velora_config", "monteclora_config", "kasa_config",
             "arrow_config", "use_bdlora"],
)
def test_sub_configs_are_completed_and_unknown_sub_keys_kept(name, recwarn):
    value = {"some_field": 1.5, "nested": {"a": [1, 2]}}
    config = LoraConfig(**{name: value})
    assert any(
        issubclass(w.category, UnknownConfigFieldsWarning) and f"`{name}` has keys this version does not know"
        in str(w.message) for w in recwarn
    )
    stored = getattr(config, name)
    assert stored is not value and {k: stored[k] for k in value} == value
    assert len(stored) > len(value)  # completed with the sub-config's defaults
    assert json.loads(config.to_json_string())[name] == stored
    with pytest.raises(ConfigError, match=f"{name} must be None or a dict, got list"):
        LoraConfig(**{name: [1, 2]})


def test_megatron_config_is_carried_as_given():
    value = {"some_field": 1.5, "nested": {"a": [1, 2]}}
    config = LoraConfig(megatron_config=value)
    assert config.megatron_config == value and config.megatron_config is not value


def test_dataclass_sub_configs_become_dicts():
    config = LoraConfig(init_lora_weights="loftq", loftq_config=_LoftQ())
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    assert json.loads(config.to_json_string())["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}


def test_default_eva_and_corda_sub_configs_are_filled_in():
    with pytest.warns(UserWarning, match="`init_lora_weights` is 'eva' but `eva_config` is not specified"):
        assert LoraConfig(init_lora_weights="eva").eva_config == EVA_DEFAULTS
    with pytest.warns(UserWarning, match="`init_lora_weights` is 'corda' but `corda_config` is not specified"):
        assert LoraConfig(init_lora_weights="corda").corda_config == CORDA_DEFAULTS


def test_ignored_sub_configs_warn():
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        config = LoraConfig(loftq_config={"loftq_bits": 4})
    assert config.loftq_config == {}
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored"):
        assert LoraConfig(eva_config={"rho": 3.0}).eva_config == {**EVA_DEFAULTS, "rho": 3.0}
    with pytest.warns(UserWarning, match="`corda_config` specified but will be ignored"):
        LoraConfig(corda_config={"corda_method": "kpm"})


def test_other_warnings():
    with pytest.warns(UserWarning, match="aLoRA is currently only supported for CAUSAL_LM task"):
        LoraConfig(alora_invocation_tokens=[1, 2])
    LoraConfig(alora_invocation_tokens=[1, 2], task_type="CAUSAL_LM")  # no warning (filterwarnings=error)
    with pytest.warns(UserWarning, match="Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern"):
        LoraConfig(use_rslora=True, rank_pattern={"q": 4}, init_lora_weights="pissa")
    LoraConfig(use_rslora=True, rank_pattern={"q": 4})  # no conversion of the base: no warning


# -- validation -------------------------------------------------------------------------------


INVALID = [
    # peft's own rules (peft raises ValueError with the same text)
    (dict(task_type="NOPE"), "Invalid task type: 'NOPE'"),
    (dict(task_type="causal_lm"), "Invalid task type"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "`layers_to_transform` cannot be used when `target_modules`"),
    (dict(target_modules=".*q", layers_pattern="layers"), "`layers_pattern` cannot be used when `target_modules` is"),
    (dict(layers_pattern="layers"), "When `layers_pattern` is specified, `layers_to_transform` must also be specified"),
    (dict(use_dora=True, megatron_config={"a": 1}), "DoRA does not support megatron_core"),
    (dict(init_lora_weights="loftq"), "`loftq_config` must be specified when `init_lora_weights` is 'loftq'"),
    (dict(init_lora_weights="loftq", loftq_config={}), "`loftq_config` must be specified"),
    (dict(lora_bias=True, init_lora_weights="gaussian"), "lora_bias=True is only supported with init_lora_weights=True"),
    (dict(lora_bias=True, use_dora=True), "lora_bias=True is not supported for DoRA"),
    (dict(target_parameters="weight"), "`target_parameters` must be a list of strings or None"),
    # peftcore is stricter (peft fails later, at layer creation, or never)
    (dict(r=0), "`r` should be a positive integer value but the value passed is 0"),
    (dict(r=-2), "`r` should be a positive integer"),
    (dict(r=2.5), "`r` should be a positive integer"),
    (dict(r=True), "`r` should be a positive integer"),
    (dict(lora_alpha="8"), "`lora_alpha` must be a number, got '8'"),
    (dict(lora_alpha=None), "`lora_alpha` must be a number"),
    (dict(lora_dropout=1.5), r"`lora_dropout` must be a number in \[0, 1\], got 1.5"),
    (dict(lora_dropout=-0.1), r"`lora_dropout` must be a number in \[0, 1\]"),
    (dict(lora_dropout="x"), r"`lora_dropout` must be a number in \[0, 1\], got 'x'"),
    (dict(lora_dropout=None), r"`lora_dropout` must be a number"),
    (dict(bias="some"), "`bias` must be 'none', 'all' or 'lora_only', got 'some'"),
    (dict(init_lora_weights="foo"), "`init_lora_weights` must be True, False, one of"),
    (dict(init_lora_weights="pissa_niter_"), "`init_lora_weights` must be"),
    (dict(init_lora_weights=None), "`init_lora_weights` must be"),
    (dict(rank_pattern={"q": 0}), r"`rank_pattern\['q'\]` must be a positive integer, got 0"),
    (dict(rank_pattern={"q": 2.5}), r"`rank_pattern\['q'\]` must be a positive integer"),
    (dict(alpha_pattern={"q": "x"}), "`alpha_pattern` maps module-name patterns to numbers; bad entry 'q': 'x'"),
    (dict(alpha_pattern={3: 1.0}), "`alpha_pattern` maps module-name patterns to numbers"),
    (dict(peft_type="IA3"), "LoraConfig configures peft_type 'LORA', got 'IA3'"),
    (dict(loftq_config=5), "loftq_config must be None or a dict, got int"),
    (dict(unknown_fields=[1]), "unknown_fields must be a dict"),
]


@pytest.mark.parametrize(("kwargs", "match"), INVALID, ids=[str(k) for k, _ in INVALID])
def test_invalid_configs_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)
    with pytest.raises(ValueError):  # what a peft user catches
        LoraConfig(**kwargs)


def test_errors_from_a_dict_name_the_source():
    with pytest.raises(ConfigError, match=r"`r` should be a positive integer.* in my_file\.json"):
        LoraConfig.from_dict({"r": 0}, source="my_file.json")
    with pytest.raises(ConfigError, match="config in x must be a JSON object, got list"):
        LoraConfig.from_dict([1], source="x")


# -- dict / JSON round trips ------------------------------------------------------------------


def test_to_json_string_is_sorted_indented_json():
    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    text = config.to_json_string()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    assert text.startswith('{\n  "alora_invocation_tokens": null,\n  "alpha_pattern": {},')
    assert json.loads(text)["task_type"] == "CAUSAL_LM" and json.loads(text)["peft_type"] == "LORA"
    assert json.loads(config.to_json_string(inference_mode=True))["inference_mode"] is True
    assert config.inference_mode is False


def test_save_and_load_round_trip(tmp_path):
    config = LoraConfig(
        r=16,
        lora_alpha=32.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 2.5},
        layer_replication=[[0, 2], [1, 3]],
        trainable_token_indices={"embed_tokens": [1, 2]},
        use_dora=True,
        task_type="SEQ_CLS",
        base_model_name_or_path="tiny/model",
        revision="main",
    )
    path = config.save_pretrained(tmp_path)
    assert path == tmp_path / CONFIG_NAME and path.read_text() == config.to_json_string()
    for loader in (LoraConfig, PeftConfig):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is LoraConfig
        assert loaded == config and loaded.to_json_string() == config.to_json_string()
    assert LoraConfig.from_pretrained(tmp_path / CONFIG_NAME) == config
    assert LoraConfig.from_dict(config.to_dict()) == config



def test_tuples_are_written_as_lists():
    # as in peft, the pairs are not normalised in memory: tuples in, lists back from JSON
    config = LoraConfig(layer_replication=[(0, 2), (1, 3)])
    assert json.loads(config.to_json_string())["layer_replication"] == [[0, 2], [1, 3]]
    assert LoraConfig.from_dict(json.loads(config.to_json_string())).layer_replication == [[0, 2], [1, 3]]


def test_save_pretrained_inference_mode_and_subfolder(tmp_path):
    LoraConfig(r=2).save_pretrained(tmp_path / "sub", inference_mode=True)
    loaded = PeftConfig.from_pretrained(tmp_path, subfolder="sub")
    assert loaded.inference_mode is True and loaded.r == 2


def test_save_pretrained_into_a_file_fails(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AdapterFileError, match="is a file"):
        LoraConfig().save_pretrained(tmp_path / "f")


def test_old_files_missing_newer_keys_load_with_defaults(tmp_path):
    _write(tmp_path, json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q"], "lora_alpha": 16}))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded == LoraConfig(r=4, target_modules={"q"}, lora_alpha=16)
    assert loaded.use_dora is False and loaded.ensure_weight_tying is False


@settings(deadline=None, max_examples=40)
@given(
    r=st.integers(1, 64),
    lora_alpha=st.one_of(st.integers(1, 64), st.floats(0.5, 64.0, allow_nan=False)),
    lora_dropout=st.floats(0.0, 0.99),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    use_rslora=st.booleans(),
    use_dora=st.booleans(),
    fan_in_fan_out=st.booleans(),
    targets=st.one_of(
        st.none(),
        st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "fc1"]), min_size=1, max_size=5),
        st.just("all-linear"),
    ),
    init=st.sampled_from([True, False, "gaussian", "olora", "pissa", "pissa_niter_2", "orthogonal"]),
    ranks=st.dictionaries(st.sampled_from(["q", "v", "layers.0"]), st.integers(1, 16), max_size=2),
    alphas=st.dictionaries(st.sampled_from(["q", "v"]), st.floats(0.5, 32.0, allow_nan=False), max_size=2),
    task=st.sampled_from([None, *TaskType]),
    modules_to_save=st.one_of(st.none(), st.just(["classifier"])),
)
def test_any_valid_config_survives_json(**draw):
    init = draw["init"]
    converts_base = isinstance(init, str) and (init.startswith("pissa") or init == "olora")
    # rsLoRA + patterns + a base-converting init only warns (tested above); keep the draw warning-free
    rsl = draw["use_rslora"] and not ((draw["ranks"] or draw["alphas"]) and converts_base)
    config = LoraConfig(
        r=draw["r"],
        lora_alpha=draw["lora_alpha"],
        lora_dropout=draw["lora_dropout"],
        bias=draw["bias"],
        use_rslora=rsl,
        use_dora=draw["use_dora"],
        fan_in_fan_out=draw["fan_in_fan_out"],
        target_modules=draw["targets"],
        init_lora_weights=init,
        rank_pattern=draw["ranks"],
        alpha_pattern=draw["alphas"],
        task_type=draw["task"],
        modules_to_save=draw["modules_to_save"],
    )
    text = config.to_json_string()
    loaded = get_peft_config(json.loads(text))
    assert loaded == config and loaded.to_json_string() == text
    assert math.isclose(json.loads(text)["lora_alpha"], draw["lora_alpha"])


# -- unknown keys -----------------------------------------------------------------------------


def test_unknown_keys_are_kept_warned_and_written_back(tmp_path):
    data = {**LoraConfig(r=4).to_dict(), "future_field": {"x": [1, 2]}, "another": True}
    _write(tmp_path, json.dumps(data))
    with pytest.warns(UnknownConfigFieldsWarning, match=r"unknown config keys .*\['another', 'future_field'\]"):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded.unknown_fields == {"future_field": {"x": [1, 2]}, "another": True}
    assert loaded == LoraConfig(r=4)  # unknown keys do not take part in equality
    assert loaded.to_dict()["future_field"] == {"x": [1, 2]}
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text()) == data


def test_unknown_keys_warning_names_the_file(tmp_path):
    _write(tmp_path, json.dumps({"peft_type": "LORA", "zzz": 1}))
    with pytest.warns(UnknownConfigFieldsWarning, match=str(tmp_path / CONFIG_NAME)):
        LoraConfig.from_pretrained(tmp_path)


def test_runtime_config_is_ignored_silently():
    loaded = LoraConfig.from_dict({"peft_type": "LORA", "runtime_config": {"ephemeral_gpu_offload": True}})
    assert loaded.unknown_fields == {} and "runtime_config" not in loaded.to_dict()


# -- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("peft_type", ["LORA", "lora", "Lora", PeftType.LORA])
def test_registry_dispatches_on_peft_type(peft_type):
    assert get_config_class(peft_type) is LoraConfig
    assert get_prefix(peft_type) == "lora_"
    spec = get_method(peft_type)
    assert spec.config_cls is LoraConfig and "lora_A" in spec.containers and "lora_embedding_A" in spec.containers
    config = get_peft_config({"peft_type": peft_type, "r": 4, "target_modules": ["q"]})
    assert config == LoraConfig(r=4, target_modules=["q"])


def test_registry_errors():
    with pytest.raises(UnknownPeftTypeError, match="unknown peft_type 'NOT_A_METHOD'"):
        get_peft_config({"peft_type": "NOT_A_METHOD"})
    with pytest.raises(UnknownPeftTypeError, match="must be a string"):
        get_config_class(3)
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        get_peft_config({"r": 4})
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        PeftConfig.from_dict({"r": 4})
    with pytest.raises(UnknownPeftTypeError, match="unknown peft_type 'XYZ'.* in somewhere"):
        PeftConfig.from_dict({"peft_type": "XYZ"}, source="somewhere")


# -- from_pretrained errors -------------------------------------------------------------------


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(AdapterNotFoundError, match=f"no {CONFIG_NAME} at {tmp_path}"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        PeftConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [
        (b'{"peft_type": "LORA",', AdapterFileError, "malformed JSON"),
        (b"", AdapterFileError, "malformed JSON"),
        (b'"LORA"', AdapterFileError, "expected a JSON object, got str"),
        (b"\xff\xfe{}", AdapterFileError, "not UTF-8"),
        (b'{"peft_type": "IA3"}', ConfigError, "peft_type is 'IA3', but LoraConfig reads 'LORA'"),
        (b'{"peft_type": "LORA", "r": -1}', ConfigError, "`r` should be a positive integer"),
        (b'{"peft_type": "LORA", "bias": "nope"}', ConfigError, "`bias` must be"),
    ],
)
def test_from_pretrained_errors_name_the_file(tmp_path, content, error, match):
    tmp_path.joinpath(CONFIG_NAME).write_bytes(content)
    with pytest.raises(error, match=match) as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_base_class_reading_unknown_method_names_the_file(tmp_path):
    _write(tmp_path, json.dumps({"peft_type": "SOMETHING_NEW"}))
    with pytest.raises(UnknownPeftTypeError, match=str(tmp_path / CONFIG_NAME)):
        PeftConfig.from_pretrained(tmp_path)


# -- spec/config.md ---------------------------------------------------------------------------


def test_spec_example_is_what_we_write_and_read(tmp_path):
    from pathlib import Path

    spec = (Path(__file__).resolve().parents[2] / "spec" / "config.md").read_text()
    example = spec.split("```json\n", 1)[1].split("\n```", 1)[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    assert config.to_json_string(inference_mode=True) == example
    _write(tmp_path, example)
    assert PeftConfig.from_pretrained(tmp_path) == dataclasses.replace(config, inference_mode=True)
    # the spec's default column for the example's untouched fields agrees with LORA_DEFAULTS
    written = json.loads(example)
    for key, default in LORA_DEFAULTS.items():
        if key not in ("r", "target_modules", "use_dora", "task_type", "inference_mode"):
            assert written[key] == default, key
