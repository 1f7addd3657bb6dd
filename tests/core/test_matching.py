"""Target matching: the case table, all-linear expansion, defaults and the no-match errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peftcore import LoraConfig

from peftcore.errors import ConfigError, NoMatchingModuleError, UnknownPeftTypeError
from peftcore.matching import (
    MatchOutcome,
    check_target_module_exists,
    expand_all_linear,
    find_target_modules,
    get_pattern_key,
    is_all_linear,
    layer_index,
    match_module,
    match_targets,
    resolve_rank_alpha,
    resolve_target_modules,
)
from tests.reference.matching_cases import MATCH_CASES, PATTERN_CASES, RANK_ALPHA_CASES, MatchCase

_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
           "target_parameters", "rank_pattern", "alpha_pattern", "r", "lora_alpha", "task_type", "peft_type")


def make_config(**kwargs):
    """A bare duck-typed config: every field peft's matching reads, lists turned into sets as peft does."""
    values = dict.fromkeys(_FIELDS)
    values.update(kwargs)
    for name in ("target_modules", "exclude_modules"):
        if isinstance(values[name], list):
            values[name] = set(values[name])
    return SimpleNamespace(**values)


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda c: c.id)
def test_match_case_table(case: MatchCase):
    config = make_config(**case.config)
    assert match_module(config, case.key).value == case.expected
    assert check_target_module_exists(config, case.key) is (case.expected == "targeted")


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda c: c.id)
def test_match_case_table_through_peftcore_lora_config(case: MatchCase):
    config = LoraConfig(**case.config)
    assert match_module(config, case.key).value == case.expected


def test_match_accepts_plain_lists_too():
    config = SimpleNamespace(target_modules=["q_proj"], exclude_modules=["k_proj"])
    assert check_target_module_exists(config, "a.q_proj")
    assert match_module(config, "a.k_proj") is MatchOutcome.EXCLUDED
    assert match_module(config, "a.v_proj") is MatchOutcome.UNMATCHED


def test_unresolved_none_targets_raise():
    with pytest.raises(ConfigError, match="a.q_proj"):
        match_module(make_config(), "a.q_proj")


@pytest.mark.parametrize(
    ("key", "layers_pattern", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("model.layers.1.mlp.experts.0.w1", None, 1),
        ("transformer.h.10.attn.c_attn", None, 10),
        ("layers.0.q_proj", None, None),
        ("layers.0.q_proj", "layers", 0),
        ("lm_head", None, None),
        ("model.layers.3.self_attn.q_proj", "h", None),
        ("model.blocks.2.layers.5.fc", ["layers", "blocks"], 5),
        ("model.blocks.2.layers.5.fc", "", 2),
        ("model.encoder.layer.0.q_proj", r"encoder\.layer|layers", None),
    ],
)
def test_layer_index(key, layers_pattern, expected):
    assert layer_index(key, layers_pattern=layers_pattern) == expected


@pytest.mark.parametrize("case", PATTERN_CASES, ids=lambda c: c.id)
def test_get_pattern_key(case):
    assert get_pattern_key(case.patterns.keys(), case.key) == case.expected


@pytest.mark.parametrize("case", RANK_ALPHA_CASES, ids=lambda c: c.id)
def test_resolve_rank_alpha(case):
    assert resolve_rank_alpha(SimpleNamespace(**case.config), case.key) == case.expected


def test_resolve_rank_alpha_none_patterns():
    config = SimpleNamespace(r=4, lora_alpha=8, rank_pattern=None, alpha_pattern=None)
    assert resolve_rank_alpha(config, "a.q_proj") == (4, 8.0)


@pytest.mark.parametrize("value", ["all-linear", "ALL-LINEAR", "All-Linear"])
def test_is_all_linear(value):
    assert is_all_linear(value)


@pytest.mark.parametrize("value", [["all-linear"], {"all-linear"}, "all_linear", ".*", None])
def test_is_not_all_linear(value):
    assert not is_all_linear(value)


LLAMA_LINEAR = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.down_proj",
    "lm_head",
]


def test_expand_all_linear_drops_output_embedding():
    assert expand_all_linear(LLAMA_LINEAR, output_embedding_name="lm_head") == set(LLAMA_LINEAR[:3])


