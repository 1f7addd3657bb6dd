"""``peftcore inspect ADAPTER_DIR``: what an adapter holds, read from its config and file header only."""

from __future__ import annotations

import argparse
from typing import Any

from peftcore._safetensors import DTYPE_NAMES
from peftcore.cli._common import AdapterLayout, open_adapter, peft_type_name, task_type_name, to_json
from peftcore.errors import PeftcoreError
from peftcore.matching import check_target_module_exists, is_all_linear, resolve_rank_alpha
from peftcore.methods.adalora.ops import kept_ranks
from peftcore.methods.adalora.ops import scaling as adalora_scaling
from peftcore.methods.ia3.ops import is_feedforward
from peftcore.methods.lora.ops import scaling as lora_scaling

HELP = "describe an adapter: method, targets, rank/alpha per module, parameter counts, dtypes, anomalies"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("inspect", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                        help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)


def _kind(parts: dict[str, str]) -> str:
    if "lora_embedding_A" in parts:
        return "embedding"
    return "linear/conv"


def _adalora_rank(config: Any, module: str, tensors: dict[str, Any], report: dict[str, Any],
                  anomalies: list[str]) -> None:
    """Kept rank = rows of the pruned ``lora_A``; ``s = α / (init_r + 1e-5)`` (peft keeps ``ranknum = init_r``)."""
    shape = tensors["lora_A"].shape if "lora_A" in tensors else ()
    report.update(init_r=config.init_r, lora_alpha=float(config.lora_alpha))
    try:
        expected = kept_ranks(getattr(config, "rank_pattern", None) or {}).get(module, config.init_r)
        report["r"] = shape[0] if shape else expected
        report["scaling"] = adalora_scaling(config.init_r, config.lora_alpha, r=report["r"])
    except PeftcoreError as exc:
        anomalies.append(f"module {module!r}: {exc}")
        return
    if report["r"] != expected:
        anomalies.append(
            f"module {module!r}: lora_A has rank {report['r']} but the config (init_r, rank_pattern) keeps {expected}"
        )


def _module_report(layout: AdapterLayout, module: str, parts: dict[str, str], anomalies: list[str]) -> dict[str, Any]:
    config = layout.config
    tensors = {name: layout.weights.tensors[key] for name, key in parts.items()}
    report: dict[str, Any] = {"module": module, "kind": _kind(parts)}
    if peft_type_name(config) == "IA3":
        _ia3_report(config, module, tensors, report, anomalies)
        return _finish_report(config, module, tensors, report, anomalies)
    adalora = peft_type_name(config) == "ADALORA"
    a_name = "lora_embedding_A" if "lora_embedding_A" in parts else "lora_A" if adalora else "lora_A.weight"
    b_name = "lora_embedding_B" if "lora_embedding_B" in parts else "lora_B" if adalora else "lora_B.weight"
    for needed in (a_name, "lora_E", b_name) if adalora else (a_name, b_name):
        if needed not in tensors:
            anomalies.append(f"module {module!r} has no {needed} tensor")
    if adalora:
        _adalora_rank(config, module, tensors, report, anomalies)
    elif hasattr(config, "r"):
        r, alpha = resolve_rank_alpha(config, module)
        use_rslora = bool(getattr(config, "use_rslora", False))
        report.update(r=r, lora_alpha=alpha)
        try:
            report["scaling"] = lora_scaling(r, alpha, use_rslora=use_rslora)
        except PeftcoreError as exc:
            anomalies.append(f"module {module!r}: {exc}")
        if a_name in tensors and tensors[a_name].shape and tensors[a_name].shape[0] != r:
            anomalies.append(
                f"module {module!r}: {a_name} has rank {tensors[a_name].shape[0]} but the config "
                f"(after rank_pattern) gives r={r}"
            )
        report["dora"] = "lora_magnitude_vector" in parts
        if report["dora"] != bool(getattr(config, "use_dora", False)):
            anomalies.append(f"module {module!r}: DoRA magnitude presence disagrees with use_dora")
    if a_name in tensors and b_name in tensors:
        a_shape, b_shape = tensors[a_name].shape, tensors[b_name].shape
        if report["kind"] == "embedding":
            report["in_features"], report["out_features"] = a_shape[1], b_shape[0]
        elif adalora:
            # a Conv2d's lora_A is (r, in·kh·kw): the adapter alone cannot tell it from a Linear
            report["in_features"], report["out_features"] = a_shape[-1], b_shape[0]
        elif len(a_shape) > 2:
            report["kind"] = f"conv{len(a_shape) - 2}d"
            report["in_features"], report["out_features"] = a_shape[1], b_shape[0]
        else:
            report["kind"] = "linear"
            report["in_features"], report["out_features"] = a_shape[-1], b_shape[0]
    return _finish_report(config, module, tensors, report, anomalies)


