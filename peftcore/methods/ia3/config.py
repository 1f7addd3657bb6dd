"""``IA3Config``: ``peft``'s ``IA3Config`` (0.21.2), same fields, defaults and ``__post_init__`` rules.

Lists (and tuples/sets) of module names become sets, as in ``peft``; a regex string stays a
string. When both ``target_modules`` and ``feedforward_modules`` are sets the latter must be a
subset of the former. ``None`` targets / feed-forward modules take ``peft``'s per-architecture
defaults (:meth:`IA3Config.with_model_defaults`, tables in :mod:`peftcore.constants`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from peftcore.config import PeftConfig
from peftcore.constants import get_feedforward_modules, get_target_modules
from peftcore.errors import ConfigError

__all__ = ["IA3Config", "weighted_adapter_config"]


def _as_set(value: Any) -> Any:
    return set(value) if isinstance(value, (list, tuple, set, frozenset)) else value


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)³ adapter, as ``peft.IA3Config``.

    ``target_modules``: names/suffixes, a full-match regex string or ``"all-linear"``;
    ``feedforward_modules`` (⊆ targets): layers whose *input* is scaled (the others scale their
    output); ``fan_in_fan_out``: weights stored ``(in, out)`` (GPT-2 Conv1D); ``init_ia3_weights``:
    vectors start at ones (``False``: standard normal draws).
    """

    PEFT_TYPE: ClassVar[str] = "IA3"

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    feedforward_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _as_set(self.target_modules)
        self.exclude_modules = _as_set(self.exclude_modules)
        self.feedforward_modules = _as_set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            missing = self.feedforward_modules - self.target_modules
            if missing:
                raise ConfigError(
                    "`feedforward_modules` should be a subset of `target_modules`. "
                    f"Not in target_modules: {sorted(missing)}"
                )

    def with_model_defaults(self, model_type: str) -> IA3Config:
        """A copy whose ``None`` targets / feed-forward modules take peft's defaults for ``model_type``.

        Mirrors ``IA3Model._prepare_adapter_config``; ``ConfigError`` ("Please specify ...") when
        peft has no default for ``model_type``. ``self`` is left unchanged.
        """
        changes: dict[str, Any] = {}
        if self.target_modules is None:
            targets = get_target_modules("IA3", model_type)
            changes["target_modules"] = targets if isinstance(targets, str) else set(targets)
        if self.feedforward_modules is None:
            changes["feedforward_modules"] = set(get_feedforward_modules(model_type))
        if not changes:
            return self
        config = dataclasses.replace(self, **changes)
        config.unknown_fields = dict(self.unknown_fields)
        return config


def weighted_adapter_config(configs: Sequence[IA3Config], /) -> IA3Config:
    """Config of ``add_weighted_adapter``'s new adapter: the first config with targets/FF modules unioned.

    Mirrors ``IA3Model._check_add_weighted_adapter``: every config must hold the same kind
    (all sets or all regex strings) of ``target_modules`` and of ``feedforward_modules``; sets are
    unioned, regex strings joined as ``"(a)|(b)"``.
    """
    if not configs:
        raise ConfigError("add_weighted_adapter needs at least one adapter config")
    for config in configs:
        if not isinstance(config, IA3Config):
            raise ConfigError(f"add_weighted_adapter combines IA3Config objects, got {type(config).__name__}")
    combined = {}
    for name in ("target_modules", "feedforward_modules"):
        values = [getattr(c, name) for c in configs]
        if len({type(v) for v in values}) > 1:
            raise ConfigError("All adapter configs should have the same type for target and feedforward modules.")
        if isinstance(values[0], str):
            combined[name] = "|".join(f"({v})" for v in values)
        elif isinstance(values[0], set):
            combined[name] = set().union(*values)
        else:
            raise ConfigError(
                f"add_weighted_adapter needs resolved `{name}` (a set or a regex), got {values[0]!r}; "
                "fill defaults first with IA3Config.with_model_defaults(model_type)"
            )
    return dataclasses.replace(configs[0], **combined)