def test_expand_all_linear_keeps_head_of_non_transformers_model():
    got = expand_all_linear(LLAMA_LINEAR, output_embedding_name="lm_head", is_transformers_model=False)
    assert got == set(LLAMA_LINEAR)


@pytest.mark.parametrize(
    ("top_level", "expected_removed"),
    [(["bert", "classifier"], "classifier"), (["model", "score"], "score"), (["score", "classifier"], "score")],
)
def test_expand_all_linear_seq_cls_head(top_level, expected_removed):
    linear = ["bert.encoder.layer.0.attention.self.query", "classifier", "score"]
    got = expand_all_linear(linear, task_type="SEQ_CLS", top_level_names=top_level)
    assert got == set(linear) - {expected_removed}


def test_expand_all_linear_seq_cls_only_without_output_embedding():
    linear = ["h.0.c_attn", "lm_head", "score"]
    got = expand_all_linear(linear, output_embedding_name="lm_head", task_type="SEQ_CLS", top_level_names=["score"])
    assert got == {"h.0.c_attn", "score"}


def test_expand_all_linear_other_task_keeps_classifier():
    linear = ["encoder.dense", "classifier"]
    assert expand_all_linear(linear, task_type="CAUSAL_LM", top_level_names=["classifier"]) == set(linear)


def test_expand_all_linear_skips_inside_tuner_layers():
    linear = ["a.q_proj", "a.q_proj.lora_A.default", "a.q_proj.lora_B.default", "a.q_projection"]
    got = expand_all_linear(linear, tuner_layer_names=["a.q_proj"])
    assert got == {"a.q_proj", "a.q_projection"}


LLAMA_MODULES = [
    "",
    "model",
    "model.embed_tokens",
    "model.layers",
    "model.layers.0",
    "model.layers.0.self_attn",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp",
    "model.layers.0.mlp.down_proj",
    "model.layers.1",
    "model.layers.1.self_attn",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp",
    "model.layers.1.mlp.down_proj",
    "model.norm",
    "lm_head",
]
LLAMA_LINEAR_ALL = [n for n in LLAMA_MODULES if n.endswith("_proj")] + ["lm_head"]


def test_find_defaults_from_model_type():
    got = find_target_modules(make_config(peft_type="LORA"), LLAMA_MODULES, model_type="llama")
    assert got == [n for n in LLAMA_MODULES if n.endswith(("q_proj", "v_proj"))]


def test_find_defaults_depend_on_method():
    got = find_target_modules(make_config(peft_type="IA3"), LLAMA_MODULES, model_type="llama")
    assert got == [n for n in LLAMA_MODULES if n.endswith(("k_proj", "v_proj", "down_proj"))]


def test_find_defaults_keyword_overrides_config_peft_type():
    got = find_target_modules(make_config(), LLAMA_MODULES, model_type="llama", peft_type="ia3")
    assert got == [n for n in LLAMA_MODULES if n.endswith(("k_proj", "v_proj", "down_proj"))]


def test_find_defaults_unknown_model_type_names_it():
    with pytest.raises(ConfigError, match="Please specify `target_modules`.*'my_arch'"):
        find_target_modules(make_config(peft_type="LORA"), LLAMA_MODULES, model_type="my_arch")


def test_find_defaults_without_model_type():
    with pytest.raises(ConfigError, match="Please specify `target_modules`.*model type is unknown"):
        find_target_modules(make_config(peft_type="LORA"), LLAMA_MODULES)


def test_find_defaults_unknown_method():
    with pytest.raises(UnknownPeftTypeError, match="PREFIX_TUNING"):
        find_target_modules(make_config(peft_type="PREFIX_TUNING"), LLAMA_MODULES, model_type="llama")


def test_resolve_does_not_mutate_config():
    config = make_config(peft_type="LORA")
    assert resolve_target_modules(config, model_type="llama") == {"q_proj", "v_proj"}
    assert config.target_modules is None


def test_find_all_linear():
    config = make_config(target_modules="all-linear")
    got = find_target_modules(config, LLAMA_MODULES, linear_module_names=LLAMA_LINEAR_ALL,
                              output_embedding_name="lm_head")
    assert got == LLAMA_LINEAR_ALL[:-1]


