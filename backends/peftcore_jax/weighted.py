"""peft's ``add_weighted_adapter`` for adapter pytrees: one new ``Adapters`` combining several of one base tree.

LoRA (``cat``, ``linear``, ``svd``: ``peftcore.methods.lora.weighted``) and (IA)³ (``l = Σ w_i·l_i``:
``peftcore.methods.ia3.ops.weighted_combination``); the new config is the core's ``weighted_adapter_config`` of
each method, so the result saves and loads like the adapter peft's ``add_weighted_adapter`` makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from peftcore.errors import ConfigError
from peftcore.methods.ia3 import ops as ia3_ops
from peftcore.methods.ia3.config import weighted_adapter_config as ia3_weighted_config
from peftcore.methods.lora import ops as lora_ops
from peftcore.methods.lora import weighted
from peftcore.methods.lora.config import weighted_adapter_config as lora_weighted_config
from peftcore_jax.params import Adapters, IA3Params, LoraParams

__all__ = ["add_weighted_adapter"]


def add_weighted_adapter(
    adapters: Sequence[Adapters],
    weights: Sequence[float],
    /,
    *,
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
) -> Adapters:
    """A new adapter ``adapter_name`` equal to ``Σ w_i·adapter_i`` (peft's ``add_weighted_adapter``).

    Every module any of ``adapters`` adapts gets the combination of the adapters that hold it. LoRA: ``cat`` is
    exact, ``linear`` mixes the factors (equal ranks), ``svd`` truncates ``Σ w_i ΔW_i`` to ``svd_rank``
    (default: the largest rank); the new scaling follows the new config (``lora_alpha = r``) as in peft.
    (IA)³: the weighted sum of the vectors. Weights are Python numbers; not jit-able as a whole (ranks and
    configs are static), but every array operation is the core's.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(weights) != len(adapters):
        raise ConfigError(f"add_weighted_adapter needs one weight per adapter; got {len(adapters)} adapters and "
                          f"weights {weights}")
    for what in ("peft_type", "layout"):
        values = {str(getattr(a, what) if what == "peft_type" else a.layout.name) for a in adapters}
        if len(values) > 1:
            raise ConfigError(f"add_weighted_adapter combines adapters of one {what}; got {sorted(values)}")
    names = [a.adapter_name for a in adapters]
    paths = list(dict.fromkeys(path for a in adapters for path in a.params))
    if adapters[0].peft_type == "IA3":
        config = ia3_weighted_config([a.config for a in adapters])
        combine: Callable[[str, list[tuple[Any, float]]], Any] = _ia3_module
    elif adapters[0].peft_type == "LORA":
        combination_type, config = lora_weighted_config([a.config for a in adapters], adapter_names=names,
                                                        combination_type=combination_type, svd_rank=svd_rank)
        scaling = lora_ops.scaling(config.r, config.lora_alpha, use_rslora=config.use_rslora)

        def combine(path, present):
            return _lora_module(path, present, combination_type=combination_type, rank=config.r,
                                scaling=scaling, dropout=config.lora_dropout, clamp=svd_clamp,
                                full_matrices=svd_full_matrices)
    else:
        raise ConfigError(f"add_weighted_adapter combines LoRA or IA3 adapters, got {adapters[0].peft_type}")
    params = {}
    for path in paths:
        present = [(a.params[path], w) for a, w in zip(adapters, weights) if path in a.params]
        params[path] = combine(path, present)
    return Adapters.create(params, config, adapter_name=adapter_name, layout=adapters[0].layout)


def _lora_module(path: str, present: list[tuple[LoraParams, float]], *, combination_type: str, rank: int,
                 scaling: float, dropout: float, clamp: float | None, full_matrices: bool) -> LoraParams:
    first = present[0][0]
    combined = weighted.combination([p.lora_A for p, _ in present], [p.lora_B for p, _ in present],
                                    combination_type=combination_type, weights=[w for _, w in present],
                                    scalings=[p.scaling for p, _ in present], rank=rank, clamp=clamp,
                                    full_matrices=full_matrices, name=path)
    return LoraParams(combined.lora_A, combined.lora_B, kind=first.kind, scaling=scaling,
                      fan_in_fan_out=first.fan_in_fan_out, dropout=dropout)


def _ia3_module(path: str, present: list[tuple[IA3Params, float]]) -> IA3Params:
    first = present[0][0]
    vector = ia3_ops.weighted_combination([p.ia3_l for p, _ in present], weights=[w for _, w in present])
    return IA3Params(vector, kind=first.kind, feedforward=first.feedforward, fan_in_fan_out=first.fan_in_fan_out,
                     groups=first.groups)
