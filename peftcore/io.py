"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``, for arrays of any namespace.

The layout is ``peft``'s ``PeftModel.save_pretrained``: adapter ``"default"`` lives in
the directory itself, any other adapter in ``<directory>/<adapter_name>/``. Weights
are a flat ``{checkpoint_key: array}`` dict in the safetensors format (an 8-byte
little-endian header length, a JSON header, raw little-endian data), which this
module reads and writes byte by byte, laid out as the ``safetensors`` library lays
it out, so no framework is needed: bfloat16, which NumPy lacks, travels as its
bit pattern. Pickled ``adapter_model.bin`` files are never read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from peftcore._xp import Array, Namespace, array_namespace, dtype_name, is_numpy_namespace, stop_gradient
from peftcore.config import PeftConfig
from peftcore.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peftcore.errors import AdapterFileError, AdapterNotFoundError
from peftcore.naming import DEFAULT_ADAPTER_NAME, adapter_subfolder

__all__ = [
    "LoadedAdapter",
    "adapter_folder",
    "load_adapter",
    "load_state_dict",
    "read_metadata",
    "save_adapter",
    "save_state_dict",
]

# The format tag ``peft`` writes (``safe_save_file(..., metadata={"format": "pt"})``);
# transformers' loaders check for it.
_DEFAULT_METADATA = {"format": "pt"}

