"""peftcore's matching and constants against peft's own functions and peft's real injection."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists as peft_check  # noqa: E402
from peft.utils import constants as peft_constants  # noqa: E402
from peft.utils.other import get_pattern_key as peft_get_pattern_key  # noqa: E402

from peftcore import constants  # noqa: E402
from peftcore.matching import (  # noqa: E402
    find_target_modules,
    get_pattern_key,
    match_module,
    resolve_rank_alpha,
)
from peftcore.methods.lora.config import LoraConfig as CoreLoraConfig  # noqa: E402
from tests.reference.matching_cases import MATCH_CASES, PATTERN_CASES, RANK_ALPHA_CASES  # noqa: E402

pytestmark = pytest.mark.oracle


def _peft_outcome(config, key: str) -> str:
    result = peft_check(config, key)
    if isinstance(result, _ExcludedModule):
        return "excluded"
    return "targeted" if result else "unmatched"


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda c: c.id)
def test_match_case_table_equals_peft(case):
    expected = _peft_outcome(peft.LoraConfig(**case.config), case.key)
    assert expected == case.expected, "the hand-written expectation disagrees with peft"
    assert match_module(peft.LoraConfig(**case.config), case.key).value == expected
    assert match_module(CoreLoraConfig(**case.config), case.key).value == expected


@pytest.mark.parametrize("case", PATTERN_CASES, ids=lambda c: c.id)
def test_pattern_case_table_equals_peft(case):
    expected = peft_get_pattern_key(case.patterns.keys(), case.key)
    assert expected == case.expected
    assert get_pattern_key(case.patterns.keys(), case.key) == expected


@pytest.mark.parametrize("case", RANK_ALPHA_CASES, ids=lambda c: c.id)
def test_rank_alpha_equals_peft_rule(case):
    config = peft.LoraConfig(target_modules=["q_proj"], **case.config)
    r_key = peft_get_pattern_key(config.rank_pattern.keys(), case.key)
    alpha_key = peft_get_pattern_key(config.alpha_pattern.keys(), case.key)
    expected = (config.rank_pattern.get(r_key, config.r), config.alpha_pattern.get(alpha_key, config.lora_alpha))
    assert expected == case.expected
    assert resolve_rank_alpha(config, case.key) == expected
    assert resolve_rank_alpha(CoreLoraConfig(target_modules=["q_proj"], **case.config), case.key) == expected


# --- random module paths and target specs -------------------------------------------------------

_COMPONENTS = ["model", "layers", "h", "blocks", "self_attn", "mlp", "experts", "q_proj", "v_proj", "proj",
               "c_attn", "lm_head", "dense", "0", "1", "2", "11"]
_REGEXES = [".*", ".*q_proj", r".*\.(q_proj|v_proj)", r"model\.layers\.1\..*", "q_proj", r".*\.\d+\..*proj",
            r"(?!.*mlp).*proj"]
_random_paths = st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=7).map(".".join)
# transformer-like paths: [prefix.]<layers>.<i>.[<block>.][experts.<j>.]<leaf>
_layered_paths = st.tuples(
    st.sampled_from(["", "model.", "transformer.", "model.encoder."]),
    st.sampled_from(["layers", "h", "blocks"]),
    st.sampled_from(["0", "1", "2", "11"]),
    st.sampled_from(["", "self_attn.", "mlp.", "mlp.experts.0.", "mlp.experts.2."]),
    st.sampled_from(["q_proj", "v_proj", "proj", "c_attn", "dense", "w1"]),
).map(lambda t: f"{t[0]}{t[1]}.{t[2]}.{t[3]}{t[4]}")
_paths = st.one_of(_random_paths, _layered_paths)
_suffix_lists = st.lists(st.one_of(st.sampled_from(_COMPONENTS), _paths), max_size=4)


def _near_names(keys: list[str]) -> list[str]:
    """Dotted suffixes of ``keys`` and near misses of them (a component cut short), to make hits likely."""
    pool = set(_COMPONENTS)
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            suffix = ".".join(parts[i:])
            pool.update({suffix, suffix[1:]})
    return sorted(name for name in pool if name)


_INDICES = [0, 1, 2, 11]


@st.composite
def _configs(draw, keys):
    near = st.sampled_from(_near_names(keys))
    name_sets = st.lists(near, min_size=1, max_size=4).map(set)
    targets = draw(st.one_of(st.sampled_from(_REGEXES), name_sets, name_sets))
    # mostly no exclusions, so the layer filter gets exercised on modules that do match
    exclude = draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(_REGEXES), name_sets))
    modules_to_save = draw(st.one_of(st.none(), st.none(), st.none(),
                                     st.lists(st.one_of(near, st.sampled_from(["layers.0", "mlp.experts"])),
                                              max_size=2)))
    layers_to_transform = layers_pattern = None
    if not isinstance(targets, str):
        layers_to_transform = draw(st.one_of(st.none(), st.sampled_from(_INDICES),
                                             st.lists(st.sampled_from(_INDICES), max_size=3)))
        if layers_to_transform is not None:
            layers_pattern = draw(st.one_of(st.none(), st.sampled_from(["layers", "h", "blocks", "experts", ""]),
                                            st.lists(st.sampled_from(["layers", "h", "blocks", "experts"]),
                                                     max_size=2)))
    return SimpleNamespace(target_modules=targets, exclude_modules=exclude, modules_to_save=modules_to_save,
                           layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
                           target_parameters=None)


@settings(deadline=None, max_examples=300)
@given(data=st.data(), keys=st.lists(_paths, min_size=1, max_size=5))
def test_random_paths_equal_peft(data, keys):
    config = data.draw(_configs(keys))
    for key in keys:
        assert match_module(config, key).value == _peft_outcome(config, key), key


@settings(deadline=None, max_examples=200)
@given(keys=st.lists(_layered_paths, min_size=1, max_size=5),
       layers_to_transform=st.one_of(st.sampled_from(_INDICES), st.lists(st.sampled_from(_INDICES), max_size=3)),
       layers_pattern=st.one_of(st.none(),
                                st.sampled_from(["layers", "h", "blocks", "experts", "layer", r"mlp\.experts"]),
                                st.lists(st.sampled_from(["layers", "h", "blocks", "experts"]), max_size=2)))
def test_random_layer_filter_equals_peft(keys, layers_to_transform, layers_pattern):
    # every key's leaf is a target, so the decision is the layer filter's alone
    config = SimpleNamespace(target_modules={key.rpartition(".")[2] for key in keys}, exclude_modules=None,
                             modules_to_save=None, layers_to_transform=layers_to_transform,
                             layers_pattern=layers_pattern, target_parameters=None)
    for key in keys:
        assert match_module(config, key).value == _peft_outcome(config, key), key


@settings(deadline=None, max_examples=200)
@given(patterns=st.lists(st.one_of(st.sampled_from(_COMPONENTS), _paths, st.sampled_from(_REGEXES)), max_size=4,
                         unique=True),
       key=_paths)
def test_random_pattern_keys_equal_peft(patterns, key):
    assert get_pattern_key(patterns, key) == peft_get_pattern_key(patterns, key)


# --- constants ---------------------------------------------------------------------------------

_PEFT_TABLES = sorted(name for name in dir(peft_constants) if name.startswith("TRANSFORMERS_MODELS_TO_"))


@pytest.mark.parametrize("name", _PEFT_TABLES)
def test_constant_tables_equal_peft(name):
    assert getattr(constants, name) == getattr(peft_constants, name)


@pytest.mark.parametrize(
    "name",
    ["WEIGHTS_NAME", "SAFETENSORS_WEIGHTS_NAME", "CONFIG_NAME", "EMBEDDING_LAYER_NAMES", "SEQ_CLS_HEAD_NAMES",
     "INCLUDE_LINEAR_LAYERS_SHORTHAND", "TOKENIZER_CONFIG_NAME", "DUMMY_TARGET_MODULES", "DUMMY_MODEL_CONFIG",
     "MIN_TARGET_MODULES_FOR_OPTIMIZATION", "UPCAST_DTYPES"],
)
def test_misc_constants_equal_peft(name):
    assert getattr(constants, name) == getattr(peft_constants, name)


def test_allowed_compute_dtypes_equal_peft():
    assert constants.ALLOWED_COMPUTE_DTYPES == tuple(str(d).removeprefix("torch.")
                                                     for d in peft_constants.ALLOWED_COMPUTE_DTYPES)


def test_each_method_table_is_the_one_its_tuner_uses():
    for peft_type, table in constants.TARGET_MODULES_MAPPINGS.items():
        tuner_cls = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        if peft_type == "IA3":  # IA3 reads its table directly in _prepare_adapter_config
            assert table == peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
        else:
            assert table == tuner_cls.target_module_mapping, peft_type


# --- real injection on tiny transformers models ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models():
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=64)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)),
        "bert": BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=64, num_labels=3)),
    }


def _peft_wrapped_names(model, kwargs) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's Conv1D fan_in_fan_out notice, transformers deprecations
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**copy.deepcopy(kwargs)))
    return {name for name, module in peft_model.base_model.model.named_modules() if isinstance(module, BaseTunerLayer)}


def _ours(model, kwargs, config_cls) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    named = list(model.named_modules())
    linear = [name for name, module in named if isinstance(module, (torch.nn.Linear, Conv1D))]
    output_embedding = model.get_output_embeddings()
    output_name = next((name for name, module in named if module is output_embedding), None)
    kwargs = copy.deepcopy(kwargs)
    if kwargs.get("task_type") == "SEQ_CLS":  # the task model adds its head to modules_to_save, as peft's does
        kwargs["modules_to_save"] = list(kwargs.get("modules_to_save") or []) + ["classifier", "score"]
    return find_target_modules(config_cls(**kwargs), [name for name, _ in named], model_type=model.config.model_type,
                               linear_module_names=linear, output_embedding_name=output_name)


INJECTION_CASES = [
    ("llama", {}),
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": "ALL-LINEAR", "task_type": "CAUSAL_LM"}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]}),
    ("llama", {"target_modules": "all-linear", "modules_to_save": ["mlp"]}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["k_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    ("llama", {"target_modules": r".*\.layers\.1\..*(gate|up)_proj"}),
    ("llama", {"target_modules": ["embed_tokens", "lm_head"]}),
    ("llama", {"target_modules": ["self_attn.q_proj", "proj"], "exclude_modules": r".*layers\.0\..*"}),
    ("gpt2", {}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "layers_to_transform": [1], "layers_pattern": "h"}),
    ("gpt2", {"target_modules": ["c_proj"], "exclude_modules": ["attn.c_proj"]}),
    ("bert", {}),
    ("bert", {"target_modules": "all-linear"}),
    ("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    ("bert", {"target_modules": ["dense"], "task_type": "SEQ_CLS"}),
    ("bert", {"target_modules": ["query", "classifier"], "task_type": "SEQ_CLS", "layers_to_transform": [0]}),
    ("bert", {"target_modules": ["dense", "query"], "layers_to_transform": [1], "layers_pattern": "layer"}),
]


@pytest.mark.parametrize(("model_name", "kwargs"), INJECTION_CASES, ids=lambda v: str(v))
def test_find_target_modules_equals_peft_injection(tiny_models, model_name, kwargs):
    model = tiny_models[model_name]
    expected = _peft_wrapped_names(model, kwargs)
    assert expected, "a case must adapt something"
    assert set(_ours(model, kwargs, CoreLoraConfig)) == expected
    assert set(_ours(model, kwargs, peft.LoraConfig)) == expected


@pytest.mark.parametrize(
    ("model_name", "kwargs"),
    [
        ("llama", {"target_modules": ["nope"]}),
        ("llama", {"target_modules": ["q_proj"], "exclude_modules": ".*"}),
        ("llama", {"target_modules": ["lm_head"], "modules_to_save": ["lm_head"]}),
        ("gpt2", {"target_modules": ["c_attn"], "layers_to_transform": [7]}),
    ],
)
def test_no_match_errors_like_peft(tiny_models, model_name, kwargs):
    from peftcore.errors import NoMatchingModuleError

    model = tiny_models[model_name]
    with pytest.raises(ValueError) as peft_error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    with pytest.raises(NoMatchingModuleError) as ours:
        _ours(model, kwargs, CoreLoraConfig)
    # our message starts with peft's (first sentence) and may add suggestions
    first_sentence = str(peft_error.value).split(". ")[0]
    assert str(ours.value).startswith(first_sentence)
