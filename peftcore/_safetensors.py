"""The safetensors file format, byte by byte, with NumPy only: dtype codes, header checks, lazy reads, writes.

A file is an 8-byte little-endian header length, a JSON header ``{key: {"dtype", "shape",
"data_offsets"}, "__metadata__": {str: str}}`` and a data section of raw little-endian tensors.
:class:`SafetensorsFile` parses and validates the header once and reads tensors one at a time
from their byte spans, so memory is bounded by the largest tensor read. bfloat16, which NumPy
lacks, is stored as its 16-bit pattern: widened to float32 exactly (its bits are float32's upper
half) and narrowed with round-to-nearest-even. The writer lays tensors out as the ``safetensors``
library does (descending dtype, then name; header padded to 8 bytes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from peftcore.errors import AdapterFileError, AdapterNotFoundError

# (safetensors code, little-endian storage dtype, Array API dtype name), in the order of
# safetensors' ``Dtype`` enum: its writer lays tensors out by descending dtype, then name.
DTYPE_TABLE = (
    ("BOOL", "?", "bool"),
    ("U8", "<u1", "uint8"),
    ("I8", "<i1", "int8"),
    ("I16", "<i2", "int16"),
    ("U16", "<u2", "uint16"),
    ("F16", "<f2", "float16"),
    ("BF16", "<u2", "bfloat16"),  # stored as its 16-bit pattern
    ("I32", "<i4", "int32"),
    ("U32", "<u4", "uint32"),
    ("F32", "<f4", "float32"),
    ("F64", "<f8", "float64"),
    ("I64", "<i8", "int64"),
    ("U64", "<u8", "uint64"),
)
STORAGE = {code: np.dtype(storage) for code, storage, _ in DTYPE_TABLE}
DTYPE_NAMES = {code: name for code, _, name in DTYPE_TABLE}
CODE_OF_NAME = {name: code for code, _, name in DTYPE_TABLE}
ALL_CODES = tuple(STORAGE)
NUMERIC_CODES = tuple(code for code in ALL_CODES if code != "BOOL")  # what adapter files hold
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_LAYOUT_RANK = {code: rank for rank, code in enumerate(ALL_CODES)}

# safetensors refuses headers above 100 MB; so do we, before allocating one.
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype code, shape and byte span (relative to the data section)."""

    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsFile:
    """A safetensors file's validated header; tensor data is read only when asked for, by byte span."""

    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike, *, codes: Collection[str] = ALL_CODES) -> SafetensorsFile:
        """Parse and validate ``path``'s header; dtypes outside ``codes`` are refused, naming the key."""
        path = _existing(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, metadata, data_start = _read_header(f, path=path, size=size)
        data_size = size - data_start
        tensors = {
            key: _check_entry(key, entry, path=path, data_size=data_size, codes=codes) for key, entry in header.items()
        }
        _check_no_overlap(tensors, path=path)
        return cls(path, data_start, tensors, metadata)

    def read_storage(self, key: str) -> np.ndarray:
        """Tensor ``key`` as stored (bfloat16 as uint16 bits), native byte order."""
        with open(self.path, "rb") as f:
            return self._read(f, key)

    def read_all(self) -> dict[str, tuple[str, np.ndarray]]:
        """``{key: (code, storage)}`` for every tensor, keys sorted, through one open file."""
        with open(self.path, "rb") as f:
            return {key: (self.tensors[key].code, self._read(f, key)) for key in sorted(self.tensors)}

    def read_float32(self, key: str) -> np.ndarray:
        """Floating tensor ``key`` widened to float32 (exact for float16/bfloat16)."""
        return to_float32(self.read_storage(key), self.tensors[key].code)

    def read_float64(self, key: str) -> np.ndarray:
        return self.read_float32(key).astype(np.float64) if self.tensors[key].code != "F64" else self.read_storage(key)

    def _read(self, f: BinaryIO, key: str) -> np.ndarray:
        info = self.tensors[key]
        buffer = bytearray(info.end - info.begin)
        f.seek(self.data_start + info.begin)
        if f.readinto(buffer) != len(buffer):
            raise AdapterFileError(f"{self.path}: tensor {key!r} is cut short (file truncated while reading?)")
        storage = np.frombuffer(buffer, dtype=STORAGE[info.code]).reshape(info.shape)
        return storage.astype(storage.dtype.newbyteorder("="), copy=False)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (``{}`` when it has none); tensors are not checked."""
    path = _existing(path)
    with open(path, "rb") as f:
        _, metadata, _ = _read_header(f, path=path, size=os.fstat(f.fileno()).st_size)
    return metadata


# -- header validation ------------------------------------------------------------------------------


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(f"safetensors file {path} does not exist")
    return path


def _read_header(f: BinaryIO, *, path: Path, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensor entries, metadata, byte offset of the data section) after validating the header."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise AdapterFileError(f"{path}: truncated safetensors file ({size} bytes; the header length alone needs 8)")
    length = int.from_bytes(prefix, "little")
    if length > _MAX_HEADER_BYTES or 8 + length > size:
        raise AdapterFileError(
            f"{path}: corrupt or truncated safetensors file: header length {length} goes beyond the file "
            f"({size} bytes)"
        )
    raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: corrupt safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: safetensors __metadata__ must map strings to strings, got {metadata!r}")
    return header, metadata, 8 + length


def _check_entry(key: str, entry: Any, *, path: Path, data_size: int, codes: Collection[str]) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterFileError(f"{path}: header entry {key!r} needs dtype, shape and data_offsets, got {entry!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(code, str) and code in STORAGE and code in codes):
        raise AdapterFileError(
            f"{path}: tensor {key!r} has dtype {code!r}, which peftcore does not read "
            f"(supported: {', '.join(c for c in ALL_CODES if c in codes)})"
        )
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise AdapterFileError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise AdapterFileError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise AdapterFileError(
            f"{path}: data_offsets {offsets} of tensor {key!r} are out of range: the data section holds "
            f"{data_size} bytes (truncated file?)"
        )
    expected = math.prod(shape) * STORAGE[code].itemsize
    if end - begin != expected:
        raise AdapterFileError(
            f"{path}: tensor {key!r} ({code}, shape {shape}) needs {expected} bytes, "
            f"its data_offsets span {end - begin}"
        )
    return TensorInfo(code, tuple(shape), begin, end)


def _check_no_overlap(tensors: Mapping[str, TensorInfo], *, path: Path) -> None:
    previous_end, previous_key = 0, None
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < previous_end:
            raise AdapterFileError(f"{path}: tensors {previous_key!r} and {key!r} overlap in the data section")
        previous_end, previous_key = info.end, key


# -- bfloat16 and dtype conversions -------------------------------------------------------------------


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32; exact, since bfloat16 is float32's upper half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch's ``.to(bfloat16)``.

    A NaN keeps its sign and upper payload bits and is made quiet (torch writes ``0x7FC0`` for every NaN).
    """
    bits = np.asarray(values, dtype=np.float32, order="C").view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), out)


