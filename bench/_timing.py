"""Side-by-side timing shared by the benchmarks: alternating rounds, per-round ratios.

The machine is shared and noisy, so absolute times drift between (and within) runs. Each round calls
every contestant the same number of times (after one untimed call), back to back, with the order
reversed every other round;
a ratio is taken within each round (both sides timed seconds apart) and summarised by its median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def paired_rounds(contestants: dict[str, Callable[[], object]], *, rounds: int = 21,
                  min_time: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each ``{name: fn}`` in every round (``fn`` must block until its result is ready)."""
    for fn in contestants.values():
        fn()
    slowest = max(contestants.values(), key=calls_time)
    calls = 1
    while calls_time(slowest, calls) < min_time:
        calls *= 2
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for i in range(rounds):
        order = list(contestants.items())[:: 1 if i % 2 == 0 else -1]
        for name, fn in order:
            # one untimed call first: the previous contestant's frees may have handed memory back to
            # the OS, and the page faults of re-fetching it belong to neither contestant's steady state
            fn()
            times[name].append(calls_time(fn, calls) / calls)
    return times


def ratio_stats(times: dict[str, list[float]], name: str, baseline: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio ``name / baseline`` (both timed in the same round)."""
    ratios = [a / b for a, b in zip(times[name], times[baseline])]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median, q1, q3


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per call of each contestant."""
    return {name: statistics.median(values) for name, values in times.items()}


def calls_time(fn: Callable[[], object], calls: int = 1) -> float:
    """Seconds taken by ``calls`` calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start
