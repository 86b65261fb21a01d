"""Timing that holds on a shared machine: interleaved rounds and per-round paired ratios.

A shared machine's speed drifts by tens of percent within seconds (other jobs, frequency scaling).
Timing one method after another and keeping each one's best lets that drift decide the ranking,
and "best of" can even report a method faster than the forward pass it contains. Here every round
runs every method once, in a rotating order, and each method's time is divided by the *same
round's* unit (usually one forward pass): the drift cancels within the round, and the median over
rounds (with its spread) is what gets reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]


@dataclass(frozen=True)
class RatioSummary:
    """The per-round ratios of one method to the unit.

    Attributes:
        name: the method.
        median: median over rounds of ``time(method) / time(unit)`` in the same round.
        low: 25th percentile of the same ratios.
        high: 75th percentile.
        rounds: how many rounds were kept.
        median_seconds: median of the method's own times (for orientation only).
        median_faults: median number of minor page faults the process took during a call
            (memory the allocator had handed back to the system and touched again), or ``None``
            where the platform does not count them.
    """

    name: str
    median: float
    low: float
    high: float
    rounds: int
    median_seconds: float
    median_faults: float | None = None

    def cell(self) -> str:
        """``1.23x [1.10-1.40]``: median and interquartile range, for a Markdown table."""
        return f"{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}]"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (inclusive method; a single value gives itself thrice)."""
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def interleaved(
    methods: Mapping[str, Callable[[], object]],
    unit: str,
    rounds: int,
    warmup: int = 1,
) -> dict[str, RatioSummary]:
    """Time every method once per round, rotating the order, and summarize paired ratios.

    Args:
        methods: name -> zero-argument callable; must include ``unit``.
        unit: the method every other one is divided by, round by round.
        rounds: measured rounds (after ``warmup`` unmeasured ones).
        warmup: rounds run first and discarded (compilation, caches, allocator).

    Returns:
        name -> :class:`RatioSummary` (the unit's own ratios are all 1).
    """
    if unit not in methods:
        raise ValueError(f"unit {unit!r} is not among the methods {list(methods)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            faults_before = page_faults()
            start = time.perf_counter()
            methods[name]()
            elapsed = time.perf_counter() - start
            faults_after = page_faults()
            if round_index >= warmup:
                times[name].append(elapsed)
                if faults_before is not None and faults_after is not None:
                    faults[name].append(faults_after - faults_before)
    return {name: summarize(name, times[name], times[unit], faults[name]) for name in names}


def summarize(
    name: str, seconds: list[float], unit_seconds: list[float], faults: list[int] | None = None
) -> RatioSummary:
    """Paired ratios ``seconds[i] / unit_seconds[i]`` summarized by their quartiles (and the
    median of ``faults``, the calls' page faults, when given)."""
    if len(seconds) != len(unit_seconds):
        raise ValueError(f"{name}: {len(seconds)} times against {len(unit_seconds)} unit times")
    ratios = [s / u for s, u in zip(seconds, unit_seconds, strict=True)]
    low, median, high = quartiles(ratios)
    median_faults = statistics.median(faults) if faults else None
    return RatioSummary(
        name, median, low, high, len(ratios), statistics.median(seconds), median_faults
    )


def page_faults() -> int | None:
    """Minor page faults of the whole process so far (``None`` where not counted).

    A call that reuses memory its process already touched takes none; memory the allocator
    returned to the system between calls (glibc trims its heap when enough at its top is free)
    is faulted in again, about two microseconds a page on the shared machine of the README's
    runs. Every thread counts, since PyTorch's and the solver's threads touch memory for the call
    too; methods are timed one at a time, so the process's faults during a call are the call's.
    """
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def load_average() -> str:
    """``load average 0.52, 0.61, 0.70``: the machine's 1, 5 and 15 minute load averages."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# OpenMP settings that change what a multi-threaded forward pass costs (MiniLM, two threads,
# batch 1, n = 128: 28.8 ms by default, 42.3 ms with OMP_WAIT_POLICY=PASSIVE, whose threads sleep
# between parallel regions and are woken for each): a run states the ones it was given.
OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def machine_line() -> str:
    """What the numbers depend on: torch, threads, cores, load average, processor, and the
    OpenMP settings of :data:`OPENMP_SETTINGS` that are set."""
    openmp = [f"{name}={os.environ[name]}" for name in OPENMP_SETTINGS if name in os.environ]
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores, {load_average()}, {platform.processor() or platform.machine()}"
        + "".join(f", {setting}" for setting in openmp)
    )
