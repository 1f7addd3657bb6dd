"""``peftcore._safetensors``: bfloat16 conversions, lazy single-tensor reads, header checks, the writer.

bfloat16 rounding is checked against a value-based reference (the nearer of the two neighbouring
bfloat16 values, ties to the even mantissa, computed in float64) and, when torch is installed,
against ``torch.Tensor.to(torch.bfloat16)``. Files are written by the ``safetensors`` library or by
hand from the format description, never by the code under test alone.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from safetensors.numpy import save as st_save
from safetensors.numpy import save_file as st_save_file

from peftcore import _safetensors as sf
from peftcore.errors import AdapterFileError, AdapterNotFoundError

ALL_BF16_PATTERNS = np.arange(2**16, dtype=np.uint16)


def _bf16_value(pattern: int) -> float:
    """The real number a bfloat16 bit pattern stands for (1 sign, 8 exponent, 7 mantissa bits)."""
    sign = -1.0 if pattern >> 15 else 1.0
    exponent, mantissa = (pattern >> 7) & 0xFF, pattern & 0x7F
    if exponent == 0xFF:
        return sign * np.inf if mantissa == 0 else np.nan
    if exponent == 0:
        return sign * mantissa * 2.0**-133  # subnormal: 0.m x 2**-126
    return sign * (1 + mantissa / 128) * 2.0 ** (exponent - 127)


def _reference_bf16_pattern(x: np.float32) -> int:
    """Round-to-nearest-even onto the bfloat16 grid, from values: the nearer neighbour, ties to even."""
    sign = 0x8000 if np.signbit(x) else 0
    magnitude = abs(float(x))
    if np.isinf(x):
        return sign | 0x7F80
    below = int(np.float32(magnitude).view(np.uint32)) >> 16  # the largest bfloat16 magnitude <= |x|
    low = _bf16_value(below)
    # past the largest finite bfloat16, IEEE rounding acts as if the exponent went on: the next step is 2**128
    high = 2.0**128 if below + 1 == 0x7F80 else _bf16_value(below + 1)
    if magnitude - low < high - magnitude or (magnitude - low == high - magnitude and below % 2 == 0):
        return sign | below
    return sign | (below + 1)


def _float32_from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _write_raw(path, entries: dict, metadata=None, *, data: bytes | None = None) -> None:
    """A file from the format description: u64-LE header length, JSON header, data section."""
    header, payloads, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for key, (code, shape, payload) in entries.items():
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(payload)]}
        offset += len(payload)
        payloads += payload
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + (payloads if data is None else data))


# -- bfloat16 -------------------------------------------------------------------------------------


def test_widening_every_bfloat16_pattern_is_exact():
    wide = sf.bfloat16_to_float32(ALL_BF16_PATTERNS)
    assert wide.dtype == np.float32 and wide.shape == (2**16,)
    expected = np.array([_bf16_value(int(p)) for p in ALL_BF16_PATTERNS])
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(wide), nan)
    np.testing.assert_array_equal(wide[~nan].astype(np.float64), expected[~nan])
    assert np.array_equal(np.signbit(wide), ALL_BF16_PATTERNS >= 0x8000)  # -0.0 and negative NaNs keep their sign


def test_every_bfloat16_pattern_round_trips():
    wide = sf.bfloat16_to_float32(ALL_BF16_PATTERNS)
    # the exact path keeps every pattern, signalling NaNs included
    assert np.array_equal(sf.bfloat16_bits_of_widened(wide), ALL_BF16_PATTERNS)
    # rounding an exact bfloat16 value changes nothing but makes signalling NaNs quiet
    rounded = sf.bfloat16_bits(wide)
    quiet = np.where(np.isnan(wide), ALL_BF16_PATTERNS | 0x40, ALL_BF16_PATTERNS)
    assert np.array_equal(rounded, quiet)


@settings(deadline=None, max_examples=15)
@given(hst.lists(hst.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_narrowing_rounds_to_nearest_even(bit_patterns):
    values = _float32_from_bits(bit_patterns)
    got = sf.bfloat16_bits(values)
    assert got.dtype == np.uint16 and got.shape == values.shape
    for x, pattern in zip(values, got):
        if np.isnan(x):
            assert np.isnan(_bf16_value(int(pattern))) and (pattern >> 15) == np.signbit(x)
        else:
            assert int(pattern) == _reference_bf16_pattern(x), hex(int(x.view(np.uint32)))


def _hard_cases() -> np.ndarray:
    uppers = np.array([0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x4049, 0x7F7E, 0x7F7F], dtype=np.uint32)
    lowers = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = ((uppers[:, None] << 16) | lowers[None, :]).ravel()  # exact ties (0x8000) on even and odd mantissas
    bits = np.concatenate([bits, bits | 0x8000_0000])
    specials = np.array([0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0x7FFF_FFFF], np.uint32)
    return _float32_from_bits(np.concatenate([bits, specials]))


def test_narrowing_ties_overflow_subnormals_and_specials():
    values = _hard_cases()
    got = sf.bfloat16_bits(values)
    for x, pattern in zip(values, got):
        if not np.isnan(x):
            assert int(pattern) == _reference_bf16_pattern(x), hex(int(x.view(np.uint32)))
    # the tie 1 + 2**-8 lies halfway between 1 (even mantissa) and 1 + 2**-7: it goes to 1
    assert sf.bfloat16_bits(np.float32(1 + 2**-8)) == 0x3F80
    # halfway past the largest finite bfloat16 overflows to inf
    assert sf.bfloat16_bits(_float32_from_bits(0x7F7F_8000)) == 0x7F80


@pytest.mark.oracle
def test_narrowing_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    values = np.concatenate([_hard_cases(), _float32_from_bits(rng.integers(0, 2**32, size=4096, dtype=np.uint32))])
    ours = sf.bfloat16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(ours[~nan], theirs[~nan])
    # torch writes one canonical NaN (0x7FC0); ours keeps sign and payload, but every NaN stays a NaN
    assert np.isnan(sf.bfloat16_to_float32(ours[nan])).all() and np.isnan(sf.bfloat16_to_float32(theirs[nan])).all()


def test_to_storage_and_to_float32():
    values = np.array([[1.0, -2.5], [np.pi, 1e-3]], dtype=np.float32)
    half = sf.to_storage(values, "F16")
    assert half.dtype == np.dtype("<f2") and half.flags.c_contiguous
    np.testing.assert_array_equal(half, values.astype(np.float16))  # NumPy's float16 cast rounds to nearest even
    bf16 = sf.to_storage(values.T, "BF16")  # a strided view is fine
    assert bf16.dtype == np.dtype("<u2") and bf16.shape == (2, 2)
    assert [int(b) for b in bf16.ravel()] == [_reference_bf16_pattern(x) for x in values.T.ravel()]
    assert sf.to_storage(np.float32(1.5), "BF16").shape == ()
    np.testing.assert_array_equal(sf.to_float32(bf16, "BF16"), [[_bf16_value(int(b)) for b in row] for row in bf16])
    np.testing.assert_array_equal(sf.to_float32(half, "F16"), values.astype(np.float16).astype(np.float32))
    with pytest.raises(AdapterFileError, match="expected a floating-point tensor, got int32"):
        sf.to_float32(np.zeros(2, np.int32), "I32")


# -- the lazy reader --------------------------------------------------------------------------------


def test_reader_parses_the_header_and_reads_one_tensor_at_a_time(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.integers(-9, 9, size=(5,), dtype=np.int64),
        "c": rng.standard_normal((2, 1, 3)),
        "s": np.asarray(np.float16(0.5)),
        "empty": np.zeros((0, 4), np.uint8),
        "mask": np.array([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    st_save_file(tensors, str(path), metadata={"format": "pt", "note": "hi"})
    f = sf.SafetensorsFile.open(path)
    assert f.path == path and f.metadata == {"format": "pt", "note": "hi"}
    assert set(f.tensors) == set(tensors)
    for key, value in tensors.items():
        info = f.tensors[key]
        assert info.code == sf.CODE_OF_NAME[value.dtype.name] and info.shape == value.shape
        assert info.numel == value.size and info.end - info.begin == value.nbytes
    np.testing.assert_array_equal(f.read_storage("b"), tensors["b"])
    assert f.read_storage("s").shape == ()

    # reads come from the file when asked for: rewrite tensor a's bytes in place, then read both
    raw = bytearray(path.read_bytes())
    start = f.data_start + f.tensors["a"].begin
    raw[start : start + tensors["a"].nbytes] = (-tensors["a"]).astype("<f4").tobytes()
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(f.read_storage("a"), -tensors["a"])
    np.testing.assert_array_equal(f.read_storage("c"), tensors["c"])

    everything = f.read_all()
    assert list(everything) == sorted(tensors)
    assert everything["mask"][0] == "BOOL" and everything["mask"][1].tolist() == [True, False, True]
    np.testing.assert_array_equal(f.read_float64("c"), tensors["c"])
    np.testing.assert_array_equal(f.read_float32("s"), np.float32(0.5))


def test_reader_widens_bfloat16_and_byte_swaps_big_endian_storage(tmp_path):
    patterns = np.array([0x3F80, 0xC049, 0x0001, 0x7F7F, 0x8000], dtype="<u2")
    path = tmp_path / "bf16.safetensors"
    _write_raw(path, {"w": ("BF16", [5], patterns.tobytes()), "d": ("F64", [2], np.array([1.0, -3.0], "<f8").tobytes())})
    f = sf.SafetensorsFile.open(path)
    np.testing.assert_array_equal(f.read_storage("w"), patterns)
    np.testing.assert_array_equal(f.read_float32("w").astype(np.float64), [_bf16_value(int(p)) for p in patterns])
    np.testing.assert_array_equal(f.read_float64("w"), [_bf16_value(int(p)) for p in patterns])
    assert f.read_storage("d").dtype.isnative and f.read_float64("d").tolist() == [1.0, -3.0]


def test_reader_truncated_after_open_names_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    st_save_file({"w": np.ones(8, np.float32)}, str(path))
    f = sf.SafetensorsFile.open(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(AdapterFileError, match=r"tensor 'w' is cut short"):
        f.read_storage("w")


def test_reader_dtype_selection(tmp_path):
    path = tmp_path / "x.safetensors"
    _write_raw(path, {"ok": ("F32", [1], b"\0" * 4), "mask": ("BOOL", [2], b"\1\0")})
    assert sf.SafetensorsFile.open(path).tensors["mask"].code == "BOOL"
    with pytest.raises(AdapterFileError, match=r"tensor 'mask' has dtype 'BOOL', which peftcore does not read") as info:
        sf.SafetensorsFile.open(path, codes=sf.NUMERIC_CODES)
    assert str(path) in str(info.value) and "BOOL," not in str(info.value)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, r"tensor 'w' has dtype \['F32'\]"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, "invalid data_offsets"),
        ({"w": [1, 2]}, "needs dtype, shape and data_offsets"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
             "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
             "c": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
            "tensors 'a' and 'c' overlap",
        ),
        ({"__metadata__": {"k": None}}, "__metadata__ must map strings to strings"),
    ],
)
def test_header_validation_names_file_and_key(tmp_path, entries, match):
    path = tmp_path / "bad.safetensors"
    text = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 12)
    with pytest.raises(AdapterFileError, match=match) as info:
        sf.SafetensorsFile.open(path)
    assert str(path) in str(info.value)


def test_read_metadata_reads_the_header_only(tmp_path):
    path = tmp_path / "x.safetensors"
    _write_raw(path, {"w": ("F32", [4], b"\0" * 16)}, metadata={"format": "pt"}, data=b"\0" * 3)
    assert sf.read_metadata(path) == {"format": "pt"}
    with pytest.raises(AdapterFileError, match="out of range"):
        sf.SafetensorsFile.open(path)
    with pytest.raises(AdapterNotFoundError, match="missing.safetensors does not exist"):
        sf.read_metadata(tmp_path / "missing.safetensors")
    with pytest.raises(AdapterNotFoundError, match="missing.safetensors does not exist"):
        sf.SafetensorsFile.open(tmp_path / "missing.safetensors")


# -- the writer -------------------------------------------------------------------------------------


def test_writer_matches_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {
        "z.w": rng.standard_normal((2, 3)).astype(np.float32),
        "a.w": rng.standard_normal((4,)),
        "m.w": rng.integers(0, 200, size=(3, 2), dtype=np.uint8),
        "scalar": np.asarray(np.int16(-7)),
        "empty": np.zeros((0,), np.float16),
        "mask": np.array([[True], [False]]),
    }
    path = tmp_path / "ours.safetensors"
    sf.write(path, {k: (sf.CODE_OF_NAME[v.dtype.name], v) for k, v in tensors.items()}, metadata={"format": "x"})
    ours, theirs = path.read_bytes(), st_save(tensors, metadata={"format": "x"})
    ours_len, theirs_len = int.from_bytes(ours[:8], "little"), int.from_bytes(theirs[:8], "little")
    assert ours_len % 8 == 0
    assert json.loads(ours[8 : 8 + ours_len]) == json.loads(theirs[8 : 8 + theirs_len])  # scalar shape [] included
    assert ours[8 + ours_len :] == theirs[8 + theirs_len :]


def test_writer_round_trips_bfloat16_storage_and_omits_empty_metadata(tmp_path):
    bits = sf.bfloat16_bits(np.linspace(-3, 3, 6, dtype=np.float32)).reshape(2, 3)
    path = tmp_path / "x.safetensors"
    sf.write(path, {"w": ("BF16", bits.T)}, metadata=None)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header == {"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 12]}}
    f = sf.SafetensorsFile.open(path)
    assert f.metadata == {}
    np.testing.assert_array_equal(f.read_storage("w"), bits.T)


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        ({"": ("F32", np.zeros(1, np.float32))}, None, "non-empty strings"),
        ({"__metadata__": ("F32", np.zeros(1, np.float32))}, None, "'__metadata__' is reserved"),
        ({"w": ("F32", np.zeros(1, np.float32))}, {"step": 7}, "metadata maps str to str; bad entry 'step': 7"),
        ({"\ud800": ("F32", np.zeros(1, np.float32))}, None, "not valid UTF-8"),
    ],
)
def test_writer_refuses_bad_keys_and_metadata(tensors, metadata, match):
    with pytest.raises(AdapterFileError, match=match):
        sf.encode(tensors, metadata=metadata)