# (safetensors code, little-endian storage dtype, Array API dtype name), in the order of
# safetensors' ``Dtype`` enum: its writer lays tensors out by descending dtype, then name.
_DTYPE_TABLE = (
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
_CODE_OF_NAME = {name: code for code, _, name in _DTYPE_TABLE}
_NAME_OF_CODE = {code: name for code, _, name in _DTYPE_TABLE}
_STORAGE_OF_CODE = {code: np.dtype(storage) for code, storage, _ in _DTYPE_TABLE}
_LAYOUT_RANK = {code: rank for rank, (code, _, _) in enumerate(_DTYPE_TABLE)}
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")

# safetensors refuses headers above 100 MB; so do we, before allocating one.
_MAX_HEADER_BYTES = 100_000_000


class LoadedAdapter(NamedTuple):
    """What ``load_adapter`` returns: the config, ``{checkpoint_key: array}``, the folder, the file metadata."""

    config: PeftConfig
    state_dict: dict[str, Array]
    path: Path
    metadata: dict[str, str]


def _numpy_namespace() -> Namespace:
    # imported on first use: array_api_compat.numpy pulls in numpy.typing and friends (~0.2 s)
    import array_api_compat.numpy

    return array_api_compat.numpy


# -- public API ---------------------------------------------------------------------------------


def save_adapter(
    directory: str | os.PathLike,
    config: PeftConfig,
    state_dict: Mapping[str, Array],
    /,
    *,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors``; return the adapter folder.

    As ``peft``'s ``PeftModel.save_pretrained``: the config is written with
    ``inference_mode: true``, the weights with metadata ``{"format": "pt"}`` (plus
    ``metadata``), and adapter ``"default"`` goes to ``directory``, any other to
    ``directory/<adapter_name>``. Both files are staged in a temporary sibling folder
    and renamed into place; an exception at any point leaves the previous adapter at
    that path, byte for byte, and no temporary files.
    """
    if not isinstance(config, PeftConfig):
        raise AdapterFileError(f"save_adapter needs a PeftConfig, got {type(config).__name__}")
    target = adapter_folder(directory, adapter_name)
    header, chunks = _prepare_safetensors(state_dict, metadata=metadata)
    config_text = config.to_json_string(inference_mode=True)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{target} is a file; save_adapter needs a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _staging_folder(target) as staging:
        _write_safetensors(staging / SAFETENSORS_WEIGHTS_NAME, header, chunks)
        _write_file(staging / CONFIG_NAME, config_text.encode("utf-8"))
        _commit(staging, target, (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME))
    return target


def load_adapter(
    directory: str | os.PathLike,
    /,
    *,
    adapter_name: str | None = None,
    subfolder: str | None = None,
    xp: Namespace | None = None,
    device: Any = None,
    dtype: Any = None,
) -> LoadedAdapter:
    """Read the adapter in ``directory[/subfolder][/adapter_name]`` into arrays of namespace ``xp``.

    ``adapter_name`` ``None`` or ``"default"`` reads ``directory`` itself, mirroring
    ``save_adapter``. The config class is chosen by the file's ``peft_type`` (the
    registry, as ``peft``'s ``PeftConfig.from_pretrained``). ``xp`` defaults to NumPy;
    ``dtype`` (a dtype of ``xp`` or its name) casts every floating tensor, which is how
    bfloat16 weights load into a namespace without bfloat16.
    """
    root = Path(directory)
    if subfolder:
        root = root / subfolder
    if not root.is_dir():
        raise AdapterNotFoundError(f"adapter directory {root} does not exist")
    folder = adapter_folder(root, adapter_name or DEFAULT_ADAPTER_NAME)
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
        raise AdapterNotFoundError(f"no adapter {adapter_name!r} in {root}: {folder} does not exist (found {found})")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterNotFoundError(f"{config_file} does not exist; {folder} holds no peft adapter")
    weights_file = folder / SAFETENSORS_WEIGHTS_NAME
    if not weights_file.is_file():
        pickle_note = ""
        if (folder / WEIGHTS_NAME).is_file():
            pickle_note = (
                f"; {folder / WEIGHTS_NAME} exists, but peftcore does not read pickled (torch.save) weights: "
                "re-save it with peft's save_pretrained(safe_serialization=True)"
            )
        raise AdapterNotFoundError(f"{weights_file} does not exist{pickle_note}")
    config = PeftConfig.from_pretrained(config_file)
    entries, file_metadata = _read_safetensors(weights_file)
    state_dict = _to_arrays(entries, path=weights_file, xp=xp, device=device, dtype=dtype)
    return LoadedAdapter(config, state_dict, folder, file_metadata)


def save_state_dict(
    path: str | os.PathLike, state_dict: Mapping[str, Array], /, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write one safetensors file atomically (metadata ``{"format": "pt"}`` plus ``metadata``)."""
    path = Path(path)
    header, chunks = _prepare_safetensors(state_dict, metadata=metadata)
    if path.is_dir():
        raise AdapterFileError(f"{path} is a directory; save_state_dict writes a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staging_folder(path) as staging:
        _write_safetensors(staging / path.name, header, chunks)
        os.replace(staging / path.name, path)
    return path


def load_state_dict(
    path: str | os.PathLike, /, *, xp: Namespace | None = None, device: Any = None, dtype: Any = None
) -> dict[str, Array]:
    """Read one safetensors file into ``{key: array}`` of namespace ``xp`` (NumPy by default), keys sorted."""
    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(f"safetensors file {path} does not exist")
    entries, _ = _read_safetensors(path)
    return _to_arrays(entries, path=path, xp=xp, device=device, dtype=dtype)


def read_metadata(path: str | os.PathLike, /) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (``{}`` when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(f"safetensors file {path} does not exist")
    with open(path, "rb") as f:
        _, metadata, _ = _read_header(f, path=path, size=os.fstat(f.fileno()).st_size)
    return metadata


def adapter_folder(directory: str | os.PathLike, adapter_name: str) -> Path:
    """``directory`` for adapter ``"default"``, ``directory/<adapter_name>`` otherwise (``peft``'s layout)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise AdapterFileError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in (".", "..") or "/" in adapter_name or "\\" in adapter_name:
        raise AdapterFileError(f"adapter_name {adapter_name!r} cannot be used as a folder name")
    return Path(directory) / adapter_subfolder(adapter_name)


# -- arrays <-> bytes ---------------------------------------------------------------------------


def _host_copy(x: Array, *, xp: Namespace) -> np.ndarray:
    """``x`` as a NumPy array in host memory (shares memory where the library allows)."""
    x = stop_gradient(x, xp=xp)
    if is_numpy_namespace(xp):
        return np.asarray(x)
    try:
        return np.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError):
        pass
    # device memory: torch exports to the host once moved to the CPU; JAX copies through __array__
    with contextlib.suppress(BufferError, RuntimeError, TypeError, ValueError):
        return np.from_dlpack(array_api_compat.to_device(x, "cpu"))
    return np.asarray(x)


def _storage(key: str, value: Any) -> tuple[str, np.ndarray]:
    """(safetensors code, contiguous little-endian NumPy array of the bytes to write) for one entry."""
    try:
        xp = array_namespace(value)
    except TypeError:
        raise AdapterFileError(f"state dict value for {key!r} is a {type(value).__name__}, not an array") from None
    name = dtype_name(value.dtype)
    code = _CODE_OF_NAME.get(name)
    if code is None:
        raise AdapterFileError(
            f"state dict value for {key!r} has dtype {name}; adapter files hold float or integer arrays "
            f"({', '.join(_CODE_OF_NAME)})"
        )
    if name == "bfloat16":
        # bfloat16 -> float32 is exact (16 zero bits appended), so the upper half is the original pattern
        wide = _host_copy(xp.astype(value, xp.float32), xp=xp)
        host = (np.ascontiguousarray(wide, dtype="<f4").view("<u4") >> 16).astype("<u2")
    else:
        host = _host_copy(value, xp=xp)
    # a fresh contiguous copy: no aliasing between entries, no strides, our own byte order
    return code, np.array(host, dtype=_STORAGE_OF_CODE[code], order="C", copy=True)


def _prepare_safetensors(
    state_dict: Mapping[str, Array], *, metadata: Mapping[str, str] | None
) -> tuple[bytes, list[np.ndarray]]:
    """Header bytes (length prefix included) and data chunks, in safetensors' own layout."""
    if not isinstance(state_dict, Mapping):
        raise AdapterFileError(f"state_dict must be a mapping of str to arrays, got {type(state_dict).__name__}")
    stored: dict[str, tuple[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key:
            raise AdapterFileError(f"state dict keys must be non-empty strings, got {key!r}")
        if key == "__metadata__":
            raise AdapterFileError("state dict key '__metadata__' is reserved by the safetensors format")
        stored[key] = _storage(key, value)
    header: dict[str, Any] = {}
    merged = {**_DEFAULT_METADATA, **dict(metadata or {})}
    for k, v in merged.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise AdapterFileError(f"safetensors metadata maps str to str; bad entry {k!r}: {v!r}")
    header["__metadata__"] = merged
    order = sorted(stored, key=lambda k: (-_LAYOUT_RANK[stored[k][0]], k))
    offset = 0
    chunks = []
    for key in order:
        code, data = stored[key]
        header[key] = {"dtype": code, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        chunks.append(data)
    try:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AdapterFileError(f"state dict key or metadata is not valid UTF-8 text: {exc}") from None
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, chunks


def _to_arrays(
    entries: Mapping[str, tuple[str, np.ndarray]], *, path: Path, xp: Namespace | None, device: Any, dtype: Any
) -> dict[str, Array]:
    xp = _numpy_namespace() if xp is None else xp
    cast_to = _resolve_float_dtype(dtype, xp=xp)
    return {
        key: _to_namespace(code, storage, key=key, path=path, xp=xp, device=device, cast_to=cast_to)
        for key, (code, storage) in entries.items()
    }


def _to_namespace(
    code: str, storage: np.ndarray, *, key: str, path: Path, xp: Namespace, device: Any, cast_to: Any
) -> Array:
    name = _NAME_OF_CODE[code]
    is_float = name in _FLOAT_NAMES
    native = getattr(xp, name, None)  # float16/bfloat16 are outside the standard: not every namespace has them
    if native is None and not (is_float and cast_to is not None):
        raise AdapterFileError(
            f"{path}: tensor {key!r} is {name}, which namespace {xp.__name__} cannot hold; "
            + ("pass dtype='float32' to upcast it" if is_float else "load it into another namespace")
        )
    host = storage
    if code == "BF16":
        host = (storage.astype(np.uint32) << 16).view(np.float32)  # exact: bfloat16 is float32's upper half
    elif native is None:
        host = storage.astype(np.float32)  # exact for float16
    array = xp.asarray(host, device=device)
    target = cast_to if (is_float and cast_to is not None) else native
    return array if array.dtype == target else xp.astype(array, target)


def _resolve_float_dtype(dtype: Any, *, xp: Namespace) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        resolved = getattr(xp, dtype, None)
        if resolved is None:
            raise AdapterFileError(f"dtype {dtype!r} does not exist in namespace {xp.__name__}")
        dtype = resolved
    if dtype_name(dtype) not in _FLOAT_NAMES:
        raise AdapterFileError(f"dtype= casts floating-point weights, so it must be a float dtype, got {dtype!r}")
    return dtype


# -- safetensors reading ------------------------------------------------------------------------


def _read_header(f: Any, *, path: Path, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
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


def _check_entry(key: str, entry: Any, *, path: Path, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterFileError(f"{path}: header entry {key!r} needs dtype, shape and data_offsets, got {entry!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in _STORAGE_OF_CODE:
        raise AdapterFileError(
            f"{path}: tensor {key!r} has dtype {code!r}, which peftcore does not read "
            f"(supported: {', '.join(_STORAGE_OF_CODE)})"
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
    expected = math.prod(shape) * _STORAGE_OF_CODE[code].itemsize
    if end - begin != expected:
        raise AdapterFileError(
            f"{path}: tensor {key!r} ({code}, shape {shape}) needs {expected} bytes, "
            f"its data_offsets span {end - begin}"
        )
    return code, tuple(shape), begin, end


def _read_safetensors(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """``{key: (code, native-order NumPy storage)}`` in sorted key order, and the metadata."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, metadata, data_start = _read_header(f, path=path, size=size)
        data_size = size - data_start
        spans = {key: _check_entry(key, entry, path=path, data_size=data_size) for key, entry in header.items()}
        previous_end, previous_key = 0, None
        for key, (_, _, begin, end) in sorted(spans.items(), key=lambda item: (item[1][2], item[1][3])):
            if begin < previous_end:
                raise AdapterFileError(f"{path}: tensors {previous_key!r} and {key!r} overlap in the data section")
            previous_end, previous_key = end, key
        entries = {}
        for key in sorted(spans):
            code, shape, begin, end = spans[key]
            buffer = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise AdapterFileError(f"{path}: tensor {key!r} is cut short (file truncated while reading?)")
            storage = np.frombuffer(buffer, dtype=_STORAGE_OF_CODE[code]).reshape(shape)
            entries[key] = (code, storage.astype(storage.dtype.newbyteorder("="), copy=False))
    return entries, metadata


# -- atomic writes ------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, header: bytes, chunks: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(header)
        for chunk in chunks:
            f.write(memoryview(chunk).cast("B") if chunk.size else b"")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _staging_folder(target: Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` (same file system, so renames out of it are atomic); always removed."""
    while True:
        staging = target.parent / f".{target.name}.peftcore-{secrets.token_hex(4)}.tmp"
        try:
            staging.mkdir()  # plain mkdir: the umask applies, as to any folder the user creates
            break
        except FileExistsError:
            continue
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, target: Path, names: tuple[str, ...]) -> None:
    """Move the staged files into ``target``; on any exception restore what ``target`` held before."""
    if not target.exists():
        os.rename(staging, target)  # one atomic step: the folder appears complete or not at all
        return
    previous = staging / ".previous"
    previous.mkdir()
    moved: list[tuple[Path, Path | None]] = []
    try:
        for name in names:
            destination = target / name
            backup = None
            if destination.exists():
                backup = previous / name
                _preserve(destination, backup)
            os.replace(staging / name, destination)
            moved.append((destination, backup))
        _fsync_directory(target)
    except BaseException:
        for destination, backup in reversed(moved):
            if backup is None:
                destination.unlink(missing_ok=True)
            else:
                os.replace(backup, destination)
        raise


def _preserve(path: Path, backup: Path) -> None:
    # a hard link keeps the old bytes alive without copying; some file systems lack links
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
