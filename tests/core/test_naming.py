"""Key grammar: building, parsing and converting LoRA state-dict keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftcore.errors import IncompatibleKeysError
from peftcore.naming import (
    BASE_MODEL_PREFIX,
    ParsedKey,
    ParsedModelKey,
    adapter_subfolder,
    checkpoint_key,
    insert_adapter_name,
    model_key,
    parse_checkpoint_key,
    parse_model_key,
    remove_adapter_name,
)

M = "model.layers.0.self_attn.q_proj"
E = "model.embed_tokens"
P = BASE_MODEL_PREFIX

# (module, container, param, adapter, in-memory key, on-disk key), written out from peft's documented grammar
KEY_TABLE = [
    (M, "lora_A", "weight", "default", f"{P}{M}.lora_A.default.weight", f"{P}{M}.lora_A.weight"),
    (M, "lora_B", "weight", "default", f"{P}{M}.lora_B.default.weight", f"{P}{M}.lora_B.weight"),
    (M, "lora_B", "bias", "other", f"{P}{M}.lora_B.other.bias", f"{P}{M}.lora_B.bias"),
    (M, "lora_magnitude_vector", None, "default", f"{P}{M}.lora_magnitude_vector.default.weight",
     f"{P}{M}.lora_magnitude_vector"),
    (E, "lora_embedding_A", None, "default", f"{P}{E}.lora_embedding_A.default", f"{P}{E}.lora_embedding_A"),
    (E, "lora_embedding_B", None, "x", f"{P}{E}.lora_embedding_B.x", f"{P}{E}.lora_embedding_B"),
    (E, "lora_magnitude_vector", "weight", "x", f"{P}{E}.lora_magnitude_vector.x.weight",
     f"{P}{E}.lora_magnitude_vector"),
    # a base module named like the adapter is left alone
    ("model.default.q_proj", "lora_A", "weight", "default", f"{P}model.default.q_proj.lora_A.default.weight",
     f"{P}model.default.q_proj.lora_A.weight"),
    ("model.model.q_proj", "lora_A", "weight", "model", f"{P}model.model.q_proj.lora_A.model.weight",
     f"{P}model.model.q_proj.lora_A.weight"),
    # adapter named like the container
    (M, "lora_A", "weight", "lora_A", f"{P}{M}.lora_A.lora_A.weight", f"{P}{M}.lora_A.weight"),
    # MultiheadAttention's nested out_proj layer
    ("attn.base_layer.out_proj", "lora_A", "weight", "default", f"{P}attn.base_layer.out_proj.lora_A.default.weight",
     f"{P}attn.base_layer.out_proj.lora_A.weight"),
]


@pytest.mark.parametrize(("module", "container", "param", "adapter", "mem", "disk"), KEY_TABLE)
def test_key_table(module, container, param, adapter, mem, disk):
    assert model_key(module, container, adapter, param) == mem
    assert checkpoint_key(module, container, param) == disk
    assert remove_adapter_name(mem, adapter) == disk
    assert insert_adapter_name(disk, adapter) == mem
    expected_param = None if container in ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B") else param
    assert parse_checkpoint_key(disk) == ParsedKey(module, container, expected_param)
    mem_param = "weight" if container == "lora_magnitude_vector" else expected_param
    assert parse_model_key(mem) == ParsedModelKey(module, container, adapter, mem_param)


def test_module_container_param_defaults_to_weight():
    assert checkpoint_key("a", "lora_A") == f"{P}a.lora_A.weight"
    assert model_key("a", "lora_B", "default") == f"{P}a.lora_B.default.weight"


def test_without_prefix():
    assert checkpoint_key("a", "lora_A", prefix="") == "a.lora_A.weight"
    assert model_key("a", "lora_embedding_A", "d", prefix="") == "a.lora_embedding_A.d"
    assert parse_checkpoint_key("a.b.lora_A.weight") == ("a.b", "lora_A", "weight")
    assert insert_adapter_name("a.lora_magnitude_vector", "d") == "a.lora_magnitude_vector.d.weight"


def test_unstripped_magnitude_is_read_as_an_alias():
    key = f"{P}{E}.lora_magnitude_vector.weight"
    assert parse_checkpoint_key(key) == ParsedKey(E, "lora_magnitude_vector", None)
    assert insert_adapter_name(key, "a") == f"{P}{E}.lora_magnitude_vector.a.weight"


def test_remove_adapter_name_on_non_adapter_keys_follows_peft():
    # peft applies the same string rule to every saved key, adapter or not
    assert remove_adapter_name(f"{P}model.norm.weight", "default") == f"{P}model.norm.weight"
    assert remove_adapter_name(f"{P}lin.base_layer.bias", "default") == f"{P}lin.base_layer.bias"
    assert remove_adapter_name("nodot", "default") == "nodot"
    # only the position before the last component is touched
    assert remove_adapter_name("a.default.b.weight", "default") == "a.default.b.weight"
    assert remove_adapter_name("a.default.weight", "default") == "a.weight"


def test_remove_adapter_name_other_adapter_untouched():
    key = f"{P}{M}.lora_A.other.weight"
    assert remove_adapter_name(key, "default") == key


def test_insert_non_adapter_key_strict_and_lenient():
    key = f"{P}model.embed_tokens.base_layer.weight"
    with pytest.raises(IncompatibleKeysError, match="base_layer.weight"):
        insert_adapter_name(key, "default")
    assert insert_adapter_name(key, "default", strict=False) == key


@pytest.mark.parametrize(
    "key",
    [f"{P}{M}.lora_A", f"{P}{M}.weight", f"{P}{M}.lora_C.weight", f"{P}{M}.lora_embedding_A.weight", "", "lora_A"],
)
def test_parse_rejects_non_adapter_keys(key):
    with pytest.raises(IncompatibleKeysError) as info:
        parse_checkpoint_key(key)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    "key",
    [f"{P}{M}.base_layer.weight", f"{P}{M}.lora_A.weight", f"{P}{M}.lora_magnitude_vector.default.bias",
     f"{P}{M}.lora_embedding_A", "lora_A.default", ""],
)
def test_parse_model_key_rejects_non_adapter_keys(key):
    with pytest.raises(IncompatibleKeysError) as info:
        parse_model_key(key)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    ("container", "param"),
    [("lora_C", None), ("lora_embedding_A", "weight"), ("lora_magnitude_vector", "bias")],
)
def test_build_rejects_bad_container_or_param(container, param):
    with pytest.raises(IncompatibleKeysError, match=container):
        checkpoint_key("m", container, param)
    with pytest.raises(IncompatibleKeysError, match=container):
        model_key("m", container, "default", param)


def test_unknown_peft_type():
    from peftcore.errors import UnknownPeftTypeError

    with pytest.raises(UnknownPeftTypeError, match="NOPE"):
        checkpoint_key("m", "lora_A", peft_type="NOPE")


@pytest.mark.parametrize(("name", "expected"), [("default", ""), ("other", "other"), ("Default", "Default")])
def test_adapter_subfolder(name, expected):
    assert adapter_subfolder(name) == expected


_CONTAINERS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
_ident = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in _CONTAINERS and s not in ("weight", "bias")
)


@st.composite
def _keys(draw):
    adapter = draw(_ident)
    # module components may repeat the adapter name anywhere, including right before the container
    parts = draw(st.lists(st.one_of(_ident, st.just(adapter), st.integers(0, 12).map(str)), min_size=1, max_size=6))
    container = draw(st.sampled_from(_CONTAINERS))
    param = draw(st.sampled_from(["weight", "bias"])) if container in ("lora_A", "lora_B") else None
    prefix = draw(st.sampled_from([BASE_MODEL_PREFIX, ""]))
    return ".".join(parts), container, param, adapter, prefix


@settings(deadline=None, max_examples=100)
@given(_keys())
def test_round_trips(drawn):
    module, container, param, adapter, prefix = drawn
    mem = model_key(module, container, adapter, param, prefix=prefix)
    disk = checkpoint_key(module, container, param, prefix=prefix)
    assert remove_adapter_name(mem, adapter) == disk
    assert insert_adapter_name(disk, adapter) == mem
    assert insert_adapter_name(remove_adapter_name(mem, adapter), adapter) == mem
    assert remove_adapter_name(insert_adapter_name(disk, adapter), adapter) == disk
    assert parse_model_key(mem, prefix=prefix).adapter_name == adapter
    parsed = parse_checkpoint_key(disk, prefix=prefix)
    assert parsed.module_path == module and parsed.container == container
    assert checkpoint_key(*parsed, prefix=prefix) == disk
