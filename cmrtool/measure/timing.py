"""The timing protocol: warm-up, then rounds in which every model runs once, alternating.

Timings on a shared machine drift (frequency scaling, neighbours, caches), so models are never
timed one after the other in blocks. Each round runs every model once on the same input batch,
the starting model rotating from round to round (A B, B A, A B, …), so a drift hits all models
alike and no model always runs first. From the per-round latencies:

- latency: median and the 10th/90th percentiles over rounds (ms per batch);
- throughput: batch / median latency (samples per second);
- speedup of model i over model 0: the median (and p10/p90) of the per-round ratios
  ``latency_0[r] / latency_i[r]``, a paired ratio that cancels drift common to both.

CPU timings need the CPUs: when other processes keep some busy and torch runs as many threads as
there are CPUs, every parallel region waits for a descheduled thread (on a 2-vCPU VM with one CPU
busy, a 0.1 ms forward pass took 24 ms). :func:`contention_note` warns when the load average
says so.

On CUDA, ``sync`` (``torch.cuda.synchronize``) runs before the clock starts and before it stops,
so the time covers the kernels and not just their launch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Spread", "spread", "time_alternating", "paired_speedup", "contention_note"]


@dataclass(frozen=True)
class Spread:
    """Median and 10th/90th percentiles of a sample."""

    median: float
    p10: float
    p90: float


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def spread(xs: Sequence[float]) -> Spread:
    """Median, p10 and p90 of a non-empty sample."""
    s = sorted(xs)
    return Spread(statistics.median(s), _percentile(s, 0.1), _percentile(s, 0.9))


def _no_sync() -> None:
    pass


def time_alternating(
    runners: Sequence[Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = _no_sync,
    advance: Callable[[int], None] = lambda n: None,
) -> list[list[float]]:
    """Seconds per call of each runner: ``times[i][r]`` is runner i in round r.

    Args:
        runners: one no-argument call per model (one forward pass on the benchmark batch).
        warmup: untimed rounds first (the TorchScript profiling executor specializes during the
            first calls; CUDA initializes kernels and allocator pools).
        repeats: timed rounds.
        sync: called before starting and before stopping the clock (``torch.cuda.synchronize``).
        advance: called with 1 after every call (progress).
    """
    n = len(runners)
    times: list[list[float]] = [[] for _ in range(n)]
    for r in range(warmup + repeats):
        for k in range(n):
            i = (r + k) % n  # rotate which model runs first in each round
            sync()
            start = time.perf_counter()
            runners[i]()
            sync()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[i].append(elapsed)
            advance(1)
    return times


def paired_speedup(base: Sequence[float], other: Sequence[float]) -> Spread:
    """Spread of the per-round ratios ``base[r] / other[r]`` (> 1: ``other`` is faster)."""
    return spread([b / o for b, o in zip(base, other)])


def contention_note(load1: float, cpus: int, threads: int) -> str | None:
    """A warning when other processes keep more CPUs busy than the timing threads leave free.

    ``load1`` is the 1-minute load average; this process counts for one of it.
    """
    others = load1 - 1.0
    if others <= cpus - threads + 0.5:
        return None
    fewer = max(1, cpus - math.ceil(others))
    advice = f"use --threads {fewer} or an idle machine" if fewer < threads else "use an idle machine for timings you report"
    return (
        f"load average {load1:.1f} on {cpus} CPUs: other processes compete with the {threads} timing "
        f"thread{'s' if threads != 1 else ''}, which can stall every parallel region; {advice}"
    )
