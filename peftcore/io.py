"""Adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``, for arrays of any namespace.

The layout is ``peft``'s ``PeftModel.save_pretrained``: adapter ``"default"`` lives in
the directory itself, any other adapter in ``<directory>/<adapter_name>/``. Weights
are a flat ``{checkpoint_key: array}`` dict in the safetensors format, read and
written byte by byte by ``peftcore._safetensors``, so no framework is needed:
bfloat16, which NumPy lacks, travels as its bit pattern. Pickled
``adapter_model.bin`` files are never read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from peftcore import _safetensors as st
from peftcore._safetensors import write_encoded as _write_safetensors  # a module global: tests crash it mid-write
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

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
# adapter files hold float or integer arrays, never BOOL
_CODE_OF_NAME = {st.DTYPE_NAMES[code]: code for code in st.NUMERIC_CODES}


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
    config_file, weights_file = _adapter_files(folder)
    config = PeftConfig.from_pretrained(config_file)
    weights = st.SafetensorsFile.open(weights_file, codes=st.NUMERIC_CODES)
    state_dict = _to_arrays(weights.read_all(), path=weights_file, xp=xp, device=device, dtype=dtype)
    return LoadedAdapter(config, state_dict, folder, weights.metadata)


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
    weights = st.SafetensorsFile.open(path, codes=st.NUMERIC_CODES)
    return _to_arrays(weights.read_all(), path=weights.path, xp=xp, device=device, dtype=dtype)


def read_metadata(path: str | os.PathLike, /) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (``{}`` when it has none)."""
    return st.read_metadata(path)


def adapter_folder(directory: str | os.PathLike, adapter_name: str) -> Path:
    """``directory`` for adapter ``"default"``, ``directory/<adapter_name>`` otherwise (``peft``'s layout)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise AdapterFileError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in (".", "..") or "/" in adapter_name or "\\" in adapter_name:
        raise AdapterFileError(f"adapter_name {adapter_name!r} cannot be used as a folder name")
    return Path(directory) / adapter_subfolder(adapter_name)


def _adapter_files(folder: Path) -> tuple[Path, Path]:
    """``folder``'s config and safetensors weight files, which must both exist (pickled weights are refused)."""
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
    return config_file, weights_file


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
        host = st.bfloat16_bits_of_widened(_host_copy(xp.astype(value, xp.float32), xp=xp))
    else:
        host = _host_copy(value, xp=xp)
    # a fresh contiguous copy: no aliasing between entries, no strides, our own byte order
    return code, np.array(host, dtype=st.STORAGE[code], order="C", copy=True)


def _prepare_safetensors(
    state_dict: Mapping[str, Array], *, metadata: Mapping[str, str] | None
) -> tuple[bytes, list[np.ndarray]]:
    """Header bytes (length prefix included) and data chunks of ``state_dict``, as ``peft`` saves them."""
    if not isinstance(state_dict, Mapping):
        raise AdapterFileError(f"state_dict must be a mapping of str to arrays, got {type(state_dict).__name__}")
    stored: dict[str, tuple[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        st.check_key(key)  # before converting the value: a bad key is the first thing to name
        stored[key] = _storage(key, value)
    return st.encode(stored, metadata={**_DEFAULT_METADATA, **dict(metadata or {})})


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
    name = st.DTYPE_NAMES[code]
    is_float = name in _FLOAT_NAMES
    native = getattr(xp, name, None)  # float16/bfloat16 are outside the standard: not every namespace has them
    if native is None and not (is_float and cast_to is not None):
        raise AdapterFileError(
            f"{path}: tensor {key!r} is {name}, which namespace {xp.__name__} cannot hold; "
            + ("pass dtype='float32' to upcast it" if is_float else "load it into another namespace")
        )
    host = storage
    if code == "BF16":
        host = st.bfloat16_to_float32(storage)
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


# -- atomic writes ------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
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