def bfloat16_bits_of_widened(wide: np.ndarray) -> np.ndarray:
    """The little-endian bfloat16 patterns of float32 values that are widened bfloat16: their upper halves.

    No rounding happens (the lower halves are zero), so every pattern, NaN payloads included, round-trips.
    """
    return (np.asarray(wide, dtype="<f4", order="C").view("<u4") >> 16).astype("<u2")


def to_float32(storage: np.ndarray, code: str) -> np.ndarray:
    """Floating ``storage`` of dtype ``code`` widened to float32 (exact for float16/bfloat16)."""
    if code == "BF16":
        return bfloat16_to_float32(storage)
    if code not in FLOAT_CODES:
        raise AdapterFileError(f"expected a floating-point tensor, got {DTYPE_NAMES[code]}")
    return storage.astype(np.float32, copy=False)


def to_storage(values: np.ndarray, code: str) -> np.ndarray:
    """float32 ``values`` narrowed to safetensors dtype ``code``'s little-endian storage."""
    if code == "BF16":
        return bfloat16_bits(values).astype("<u2")
    return np.asarray(values, dtype=STORAGE[code], order="C")


# -- writing ----------------------------------------------------------------------------------------


def check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise AdapterFileError(f"state dict keys must be non-empty strings, got {key!r}")
    if key == "__metadata__":
        raise AdapterFileError("state dict key '__metadata__' is reserved by the safetensors format")


def encode(
    tensors: Mapping[str, tuple[str, np.ndarray]], *, metadata: Mapping[str, str] | None
) -> tuple[bytes, list[np.ndarray]]:
    """Header bytes (length prefix included) and data chunks of ``{key: (code, storage)}``, in safetensors' layout.

    ``storage`` is as :meth:`SafetensorsFile.read_storage` returns it (bfloat16 as uint16 bits);
    ``__metadata__`` is written when ``metadata`` is not empty.
    """
    header: dict[str, Any] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise AdapterFileError(f"safetensors metadata maps str to str; bad entry {k!r}: {v!r}")
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key in tensors:
        check_key(key)
    offset, chunks = 0, []
    for key in sorted(tensors, key=lambda k: (-_LAYOUT_RANK[tensors[k][0]], k)):
        code, storage = tensors[key]
        data = np.asarray(storage, dtype=STORAGE[code], order="C")
        header[key] = {"dtype": code, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        chunks.append(data)
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AdapterFileError(f"state dict key or metadata is not valid UTF-8 text: {exc}") from None
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, chunks


def write_encoded(path: Path, header: bytes, chunks: list[np.ndarray]) -> None:
    """Write what :func:`encode` returned to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(header)
        for chunk in chunks:
            f.write(tensor_bytes(chunk))
        f.flush()
        os.fsync(f.fileno())


def write(path: Path, tensors: Mapping[str, tuple[str, np.ndarray]], *, metadata: Mapping[str, str] | None) -> None:
    """Write ``{key: (code, storage)}`` as a safetensors file (storage as :func:`to_storage` makes it)."""
    write_encoded(path, *encode(tensors, metadata=metadata))


def tensor_bytes(data: np.ndarray) -> memoryview | bytes:
    """``data``'s bytes without a copy (``data`` C-contiguous in its stored byte order)."""
    return memoryview(data).cast("B") if data.size else b""
