"""Adapter-directory I/O: round trips on every backend, peft's folder layout, atomic saves, file errors.

The byte layout is checked against the ``safetensors`` library's own NumPy writer and
readers (an independent implementation of the format); bfloat16 files for namespaces
without bfloat16 are built by hand from the format description.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import peftcore.io as pio
from peftcore import LoraConfig, PeftConfig
from peftcore.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peftcore.errors import AdapterFileError, AdapterNotFoundError, ConfigError, UnknownPeftTypeError
from peftcore.io import LoadedAdapter, load_adapter, load_state_dict, read_metadata, save_adapter, save_state_dict
from peftcore.testing import assert_close, to_numpy

CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM", use_dora=True)

# dtype names every backend under test can hold (float16 and bfloat16, outside the standard, are tested apart)
PORTABLE_DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _example(dtype_name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype_name.startswith("float"):
        return rng.standard_normal(shape).astype(dtype_name)
    info = np.iinfo(dtype_name)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype_name, endpoint=True)


def _as_xp(xp, array: np.ndarray):
    return xp.asarray(array)


def _bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 values rounded (to nearest even) onto the bfloat16 grid, still as float32."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype("<u4").view("<f4")


def _write_raw_safetensors(path, entries: dict[str, tuple[str, list[int], bytes]], metadata=None) -> None:
    """A safetensors file written from the format description: u64-LE header length, JSON header, data."""
    header, data, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for key, (code, shape, payload) in entries.items():
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(payload)]}
        data += payload
        offset += len(payload)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _temp_entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".peftcore-" in p.name or p.name.endswith(".tmp"))


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", PORTABLE_DTYPES)
def test_round_trip_keeps_values_dtype_and_namespace(xp, tmp_path, dtype_name):
    expected = {
        "base_model.model.layers.0.q_proj.lora_A.weight": _example(dtype_name, (2, 5), 0),
        "base_model.model.layers.0.q_proj.lora_B.weight": _example(dtype_name, (4, 2), 1),
        "base_model.model.layers.0.q_proj.lora_magnitude_vector": _example(dtype_name, (4,), 2),
        "scalar": _example(dtype_name, (), 3),
        "empty": _example(dtype_name, (0, 3), 4),
    }
    state_dict = {k: _as_xp(xp, v) for k, v in expected.items()}
    folder = save_adapter(tmp_path, CONFIG, state_dict)
    loaded = load_adapter(tmp_path, xp=xp)
    assert isinstance(loaded, LoadedAdapter)
    assert loaded.path == folder == tmp_path
    assert list(loaded.state_dict) == sorted(expected)
    for key, want in expected.items():
        got = loaded.state_dict[key]
        assert_close(got, want.astype(np.float64), xp=xp, dtype=getattr(xp, dtype_name), rtol=0, atol=0, err_msg=key)
        np.testing.assert_array_equal(to_numpy(got), want, err_msg=key)  # exact for int64 beyond 2**53 too


@pytest.mark.parametrize("dtype_name", PORTABLE_DTYPES)
def test_written_file_is_byte_identical_to_safetensors_own_writer(xp, tmp_path, dtype_name):
    expected = {"b.lora_B.weight": _example(dtype_name, (3, 2), 5), "a.lora_A.weight": _example("float32", (2, 3), 6)}
    expected["c.ids"] = _example("int64", (4,), 7)
    save_state_dict(tmp_path / "w.safetensors", {k: _as_xp(xp, v) for k, v in expected.items()})
    written = (tmp_path / "w.safetensors").read_bytes()
    assert written == st_save(expected, metadata={"format": "pt"})
    for key, value in st_load(written).items():
        np.testing.assert_array_equal(value, expected[key])
        assert value.dtype == expected[key].dtype


@settings(deadline=None, max_examples=15)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4),
    codes=st.lists(st.sampled_from(["float16", "float32", "float64", "int16", "int64", "uint8"]), min_size=4,
                   max_size=4),
    seed=st.integers(0, 2**16),
)
def test_any_numpy_state_dict_matches_safetensors_layout(shapes, codes, seed):
    import tempfile
    from pathlib import Path

    expected = {f"m{i}.w": _example(codes[i], shape, seed + i) for i, shape in enumerate(shapes)}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_state_dict(Path(tmp) / "x.safetensors", expected, metadata={"note": "hi"})
        # safetensors writes metadata in hash order, so compare the data and the parsed header instead of bytes
        ours = path.read_bytes()
        theirs = st_save(expected, metadata={"format": "pt", "note": "hi"})
        assert ours[8 + int.from_bytes(ours[:8], "little") :] == theirs[8 + int.from_bytes(theirs[:8], "little") :]
        assert json.loads(ours[8 : 8 + int.from_bytes(ours[:8], "little")]) == json.loads(
            theirs[8 : 8 + int.from_bytes(theirs[:8], "little")]
        )
        loaded = load_state_dict(path)
    assert list(loaded) == sorted(expected)
    for key, want in expected.items():
        assert loaded[key].dtype == want.dtype and loaded[key].shape == want.shape
        np.testing.assert_array_equal(loaded[key], want)


@pytest.mark.parametrize(("code", "name"), [("F16", "float16"), ("BF16", "bfloat16")])
def test_half_file_loads_as_half_or_fails_clearly(xp, tmp_path, code, name):
    values = _bf16_round(_example("float32", (2, 3), 9)) if code == "BF16" else _example("float16", (2, 3), 9)
    if code == "BF16":
        payload = (values.view("<u4") >> 16).astype("<u2").tobytes()
    else:
        payload = values.astype("<f2").tobytes()
    _write_raw_safetensors(tmp_path / "w.safetensors", {"layer.lora_A.weight": (code, [2, 3], payload)})
    expected = values.astype(np.float64)
    if hasattr(xp, name):
        got = load_state_dict(tmp_path / "w.safetensors", xp=xp)["layer.lora_A.weight"]
        assert_close(got, expected, xp=xp, dtype=getattr(xp, name), rtol=0, atol=0)
    else:
        with pytest.raises(AdapterFileError, match=rf"w\.safetensors: tensor 'layer\.lora_A\.weight' is {name}"):
            load_state_dict(tmp_path / "w.safetensors", xp=xp)
    for requested, expected_dtype in (("float32", xp.float32), (xp.float64, xp.float64)):
        got = load_state_dict(tmp_path / "w.safetensors", xp=xp, dtype=requested)["layer.lora_A.weight"]
        assert_close(got, expected, xp=xp, dtype=expected_dtype, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_arrays_round_trip_where_the_namespace_has_them(xp, tmp_path, name):
    values = _bf16_round(_example("float32", (3, 4), 8)) if name == "bfloat16" else _example("float16", (3, 4), 8)
    if not hasattr(xp, name):
        assert xp.__name__.rsplit(".")[-1] in ("numpy", "array_api_strict")  # no such arrays to save
        return
    save_adapter(tmp_path, CONFIG, {"w": xp.astype(xp.asarray(values.astype(np.float32)), getattr(xp, name))})
    raw = (tmp_path / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    code = {"float16": "F16", "bfloat16": "BF16"}[name]
    assert header["w"] == {"dtype": code, "shape": [3, 4], "data_offsets": [0, 24]}
    # bfloat16 is the upper half of float32; both little-endian
    payload = (values.view("<u4") >> 16).astype("<u2") if name == "bfloat16" else values.astype("<f2")
    assert raw[8 + header_len :] == payload.tobytes()
    loaded = load_adapter(tmp_path, xp=xp).state_dict["w"]
    assert_close(loaded, values.astype(np.float64), xp=xp, dtype=getattr(xp, name), rtol=0, atol=0)
    upcast = load_adapter(tmp_path, xp=xp, dtype="float32").state_dict["w"]
    assert_close(upcast, values.astype(np.float64), xp=xp, dtype=xp.float32, rtol=0, atol=0)


def test_dtype_override_casts_floats_only(xp, tmp_path):
    save_state_dict(
        tmp_path / "w.safetensors",
        {"f": xp.asarray(np.asarray([1.5, -2.25])), "i": xp.asarray(np.asarray([3, 4], dtype=np.int64))},
    )
    loaded = load_state_dict(tmp_path / "w.safetensors", xp=xp, dtype=xp.float32)
    assert_close(loaded["f"], np.asarray([1.5, -2.25]), xp=xp, dtype=xp.float32)
    assert_close(loaded["i"], np.asarray([3.0, 4.0]), xp=xp, dtype=xp.int64, rtol=0, atol=0)
    with pytest.raises(AdapterFileError, match="float dtype"):
        load_state_dict(tmp_path / "w.safetensors", xp=xp, dtype=xp.int32)
    with pytest.raises(AdapterFileError, match="'float99' does not exist"):
        load_state_dict(tmp_path / "w.safetensors", xp=xp, dtype="float99")


def test_non_contiguous_and_aliased_inputs_are_copied(xp, tmp_path):
    base = _example("float32", (3, 4), 10)
    shared = xp.asarray(base)
    state_dict = {"t": xp.permute_dims(shared, (1, 0)), "a": shared, "b": shared, "s": shared[:, 1:3]}
    save_state_dict(tmp_path / "w.safetensors", state_dict)
    loaded = st_load((tmp_path / "w.safetensors").read_bytes())
    np.testing.assert_array_equal(loaded["t"], base.T)
    np.testing.assert_array_equal(loaded["a"], base)
    np.testing.assert_array_equal(loaded["b"], base)
    np.testing.assert_array_equal(loaded["s"], base[:, 1:3])


# -- layout, config, metadata -----------------------------------------------------------------


def test_default_adapter_in_directory_named_adapter_in_subfolder(tmp_path):
    first = {"m.lora_A.weight": np.ones((2, 3), np.float32)}
    second = {"m.lora_A.weight": np.full((2, 3), 2.0, np.float32)}
    assert save_adapter(tmp_path, CONFIG, first) == tmp_path
    assert save_adapter(tmp_path, CONFIG, second, adapter_name="other") == tmp_path / "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, "other"])
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == sorted([CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME])
    for name, expected in ((None, first), ("default", first), ("other", second)):
        loaded = load_adapter(tmp_path, adapter_name=name)
        np.testing.assert_array_equal(loaded.state_dict["m.lora_A.weight"], expected["m.lora_A.weight"])
    loaded = load_adapter(tmp_path, subfolder="other")
    np.testing.assert_array_equal(loaded.state_dict["m.lora_A.weight"], second["m.lora_A.weight"])
    assert loaded.path == tmp_path / "other"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", 3])
def test_bad_adapter_names_are_rejected(tmp_path, bad):
    with pytest.raises(AdapterFileError, match="adapter_name"):
        save_adapter(tmp_path, CONFIG, {}, adapter_name=bad)


def test_config_file_is_written_with_inference_mode_and_reloads_equal(tmp_path):
    save_adapter(tmp_path, CONFIG, {"w": np.zeros(2, np.float32)})
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert data["inference_mode"] is True and CONFIG.inference_mode is False
    assert list(data) == sorted(data)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert data["target_modules"] == ["q_proj"] and data["peft_type"] == "LORA" and data["use_dora"] is True
    loaded = load_adapter(tmp_path).config
    assert type(loaded) is LoraConfig
    assert loaded == LoraConfig(**{**CONFIG.to_dict(), "inference_mode": True})


def test_metadata_defaults_to_format_pt_and_merges(tmp_path):
    save_adapter(tmp_path, CONFIG, {"w": np.zeros(1, np.float32)})
    assert read_metadata(tmp_path / SAFETENSORS_WEIGHTS_NAME) == {"format": "pt"}
    assert load_adapter(tmp_path).metadata == {"format": "pt"}
    save_state_dict(tmp_path / "w.safetensors", {"w": np.zeros(1)}, metadata={"step": "7"})
    assert read_metadata(tmp_path / "w.safetensors") == {"format": "pt", "step": "7"}
    _write_raw_safetensors(tmp_path / "bare.safetensors", {"w": ("F32", [1], b"\0" * 4)})
    assert read_metadata(tmp_path / "bare.safetensors") == {}


def test_keys_load_sorted_whatever_the_insertion_order(tmp_path):
    state_dict = {k: np.full(2, i, np.float32) for i, k in enumerate(["z.w", "a.w", "m.w", "B.w"])}
    save_state_dict(tmp_path / "w.safetensors", state_dict)
    loaded = load_state_dict(tmp_path / "w.safetensors")
    assert list(loaded) == ["B.w", "a.w", "m.w", "z.w"]
    for key, value in state_dict.items():
        np.testing.assert_array_equal(loaded[key], value)


# -- atomicity ---------------------------------------------------------------------------------


def _existing_adapter(folder) -> dict[str, bytes]:
    save_adapter(folder, CONFIG, {"w": np.ones(3, np.float32)})
    return _snapshot(folder)


NEW_CONFIG = LoraConfig(r=4, target_modules=["v_proj"])
NEW_WEIGHTS = {"w": np.full(3, 9.0, np.float32), "extra": np.zeros(5, np.float64)}


@pytest.mark.parametrize("failing_call", [1, 2])
def test_failed_rename_restores_previous_adapter(tmp_path, monkeypatch, failing_call):
    folder = tmp_path / "adapter"
    before = _existing_adapter(folder)
    calls = []
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(pio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(folder, NEW_CONFIG, NEW_WEIGHTS)
    # the weights move first, then the config; the failing move is the one asked for
    assert calls[failing_call - 1].name == (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)[failing_call - 1]
    assert _snapshot(folder) == before
    assert _temp_entries(tmp_path) == [] and _temp_entries(folder) == []


def test_crash_while_writing_weights_leaves_previous_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    before = _existing_adapter(folder)

    def half_write(path, header, chunks):
        path.write_bytes(header[: len(header) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pio, "_write_safetensors", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(folder, NEW_CONFIG, NEW_WEIGHTS)
    assert _snapshot(folder) == before
    assert _temp_entries(tmp_path) == []
    loaded = load_adapter(folder)
    np.testing.assert_array_equal(loaded.state_dict["w"], np.ones(3, np.float32))


def test_crash_on_fresh_path_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pio, "_write_file", lambda path, data: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_adapter(tmp_path / "new", NEW_CONFIG, NEW_WEIGHTS, adapter_name="named")
    assert not (tmp_path / "new" / "named").exists()
    assert _temp_entries(tmp_path / "new") == []


def test_successful_overwrite_replaces_both_files_and_keeps_other_files(tmp_path):
    folder = tmp_path / "adapter"
    _existing_adapter(folder)
    (folder / "README.md").write_text("keep me")
    save_adapter(folder, NEW_CONFIG, NEW_WEIGHTS, adapter_name="other")
    save_adapter(folder, NEW_CONFIG, NEW_WEIGHTS)
    loaded = load_adapter(folder)
    assert loaded.config.r == 4 and sorted(loaded.state_dict) == ["extra", "w"]
    assert (folder / "README.md").read_text() == "keep me" and (folder / "other" / CONFIG_NAME).is_file()
    assert _temp_entries(tmp_path) == [] and _temp_entries(folder) == []


def test_validation_errors_happen_before_touching_disk(tmp_path):
    folder = tmp_path / "adapter"
    before = _existing_adapter(folder)
    with pytest.raises(AdapterFileError, match="'bad'"):
        save_adapter(folder, NEW_CONFIG, {"w": np.zeros(2), "bad": [1.0, 2.0]})
    assert _snapshot(folder) == before
    assert _temp_entries(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_files_get_the_permissions_of_ordinary_files(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    folder = save_adapter(tmp_path / "a", CONFIG, {"w": np.zeros(1)}, adapter_name="named")
    single = save_state_dict(tmp_path / "w.safetensors", {"w": np.zeros(1)})
    for path in (folder / CONFIG_NAME, folder / SAFETENSORS_WEIGHTS_NAME, single):
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask), path
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~umask)


# -- save-side validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state_dict", "match"),
    [
        ({1: np.zeros(2)}, "keys must be non-empty strings, got 1"),
        ({"": np.zeros(2)}, "keys must be non-empty strings"),
        ({"w": [1.0]}, "'w' is a list, not an array"),
        ({"w": 1.5}, "'w' is a float, not an array"),
        ({"mask": np.zeros(2, bool)}, "'mask' has dtype bool"),
        ({"c": np.zeros(2, np.complex64)}, "'c' has dtype complex64"),
        ({"__metadata__": np.zeros(2)}, "reserved"),
        ([("w", np.zeros(2))], "must be a mapping"),
    ],
)
def test_bad_state_dicts_are_rejected_naming_the_key(tmp_path, state_dict, match):
    with pytest.raises(AdapterFileError, match=match):
        save_state_dict(tmp_path / "w.safetensors", state_dict)
    assert not (tmp_path / "w.safetensors").exists()


def test_bad_metadata_and_targets_are_rejected(tmp_path):
    with pytest.raises(AdapterFileError, match="metadata maps str to str; bad entry 'step': 7"):
        save_state_dict(tmp_path / "w.safetensors", {"w": np.zeros(1)}, metadata={"step": 7})
    with pytest.raises(AdapterFileError, match="needs a PeftConfig"):
        save_adapter(tmp_path, CONFIG.to_dict(), {"w": np.zeros(1)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFileError, match="is a file"):
        save_adapter(tmp_path / "file", CONFIG, {"w": np.zeros(1)})
    with pytest.raises(AdapterFileError, match="is a directory"):
        save_state_dict(tmp_path, {"w": np.zeros(1)})


# -- load-side errors ---------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # a peft user's except clause still works
        load_adapter(tmp_path / "nope")


def test_missing_named_adapter_lists_the_ones_present(tmp_path):
    save_adapter(tmp_path, CONFIG, {"w": np.zeros(1)}, adapter_name="one")
    with pytest.raises(AdapterNotFoundError, match=r"no adapter 'two' in .*\['one'\]"):
        load_adapter(tmp_path, adapter_name="two")


def test_missing_config(tmp_path):
    save_state_dict(tmp_path / SAFETENSORS_WEIGHTS_NAME, {"w": np.zeros(1)})
    with pytest.raises(AdapterNotFoundError, match=f"{tmp_path / CONFIG_NAME} does not exist"):
        load_adapter(tmp_path)


def test_missing_weights_mentions_pickled_bin(tmp_path):
    CONFIG.save_pretrained(tmp_path)
    with pytest.raises(AdapterNotFoundError, match=f"{tmp_path / SAFETENSORS_WEIGHTS_NAME} does not exist$"):
        load_adapter(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterNotFoundError, match=r"adapter_model\.bin exists, but peftcore does not read pickled"):
        load_adapter(tmp_path)


def test_missing_single_file(tmp_path):
    with pytest.raises(AdapterNotFoundError, match="x.safetensors does not exist"):
        load_state_dict(tmp_path / "x.safetensors")
    with pytest.raises(AdapterNotFoundError, match="x.safetensors does not exist"):
        read_metadata(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ('{"peft_type": "LORA", "r": ', AdapterFileError, "malformed JSON"),
        ('["LORA"]', AdapterFileError, "expected a JSON object, got list"),
        ('{"peft_type": "NOT_A_METHOD"}', UnknownPeftTypeError, "unknown peft_type 'NOT_A_METHOD'"),
        ('{"r": 4}', ConfigError, "no 'peft_type'"),
        ('{"peft_type": "LORA", "r": 0}', ConfigError, "`r` should be a positive integer"),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, error, match):
    save_adapter(tmp_path, CONFIG, {"w": np.zeros(1)})
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(error, match=match) as info:
        load_adapter(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def _good_file(tmp_path) -> bytes:
    path = save_state_dict(tmp_path / "w.safetensors", {"a": np.arange(6, dtype=np.float32), "b": np.ones(2)})
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1, -9])
def test_truncated_safetensors(tmp_path, keep):
    raw = _good_file(tmp_path)
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw[:keep])
    match = {0: "truncated", 5: "truncated", 8: "header length", 20: "header length"}.get(keep, "out of range")
    with pytest.raises(AdapterFileError, match=match) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00\x00", "not JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"__metadata__": {"format": 1}}', "must map strings to strings"),
        (b'{"w": {"dtype": "F32", "shape": [2]}}', "needs dtype, shape and data_offsets"),
        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', r"data_offsets \[0, 8\] of tensor 'w'"),
        (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', "invalid shape"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', "out of range"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', "invalid data_offsets"),
    ],
)
def test_corrupt_headers(tmp_path, header, match):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(AdapterFileError, match=match) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(AdapterFileError, match=r"header length 1099511627776 goes beyond the file \(10 bytes\)"):
        load_state_dict(path)


def test_overlapping_and_mis_sized_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 12)
    with pytest.raises(AdapterFileError, match="'a' and 'b' overlap"):
        load_state_dict(path)
    _write_raw_safetensors(path, {"w": ("F32", [3], b"\0" * 8)})
    with pytest.raises(AdapterFileError, match=r"tensor 'w' \(F32, shape \[3\]\) needs 12 bytes"):
        load_state_dict(path)


@pytest.mark.parametrize("code", ["F8_E4M3", "BOOL", "C64", "F4", "XYZ"])
def test_unsupported_dtype_names_key_and_dtype(tmp_path, code):
    path = tmp_path / "w.safetensors"
    _write_raw_safetensors(path, {"good": ("F32", [1], b"\0" * 4), "layers.0.q": (code, [2], b"\0" * 2)})
    with pytest.raises(AdapterFileError, match=f"tensor 'layers.0.q' has dtype '{code}'") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_corrupt_weights_inside_adapter_name_the_file(tmp_path):
    save_adapter(tmp_path, CONFIG, {"w": np.zeros(4, np.float32)})
    weights = tmp_path / SAFETENSORS_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(AdapterFileError, match=f"{weights}: data_offsets"):
        load_adapter(tmp_path)


def test_reading_respects_declared_sizes_exactly(tmp_path):
    # the header names exactly the bytes of every tensor, so math.prod(shape) * itemsize must match
    _write_raw_safetensors(tmp_path / "w.safetensors", {"w": ("I16", [2, 3], np.arange(6, dtype="<i2").tobytes())})
    got = load_state_dict(tmp_path / "w.safetensors")["w"]
    assert got.dtype == np.int16 and math.prod(got.shape) == 6
    np.testing.assert_array_equal(got, np.arange(6).reshape(2, 3))


def test_loaded_config_is_a_peft_config(tmp_path):
    save_adapter(tmp_path, CONFIG, {"w": np.zeros(1)})
    assert isinstance(load_adapter(tmp_path).config, PeftConfig)
