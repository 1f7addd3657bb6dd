"""``peftcore convert``: peft LoRA adapters <-> mlx-lm LoRA adapters, tensors copied bit for bit.

mlx-lm's ``LoRALinear`` computes ``y = x·Wᵀ + scale·(x·a)·b`` with ``a = lora_a (in, r)`` and
``b = lora_b (r, out)`` and an absolute ``scale``; peft computes ``y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` with
``A (r, in)``, ``B (out, r)``, ``s = alpha/r`` (``alpha/√r`` with rsLoRA). So ``a = Aᵀ``, ``b = Bᵀ``
(transposes, exact in any dtype), ``scale = s``, and back ``lora_alpha`` is chosen so that
``lora_alpha / r == scale`` exactly in float64. mlx-lm adapts the same layer-relative ``keys`` in
the model's last ``num_layers`` blocks with one rank and scale, so only such peft adapters convert.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from peftcore import _safetensors as st
from peftcore.cli._common import open_adapter, peft_type_name, to_json
from peftcore.cli.merge import _publish, _staging
from peftcore.config import PeftConfig
from peftcore.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peftcore.errors import AdapterFileError, AdapterNotFoundError
from peftcore.matching import resolve_rank_alpha
from peftcore.methods.lora.ops import scaling as lora_scaling

HELP = "convert a LoRA adapter between peft's format and mlx-lm's (direction from the input)"
MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = "adapter_config.json"
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)\.(?P<key>.+)$")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("convert", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("src", metavar="SRC_DIR", help=f"peft adapter folder, or mlx-lm folder with {MLX_WEIGHTS}")
    parser.add_argument("out", metavar="OUT_DIR", help="output folder (must not exist or be empty)")
    parser.add_argument("--to", choices=("mlx", "peft"), help="target format (default: the other one)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(run=run)


def source_format(src: str | Path) -> str:
    folder = Path(src)
    if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        return "peft"
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    raise AdapterNotFoundError(f"{folder} holds neither {SAFETENSORS_WEIGHTS_NAME} (peft) nor {MLX_WEIGHTS} (mlx-lm)")


def _exact_alpha(scale: float, divisor: float) -> float | None:
    alpha = scale * divisor
    below = above = alpha
    for _ in range(64):
        for candidate in (below, above):
            if candidate / divisor == scale:
                return candidate
        below, above = math.nextafter(below, -math.inf), math.nextafter(above, math.inf)
    return None


def alpha_for_scale(scale: float, r: int) -> tuple[float, bool]:
    """``(lora_alpha, use_rslora)`` whose peft scaling equals ``scale`` exactly in float64.

    ``alpha / r == scale`` when some float ``alpha`` gives it, else ``alpha / √r == scale`` (rsLoRA);
    a scale neither reaches (rare: division skips some quotients) gets the nearest ``alpha / r``.
    """
    for use_rslora, divisor in ((False, float(r)), (True, math.sqrt(r))):
        alpha = _exact_alpha(scale, divisor)
        if alpha is not None:
            return alpha, use_rslora
    return scale * r, False


def peft_to_mlx(src: str | Path, staging: Path) -> dict[str, Any]:
    layout = open_adapter(src)
    config = layout.config
    where = f"cannot convert {layout.folder} to mlx-lm:"
    if peft_type_name(config) != "LORA":
        raise AdapterFileError(f"{where} it is a {peft_type_name(config)} adapter, mlx-lm reads LoRA")
    for flag, name in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"), ("fan_in_fan_out", "fan_in_fan_out")):
        if getattr(config, flag, False):
            raise AdapterFileError(f"{where} {name} adapters have no mlx-lm LoRA equivalent")
    if layout.other_keys:
        raise AdapterFileError(f"{where} tensor {layout.other_keys[0]!r} is not a LoRA factor (modules_to_save?)")
    ranks, layers, prefixes, tensors = set(), {}, set(), {}
    for module, parts in layout.modules.items():
        if set(parts) != {"lora_A.weight", "lora_B.weight"}:
            raise AdapterFileError(f"{where} module {module!r} holds {sorted(parts)}; only Linear LoRA converts")
        a, b = (layout.weights.tensors[parts[n]] for n in ("lora_A.weight", "lora_B.weight"))
        if len(a.shape) != 2:
            raise AdapterFileError(f"{where} module {module!r} is a convolution")
        r, alpha = resolve_rank_alpha(config, module)
        ranks.add((a.shape[0], lora_scaling(r, alpha, use_rslora=bool(config.use_rslora))))
        match = _LAYER.match(module)
        if match is None:
            raise AdapterFileError(f"{where} module {module!r} is outside the transformer blocks (mlx-lm adapts "
                                   "'layers.<i>.<key>' modules only)")
        prefixes.add(match["prefix"])
        layers.setdefault(int(match["index"]), set()).add(match["key"])
        tensors[f"{module}.lora_a"] = (a.code, layout.weights.read_storage(parts["lora_A.weight"]).T)
        tensors[f"{module}.lora_b"] = (b.code, layout.weights.read_storage(parts["lora_B.weight"]).T)
    if len(ranks) != 1:
        raise AdapterFileError(f"{where} mlx-lm has one rank and scale, this adapter has {sorted(ranks)} "
                               "(rank_pattern/alpha_pattern)")
    keys = {frozenset(k) for k in layers.values()}
    indices = sorted(layers)
    if len(prefixes) != 1 or len(keys) != 1 or indices != list(range(indices[0], indices[-1] + 1)):
        raise AdapterFileError(f"{where} mlx-lm adapts the same keys in consecutive last blocks; this adapter adapts "
                               f"blocks {indices} with keys {sorted(sorted(k) for k in keys)}")
    (rank, scale), = ranks
    mlx_config = {
        "fine_tune_type": "lora",
        "model": config.base_model_name_or_path,
        "num_layers": indices[-1] + 1 - indices[0],
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(config.lora_dropout),
                            "keys": sorted(next(iter(keys)))},
    }
    st.write(staging / MLX_WEIGHTS, tensors, metadata={"format": "mlx"})
    (staging / MLX_CONFIG).write_text(json.dumps(mlx_config, indent=4), encoding="utf-8")
    return {"format": "mlx", "rank": rank, "scale": scale, "num_layers": mlx_config["num_layers"],
            "keys": mlx_config["lora_parameters"]["keys"], "tensors": len(tensors),
            "note": f"num_layers counts back from the model's last block; this assumes it is block {indices[-1]}"}


def mlx_to_peft(src: str | Path, staging: Path) -> dict[str, Any]:
    folder = Path(src)
    config_file = folder / MLX_CONFIG
    try:
        mlx_config = json.loads(config_file.read_text(encoding="utf-8"))
        params = mlx_config.get("lora_parameters") or {}
        scale = float(params["scale"])
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{config_file} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AdapterFileError(f"{config_file}: not an mlx-lm adapter config ({exc!r})") from None
    kind = mlx_config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterFileError(f"cannot convert {folder}: fine_tune_type {kind!r}; only 'lora' converts to peft")
    weights = st.SafetensorsFile.open(folder / MLX_WEIGHTS)
    modules: dict[str, dict[str, str]] = {}
    for key in weights.tensors:
        module, _, name = key.rpartition(".")
        if name not in ("lora_a", "lora_b") or not module:
            raise AdapterFileError(f"{weights.path}: tensor {key!r} is not an mlx-lm LoRA factor (lora_a/lora_b)")
        modules.setdefault(module, {})[name] = key
    tensors, ranks = {}, set()
    for module, parts in sorted(modules.items()):
        if set(parts) != {"lora_a", "lora_b"}:
            raise AdapterFileError(f"{weights.path}: module {module!r} lacks lora_a or lora_b")
        a, b = weights.tensors[parts["lora_a"]], weights.tensors[parts["lora_b"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
            raise AdapterFileError(f"{weights.path}: module {module!r} has lora_a {a.shape}, lora_b {b.shape}")
        ranks.add(a.shape[1])
        tensors[f"base_model.model.{module}.lora_A.weight"] = (a.code, weights.read_storage(parts["lora_a"]).T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (b.code, weights.read_storage(parts["lora_b"]).T)
    if len(ranks) != 1:
        raise AdapterFileError(f"{weights.path}: modules have different ranks {sorted(ranks)}")
    (r,) = ranks
    alpha, use_rslora = alpha_for_scale(scale, r)
    config = PeftConfig.from_dict({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora,
        "lora_dropout": float(params.get("dropout", 0.0)), "target_modules": sorted(modules),
        "base_model_name_or_path": mlx_config.get("model"),
    })
    st.write(staging / SAFETENSORS_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    (staging / CONFIG_NAME).write_text(config.to_json_string(inference_mode=True), encoding="utf-8")
    scaling = lora_scaling(r, alpha, use_rslora=use_rslora)
    return {"format": "peft", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora, "scaling": scaling,
            "scale_error": abs(scaling - scale), "tensors": len(tensors)}


def convert(src: str | Path, out: str | Path, *, to: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert ``src`` into ``out`` (written atomically); return a summary."""
    origin = source_format(src)
    target = to or ("mlx" if origin == "peft" else "peft")
    if target == origin:
        raise AdapterFileError(f"{src} is already in {origin} format")
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise AdapterFileError(f"output {out} already exists and is not empty; pass --overwrite to replace it")
    with _staging(out) as staging:
        summary = peft_to_mlx(src, staging) if target == "mlx" else mlx_to_peft(src, staging)
        _publish(staging, out, overwrite=overwrite)
    return {"out": str(out), **summary}


def run(args: argparse.Namespace) -> int:
    summary = convert(args.src, args.out, to=args.to, overwrite=args.overwrite)
    if args.json:
        print(to_json(summary))
    else:
        print(f"wrote {summary['format']} adapter to {summary['out']} ({summary['tensors']} tensors)")
    return 0


__all__ = ["alpha_for_scale", "convert"]
