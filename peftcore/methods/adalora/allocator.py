"""AdaLoRA's rank allocator as explicit state and pure functions (``peft``'s ``RankAllocator``).

``params``/``grads`` map parameter names to arrays, named as ``peft`` names them
(``<module>.lora_A.<adapter>``, ``<module>.lora_E.<adapter>``, ``<module>.lora_B.<adapter>``;
the adapter part is optional). A name is tracked when one of its dot-separated parts is
``lora_A``/``lora_E``/``lora_B`` (and, given ``adapter_name``, another part is that adapter);
other entries pass through untouched. One layer is the set of names equal up to that part.

Per step (``AdaLoraModel.update_and_allocate``; ``T = total_step − tfinal``):

* ``step < T``: update the importance EMAs, then, when the schedule says so, mask to the budget;
* ``step == T``: mask to ``target_bgt`` with the EMAs as they are, then reset the EMAs;
* ``step > T``: re-apply the last mask (``mask_using_rank_pattern``).

The budget and the masking decision depend on the step only (a Python int), so every
function here runs under ``jax.jit`` with ``step``/``schedule`` static; the masks are bool
arrays, turned into peft's ``rank_pattern`` lists on the host by :func:`rank_pattern_to_lists`.

:func:`allocate` is the same step without branches: :func:`step_plan` turns the Python int step
into a :class:`StepPlan` of 0-d arrays on the host, and ``allocate`` selects with ``where``, so a
train step jitted with only ``schedule`` static compiles once for the whole schedule. Its state
keeps masks from the start (``init_state(..., masks=True)``: all True), so the pytree never changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import array_api_compat

from peftcore._xp import Array, array_namespace
from peftcore.errors import ConfigError, IncompatibleKeysError, ShapeMismatchError

__all__ = [
    "AllocatorState",
    "Schedule",
    "StepPlan",
    "allocate",
    "apply_rank_pattern",
    "budget_schedule",
    "init_state",
    "make_schedule",
    "mask_to_budget",
    "rank_pattern_to_lists",
    "step_plan",
    "triplet_scores",
    "update_and_allocate",
    "update_importance",
]

_CONTAINERS = ("lora_A", "lora_E", "lora_B")


class Schedule(NamedTuple):
    """The static part of the allocator (hashable: a ``jax.jit`` static argument).

    ``init_bgt`` = Σ rows of every ``lora_A`` (``init_r·L``), ``target_bgt = target_r·L``
    (``L`` = number of adapted layers); the rest are the config's fields.
    """

    init_bgt: int
    target_bgt: int
    tinit: int
    tfinal: int
    total_step: int
    deltaT: int
    beta1: float
    beta2: float


class AllocatorState(NamedTuple):
    """``exp_avg_ipt``/``exp_avg_unc``: name -> EMA of the sensitivity ``|p·g|`` and of its uncertainty;
    ``rank_pattern``: ``lora_E`` name -> bool ``(r,)`` mask last applied (``None`` before the first)."""

    exp_avg_ipt: dict[str, Array]
    exp_avg_unc: dict[str, Array]
    rank_pattern: dict[str, Array] | None = None


class StepPlan(NamedTuple):
    """One allocator step as 0-d arrays (:func:`step_plan`), so that a jitted step never sees the step itself.

    ``update`` (bool): ``step < T``, update the EMAs; ``mask`` (bool): mask anew now (a scheduled mask,
    or ``step == T``); ``k`` (int): triplets to mask, ``init_bgt − budget`` (1 when not masking);
    ``reset`` (bool): ``step == T``, zero the EMAs after masking; ``reapply`` (bool): ``step > T``.
    """

    update: Array
    mask: Array
    k: Array
    reset: Array
    reapply: Array


def make_schedule(params: Mapping[str, Array], /, *, config: Any, adapter_name: str | None = None) -> Schedule:
    """The schedule of ``config`` (an ``AdaLoraConfig``) for these parameters (``RankAllocator.__init__``)."""
    layers = _layers(params, adapter_name=adapter_name)
    for name in ("beta1", "beta2"):
        value = getattr(config, name)
        if not 0 < value < 1:
            raise ConfigError(f"AdaLoRA `{name}` must lie strictly between 0 and 1, got {value!r}")
    init_bgt = sum(int(params[names["lora_A"]].shape[0]) for names in layers.values())
    return Schedule(
        init_bgt=init_bgt,
        target_bgt=int(config.target_r) * len(layers),
        tinit=int(config.tinit),
        tfinal=int(config.tfinal),
        total_step=int(config.total_step),
        deltaT=int(config.deltaT),
        beta1=float(config.beta1),
        beta2=float(config.beta2),
    )


def init_state(
    params: Mapping[str, Array], /, *, adapter_name: str | None = None, masks: bool = False
) -> AllocatorState:
    """Zero EMAs for every tracked parameter (peft's lazily created zeros) and no mask yet.

    ``masks=True`` starts ``rank_pattern`` as all-True ``(r,)`` masks instead of ``None`` (what
    :func:`allocate` needs: a state whose pytree structure never changes; keeping every triplet is a no-op).
    """
    xp = array_namespace(*params.values())
    tracked = _tracked(params, adapter_name=adapter_name)
    zeros = {n: xp.zeros_like(params[n]) for n in tracked}
    rank_pattern = None
    if masks:
        rank_pattern = {}
        for names in _layers(params, adapter_name=adapter_name).values():
            lora_E = params[names["lora_E"]]
            rank_pattern[names["lora_E"]] = xp.ones((lora_E.shape[0],), dtype=xp.bool, device=_device(lora_E))
    return AllocatorState(exp_avg_ipt=zeros, exp_avg_unc=dict(zeros), rank_pattern=rank_pattern)


def budget_schedule(step: int, *, schedule: Schedule) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step`` (``RankAllocator.budget_schedule``).

    ``step ≤ tinit``: ``(init_bgt, False)``; ``step > total_step − tfinal``: ``(target_bgt, True)``;
    otherwise ``budget = int((init_bgt − target_bgt)·m³ + target_bgt)`` with
    ``m = 1 − (step − tinit)/(total_step − tfinal − tinit)``, masking when ``step % deltaT == 0``.
    """
    s = schedule
    if step <= s.tinit:
        return s.init_bgt, False
    if step > s.total_step - s.tfinal:
        return s.target_bgt, True
    mul_coeff = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
    budget = int((s.init_bgt - s.target_bgt) * (mul_coeff**3) + s.target_bgt)
    return budget, step % s.deltaT == 0


def update_importance(
    state: AllocatorState,
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    /,
    *,
    beta1: float,
    beta2: float,
    adapter_name: str | None = None,
) -> AllocatorState:
    """EMAs of the sensitivity ``I = |p ⊙ g|`` for every tracked parameter (``RankAllocator.update_ipt``).

    ``Ī ← β₁·Ī + (1−β₁)·I``, then ``Ū ← β₂·Ū + (1−β₂)·|I − Ī|`` (with the new ``Ī``).
    """
    xp = array_namespace(*params.values())
    tracked = _tracked(params, adapter_name=adapter_name)
    missing = [n for n in tracked if n not in grads]
    if missing:
        raise IncompatibleKeysError(f"AdaLoRA importance needs a gradient for every factor; missing {missing}")
    exp_avg_ipt, exp_avg_unc = dict(state.exp_avg_ipt), dict(state.exp_avg_unc)
    for name in tracked:
        p, g = params[name], grads[name]
        if tuple(g.shape) != tuple(p.shape):
            raise ShapeMismatchError(f"gradient of {name!r} has shape {tuple(g.shape)}, parameter {tuple(p.shape)}")
        ipt = xp.abs(p * g)
        avg = exp_avg_ipt.get(name)
        unc = exp_avg_unc.get(name)
        avg = (1 - beta1) * ipt if avg is None else beta1 * avg + (1 - beta1) * ipt
        deviation = xp.abs(ipt - avg)
        unc = (1 - beta2) * deviation if unc is None else beta2 * unc + (1 - beta2) * deviation
        exp_avg_ipt[name], exp_avg_unc[name] = avg, unc
    return AllocatorState(exp_avg_ipt, exp_avg_unc, state.rank_pattern)


def triplet_scores(
    state: AllocatorState, params: Mapping[str, Array], /, *, adapter_name: str | None = None
) -> dict[str, Array]:
    """``lora_E`` name -> ``(r,)`` score of each triplet ``i``: ``S_E[i] + (mean_j S_A[i, j] + mean_j S_B[j, i])``.

    ``S = Ī ⊙ Ū`` element-wise (``RankAllocator._element_score``/``_combine_ipt``/``mask_to_budget``).
    """
    layers = _layers(params, adapter_name=adapter_name)
    xp = array_namespace(*params.values())
    scores = {}
    for names in layers.values():
        s_A, s_E, s_B = (_element_score(state, names[c]) for c in _CONTAINERS)
        vector = xp.mean(s_A, axis=1) + xp.mean(s_B, axis=0)
        scores[names["lora_E"]] = xp.reshape(s_E, (-1,)) + vector
    return scores


def mask_to_budget(
    state: AllocatorState,
    params: Mapping[str, Array],
    /,
    *,
    budget: int,
    init_bgt: int,
    adapter_name: str | None = None,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Zero ``E`` of every triplet scoring ``≤`` the ``(init_bgt − budget)``-th smallest score overall.

    Returns ``(params with those E entries zeroed, lora_E name -> bool (r,) keep mask)``
    (``RankAllocator.mask_to_budget``; ties at the threshold are all masked, as peft's ``<=``).
    """
    xp = array_namespace(*params.values())
    scores = triplet_scores(state, params, adapter_name=adapter_name)
    everything = xp.concat(list(scores.values()))
    k = init_bgt - budget
    if not 1 <= k <= everything.shape[0]:
        raise ConfigError(
            f"AdaLoRA cannot mask to budget {budget}: it must leave between 0 and {everything.shape[0] - 1} of "
            f"the {everything.shape[0]} triplets masked (init budget {init_bgt}); check init_r > target_r"
        )
    threshold = xp.sort(everything)[k - 1]
    masks = {name: score > threshold for name, score in scores.items()}
    return apply_rank_pattern(params, rank_pattern=masks), masks


def apply_rank_pattern(
    params: Mapping[str, Array], /, *, rank_pattern: Mapping[str, Any], adapter_name: str | None = None
) -> dict[str, Array]:
    """``params`` with ``E[i] = 0`` wherever ``rank_pattern[<E name>][i]`` is False (``mask_using_rank_pattern``).

    ``rank_pattern`` values are bool arrays or lists; its keys may omit the adapter part
    (as saved configs do).
    """
    xp = array_namespace(*params.values())
    out = dict(params)
    for names in _layers(params, adapter_name=adapter_name).values():
        name = names["lora_E"]
        mask = _lookup(rank_pattern, name)
        lora_E = params[name]
        if not hasattr(mask, "shape"):
            mask = xp.asarray([bool(m) for m in mask], device=_device(lora_E))
        mask = xp.reshape(mask, (-1, 1))
        if mask.shape[0] != lora_E.shape[0]:
            raise ShapeMismatchError(
                f"rank_pattern mask of {name!r} has {mask.shape[0]} entries, rank is {lora_E.shape[0]}"
            )
        out[name] = xp.where(mask, lora_E, xp.zeros_like(lora_E))
    return out


def update_and_allocate(
    state: AllocatorState,
    params: Mapping[str, Array],
    grads: Mapping[str, Array] | None,
    /,
    *,
    step: int,
    schedule: Schedule,
    adapter_name: str | None = None,
) -> tuple[AllocatorState, dict[str, Array], dict[str, Array] | None]:
    """One call of ``AdaLoraModel.update_and_allocate(step)``: ``(state, params, new rank_pattern or None)``.

    Call it after the optimiser step with that step's gradients (``grads`` is only read while
    ``step < total_step − tfinal``). The returned ``rank_pattern`` (bool masks) is what peft
    stores in ``config.rank_pattern``; it is ``None`` on steps that do not mask anew.
    """
    s = schedule
    final = s.total_step - s.tfinal
    kw = dict(adapter_name=adapter_name)
    if step < final:
        if grads is None:
            raise IncompatibleKeysError(f"AdaLoRA step {step} < {final} updates the importance: grads are required")
        state = update_importance(state, params, grads, beta1=s.beta1, beta2=s.beta2, **kw)
        budget, mask_now = budget_schedule(step, schedule=s)
        if not mask_now:
            return state, dict(params), None
        params, masks = mask_to_budget(state, params, budget=budget, init_bgt=s.init_bgt, **kw)
        return state._replace(rank_pattern=masks), params, masks
    if step == final:
        budget, _ = budget_schedule(step, schedule=s)
        params, masks = mask_to_budget(state, params, budget=budget, init_bgt=s.init_bgt, **kw)
        xp = array_namespace(*params.values())
        zeros = {n: xp.zeros_like(v) for n, v in state.exp_avg_ipt.items()}
        return AllocatorState(zeros, dict(zeros), masks), params, masks
    if state.rank_pattern is None:
        raise ConfigError(f"AdaLoRA step {step} > {final} re-applies the final mask, but no mask was computed yet")
    return state, apply_rank_pattern(params, rank_pattern=state.rank_pattern, **kw), None


def step_plan(step: int, *, schedule: Schedule, xp: Any, device: Any = None) -> StepPlan:
    """The :class:`StepPlan` of Python int ``step`` (host side; budgets from :func:`budget_schedule`).

    Raises ``ConfigError`` for a non-int step and for a masking step whose ``k = init_bgt − budget``
    lies outside ``[1, init_bgt]`` (e.g. ``target_r ≥ init_r``), as :func:`mask_to_budget` would.
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise ConfigError(f"the AdaLoRA step plan needs a Python int step (on the host), got {step!r}")
    s = schedule
    final = s.total_step - s.tfinal
    budget, mask_now = budget_schedule(step, schedule=s)
    mask = step == final or (step < final and mask_now)
    k = s.init_bgt - budget if mask else 1
    if mask and not 1 <= k <= s.init_bgt:
        raise ConfigError(
            f"AdaLoRA cannot mask to budget {budget} at step {step}: it must leave between 0 and {s.init_bgt - 1} "
            f"of the {s.init_bgt} triplets masked (init budget {s.init_bgt}); check init_r > target_r"
        )
    flags = dict(update=step < final, mask=mask, reset=step == final, reapply=step > final)
    arrays = {name: xp.asarray(flag, dtype=xp.bool, device=device) for name, flag in flags.items()}
    return StepPlan(k=xp.asarray(k, device=device), **arrays)


def allocate(
    state: AllocatorState,
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    plan: StepPlan,
    /,
    *,
    schedule: Schedule,
    adapter_name: str | None = None,
) -> tuple[AllocatorState, dict[str, Array]]:
    """:func:`update_and_allocate` without branches: ``(state, params)`` for the step ``plan`` describes.

    ``Ī, Ū ← where(update, EMAs(p, g), Ī, Ū)``; ``θ = sort(scores)[k − 1]``;
    ``masks ← where(mask, score > θ, masks)``; ``E ← E ⊙ masks`` where ``mask or reapply``;
    ``Ī, Ū ← 0`` where ``reset``. ``state`` needs masks (``init_state(..., masks=True)``);
    ``grads`` is always given and read only where ``update``. ``state.rank_pattern`` holds the masks.
    """
    if state.rank_pattern is None:
        raise ConfigError("allocate needs a state that holds masks from the start: init_state(..., masks=True)")
    xp = array_namespace(*params.values())
    kw = dict(adapter_name=adapter_name)
    updated = update_importance(state, params, grads, beta1=schedule.beta1, beta2=schedule.beta2, **kw)
    exp_avg_ipt = {n: xp.where(plan.update, v, state.exp_avg_ipt[n]) for n, v in updated.exp_avg_ipt.items()}
    exp_avg_unc = {n: xp.where(plan.update, v, state.exp_avg_unc[n]) for n, v in updated.exp_avg_unc.items()}
    scores = triplet_scores(AllocatorState(exp_avg_ipt, exp_avg_unc), params, **kw)
    ordered = xp.sort(xp.concat(list(scores.values())))
    threshold = xp.take(ordered, xp.reshape(plan.k - 1, (1,)))
    masks = {n: xp.where(plan.mask, score > threshold, _lookup(state.rank_pattern, n)) for n, score in scores.items()}
    # a step that neither masks nor re-applies leaves E as it is: keep every triplet
    idle = xp.logical_not(xp.logical_or(plan.mask, plan.reapply))
    params = apply_rank_pattern(params, rank_pattern={n: xp.logical_or(m, idle) for n, m in masks.items()}, **kw)
    exp_avg_ipt = {n: xp.where(plan.reset, xp.zeros_like(v), v) for n, v in exp_avg_ipt.items()}
    exp_avg_unc = {n: xp.where(plan.reset, xp.zeros_like(v), v) for n, v in exp_avg_unc.items()}
    return AllocatorState(exp_avg_ipt, exp_avg_unc, masks), params


def rank_pattern_to_lists(
    rank_pattern: Mapping[str, Array], /, *, adapter_name: str | None = None
) -> dict[str, list[bool]]:
    """Host-side ``{name: [bool, ...]}`` as peft writes ``rank_pattern`` (adapter part dropped when given)."""
    out = {}
    for name, mask in rank_pattern.items():
        key = name
        if adapter_name is not None:
            key = ".".join(p for p in name.split(".") if p != adapter_name)
        values = mask.tolist() if hasattr(mask, "tolist") else list(mask)
        out[key] = [bool(v) for v in values]
    return out


# --- helpers --------------------------------------------------------------------------------------


def _container_index(parts: list[str]) -> int | None:
    found = [i for i, p in enumerate(parts) if p in _CONTAINERS]
    return found[-1] if found else None


def _tracked(params: Mapping[str, Array], *, adapter_name: str | None) -> list[str]:
    names = []
    for name in params:
        parts = name.split(".")
        if _container_index(parts) is None:
            continue
        if adapter_name is not None and adapter_name not in parts:
            continue
        names.append(name)
    return names


def _layers(params: Mapping[str, Array], *, adapter_name: str | None) -> dict[str, dict[str, str]]:
    layers: dict[str, dict[str, str]] = {}
    for name in _tracked(params, adapter_name=adapter_name):
        parts = name.split(".")
        i = _container_index(parts)
        layer = ".".join(parts[:i] + ["%s"] + parts[i + 1 :])
        layers.setdefault(layer, {})[parts[i]] = name
    if not layers:
        of = f" of adapter {adapter_name!r}" if adapter_name is not None else ""
        raise IncompatibleKeysError(f"AdaLoRA found no lora_A/lora_E/lora_B parameters{of}")
    for layer, names in layers.items():
        missing = [c for c in _CONTAINERS if c not in names]
        if missing:
            raise IncompatibleKeysError(f"AdaLoRA layer {layer!r} lacks {missing}")
    return layers


def _element_score(state: AllocatorState, name: str) -> Array:
    try:
        return state.exp_avg_ipt[name] * state.exp_avg_unc[name]
    except KeyError:
        raise IncompatibleKeysError(f"AdaLoRA allocator state has no importance for {name!r}") from None


def _lookup(rank_pattern: Mapping[str, Any], name: str) -> Any:
    if name in rank_pattern:
        return rank_pattern[name]
    parts = name.split(".")
    for i in range(_container_index(parts) + 1, len(parts)):
        shorter = ".".join(parts[:i] + parts[i + 1 :])
        if shorter in rank_pattern:
            return rank_pattern[shorter]
    raise IncompatibleKeysError(f"rank_pattern has no entry for {name!r}")


def _device(x: Array) -> Any:
    return array_api_compat.device(x)
