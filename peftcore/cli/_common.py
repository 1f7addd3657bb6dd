"""Shared pieces of the ``peftcore`` commands: lazy safetensors reading, bfloat16 rounding, adapter layout.

Safetensors files are read tensor by tensor from their header's byte offsets (never all at once), so
a command's memory is bounded by its largest tensor. bfloat16, which NumPy lacks, is widened to
float32 exactly (its bits are float32's upper half) and narrowed back with round-to-nearest-even.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftcore.config import PeftConfig, UnknownConfigFieldsWarning
from peftcore.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peftcore.errors import AdapterFileError, AdapterNotFoundError, IncompatibleKeysError
from peftcore.naming import BASE_MODEL_PREFIX, parse_checkpoint_key

# safetensors dtype code -> little-endian NumPy storage dtype (bfloat16 as its 16-bit pattern)
STORAGE = {
    "BOOL": np.dtype("?"), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"), "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
    "I64": "int64", "U64": "uint64",
}
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
    """A safetensors file's parsed header; tensors are read one at a time with :meth:`read`."""

    path: Path
    header_bytes: bytes  # length prefix + JSON header, as stored
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsFile:
        path = Path(path)
        if not path.is_file():
            raise AdapterNotFoundError(f"safetensors file {path} does not exist")
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterFileError(f"{path}: truncated safetensors file ({size} bytes)")
            length = int.from_bytes(prefix, "little")
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise AdapterFileError(f"{path}: corrupt safetensors file: header length {length} exceeds the file")
            raw = f.read(length)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFileError(f"{path}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        data_size = size - 8 - length
        tensors = {}
        for key, entry in header.items():
            try:
                code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise AdapterFileError(f"{path}: malformed header entry for {key!r}: {entry!r}") from None
            if code not in STORAGE:
                raise AdapterFileError(f"{path}: tensor {key!r} has unsupported dtype {code!r}")
            info = TensorInfo(code, shape, int(begin), int(end))
            span = info.end - info.begin
            if not 0 <= info.begin <= info.end <= data_size or span != info.numel * STORAGE[code].itemsize:
                raise AdapterFileError(f"{path}: tensor {key!r} has bad data_offsets {[begin, end]} (truncated file?)")
            tensors[key] = info
        return cls(path, prefix + raw, 8 + length, tensors, dict(metadata))

    def read_storage(self, key: str) -> np.ndarray:
        """Tensor ``key`` as stored (bfloat16 as uint16 bits), native byte order."""
        info = self.tensors[key]
        buffer = bytearray(info.end - info.begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.begin)
            if f.readinto(buffer) != len(buffer):
                raise AdapterFileError(f"{self.path}: tensor {key!r} is cut short")
        storage = np.frombuffer(buffer, dtype=STORAGE[info.code]).reshape(info.shape)
        return storage.astype(storage.dtype.newbyteorder("="), copy=False)

    def read_float32(self, key: str) -> np.ndarray:
        """Floating tensor ``key`` widened to float32 (exact for float16/bfloat16)."""
        return to_float32(self.read_storage(key), self.tensors[key].code)

    def read_float64(self, key: str) -> np.ndarray:
        return self.read_float32(key).astype(np.float64) if self.tensors[key].code != "F64" else self.read_storage(key)


def to_float32(storage: np.ndarray, code: str) -> np.ndarray:
    if code == "BF16":
        return (storage.astype(np.uint32) << 16).view(np.float32)
    if code not in FLOAT_CODES:
        raise AdapterFileError(f"expected a floating-point tensor, got {DTYPE_NAMES[code]}")
    return storage.astype(np.float32, copy=False)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch's ``.to(bfloat16)``."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), out)


def to_storage(values: np.ndarray, code: str) -> np.ndarray:
    """float32 ``values`` narrowed to safetensors dtype ``code``'s little-endian storage."""
    if code == "BF16":
        return bfloat16_bits(values).astype("<u2")
    return np.ascontiguousarray(values.astype(STORAGE[code], copy=False))


# -- adapters ---------------------------------------------------------------------------------------


@dataclass
class AdapterLayout:
    """An adapter folder read lazily: config, the weight file's header, keys grouped by module."""

    folder: Path
    config: PeftConfig
    weights: SafetensorsFile
    modules: dict[str, dict[str, str]]  # module path -> {"lora_A.weight": key, "lora_magnitude_vector": key, ...}
    other_keys: list[str]  # keys that fit no adapter container (modules_to_save copies, ...)
    config_warnings: list[str]
    config_bytes: int


def open_adapter(directory: str | os.PathLike) -> AdapterLayout:
    """Read ``adapter_config.json`` and the header of ``adapter_model.safetensors`` (no tensor data)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter directory {folder} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterNotFoundError(f"{config_file} does not exist; {folder} holds no peft adapter")
    weights_file = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights_file.is_file():
        raise AdapterNotFoundError(f"{weights_file} does not exist (only safetensors adapters are read)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnknownConfigFieldsWarning)
        config = PeftConfig.from_pretrained(config_file)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownConfigFieldsWarning)]
    weights = SafetensorsFile.open(weights_file)
    modules: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in sorted(weights.tensors):
        try:
            module, container, param = parse_checkpoint_key(key, peft_type=config.peft_type)
        except IncompatibleKeysError:
            other.append(key)
            continue
        modules.setdefault(module, {})[container if param is None else f"{container}.{param}"] = key
    return AdapterLayout(folder, config, weights, modules, other, messages, config_file.stat().st_size)


def peft_type_name(config: PeftConfig) -> str:
    value = config.peft_type
    return str(getattr(value, "value", value))


def task_type_name(config: PeftConfig) -> str | None:
    value = config.task_type
    return None if value is None else str(getattr(value, "value", value))


def base_key(module_path: str, param: str = "weight") -> str:
    """The base checkpoint's name of ``module_path``'s ``param`` (adapter keys carry ``base_model.model.``)."""
    return f"{module_path}.{param}"


def strip_prefix(key: str) -> str:
    return key[len(BASE_MODEL_PREFIX):] if key.startswith(BASE_MODEL_PREFIX) else key


def to_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def write_safetensors(
    path: Path, tensors: Mapping[str, tuple[str, np.ndarray]], *, metadata: Mapping[str, str]
) -> None:
    """Write ``{key: (dtype code, storage array)}`` as a safetensors file (storage as ``to_storage`` makes it)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, chunks = 0, []
    for key in sorted(tensors):
        code, storage = tensors[key]
        data = np.ascontiguousarray(storage, dtype=STORAGE[code])
        header[key] = {"dtype": code, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        chunks.append(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for chunk in chunks:
            f.write(memoryview(chunk).cast("B") if chunk.size else b"")
        f.flush()
        os.fsync(f.fileno())
