"""``peftcore verify ADAPTER_DIR``: every adapted layer's ΔW on each installed backend vs a float64 reference.

The reference is ``s·B·A`` (``s·(B·A)ᵀ`` for embeddings) formed by plain NumPy matmuls in float64;
each backend forms ΔW with the core's ``peftcore.methods.lora.ops`` in the adapter's own dtype.
Frameworks are imported only here, inside :func:`namespace`, and only when asked for.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import numpy as np

from peftcore._safetensors import DTYPE_NAMES
from peftcore.cli._common import open_adapter, peft_type_name, to_json
from peftcore.errors import ConfigError, MergeError
from peftcore.matching import resolve_rank_alpha
from peftcore.methods.adalora import ops as adalora_ops
from peftcore.methods.lora import ops

HELP = "compute every adapted layer's delta weight on each backend and compare with a float64 reference"
BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
_MODULE_OF = {"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch", "jax": "jax"}
# largest accepted |ΔW - ref| / max|ref| per adapter dtype: a few ulps of accumulated rounding
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
EXIT_DISAGREE = 3


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("verify", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    parser.add_argument("--backends", help=f"comma-separated subset of {','.join(BACKENDS)} "
                        "(default: every installed one)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default: by adapter dtype, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RTOL.items()) + ")")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def installed_backends() -> list[str]:
    """Backends whose package is importable (found without importing it)."""
    return [name for name in BACKENDS if importlib.util.find_spec(_MODULE_OF[name]) is not None]


def namespace(name: str) -> Any:
    """The Array API namespace of backend ``name`` (imports the framework)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if importlib.util.find_spec(_MODULE_OF[name]) is None:
        raise ConfigError(f"backend {name!r} is not installed")
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "array_api_strict":
        import array_api_strict as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    else:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp
    return xp


def _to_backend(values: np.ndarray, dtype_name: str, *, xp: Any) -> Any:
    array = xp.asarray(values)
    target = getattr(xp, dtype_name, None) or xp.float32  # NumPy and array-api-strict lack bfloat16
    return array if array.dtype == target else xp.astype(array, target)


def _reference(a: np.ndarray, b: np.ndarray, *, scaling: float, embedding: bool) -> np.ndarray:
    if embedding:
        return (b @ a).T * scaling
    return np.tensordot(b.reshape(b.shape[0], -1), a, axes=1) * scaling


def _delta(a: Any, b: Any, *, scaling: float, embedding: bool) -> Any:
    if embedding:
        return ops.embedding_delta_weight(a, b, scaling=scaling)
    if a.ndim > 2:
        return ops.conv_delta_weight(a, b, scaling=scaling)
    return ops.delta_weight(a, b, scaling=scaling)


def _factors(layout: Any, module: str, parts: dict[str, str]) -> tuple[list[str], Any, Any] | None:
    """The module's factor keys, its float64 reference ``ΔW`` and the core's ``ΔW``; None if it has none."""
    config = layout.config
    if peft_type_name(config) == "ADALORA":
        if not {"lora_A", "lora_E", "lora_B"} <= parts.keys():
            return None
        keys = [parts["lora_A"], parts["lora_E"], parts["lora_B"]]
        # peft keeps ranknum = init_r after pruning; conv factors stay flattened (out, in·kh·kw)
        s = adalora_ops.scaling(config.init_r, config.lora_alpha, r=layout.weights.tensors[keys[0]].shape[0])
        return (keys, lambda a, e, b: (b @ (a * e)) * s,
                lambda a, e, b: adalora_ops.delta_weight(a, e, b, scaling=s))
    embedding = "lora_embedding_A" in parts
    a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a_key is None or b_key is None:
        return None
    r, alpha = resolve_rank_alpha(config, module)
    s = ops.scaling(r, alpha, use_rslora=bool(getattr(config, "use_rslora", False)))
    return ([a_key, b_key], lambda a, b: _reference(a, b, scaling=s, embedding=embedding),
            lambda a, b: _delta(a, b, scaling=s, embedding=embedding))


def verify_adapter(adapter_dir: str, *, backends: list[str] | None = None, rtol: float | None = None) -> dict[str, Any]:
    """Per backend and layer: max |ΔW − ref| and that over max |ref|; ``ok`` when every ratio <= rtol."""
    from peftcore.testing import to_numpy

    layout = open_adapter(adapter_dir)
    method = peft_type_name(layout.config)
    if method not in ("LORA", "ADALORA"):
        reason = " ((IA)³ rescales the base weights and has no delta weight; `peftcore merge` folds it in)" \
            if method == "IA3" else ""
        raise MergeError(f"verify supports LoRA and AdaLoRA adapters; {adapter_dir} is a {method} adapter{reason}")
    names = installed_backends() if backends is None else backends
    spaces = {name: namespace(name) for name in names}
    layers, worst = [], {name: 0.0 for name in names}
    ok = True
    for module, parts in layout.modules.items():
        factors = _factors(layout, module, parts)
        if factors is None:
            continue
        keys, reference_fn, delta_fn = factors
        dtype = DTYPE_NAMES[layout.weights.tensors[keys[0]].code]
        stored = [layout.weights.read_float64(key) for key in keys]  # exact widening
        reference = reference_fn(*(f.astype(np.float64) for f in stored))
        scale = float(np.max(np.abs(reference))) if reference.size else 0.0
        tolerance = rtol if rtol is not None else DEFAULT_RTOL.get(dtype, 1e-5)
        row: dict[str, Any] = {"module": module, "dtype": dtype, "shape": list(reference.shape), "backends": {}}
        for name, xp in spaces.items():
            delta = delta_fn(*(_to_backend(f, DTYPE_NAMES[layout.weights.tensors[key].code], xp=xp)
                               for f, key in zip(stored, keys)))
            error = float(np.max(np.abs(to_numpy(delta).astype(np.float64) - reference))) if reference.size else 0.0
            relative = error / scale if scale > 0 else error
            row["backends"][name] = {"max_abs_error": error, "relative_error": relative}
            worst[name] = max(worst[name], relative)
            ok = ok and relative <= tolerance
        row["rtol"] = tolerance
        layers.append(row)
    return {"adapter": str(layout.folder), "backends": names, "layers": layers, "worst_relative_error": worst, "ok": ok}


def format_text(report: dict[str, Any]) -> str:
    names = report["backends"]
    rows = [("module", "dtype", *names)]
    for layer in report["layers"]:
        rows.append((layer["module"], layer["dtype"],
                     *(f"{layer['backends'][n]['relative_error']:.2e}" for n in names)))
    rows.append(("worst", "", *(f"{report['worst_relative_error'][n]:.2e}" for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["relative error of ΔW against the float64 reference (max|Δ-ref| / max|ref|)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("OK" if report["ok"] else "DISAGREEMENT above tolerance")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    backends = None
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        for b in backends:
            if b not in BACKENDS:
                raise ConfigError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    report = verify_adapter(args.adapter_dir, backends=backends, rtol=args.rtol)
    print(to_json(report) if args.json else format_text(report))
    return 0 if report["ok"] else EXIT_DISAGREE
