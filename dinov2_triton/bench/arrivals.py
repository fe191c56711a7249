"""Poisson arrival schedules for perf_analyzer's open-loop load, with the
offered rate exact.

Why not ``--request-distribution=poisson``: perf_analyzer 2.50 draws its
Poisson schedule from a default-seeded ``std::mt19937`` (the same numbers on
every run, request_rate_manager.cc) over ``max_trials x window`` and then
repeats it. The capacity finder sizes windows to hold ~50 requests, so below
~50 req/s every schedule is the same first ~300 draws, whose mean interval is
1.19x the asked one: 10, 20 and 40 req/s "Poisson" offered 8.4, 16.8 and
33.5 req/s (measured, docs/field-notes.md #18), while ``constant`` offered
9.9, 19.9 and 39.5. A rate that passed was 16 % lower than the one reported,
and the keep-up check lost most of its tolerance to the bias.

Here the intervals are drawn from a seeded exponential distribution and
scaled so that one pass of the schedule holds exactly ``rate`` requests per
second; perf_analyzer reads them with ``--request-intervals`` (microseconds,
one per line, looped) and keeps its own timing of the sends. The seed is
fixed, so every configuration of a search meets the same arrival pattern at
a given rate (common random numbers: differences between two configurations
are the server's, not the load's)."""
from __future__ import annotations

import math
from pathlib import Path

SEED = 20261201
#: at least this many intervals per schedule, so one pass is not a few bursts
MIN_INTERVALS = 2000
#: at most this many (a file of ~1 MB); a longer run loops the schedule
MAX_INTERVALS = 200_000


def poisson_intervals(rate: float, n: int, *, seed: int = SEED) -> list[int]:
    """``n`` exponential inter-arrival times in whole microseconds whose sum is
    ``n / rate`` seconds (to the microsecond): the mean rate of one pass is
    ``rate``. Rounded with the remainder carried, so no rounding drift."""
    import numpy as np

    if not rate > 0:
        raise ValueError(f"request rate {rate}: must be > 0")
    if n < 1:
        raise ValueError(f"{n} intervals: at least 1")
    draws = np.random.default_rng(seed).exponential(1.0, n)
    total_us = round(n / rate * 1e6)
    edges = np.rint(np.cumsum(draws) * (total_us / draws.sum())).astype(np.int64)
    intervals = np.diff(edges, prepend=0)
    # a zero interval is a burst of two requests at once, which Poisson allows;
    # perf_analyzer's std::stol reads "0" fine
    return intervals.tolist()


def schedule_length(rate: float, run_s: float) -> int:
    """Intervals for a schedule covering ``run_s`` seconds at ``rate``, within
    [MIN_INTERVALS, MAX_INTERVALS]."""
    return int(min(MAX_INTERVALS, max(MIN_INTERVALS, math.ceil(rate * run_s))))


def write_poisson_schedule(path: str | Path, rate: float, run_s: float, *, seed: int = SEED) -> Path:
    """Write the ``--request-intervals`` file for ``rate`` req/s over ``run_s`` s."""
    from dinov2_triton.core.artifact_io import atomic_write_text

    intervals = poisson_intervals(rate, schedule_length(rate, run_s), seed=seed)
    path = Path(path)
    atomic_write_text(path, "\n".join(map(str, intervals)) + "\n")
    return path


def offered_rate(path: str | Path) -> float:
    """The mean rate (req/s) of a ``--request-intervals`` file, as perf_analyzer
    computes it (GetCustomRequestRate: count / sum)."""
    values = [int(line) for line in Path(path).read_text().split()]
    return len(values) / (sum(values) / 1e6)
