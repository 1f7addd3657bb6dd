"""``LoraConfig``: every field of ``peft``'s ``LoraConfig`` (0.21.2), same names, defaults and checks.

Sub-configs (``loftq_config``, ``eva_config``, ...) are kept as plain dicts, which
is how ``adapter_config.json`` stores them; peftcore does not interpret the ones
for features it does not implement, but keeps them so files round-trip.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from peftcore.config import PeftConfig, UnknownConfigFieldsWarning
from peftcore.errors import ConfigError

__all__ = ["INIT_LORA_WEIGHTS_MODES", "LoraConfig", "weighted_adapter_config"]

#: String values ``peft`` accepts for ``init_lora_weights`` (plus ``pissa_niter_<K>``).
INIT_LORA_WEIGHTS_MODES = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")



def _check_eva(c: dict) -> None:
    if c["rho"] < 1.0:
        raise ConfigError("`rho` must be >= 1.0")
    if not 0.0 <= c["tau"] <= 1.0:
        raise ConfigError("`tau` must be between 0.0 and 1.0.")


def _check_velora(c: dict) -> None:
    if c["num_groups"] <= 0:
        raise ConfigError(f"`num_groups` should be positive, got {c['num_groups']}.")
    if c["scale"] <= 0:
        raise ConfigError(f"`scale` should be positive, got {c['scale']}.")
    if c["init_type"] not in {"batch_average_once", "batch_average", "random"}:
        raise ConfigError(
            f"Unsupported `init_type` {c['init_type']!r}. Supported values are 'batch_average_once', "
            "'batch_average', and 'random'."
        )


def _check_kasa(c: dict) -> None:
    for name in ("beta", "gamma"):
        if c[name] < 0:
            raise ConfigError(f"`{name}` must be non-negative, got {c[name]}.")


def _check_arrow(c: dict) -> None:
    if c["top_k"] <= 0:
        raise ConfigError("top_k cannot be negative.")
    if c["router_temperature"] <= 0:
        raise ConfigError("router_temperature must be greater than 0.")


def _check_bdlora(c: dict) -> None:
    overlap = set(c["target_modules_bd_a"] or []) & set(c["target_modules_bd_b"] or [])
    if overlap:
        raise ConfigError(
            "Found overlapping modules in target_modules_bd lists:"
            f"{c['target_modules_bd_a']} (A) and {c['target_modules_bd_b']} (B)."
        )


def _check_monteclora(c: dict) -> None:
    for name, what in (("num_samples", "greater than 0"), ("dirichlet_prior", "greater than 0"),
                       ("buffer_size", "greater than 0")):
        if c[name] <= 0:
            raise ConfigError(f"`{name}` must be {what}.")


# peft's sub-config dataclasses: field defaults (``init=False`` fields marked by a leading "!"), checks.
# A dict given for one is completed with these defaults and validated, as peft's dataclass would be.
_SUBCONFIG_SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "eva_config": (
        {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
         "adjust_scaling_factors": True},
        _check_eva,
    ),
    "corda_config": (
        {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
         "use_float16_for_covariance": False, "prune_temporary_fields": True},
        None,
    ),
    "lora_ga_config": ({"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}, None),
    "velora_config": ({"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}, _check_velora),
    "kasa_config": ({"beta": 1e-4, "gamma": 1e-3}, _check_kasa),
    "use_bdlora": (
        {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1, "match_strict": True},
        _check_bdlora,
    ),
    "arrow_config": (
        {"top_k": 3, "router_temperature": 1.0, "use_gks": False, "!task_adapter_names": None,
         "!gks_adapter_names": None, "rng_seed": None},
        _check_arrow,
    ),
    "monteclora_config": (
        {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
         "kl_loss_weight": 1e-5, "buffer_size": 150},
        _check_monteclora,
    ),
}


def _complete_subconfig(name: str, value: Any) -> dict | None:
    """``value`` (None, dict or dataclass) as the full dict ``peft``'s sub-config dataclass would serialise."""
    given = _as_dict(name, value)
    if given is None:
        return None
    defaults, check = _SUBCONFIG_SCHEMAS[name]
    settable = {k for k in defaults if not k.startswith("!")}
    unknown = set(given) - settable - {k[1:] for k in defaults if k.startswith("!")}
    # as peft's loader does, fields that are not constructor arguments are reset to their defaults
    full = {k.lstrip("!"): (given.get(k, v) if k in settable else v) for k, v in defaults.items()}
    if check is not None:
        check(full)
    if unknown:
        # a newer peft may have grown the sub-config: carry the keys through rather than fail or drop them
        warnings.warn(
            f"`{name}` has keys this version does not know {sorted(unknown)}; they are kept and written back",
            UnknownConfigFieldsWarning,
            stacklevel=4,
        )
        full.update({k: given[k] for k in sorted(unknown)})
    return full


def _as_set(value: Any) -> Any:
    return set(value) if isinstance(value, (list, tuple, set, frozenset)) else value


