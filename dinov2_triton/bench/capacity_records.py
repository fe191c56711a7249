"""The typed sections of results.json that open-loop capacity and the
configuration search write (dinov2_triton.bench.capacity, dinov2_triton.tune.search); dinov2_triton.bench.results'
``PerfResults`` holds them as ``capacity`` and ``search``, and its one
writer and reader validate them with the rest of the file.

dinov2_triton.tune.search also keeps each measured configuration in its run folder as one
:class:`SearchPoint` file (search/points/<n>.json) so that an interrupted
search resumes where it stopped.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Part(BaseModel):
    """A section these modules write themselves: every field declared."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------- capacity at an SLO (dinov2_triton.bench.capacity)
RateStatus = Literal["PASS", "OVER_SLO", "ERRORS", "NOT_SUSTAINED", "CLIENT_LIMITED", "UNSTABLE", "FAILED"]


class RatePoint(_Part):
    """One open-loop perf_analyzer run at one offered rate (requests/s)."""
    rate_rps: float
    status: RateStatus
    reason: str
    throughput_img_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    successes: int | None = None
    failures: int = 0
    error_rate: float | None = None
    delayed_pct: float | None = None
    wall_s: float
    #: seconds waited before this rate for the server to finish the previous rate's requests
    drain_s: float | None = None
    #: this verdict was marginal (p99 within a factor 1 + ``recheck_margin`` of the SLO): the rate was
    #: measured again, and the next point, the re-measurement, holds the verdict at this rate
    rechecked: bool = False
    #: on a re-measurement: the mean p99 of both measurements, which ``status`` judged
    mean_p99_ms: float | None = None
    command: str = ""
    csv: str | None = None


class CapacitySettings(_Part):
    """How dinov2_triton.bench.capacity searches (dinov2_triton.bench.capacity.capacity_settings checks the flags)."""
    slo_p99_ms: float
    max_error_rate: float = 0.001
    protocol: Literal["grpc", "http"] = "grpc"
    batch_size: int = 1
    distribution: Literal["poisson", "constant"] = "poisson"
    window_ms: int = 3000
    stability_pct: float = 100.0     # windows within 2x: Poisson arrivals are noisy
    max_trials: int = 6
    max_threads: int = 4
    budget_s: float = 180.0
    precision: float = 0.05
    start_rate: float = 10.0
    growth: float = 2.0
    max_rate: float = 5000.0
    #: a rate whose p99 is within a factor 1 + m of the SLO (SLO/(1+m) < p99 <= SLO*(1+m)) is
    #: measured again and judged on the mean p99 of both; 0: every rate measured once
    recheck_margin: float = 0.5


class Capacity(_Part):
    """One model's capacity at the SLO: the highest offered rate that passed;
    ``failed_rps`` is the lowest failing rate above it when the search stopped."""
    model: str
    repeat: int = 1
    capacity_rps: float | None
    capacity_img_s: float | None
    p99_at_capacity_ms: float | None
    failed_rps: float | None
    knee_rps: float | None
    stop: Literal["converged", "budget", "max_rate", "no_passing_rate", "failed", "interrupted"]
    reason: str
    points: list[RatePoint] = []
    wall_s: float


class CapacityRun(_Part):
    """dinov2_triton.bench.capacity.run_capacity(): every model's capacity at the SLO, ``repeat`` 1..N."""
    settings: CapacitySettings
    input_data: dict[str, Any] | None = None   # dinov2_triton.bench.input_data.Samples.describe()
    results: list[Capacity] = []
    failures: list[str] = []


# ---------------------------------------------------------------- configuration search (dinov2_triton.tune.search)
class ServingConfig(_Part):
    """The knobs dinov2_triton.tune.search turns on one model's config."""
    instances: int
    threads: int | None = None       # intra-op threads per instance; None: the backend's default
    max_queue_delay_us: int
    preferred_batch_sizes: list[int] = []
    max_batch_size: int
    #: the exported dynamic_batching.default_queue_policy (load shedding): True kept,
    #: False removed by the search (--queue-policies on,off; dinov2_triton.tune.space),
    #: None the export has none (nothing to keep or remove)
    queue_policy: bool | None = None


class SearchPoint(_Part):
    """One measured configuration (also dinov2_triton.tune.search's resume file search/points/<n>.json)."""
    index: int
    key: str
    model: str
    variant: str | None = None
    config: ServingConfig
    is_default: bool = False
    capacity: Capacity | None = None
    peak_memory_mb: float | None = None
    violations: list[str] = []
    feasible: bool = False
    error: str | None = None
    load_s: float | None = None
    measured: str


class SearchSettings(_Part):
    strategy: Literal["grid", "coordinate"]
    space: dict[str, dict[str, list[Any]]]       # model -> knob -> values tried
    min_throughput: float | None = None
    max_memory_mb: float | None = None
    budget_s: float
    repository: str
    url: str
    capacity: CapacitySettings


class Excluded(_Part):
    variant: str
    reason: str


class SearchComparison(_Part):
    """The winner and the exported default configuration, re-measured in the same run."""
    model: str
    default: Capacity
    winner: Capacity
    ratio: float | None

    def lower_bounds(self) -> list[tuple[str, Capacity]]:
        """The sides whose bisection ran out of budget (their capacity is a lower bound)."""
        return [(label, c) for label, c in (("exported default", self.default), ("winner", self.winner))
                if c.stop == "budget"]


class SearchApplied(_Part):
    path: str
    model: str
    key: str


class SearchRun(_Part):
    """dinov2_triton.tune.search: every measured point, the variants kept out, the winner."""
    settings: SearchSettings
    points: list[SearchPoint] = []
    excluded: list[Excluded] = []
    winner: str | None = None
    comparison: SearchComparison | None = None
    applied: SearchApplied | None = None
    stopped: Literal["done", "budget", "interrupted"] = "done"
    wall_s: float = 0.0                  # the search, earlier sessions included (not the comparison)
    input_data: dict[str, Any] | None = None    # dinov2_triton.bench.input_data.Samples.describe()


# ------------------------------------------------ the pipeline's tune stage (dinov2_triton.pipeline.capacity_stage)
class PolicyAB(_Part):
    """One configuration's capacity at the SLO with the queue policy (as served) and
    without it, measured one after the other in the same run."""
    key: str
    config: ServingConfig
    with_policy: Capacity
    without_policy: Capacity
    #: with / without (None: a side has no capacity)
    ratio: float | None
    #: the policy costs capacity when ratio < 1 - tolerance
    tolerance: float
    costs: bool | None        # None: not decided (a side has no capacity under the SLO)
    verdict: str


class ServingChoice(_Part):
    """The tune stage: the serving configuration of the model the ``dinov2`` ensemble
    calls, chosen by a short search on this host with the queue policy on, applied
    to the repository, and the A/B of the policy in that configuration."""
    model: str
    variant: str | None = None
    slo_p99_ms: float
    space: Literal["joint", "full"] = "joint"
    #: the search's run folder (its results.json and report)
    search_run: str
    search_winner: str | None = None
    #: the configuration served now (the search's winner, or the next one where the policy costs nothing)
    chosen: str | None = None
    config: ServingConfig | None = None
    applied_path: str | None = None
    #: what the server reports after reloading config.pbtxt matches the file
    served_matches: bool = False
    served: str = ""
    #: every step of the ``dinov2`` ensemble is served with a queue policy
    ensemble_steps_shed: dict[str, bool] = {}
    ab: list[PolicyAB] = []
    notes: list[str] = []
    search_s: float = 0.0
    ab_s: float = 0.0
    wall_s: float = 0.0