def test_find_all_linear_needs_linear_names():
    with pytest.raises(ConfigError, match="linear_module_names"):
        find_target_modules(make_config(target_modules="all-linear"), LLAMA_MODULES)


def test_find_all_linear_with_exclude_and_layers():
    config = make_config(target_modules="all-linear", exclude_modules=["k_proj"])
    got = find_target_modules(config, LLAMA_MODULES, linear_module_names=LLAMA_LINEAR_ALL,
                              output_embedding_name="lm_head")
    assert got == [n for n in LLAMA_LINEAR_ALL[:-1] if not n.endswith("k_proj")]


def test_find_skips_root_and_inside_tuner_layers():
    names = ["", "q_proj", "a.q_proj", "a.q_proj.base_layer", "a.q_proj.lora_A.q_proj"]
    got = find_target_modules(make_config(target_modules=["q_proj"]), names, tuner_layer_names=["a.q_proj"])
    assert got == ["q_proj", "a.q_proj"]


def test_find_layers_to_transform():
    config = make_config(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    got = find_target_modules(config, LLAMA_MODULES)
    assert got == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_find_dummy_targets_match_nothing_without_error():
    result = match_targets(make_config(target_modules="dummy-target-modules"), LLAMA_MODULES)
    assert result.matched == [] and result.target_modules == "dummy-target-modules"


def test_find_target_parameters_only_returns_empty_without_error():
    config = make_config(target_modules=None, target_parameters=["experts.gate_up_proj"])
    assert find_target_modules(config, LLAMA_MODULES) == []


def test_match_result_reports_unused_targets_and_patterns():
    config = make_config(target_modules=["q_proj", "qproj", "o_proj"], exclude_modules=["k_proj"],
                         rank_pattern={"q_proj": 2, "gate_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    result = match_targets(config, LLAMA_MODULES)
    assert result.matched == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert result.excluded == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert result.unused_targets == ["o_proj", "qproj"]
    assert not result.unused_exclude
    assert result.unused_rank_pattern_keys == ["gate_proj"]
    assert result.unused_alpha_pattern_keys == []
    assert result.warnings() == [
        "The following rank_pattern keys did not match any targeted module and were ignored: ['gate_proj']."
    ]


def test_match_result_unused_exclude_warning():
    result = match_targets(make_config(target_modules=["q_proj"], exclude_modules=["o_proj"]), LLAMA_MODULES)
    assert result.unused_exclude
    assert "exclude_modules={'o_proj'} but no modules were excluded" in result.warnings()[0]


def test_no_match_all_excluded():
    config = make_config(target_modules=["q_proj"], exclude_modules=".*")
    with pytest.raises(NoMatchingModuleError, match="All modules were excluded"):
        find_target_modules(config, LLAMA_MODULES)


def test_no_match_empty_targets():
    with pytest.raises(NoMatchingModuleError, match="No `target_modules` passed"):
        find_target_modules(make_config(target_modules=[]), LLAMA_MODULES)


def test_no_match_targets_not_found_suggests_close_names():
    config = make_config(target_modules=["qproj", "v_prj"], layers_to_transform=[0])
    with pytest.raises(NoMatchingModuleError) as info:
        find_target_modules(config, LLAMA_MODULES)
    message = str(info.value)
    assert message.startswith("Target modules {")
    assert "not found in the base model" in message
    assert "'layers_to_transform': [0]" in message
    assert "'qproj' not found; close module names: ['q_proj'" in message
    assert "'v_prj' not found; close module names: ['v_proj'" in message


def test_no_match_regex_suggests_full_match():
    with pytest.raises(NoMatchingModuleError, match=r"regex that must match the WHOLE module name.*'\.\*q_proj'"):
        find_target_modules(make_config(target_modules="q_proj"), LLAMA_MODULES)


def test_no_match_mixed_excluded_and_unmatched():
    config = make_config(target_modules=["lm_head"], modules_to_save=["lm_head"], layers_pattern="layers",
                         layers_to_transform=[0])
    with pytest.raises(NoMatchingModuleError, match="No modules were targeted.*'layers_pattern': layers"):
        find_target_modules(config, LLAMA_MODULES)
