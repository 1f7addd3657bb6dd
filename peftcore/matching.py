"""Which modules an adapter targets: ``peft``'s matching rules on plain module-name strings.

Mirrors ``peft.tuners.tuners_utils.check_target_module_exists``, ``_maybe_include_all_linear_layers``
and the error handling of ``BaseTuner.inject_adapter``, plus ``peft.utils.other.get_pattern_key``.
Every function takes any config object with peft's attribute names (read with ``getattr``), so
peft's own configs work too. A backend supplies what only it can know (the module names of its
model, which of them are linear layers, the output-embedding name); everything else is here.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from peftcore.constants import (
    DUMMY_TARGET_MODULES,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    SEQ_CLS_HEAD_NAMES,
    get_target_modules,
)
from peftcore.errors import ConfigError, NoMatchingModuleError

__all__ = [
    "DEFAULT_LAYER_INDEX_REGEX",
    "MatchOutcome",
    "TargetMatch",
    "check_target_module_exists",
    "expand_all_linear",
    "find_target_modules",
    "get_pattern_key",
    "is_all_linear",
    "layer_index",
    "match_module",
    "match_targets",
    "resolve_rank_alpha",
    "resolve_target_modules",
]

# Lazy ``.*?`` takes the FIRST "<name>.<digits>." segment, so an MoE expert index
# ("layers.1.experts.0.w1") never shadows the layer index.
DEFAULT_LAYER_INDEX_REGEX = r".*?\.[^.]*\.(?P<idx>\d+)\."

_MATCH_FIELDS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
                 "target_parameters")


class MatchOutcome(enum.Enum):
    """Decision for one module name (peft returns ``True``, a falsy ``_ExcludedModule`` or ``False``)."""

    TARGETED = "targeted"
    EXCLUDED = "excluded"
    UNMATCHED = "unmatched"


def _is_excluded(config: Any, key: str) -> bool:
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return True
    # A module wrapped for full fine-tuning (or anything inside it) must never also get an adapter.
    # The name is spliced into the regex unescaped, exactly as peft does.
    modules_to_save = getattr(config, "modules_to_save", None)
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in modules_to_save)


def layer_index(key: str, *, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """Index of the layer that module ``key`` sits in, or ``None`` when no layer segment is found.

    Without ``layers_pattern`` the index is the first ``<name>.<digits>.`` segment
    (``DEFAULT_LAYER_INDEX_REGEX``); with it, the first ``<pattern>.<digits>.`` segment for the first
    pattern (a regex, tried in order) that occurs. An empty pattern (``""``, ``[]``) counts as none.
    """
    if layers_pattern is None or len(layers_pattern) == 0:
        found = re.match(DEFAULT_LAYER_INDEX_REGEX, key)
    else:
        found = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if found is not None:
                break
    # a pattern with a top-level "|" can match without capturing the index; peft then finds no layer
    index = None if found is None else found["idx"]
    return None if index is None else int(index)


def _uses_layer_indexes(layers_to_transform: Any) -> bool:
    if layers_to_transform is None:
        return False
    # peft: an empty list disables the filter (we treat an empty tuple the same way)
    return isinstance(layers_to_transform, int) or len(layers_to_transform) != 0


def match_module(config: Any, key: str) -> MatchOutcome:
    """Decide whether module ``key`` (its dotted name in the user model) gets the adapter.

    Order, as in peft: ``exclude_modules`` (str: full-match regex; collection: exact name or
    dotted suffix) -> inside ``modules_to_save`` -> ``target_parameters``-only config -> str
    ``target_modules``: full-match regex; collection: exact name, else dotted suffix followed by the
    ``layers_to_transform`` / ``layers_pattern`` filter (skipped for exact names).
    """
    if _is_excluded(config, key):
        return MatchOutcome.EXCLUDED
    targets = getattr(config, "target_modules", None)
    if targets is None:
        if getattr(config, "target_parameters", None) is not None:
            return MatchOutcome.UNMATCHED
        raise ConfigError(
            f"cannot match module {key!r}: target_modules is None; resolve the defaults first "
            "(resolve_target_modules / find_target_modules)"
        )
    if isinstance(targets, str):
        found = re.fullmatch(targets, key) is not None
    elif key in targets:
        found = True
    else:
        found = any(key.endswith(f".{target}") for target in targets)
        layers_to_transform = getattr(config, "layers_to_transform", None)
        if found and _uses_layer_indexes(layers_to_transform):
            index = layer_index(key, layers_pattern=getattr(config, "layers_pattern", None))
            if index is None:
                found = False
            elif isinstance(layers_to_transform, int):
                found = index == layers_to_transform
            else:
                found = index in layers_to_transform
    return MatchOutcome.TARGETED if found else MatchOutcome.UNMATCHED


def check_target_module_exists(config: Any, key: str) -> bool:
    """``True`` iff module ``key`` is adapted under ``config`` (peft's function of the same name)."""
    return match_module(config, key) is MatchOutcome.TARGETED


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """First pattern (in iteration order) matching ``key`` as a dotted-suffix regex, else ``key``.

    Pattern ``p`` matches when ``re.match(rf"(.*\\.)?({p})$", key)`` does: ``"q_proj"`` matches
    ``"a.q_proj"`` but ``"proj"`` does not; first match wins, not the longest.
    """
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def resolve_rank_alpha(config: Any, key: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` for module ``key`` after ``rank_pattern`` / ``alpha_pattern`` (LoRA's rule).

    Mirrors ``LoraModel._create_and_replace``: ``r = rank_pattern.get(get_pattern_key(rank_pattern, key), r)``,
    likewise for alpha; the two patterns resolve independently.
    """
    rank_pattern = getattr(config, "rank_pattern", None) or {}
    alpha_pattern = getattr(config, "alpha_pattern", None) or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), config.lora_alpha)
    return int(r), float(alpha)


def is_all_linear(target_modules: Any) -> bool:
    """``True`` iff ``target_modules`` is the ``"all-linear"`` shorthand (a string, any case; not a list)."""
    return isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def _task_type_name(task_type: Any) -> str | None:
    value = getattr(task_type, "value", task_type)
    return value if isinstance(value, str) or value is None else str(value)


def expand_all_linear(
    linear_module_names: Iterable[str],
    *,
    output_embedding_name: str | None = None,
    task_type: Any = None,
    top_level_names: Iterable[str] = (),
    is_transformers_model: bool = True,
    tuner_layer_names: Iterable[str] = (),
) -> set[str]:
    """The explicit target set that ``"all-linear"`` stands for (peft's ``_maybe_include_all_linear_layers``).

    ``linear_module_names``: full names of every linear / GPT-2 ``Conv1D`` module (and of existing
    tuner layers wrapping one). Removed from it: for a transformers model, the output embedding
    (``output_embedding_name``, e.g. ``lm_head``) or, when the model has none and ``task_type`` is
    ``SEQ_CLS``, the first of ``SEQ_CLS_HEAD_NAMES`` found among ``top_level_names`` (the model's direct
    children); and anything nested inside a module of ``tuner_layer_names``.
    """
    names = set(linear_module_names)
    removed: set[str] = set()
    if is_transformers_model:
        if output_embedding_name is not None:
            removed.add(output_embedding_name)
        elif _task_type_name(task_type) == "SEQ_CLS":
            children = set(top_level_names)
            head = next((name for name in SEQ_CLS_HEAD_NAMES if name in children), None)
            if head is not None:
                removed.add(head)
    prefixes = tuple(f"{name}." for name in tuner_layer_names)
    return {name for name in names if name not in removed and not (prefixes and name.startswith(prefixes))}


def resolve_target_modules(
    config: Any,
    *,
    model_type: str | None = None,
    peft_type: Any = None,
    linear_module_names: Iterable[str] | None = None,
    output_embedding_name: str | None = None,
    top_level_names: Iterable[str] = (),
    is_transformers_model: bool = True,
    tuner_layer_names: Iterable[str] = (),
) -> str | Collection[str] | None:
    """``config.target_modules`` after peft's defaults and the ``"all-linear"`` expansion.

    ``None`` targets take the method's default for ``model_type`` (``peftcore.constants``; ``ConfigError``
    "Please specify target_modules" when there is none), except that a config with
    ``target_parameters`` keeps ``None`` (it adapts parameters only). Never mutates ``config``.
    """
    targets = getattr(config, "target_modules", None)
    if targets is None:
        if getattr(config, "target_parameters", None):
            return None
        method = peft_type if peft_type is not None else getattr(config, "peft_type", None) or "LORA"
        if model_type is None:
            raise ConfigError(
                "Please specify `target_modules` in the config: it is None and the model type is unknown, "
                "so no per-architecture default can be chosen"
            )
        defaults = get_target_modules(method, model_type)
        targets = defaults if isinstance(defaults, str) else set(defaults)
    if is_all_linear(targets):
        if linear_module_names is None:
            raise ConfigError(
                f"target_modules={targets!r} needs the model's linear module names (linear_module_names=...)"
            )
        targets = expand_all_linear(
            linear_module_names,
            output_embedding_name=output_embedding_name,
            task_type=getattr(config, "task_type", None),
            top_level_names=top_level_names,
            is_transformers_model=is_transformers_model,
            tuner_layer_names=tuner_layer_names,
        )
    return targets


@dataclass(frozen=True)
class TargetMatch:
    """Outcome of matching one config against a model's module names.

    ``matched`` / ``excluded`` / ``unmatched`` keep the input order; ``target_modules`` is the resolved
    target spec; ``unused_targets`` lists collection entries (or the regex) that selected no adapted
    module, which peft silently ignores.
    """

    target_modules: str | Collection[str] | None
    matched: list[str]
    excluded: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    unused_targets: list[str] = field(default_factory=list)
    unused_exclude: bool = False
    unused_rank_pattern_keys: list[str] = field(default_factory=list)
    unused_alpha_pattern_keys: list[str] = field(default_factory=list)
    exclude_modules: Any = None

    def warnings(self) -> list[str]:
        """The warnings peft's ``inject_adapter`` emits for this outcome (a caller may ``warnings.warn`` them)."""
        messages = []
        if self.unused_exclude:
            messages.append(
                f"You have passed exclude_modules={self.exclude_modules} but no modules were excluded. "
                "Please check that exclude_modules was set correctly."
            )
        for name, keys in (("rank_pattern", self.unused_rank_pattern_keys),
                           ("alpha_pattern", self.unused_alpha_pattern_keys)):
            if keys:
                messages.append(
                    f"The following {name} keys did not match any targeted module and were ignored: {keys}."
                )
        return messages


def _unused_targets(targets: Any, matched: Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        return [] if matched else [targets]
    return sorted(
        target for target in (targets or ())
        if not any(key == target or key.endswith(f".{target}") for key in matched)
    )


def _unused_pattern_keys(patterns: Any, matched: Sequence[str]) -> list[str]:
    if not patterns:
        return []
    return sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", key) for key in matched))


def _suggestions(targets: Any, keys: Sequence[str], linear_module_names: Iterable[str] | None) -> str:
    leaves = sorted({key.rpartition(".")[2] for key in (linear_module_names if linear_module_names is not None
                                                          else keys)} - {""})
    hints = []
    if isinstance(targets, str):
        if any(key.endswith(f".{targets}") for key in keys):
            hints.append(
                f"A string target_modules is a regex that must match the WHOLE module name; "
                f"did you mean target_modules=[{targets!r}] or {'.*' + targets!r}?"
            )
    else:
        for target in sorted(targets or ()):
            close = difflib.get_close_matches(target.rpartition(".")[2], leaves, n=3, cutoff=0.6)
            if close:
                hints.append(f"{target!r} not found; close module names: {close}")
    shown = leaves[:30]
    more = f" (and {len(leaves) - len(shown)} more)" if len(leaves) > len(shown) else ""
    hints.append(f"Candidate module names (last name component): {shown}{more}")
    return " " + " ".join(hints)


def _layer_notes(config: Any) -> str:
    notes = ""
    if getattr(config, "layers_to_transform", None) is not None:
        notes += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if getattr(config, "layers_pattern", None) is not None:
        notes += f" You also specified 'layers_pattern': {config.layers_pattern}."
    return notes


def match_targets(
    config: Any,
    module_names: Iterable[str],
    *,
    model_type: str | None = None,
    peft_type: Any = None,
    linear_module_names: Iterable[str] | None = None,
    output_embedding_name: str | None = None,
    is_transformers_model: bool = True,
    tuner_layer_names: Iterable[str] = (),
) -> TargetMatch:
    """Match ``config`` against ``module_names`` (a model's ``named_modules()`` names, in order).

    Resolves defaults and ``"all-linear"`` (``resolve_target_modules``), skips the root ``""`` and
    anything inside ``tuner_layer_names`` (existing adapter layers), then applies ``match_module``.
    Raises ``NoMatchingModuleError`` with peft's case distinction (all excluded / no targets / targets
    not found / mixed) plus close-name suggestions when nothing is adapted, unless
    ``target_modules`` is ``"dummy-target-modules"`` or the config also has ``target_parameters``
    (then the caller decides, as parameters may still match).
    """
    module_names = list(module_names)
    linear_module_names = None if linear_module_names is None else list(linear_module_names)
    tuner_layer_names = list(tuner_layer_names)
    targets = resolve_target_modules(
        config,
        model_type=model_type,
        peft_type=peft_type,
        linear_module_names=linear_module_names,
        output_embedding_name=output_embedding_name,
        top_level_names=[name for name in module_names if name and "." not in name],
        is_transformers_model=is_transformers_model,
        tuner_layer_names=tuner_layer_names,
    )
    if targets == DUMMY_TARGET_MODULES:
        return TargetMatch(target_modules=targets, matched=[])

    view = SimpleNamespace(**{name: getattr(config, name, None) for name in _MATCH_FIELDS})
    view.target_modules = targets
    inside_tuner = tuple(f"{name}." for name in tuner_layer_names)
    matched, excluded, unmatched = [], [], []
    if targets is not None:
        for key in module_names:
            if not key or (inside_tuner and key.startswith(inside_tuner)):
                continue
            outcome = match_module(view, key)
            {MatchOutcome.TARGETED: matched, MatchOutcome.EXCLUDED: excluded,
             MatchOutcome.UNMATCHED: unmatched}[outcome].append(key)

    exclude = getattr(config, "exclude_modules", None)
    result = TargetMatch(
        target_modules=targets,
        matched=matched,
        excluded=excluded,
        unmatched=unmatched,
        unused_targets=_unused_targets(targets, matched),
        unused_exclude=bool(exclude) and bool(matched) and not excluded,
        unused_rank_pattern_keys=_unused_pattern_keys(getattr(config, "rank_pattern", None), matched),
        unused_alpha_pattern_keys=_unused_pattern_keys(getattr(config, "alpha_pattern", None), matched),
        exclude_modules=exclude,
    )
    if matched or getattr(config, "target_parameters", None):
        return result

    if excluded and not unmatched:
        message = ("All modules were excluded. This is likely unintended. "
                   "Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration.")
    elif not excluded and unmatched and not targets:
        message = ("No `target_modules` passed but also no `target_parameters` found. "
                   "Please check the values for these arguments.")
    elif not excluded and unmatched:
        message = (f"Target modules {targets} not found in the base model. "
                   "Please check the target modules and try again." + _layer_notes(config)
                   + _suggestions(targets, unmatched, linear_module_names))
    else:
        message = ("No modules were targeted for adaptation. "
                   "This might be caused by a combination of mismatched target modules and excluded modules. "
                   "Please check your `target_modules` and `exclude_modules` configuration. You may also have "
                   "only targeted modules that are marked to be saved (`modules_to_save`)." + _layer_notes(config))
        if not module_names or module_names == [""]:
            message += " The model has no named sub-modules."
    raise NoMatchingModuleError(message)


def find_target_modules(config: Any, module_names: Iterable[str], **kwargs: Any) -> list[str]:
    """Names (in input order) of the modules ``config`` adapts; ``match_targets(...).matched``.

    Keywords as ``match_targets`` (``model_type``, ``linear_module_names``, ``output_embedding_name``, ...).
    """
    return match_targets(config, module_names, **kwargs).matched
