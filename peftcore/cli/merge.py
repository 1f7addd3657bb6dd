"""``peftcore merge``: fold a LoRA/DoRA/AdaLoRA/(IA)³ adapter into a safetensors base checkpoint, no model needed.

The base is copied file by file, then each adapted tensor is read, merged in float32 (float64 for a
float64 base) by the core's ``peftcore.methods.lora.ops`` / ``.dora`` / ``peftcore.methods.adalora.ops``
functions (``peftcore.methods.ia3.ops`` for (IA)³), narrowed back to its stored dtype and written over its own byte span: same header, same
sharding, same index. Memory is bounded by the largest adapted tensor plus the adapter. Everything is
staged in a hidden sibling of the output folder, which is renamed into place at the end, so a failure
leaves no partial output.
Mirrors ``peft``'s ``merge_and_unload()`` followed by ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftcore._safetensors import DTYPE_NAMES, FLOAT_CODES, SafetensorsFile, tensor_bytes, to_float32, to_storage
from peftcore.cli._common import AdapterLayout, open_adapter, peft_type_name, strip_prefix, to_json
from peftcore.errors import AdapterFileError, AdapterNotFoundError, IncompatibleKeysError, MergeError
from peftcore.matching import resolve_rank_alpha
from peftcore.methods.adalora import ops as adalora_ops
from peftcore.methods.ia3 import ops as ia3_ops
from peftcore.methods.lora import dora, ops

HELP = "merge an adapter into a safetensors base checkpoint (single file or sharded folder)"
INDEX_NAME = "model.safetensors.index.json"
# inits that change the base weights: their unconverted adapters only fit the modified base
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("merge", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("--base", required=True, help="base model.safetensors file, or a folder with one or with "
                        f"sharded files and {INDEX_NAME}")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="peft adapter folder")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--safe", action="store_true", help="fail if a merged tensor holds nan or inf")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(run=run)


# -- base checkpoint ----------------------------------------------------------------------------------


@dataclass
class BaseCheckpoint:
    files: list[Path]  # safetensors files, in index order
    index: Path | None  # model.safetensors.index.json, when sharded
    extras: list[Path]  # other files of the base folder (config.json, ...), copied as they are


def find_base(base: str | os.PathLike) -> BaseCheckpoint:
    """The safetensors file(s) of ``base``: a file, a folder with an index, or a folder with one file."""
    path = Path(base)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterFileError(f"base {path} is not a .safetensors file")
        return BaseCheckpoint([path], None, [])
    if not path.is_dir():
        raise AdapterNotFoundError(f"base checkpoint {path} does not exist")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{index}: not a safetensors index ({exc})") from None
        files = [path / name for name in names]
        for f in files:
            if not f.is_file() or f.parent != path:
                raise AdapterNotFoundError(f"{index} lists shard {f.name}, which does not exist in {path}")
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise AdapterNotFoundError(
                f"base folder {path} has {len(files)} .safetensors files and no {INDEX_NAME}; "
                "pass one file or a sharded folder with its index"
            )
        index = None
    taken = {*files, *([index] if index else [])}
    extras = sorted(p for p in path.iterdir() if p.is_file() and p not in taken and not p.name.startswith("."))
    return BaseCheckpoint(files, index, extras)


# -- merge plan ---------------------------------------------------------------------------------------

Update = Callable[[np.ndarray], np.ndarray]  # base tensor (compute dtype) -> merged tensor (compute dtype)


def _check_mergeable(layout: AdapterLayout) -> None:
    config = layout.config
    method = peft_type_name(config)
    if method not in ("LORA", "ADALORA", "IA3"):
        raise MergeError(
            f"peftcore merge supports LoRA/DoRA/rsLoRA/AdaLoRA/IA3 adapters; {layout.folder} is a {method} adapter"
        )
    if getattr(config, "target_parameters", None):
        raise MergeError(f"{layout.folder}: adapters on target_parameters (ParamWrapper) cannot be merged by peftcore")
    if getattr(config, "layer_replication", None):
        raise MergeError(f"{layout.folder}: layer_replication changes the model's layers; merge it with peft")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower() in _BASE_CHANGING_INITS:
        raise MergeError(
            f"{layout.folder}: init_lora_weights={init!r} changed the base weights during training; merge the "
            "adapter into that modified base with peft, or convert it first (save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    if not layout.modules:
        raise MergeError(f"{layout.folder}: the adapter holds no {method} layer to merge")


def _locate(module: str, param: str, where: dict[str, int]) -> str:
    for candidate in (module, module.removeprefix("model."), f"model.{module}"):
        key = f"{candidate}.{param}"
        if key in where:
            return key
    raise IncompatibleKeysError(
        f"adapter module {module!r} has no '{module}.{param}' in the base checkpoint "
        "(is this the adapter's base model?)"
    )


def _is_conv1d(weight_shape: tuple[int, ...], in_features: int, out_features: int) -> bool:
    # peft forces fan_in_fan_out for GPT-2 Conv1D whatever the config says; the stored shape tells
    return len(weight_shape) == 2 and weight_shape == (in_features, out_features) != (out_features, in_features)


def _adalora_updates(layout: AdapterLayout, module: str, parts: dict[str, str], where: dict[str, int],
                     shapes: dict[str, tuple[int, ...]], *, safe: bool) -> dict[str, Update]:
    """``W + s·B·(A⊙E)``, ``s = α / (init_r + 1e-5)``, pruned triplets (peft ``SVDLinear``/``SVDConv2d.merge``)."""
    missing = {"lora_A", "lora_E", "lora_B"} - parts.keys()
    if missing:
        raise IncompatibleKeysError(f"adapter module {module!r} lacks {sorted(missing)}; cannot merge it")
    config = layout.config
    factors = [layout.weights.read_float64(parts[name]) for name in ("lora_A", "lora_E", "lora_B")]
    # peft reloads a pruned layer at the kept rank but keeps ranknum = init_r
    s = adalora_ops.scaling(config.init_r, config.lora_alpha, r=factors[0].shape[0])
    weight_key = _locate(module, "weight", where)
    weight_shape = shapes[weight_key]
    conv = len(weight_shape) > 2
    fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False)) or (
        not conv and _is_conv1d(weight_shape, factors[0].shape[1], factors[2].shape[0]))

    def update(weight):
        a, e, b = (f.astype(weight.dtype) for f in factors)
        if conv:
            delta = adalora_ops.conv_delta_weight(a, e, b, scaling=s, weight_shape=weight_shape)
        else:
            delta = adalora_ops.delta_weight(a, e, b, scaling=s, fan_in_fan_out=fan_in_fan_out)
        return adalora_ops.merge(weight, delta, name=module, safe=safe)

    return {weight_key: update}


def _ia3_updates(layout: AdapterLayout, module: str, parts: dict[str, str], where: dict[str, int],
                 shapes: dict[str, tuple[int, ...]], *, safe: bool) -> dict[str, Update]:
    """``W ⊙ l`` (rows, or columns for feed-forward layers) and ``b ⊙ l`` (peft ``IA3Layer.merge``)."""
    if "ia3_l" not in parts:
        raise IncompatibleKeysError(f"adapter module {module!r} lacks 'ia3_l'; cannot merge it")
    config = layout.config
    vector = layout.weights.read_float64(parts["ia3_l"])
    feedforward = ia3_ops.is_feedforward(config, module)
    weight_key = _locate(module, "weight", where)
    weight_shape = shapes[weight_key]
    conv = len(weight_shape) > 2
    fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
    if not conv and not fan_in_fan_out and len(weight_shape) == 2:
        # peft writes fan_in_fan_out=True once it meets a GPT-2 Conv1D; a non-square (in, out) weight
        # whose axes only fit the vector transposed is one too
        size = vector.size
        fan_in_fan_out = weight_shape[int(feedforward)] != size == weight_shape[int(not feedforward)]
    groups = vector.size // weight_shape[1] if conv and feedforward and weight_shape[1] else 1
    options = dict(feedforward=feedforward, kind="conv" if conv else "linear", fan_in_fan_out=fan_in_fan_out,
                   groups=groups)
    expected = ia3_ops.ia3_shape(weight_shape, **options)
    if tuple(vector.shape) != expected:
        raise IncompatibleKeysError(
            f"adapter tensor {parts['ia3_l']!r} has shape {tuple(vector.shape)}, but base weight {weight_key!r} "
            f"{weight_shape} needs {expected} (is this the adapter's base model?)"
        )

    def update(weight):
        merged = ia3_ops.merge_weight(weight, vector.astype(weight.dtype), **options)
        if safe and not np.all(np.isfinite(merged)):
            # peft's safe_merge check: refuse rather than write a broken base
            raise MergeError(f"NaNs or infs detected in the merged weights of {module!r}; the adapter seems to be "
                             "broken")
        return merged

    updates: dict[str, Update] = {weight_key: update}
    if not feedforward and any(f"{c}.bias" in where for c in (module, module.removeprefix("model."),
                                                               f"model.{module}")):

        def bias_update(bias):
            return ia3_ops.merge_bias(bias, vector.astype(bias.dtype), feedforward=False)

        updates[_locate(module, "bias", where)] = bias_update
    return updates


def _module_updates(layout: AdapterLayout, module: str, parts: dict[str, str], where: dict[str, int],
                    shapes: dict[str, tuple[int, ...]], codes: dict[str, str], *, safe: bool) -> dict[str, Update]:
    config = layout.config
    if peft_type_name(config) == "ADALORA":
        return _adalora_updates(layout, module, parts, where, shapes, safe=safe)
    if peft_type_name(config) == "IA3":
        return _ia3_updates(layout, module, parts, where, shapes, safe=safe)
    r, alpha = resolve_rank_alpha(config, module)
    s = ops.scaling(r, alpha, use_rslora=bool(getattr(config, "use_rslora", False)))
    adapter = {name: layout.weights.read_float64(key) for name, key in parts.items()}
    magnitude = adapter.get("lora_magnitude_vector")
    weight_key = _locate(module, "weight", where)
    weight_shape, weight_code = shapes[weight_key], codes[weight_key]

    def factors(dtype):
        return {name: value.astype(dtype) for name, value in adapter.items()}

    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        missing = {"lora_embedding_A", "lora_embedding_B"} - parts.keys()

        def update(weight):
            f = factors(weight.dtype)
            delta = ops.embedding_delta_weight(f["lora_embedding_A"], f["lora_embedding_B"], scaling=s)
            if weight_code in ("F16", "BF16"):
                # peft's Embedding.merge rounds ΔW to the base dtype before adding it
                delta = to_float32(to_storage(delta, weight_code), weight_code)
            if magnitude is not None:
                return dora.embedding_merge(weight, delta, f["lora_magnitude_vector"], name=module, safe=safe)[0]
            return ops.merge(weight, delta, name=module, safe=safe)
    else:
        missing = {"lora_A.weight", "lora_B.weight"} - parts.keys()
        a_shape = layout.weights.tensors[parts["lora_A.weight"]].shape if "lora_A.weight" in parts else ()
        conv = len(weight_shape) > 2
        if conv and a_shape and len(a_shape) == len(weight_shape) and a_shape[1] != weight_shape[1]:
            raise MergeError(
                f"cannot merge into {module!r}: lora_A {a_shape} vs base weight {weight_shape} is a grouped "
                "convolution (groups > 1), which peft cannot merge either"
            )
        fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
        if not conv and a_shape and len(weight_shape) == 2 and "lora_B.weight" in parts:
            out_features = layout.weights.tensors[parts["lora_B.weight"]].shape[0]
            fan_in_fan_out = fan_in_fan_out or _is_conv1d(weight_shape, a_shape[1], out_features)

        def update(weight):
            f = factors(weight.dtype)
            if conv:
                delta = ops.conv_delta_weight(f["lora_A.weight"], f["lora_B.weight"], scaling=s)
                if magnitude is not None:
                    return dora.conv_merge(weight, delta, f["lora_magnitude_vector"], name=module, safe=safe)[0]
            else:
                delta = ops.delta_weight(f["lora_A.weight"], f["lora_B.weight"], scaling=s,
                                         fan_in_fan_out=fan_in_fan_out)
                if magnitude is not None:
                    return dora.merge(weight, delta, f["lora_magnitude_vector"], name=module,
                                      fan_in_fan_out=fan_in_fan_out, safe=safe)[0]
            return ops.merge(weight, delta, name=module, safe=safe)
    if missing:
        raise IncompatibleKeysError(f"adapter module {module!r} lacks {sorted(missing)}; cannot merge it")
    updates: dict[str, Update] = {weight_key: update}
    if "lora_B.bias" in parts:
        bias_key = _locate(module, "bias", where) if any(
            f"{c}.bias" in where for c in (module, module.removeprefix("model."), f"model.{module}")) else None
        lora_bias = adapter["lora_B.bias"]

        def bias_update(bias):
            return ops.merge_bias(bias, lora_bias.astype(bias.dtype), scaling=s, name=module, safe=safe)

        if bias_key is None:
            ops.merge_bias(None, lora_bias, scaling=s, name=module)  # raises the core's MergeError
        updates[bias_key] = bias_update
    return updates


def _replacement(layout: AdapterLayout, key: str, where: dict[str, int],
                 shapes: dict[str, tuple[int, ...]]) -> tuple[str, Update]:
    """A non-LoRA adapter tensor (a ``modules_to_save`` copy, a saved embedding layer) replaces its base tensor."""
    name = strip_prefix(key).replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    module, _, param = name.rpartition(".")
    try:
        target = _locate(module, param, where)
    except IncompatibleKeysError:
        raise MergeError(
            f"adapter tensor {key!r} is neither a LoRA factor nor a copy of a base tensor; cannot merge it"
        ) from None
    shape = layout.weights.tensors[key].shape
    if shape != shapes[target]:
        raise MergeError(
            f"adapter tensor {key!r} {shape} would replace base tensor {target!r} {shapes[target]}: a resized "
            "layer cannot be merged tensor by tensor; merge it with peft"
        )

    def replace(weight):
        return layout.weights.read_float64(key).astype(weight.dtype)

    return target, replace


def _chain(first: Update, then: Update) -> Update:
    return lambda weight: then(first(weight))


def plan_merge(layout: AdapterLayout, shards: list[SafetensorsFile], *, safe: bool = False) -> dict[str, Update]:
    """``{base tensor name: update}`` for every base tensor the adapter changes.

    Saved copies of base tensors replace them first; LoRA deltas are then merged on top (peft
    loads the saved tensors into the model before ``merge_and_unload``).
    """
    _check_mergeable(layout)
    where = {key: i for i, shard in enumerate(shards) for key in shard.tensors}
    shapes = {key: shard.tensors[key].shape for shard in shards for key in shard.tensors}
    codes = {key: shard.tensors[key].code for shard in shards for key in shard.tensors}
    updates: dict[str, Update] = {}
    for key in layout.other_keys:
        target, replace = _replacement(layout, key, where, shapes)
        updates[target] = replace
    for module, parts in layout.modules.items():
        for target, update in _module_updates(layout, module, parts, where, shapes, codes, safe=safe).items():
            updates[target] = _chain(updates[target], update) if target in updates else update
    for key in updates:
        code = shards[where[key]].tensors[key].code
        if code not in FLOAT_CODES:
            raise MergeError(f"base tensor {key!r} is {DTYPE_NAMES[code]}; only floating-point weights can be merged")
    return updates


# -- output -------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.done, self.enabled = max(total, 1), 0, enabled

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\rmerging [{'#' * filled}{'.' * (30 - filled)}] {100 * self.done // self.total:3d}%")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.peftcore-{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(staging: Path, out: Path, *, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif not overwrite:
            raise AdapterFileError(f"output {out} already exists and is not empty; pass --overwrite to replace it")
        else:
            trash = out.parent / f".{out.name}.peftcore-old-{secrets.token_hex(4)}"
            os.rename(out, trash)
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(trash, out)
                raise
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
            return
    os.rename(staging, out)
    _fsync(out.parent)


def _write_shard(shard: SafetensorsFile, destination: Path, updates: dict[str, Update], progress: _Progress) -> None:
    shutil.copyfile(shard.path, destination)
    progress.advance(shard.path.stat().st_size)
    with open(destination, "r+b") as f:
        for key in sorted((k for k in updates if k in shard.tensors), key=lambda k: shard.tensors[k].begin):
            info = shard.tensors[key]
            compute = np.float64 if info.code == "F64" else np.float32
            weight = shard.read_float64(key).astype(compute) if compute is np.float64 else shard.read_float32(key)
            merged = np.asarray(updates[key](weight))
            data = to_storage(merged, info.code)
            if data.nbytes != info.end - info.begin:
                raise MergeError(f"merged {key!r} has {data.nbytes} bytes, its slot {info.end - info.begin}")
            f.seek(shard.data_start + info.begin)
            f.write(tensor_bytes(data))
            progress.advance(info.end - info.begin)
        f.flush()
        os.fsync(f.fileno())


def merge_checkpoint(base: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                     overwrite: bool = False, safe: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write ``out`` = ``base`` with ``adapter_dir`` merged in; return a summary (files, merged tensors)."""
    out = Path(out)
    checkpoint = find_base(base)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise AdapterFileError(f"output {out} already exists and is not empty; pass --overwrite to replace it")
    resolved_out = out.resolve()
    if any(resolved_out == p.resolve().parent for p in checkpoint.files):
        raise AdapterFileError(f"output {out} is the base folder itself; choose another folder")
    layout = open_adapter(adapter_dir)
    shards = [SafetensorsFile.open(f) for f in checkpoint.files]
    updates = plan_merge(layout, shards, safe=safe)
    bar = _Progress(sum(s.path.stat().st_size for s in shards)
                    + sum(s.tensors[k].end - s.tensors[k].begin for s in shards for k in updates if k in s.tensors),
                    enabled=progress)
    try:
        with _staging(out) as staging:
            for shard in shards:
                _write_shard(shard, staging / shard.path.name, updates, bar)
            for extra in [*([checkpoint.index] if checkpoint.index else []), *checkpoint.extras]:
                shutil.copyfile(extra, staging / extra.name)
            _fsync(staging)
            _publish(staging, out, overwrite=overwrite)
    finally:
        bar.close()
    return {
        "out": str(out),
        "files": [s.path.name for s in shards] + ([checkpoint.index.name] if checkpoint.index else [])
        + [e.name for e in checkpoint.extras],
        "merged_tensors": sorted(updates),
    }


def run(args: argparse.Namespace) -> int:
    summary = merge_checkpoint(args.base, args.adapter, args.out, overwrite=args.overwrite, safe=args.safe,
                               progress=not args.quiet and sys.stderr.isatty())
    if args.json:
        print(to_json(summary))
    else:
        print(f"merged {len(summary['merged_tensors'])} tensors into {summary['out']} ({len(summary['files'])} files)")
    return 0