def _ia3_report(config: Any, module: str, tensors: dict[str, Any], report: dict[str, Any],
                anomalies: list[str]) -> None:
    """(IA)³: which side the vector scales and its length (peft: input for feed-forward layers)."""
    if "ia3_l" not in tensors:
        anomalies.append(f"module {module!r} has no ia3_l tensor")
        return
    shape = tensors["ia3_l"].shape
    report["kind"] = "conv" if len(shape) > 2 else "linear"
    try:
        report["scales"] = "input" if is_feedforward(config, module) else "output"
    except PeftcoreError as exc:
        anomalies.append(f"module {module!r}: {exc}")
        return
    # input vectors are (1, in, ...); output vectors (out, 1) for linear, (1, out, ...) for conv
    axis = 0 if report["kind"] == "linear" and report["scales"] == "output" else 1
    report["in_features" if report["scales"] == "input" else "out_features"] = shape[axis] if shape else None


def _finish_report(config: Any, module: str, tensors: dict[str, Any], report: dict[str, Any],
                   anomalies: list[str]) -> dict[str, Any]:
    report["tensors"] = {name: {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.code]} for name, t in tensors.items()}
    report["parameters"] = sum(t.numel for t in tensors.values())
    targets = getattr(config, "target_modules", None)
    if targets is not None and not is_all_linear(targets):
        try:
            if not check_target_module_exists(config, module):
                anomalies.append(f"module {module!r} fits no target_modules pattern of the config")
        except PeftcoreError as exc:
            anomalies.append(f"module {module!r}: {exc}")
    return report


def describe(adapter_dir: str) -> dict[str, Any]:
    """The ``inspect --json`` object."""
    layout = open_adapter(adapter_dir)
    config = layout.config
    anomalies = list(layout.config_warnings)
    modules = [_module_report(layout, m, parts, anomalies) for m, parts in layout.modules.items()]
    for key in layout.other_keys:
        anomalies.append(f"key {key!r} fits no adapter container (a modules_to_save copy or a foreign tensor)")
    if not modules:
        anomalies.append("the adapter file holds no adapter layer")
    targets = getattr(config, "target_modules", None)
    dtypes = sorted({DTYPE_NAMES[t.code] for t in layout.weights.tensors.values()})
    other_params = sum(layout.weights.tensors[k].numel for k in layout.other_keys)
    size = layout.weights.path.stat().st_size + layout.config_bytes
    return {
        "path": str(layout.folder),
        "method": peft_type_name(config),
        "task_type": task_type_name(config),
        "base_model": config.base_model_name_or_path,
        "target_modules": _as_list(targets),
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "init_r": getattr(config, "init_r", None),
        "target_r": getattr(config, "target_r", None),
        "use_rslora": getattr(config, "use_rslora", None),
        "use_dora": getattr(config, "use_dora", None),
        "feedforward_modules": _as_list(getattr(config, "feedforward_modules", None)),
        "rank_pattern": getattr(config, "rank_pattern", None) or {},
        "alpha_pattern": getattr(config, "alpha_pattern", None) or {},
        "modules": modules,
        "other_keys": list(layout.other_keys),
        "trainable_parameters": sum(m["parameters"] for m in modules) + other_params,
        "dtypes": dtypes,
        "size_on_disk": size,
        "anomalies": anomalies,
    }


def _as_list(names: Any) -> Any:
    return sorted(names) if isinstance(names, (set, list, tuple, frozenset)) else names


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"adapter       {info['path']}",
        f"method        {info['method']}" + (" (DoRA)" if info["use_dora"] else "")
        + (" (rsLoRA)" if info["use_rslora"] else ""),
        f"task type     {info['task_type']}",
        f"base model    {info['base_model']}",
        f"targets       {info['target_modules']}",
        (f"feedforward   {info['feedforward_modules']}" if info["method"] == "IA3" else
         f"r / alpha     {info['r']} / {info['lora_alpha']}" if info["init_r"] is None else
         f"init_r / target_r / alpha  {info['init_r']} / {info['target_r']} / {info['lora_alpha']}")
        + (f"  rank_pattern={info['rank_pattern']}" if info["rank_pattern"] else "")
        + (f"  alpha_pattern={info['alpha_pattern']}" if info["alpha_pattern"] else ""),
        f"dtypes        {', '.join(info['dtypes'])}",
        f"parameters    {info['trainable_parameters']:,}",
        f"size on disk  {_human_bytes(info['size_on_disk'])}",
        "",
    ]
    rows = [("module", "kind", "r", "alpha", "scaling", "in", "out", "params")]
    for m in info["modules"]:
        scale = m.get("scaling")
        rows.append((
            m["module"], m["kind"] + (" +DoRA" if m.get("dora") else "")
            + (f" ({m['scales']} scaling)" if "scales" in m else ""), str(m.get("r", "")),
            f"{m['lora_alpha']:g}" if "lora_alpha" in m else "", f"{scale:g}" if scale is not None else "",
            str(m.get("in_features", "")), str(m.get("out_features", "")), f"{m['parameters']:,}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if info["other_keys"]:
        lines += ["", "other tensors:"] + [f"  {k}" for k in info["other_keys"]]
    lines.append("")
    if info["anomalies"]:
        lines.append(f"{len(info['anomalies'])} unusual finding(s):")
        lines += [f"  ! {a}" for a in info["anomalies"]]
    else:
        lines.append("nothing unusual")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args.adapter_dir)
    print(to_json(info) if args.json else format_text(info))
    return 0