def _as_dict(name: str, value: Any) -> dict | None:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{name} must be None or a dict, got {type(value).__name__}")


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter, as ``peft.LoraConfig``.

    The fields that change the math are ``r``, ``lora_alpha``, ``use_rslora``
    (scaling ``lora_alpha/r`` or ``lora_alpha/sqrt(r)``), ``rank_pattern`` /
    ``alpha_pattern`` (per-module overrides, first matching key wins),
    ``fan_in_fan_out`` (weights stored ``(in, out)``, GPT-2's Conv1D), ``use_dora``,
    ``lora_bias`` and ``init_lora_weights``. Targeting: ``target_modules``
    (list of names/suffixes, a full-match regex string, or ``"all-linear"``),
    ``exclude_modules``, ``layers_to_transform``/``layers_pattern``, ``modules_to_save``.
    """

    PEFT_TYPE: ClassVar[str] = "LORA"

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = dataclasses.field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[tuple[int, int]] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        for name in _SUBCONFIG_SCHEMAS:
            setattr(self, name, _complete_subconfig(name, getattr(self, name)))
        self.megatron_config = _as_dict("megatron_config", self.megatron_config)
        if self.layer_replication is not None:
            self.layer_replication = [list(pair) for pair in self.layer_replication]
        self.loftq_config = _as_dict("loftq_config", self.loftq_config) or {}
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self._check_values()
        self._check_combinations()

    def _check_values(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"`r` should be a positive integer value but the value passed is {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ConfigError(f"`lora_alpha` must be a number, got {self.lora_alpha!r}")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"`lora_dropout` must be a number in [0, 1], got {dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"`bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in INIT_LORA_WEIGHTS_MODES or _PISSA_NITER.fullmatch(str(init))):
            raise ConfigError(
                f"`init_lora_weights` must be True, False, one of {list(INIT_LORA_WEIGHTS_MODES)} "
                f"or 'pissa_niter_<K>', got {init!r}"
            )
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"`{name}` maps module-name patterns to numbers; bad entry {key!r}: {value!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"`rank_pattern[{key!r}]` must be a positive integer, got {value!r}")
        if isinstance(self.target_parameters, str):
            raise ConfigError("`target_parameters` must be a list of strings or None.")

    def _check_combinations(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.use_dora and self.megatron_config:
            raise ConfigError("DoRA does not support megatron_core, please set `use_dora=False`.")

        init = self.init_lora_weights
        if init == "loftq":
            if not self.loftq_config:
                raise ConfigError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
        elif init == "eva" and self.eva_config is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.")
            self.eva_config = _complete_subconfig("eva_config", {})
        elif init != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.")
        elif init == "corda" and self.corda_config is None:
            warnings.warn(
                "`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA config."
            )
            self.corda_config = _complete_subconfig("corda_config", {})
        elif init != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.")

        if self.lora_bias:
            if init not in (True, False):
                raise ConfigError(
                    "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={init!r} instead."
                )
            if self.use_dora:
                raise ConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if self.alora_invocation_tokens is not None and self.task_type != "CAUSAL_LM":
            warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.")
        mutates_base = (isinstance(init, str) and init.startswith("pissa")) or init in ("olora", "corda", "lora_ga")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and mutates_base:
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of modified "
                "base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values of the "
                "base weights; if you intend to do this, please ensure not to use rslora or rank_pattern/alpha_pattern."
            )

    @property
    def pissa_niter(self) -> int | None:
        """``K`` of ``init_lora_weights="pissa_niter_K"``, else ``None``."""
        match = _PISSA_NITER.fullmatch(str(self.init_lora_weights))
        return int(match.group(1)) if match else None


def weighted_adapter_config(
    configs: Sequence[LoraConfig], /, *, adapter_names: Sequence[str], combination_type: str = "svd",
    svd_rank: int | None = None,
) -> tuple[str, LoraConfig]:
    """``(combination_type, config)`` of ``add_weighted_adapter``'s new adapter (peft's
    ``LoraModel._check_add_weighted_adapter`` and the config it builds).

    One adapter always combines ``"linear"``. The new rank is the adapters' common rank (``linear``), their
    sum (``cat``) or ``svd_rank`` / the largest (``svd``), each adapter's rank being the largest any of its
    layers has; the config is the first one's with ``r = lora_alpha =`` that rank (scaling 1), no
    rank/alpha patterns and the targets of all (sets unioned, regex strings joined as ``"(a)|(b)"``).
    DoRA, ``lora_bias`` and ``target_parameters`` adapters are refused (their combination is undefined).
    """
    configs, adapter_names = list(configs), list(adapter_names)
    if not configs or len(configs) != len(adapter_names):
        raise ConfigError(f"add_weighted_adapter needs one config per adapter; got {len(configs)} configs for "
                          f"adapters {adapter_names}")
    for adapter, config in zip(adapter_names, configs):
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"add_weighted_adapter combines LoRA adapters; '{adapter}' is a {type(config).__name__}")
        if config.target_parameters:
            raise ConfigError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic "
                              f"adapter '{adapter}')")
        if config.use_dora:
            raise ConfigError(f"add_weighted_adapter cannot combine DoRA adapters (adapter '{adapter}' has "
                              "use_dora=True): the magnitude of the combination is not defined")
        if config.lora_bias:
            raise ConfigError(f"add_weighted_adapter cannot combine adapters with lora_bias=True (adapter "
                              f"'{adapter}')")
    combination_type = "linear" if len(configs) == 1 else combination_type
    ranks = [max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r for config in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(f"All adapters must have the same r value when using combination_type linear; "
                              f"got ranks {dict(zip(adapter_names, ranks))}")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        raise ConfigError(f"Invalid combination_type: {combination_type!r}; peftcore supports 'svd', 'linear' "
                          "and 'cat'")
    target_types = {type(config.target_modules) for config in configs}
    if len(target_types) > 1:
        raise ConfigError("all adapter configs should follow the same target modules type. Combining adapters "
                          "with `target_modules` type being a mix of list/set and string is not supported.")
    if target_types == {str}:
        targets: set[str] | str = "|".join(f"({config.target_modules})" for config in configs)
    elif target_types == {set}:
        targets = set().union(*(config.target_modules for config in configs))
    else:
        raise ConfigError(f"Invalid type {target_types.pop()} found in target_modules")
    config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                 alpha_pattern={}, rank_pattern={})
    return combination_type, config
