"""The typed ``overload`` section of results.json: the overload check of the
served deployment (dinov2_triton.qa.overload, run by the bench stage after
its measurements). dinov2_triton.bench.results' ``PerfResults`` holds it as
``overload``; its one writer and reader validate it with the rest of the file.

Three claims per target (the ``dinov2`` ensemble, with encoded images, and
the classifier it calls, with pixel values), each PASS (True), FAIL (False)
or not applicable (None, the detail says why):

- ``sheds``: the burst above capacity is shed with gRPC UNAVAILABLE / HTTP 503
  and nothing fails otherwise;
- ``p99_bounded``: the accepted requests' p99 <= the queue timeout (read
  from the served config) + one batch's service time;
- ``same_logits``: a good request after the burst answers the same logits as
  before it (arrays compared with tolerance 0).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    """A section this check writes itself: every field declared."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class OverloadSettings(_Part):
    """How the burst is sized (the recipe's ``bench.overload``, ``dinov2-triton bench --overload-*``)."""
    factor: float = Field(3.0, gt=1)            # offered load in multiples of the measured capacity
    seconds: float = Field(5.0, gt=0)           # burst duration (shortened to stay within max_requests)
    max_requests: int = Field(2000, ge=1)       # the burst never sends more than this
    protocol: Literal["grpc", "http"] = "grpc"
    strict: bool = False                        # a FAIL or a config without a queue policy is a run error


class Claim(_Part):
    """One claim's verdict: True (PASS), False (FAIL) or None (does not apply), and its numbers in words."""
    passed: bool | None = None
    detail: str = "not measured"


class ServedPolicy(_Part):
    """One model on the request's path as the server reports it (repository/config API)."""
    model: str
    timeout_ms: float | None = None             # default_queue_policy.default_timeout_microseconds / 1000
    max_queue_size: int | None = None
    has_policy: bool = False                    # a non-empty default_queue_policy
    max_batch_size: int = 0
    instances: int | None = None


class OverloadTarget(_Part):
    """The burst against one served model and its three claims."""
    model: str
    kind: Literal["ensemble", "classifier"]
    inputs: str = ""                            # what one request carries
    protocol: str = "grpc"
    skipped: str | None = None                  # why it was not measured (nothing else is then filled in)
    policies: list[ServedPolicy] = []           # the model and, for the ensemble, each step
    capacity_rps: float | None = None           # requests/s of one image each
    capacity_source: str | None = None
    rate_rps: float | None = None               # offered (factor x capacity)
    seconds: float | None = None                # the burst's send duration, as asked (within max_requests)
    send_s: float | None = None                 # first to last send, as it went
    achieved_rps: float | None = None           # offered / send_s: the rate the client reached
    wall_s: float | None = None                 # until the last answer
    client_threads: int | None = None
    offered: int = 0
    accepted: int = 0
    shed: int = 0                               # gRPC UNAVAILABLE / HTTP 503
    failed: int = 0
    messages: dict[str, int] = {}               # the server's words for what was refused or failed (top 5)
    p50_ms: float | None = None                 # of the accepted requests, as the client waited for them
    p99_ms: float | None = None
    queue_timeout_ms: float | None = None       # sum of the path's served queue timeouts
    batch_ms: float | None = None               # one full batch: the slowest client-timed round trip, idle server
    batch_source: str | None = None
    burst_batch_ms: float | None = None         # Triton's mean compute of the burst's largest batches (path sum)
    burst_batch_source: str | None = None
    bound_ms: float | None = None               # queue_timeout_ms + the longer of batch_ms, burst_batch_ms
    logits_max_abs_diff: float | None = None
    versions: list[str] = []                    # model versions that answered before and after the burst
    sheds: Claim = Claim()
    p99_bounded: Claim = Claim()
    same_logits: Claim = Claim()
    passed: bool | None = None                  # every claim that applies passed; None: none applied

    def one_batch_ms(self) -> tuple[float, str]:
        """One batch's service time in the p99 bound, and which measurement it
        is: the longer of the full batch timed alone before the burst
        (client-timed, transport included) and Triton's own compute of the
        burst's largest batches (every instance busy, the load generator on
        the same CPU: a batch that leaves the queue at its timeout takes that long)."""
        if self.burst_batch_ms is not None and self.burst_batch_ms > (self.batch_ms or 0.0):
            return self.burst_batch_ms, "Triton's compute of a batch during the burst"
        return float(self.batch_ms or 0.0), "a full batch alone before the burst"


class OverloadCheck(_Part):
    """dinov2_triton.qa.overload.run_overload_check(): the targets, a verdict, the host's load."""
    settings: OverloadSettings
    url: str
    load_average: list[float] | None = None     # of the host when the check started
    targets: list[OverloadTarget] = []
    passed: bool | None = None
    summary: str = ""
    problems: list[str] = []                    # what FAILed or did not apply, one line each
