"""The overload check of the served deployment: does it shed what it cannot serve?

The bench stage runs it last (dinov2_triton.pipeline.bench_stage, ``bench.overload`` in a
recipe, ``dinov2-triton bench --overload``), against a server on loopback only:

1. the targets: the ``dinov2`` ensemble with encoded images (what users
   call) and the classifier its ensemble calls with ``pixel_values``, both
   as the server reports them (repository/config API);
2. per target, the served configs along its path (the ensemble's steps): the
   queue policy, timeout and batch size the server actually runs;
3. a good request; one batch's service time: the slowest of a few sequential
   full-batch (max_batch_size) requests, timed by the client as the burst's
   latencies are (transport included); then a bounded open-loop burst at
   ``factor`` x the measured capacity (the bench run's perf_analyzer sweep,
   else a short closed loop) for ``seconds`` and at most ``max_requests``
   requests (dinov2_triton.qa.reliability.scenario_overload: one image per request,
   every answer waited for), then the good request again;
4. three claims (dinov2_triton.bench.overload_records): it sheds (gRPC UNAVAILABLE or
   HTTP 503, both typed :class:`dinov2_triton.serve.triton_access.Overloaded`) and
   nothing else fails; the accepted requests' p99 <= the served queue
   timeout (summed along the ensemble's steps) + one batch; the same logits
   after the burst as before (tolerance 0: the same served model, alone in its batch).

In a full queue the accepted requests wait nearly the whole timeout, so
their p99 lies close to the bound. One batch is the longer of a full batch
timed alone before the burst and Triton's own compute time of the burst's
largest batches (``burst_batch_ms``: every instance busy, the load
generator on the same cores): a batch that leaves the queue at its timeout
takes that long. A FAIL by a few tens of ms is the client's own delay on a
saturated CPU; a FAIL by seconds is a queue the timeout does not bound.

A config with no queue policy is reported as such (nothing is shed, and why);
it is a run error only with ``strict``.
"""
from __future__ import annotations

import itertools
import os
import statistics
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from dinov2_triton.bench.overload_records import Claim, OverloadCheck, OverloadSettings, OverloadTarget, ServedPolicy

#: sequential full-batch requests timed before the burst; the slowest is one batch's service time
PROBE_REQUESTS = 10
#: the words for a shed request in both protocols
SHED_WORDS = "gRPC UNAVAILABLE / HTTP 503"


# --------------------------------------------------------------------------- what the server runs
def served_policy(config: Mapping[str, Any]) -> ServedPolicy:
    """A served (normalised) model config's queue policy, batch size and instances."""
    policy = (config.get("dynamic_batching") or {}).get("default_queue_policy") or {}
    timeout_us = int(policy.get("default_timeout_microseconds") or 0)
    rejects = policy.get("timeout_action", "REJECT") in ("REJECT", 0)   # DELAY keeps a timed-out request
    size = int(policy.get("max_queue_size") or 0)
    groups = config.get("instance_group") or []
    return ServedPolicy(model=str(config.get("name", "?")),
                        timeout_ms=timeout_us / 1000.0 if timeout_us and rejects else None,
                        max_queue_size=size or None, has_policy=bool((timeout_us and rejects) or size),
                        max_batch_size=int(config.get("max_batch_size") or 0),
                        instances=sum(int(g.get("count", 1)) for g in groups) if groups else None)


def ensemble_steps(config: Mapping[str, Any]) -> list[str]:
    """The models an ensemble's served config calls, in order; [] for a model that is no ensemble."""
    steps = (config.get("ensemble_scheduling") or {}).get("step") or []
    return [str(s["model_name"]) for s in steps]


def logits_step(config: Mapping[str, Any]) -> str | None:
    """The ensemble step that produces ``logits`` (the classifier the ensemble calls)."""
    for s in (config.get("ensemble_scheduling") or {}).get("step") or []:
        if "logits" in (s.get("output_map") or {}).values():
            return str(s["model_name"])
    return None


# --------------------------------------------------------------------------- what the run measured
def _ok_points(sweep: Mapping[str, Any] | None, model: str) -> list[Mapping[str, Any]]:
    return [p for p in (sweep or {}).get("points", []) if p.get("model") == model and p.get("status") == "OK"]


def sweep_capacity(sweep: Mapping[str, Any] | None, model: str) -> tuple[float, str] | None:
    """The most images/s the sweep measured for ``model`` (closed loop), with where it came from."""
    best = max(((p["metrics"].get("throughput_infer_per_s") or 0.0, p) for p in _ok_points(sweep, model)),
               key=lambda x: x[0], default=(0.0, None))
    if not best[0]:
        return None
    p = best[1]
    return float(best[0]), (f"perf_analyzer sweep, best point: batch {p['batch_size']}, concurrency "
                            f"{p['concurrency']}, {p['protocol']} ({best[0]:.1f} img/s)")


# --------------------------------------------------------------------------- connections
class PerThreadConnection:
    """The connection API the load generators call, with one connection per client
    thread: tritonclient's HTTP client must not be shared between threads."""

    def __init__(self, url: str, protocol: str, *, api_key: str | None, timeout_s: float) -> None:
        self._args = (url, protocol, api_key, timeout_s)
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            from dinov2_triton.serve.triton_access import connect

            url, protocol, api_key, timeout_s = self._args
            conn = self._local.conn = connect(url, protocol, api_key=api_key, timeout_s=timeout_s)
            with self._lock:
                self._all.append(conn)
        return conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn(), name)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def _connect(url: str, settings: OverloadSettings, api_key: str | None, timeout_s: float):
    from dinov2_triton.serve.triton_access import connect

    if settings.protocol == "http":
        return PerThreadConnection(url, "http", api_key=api_key, timeout_s=timeout_s)
    return connect(url, "grpc", api_key=api_key, timeout_s=timeout_s)


# --------------------------------------------------------------------------- one target
def _inputs(kind: str, samples, batch: int = 1, start: int = 0) -> Callable[[Any], list]:
    """make_inputs for the load generators: the samples in turn, ``batch`` per request."""
    counter = itertools.count(start)
    n = len(samples.encoded) if kind == "ensemble" else len(samples.pixel_values)

    def make(conn) -> list:
        idx = [next(counter) % n for _ in range(batch)]
        if kind == "ensemble":
            return [conn.bytes_input("image", [samples.encoded[i] for i in idx])]
        return [conn.tensor_input("pixel_values", samples.pixel_values[idx])]
    return make


def _good_logits(conn, model: str, make_inputs) -> tuple[np.ndarray, str | None]:
    from dinov2_triton.client.classifier import response_model_version

    answer = conn.infer(model, make_inputs(conn))
    return answer.as_numpy("logits"), response_model_version(answer)


def batch_compute(conn, model: str) -> dict[int, tuple[int, int]]:
    """Triton's statistics of ``model``: {batch size: (executions, compute input + infer + output ns)}."""
    from dinov2_triton.serve.triton_access import TritonError

    try:
        stats = conn.inference_statistics(model)
    except TritonError:
        return {}
    out = {}
    for b in stats.get("batch_stats") or []:
        ns = sum(int((b.get(k) or {}).get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))
        out[int(b["batch_size"])] = (int((b.get("compute_infer") or {}).get("count", 0)), ns)
    return out


def burst_batches(before: dict[str, dict[int, tuple[int, int]]],
                  after: dict[str, dict[int, tuple[int, int]]]) -> tuple[float, str] | None:
    """The server's mean compute time of the largest batch each model ran between two
    :func:`batch_compute` readings, summed along the path; None when a model ran none."""
    total, parts = 0.0, []
    for model, now in after.items():
        ran = {b: (n - before.get(model, {}).get(b, (0, 0))[0], ns - before.get(model, {}).get(b, (0, 0))[1])
               for b, (n, ns) in now.items()}
        ran = {b: v for b, v in ran.items() if v[0] > 0}
        if not ran:
            return None
        b = max(ran)
        ms = ran[b][1] / ran[b][0] / 1e6
        total += ms
        parts.append(f"{model} batch {b}: {ms:.1f} ms (mean of {ran[b][0]})")
    return (total, "Triton's compute of the burst's largest batches: " + ", ".join(parts)) if parts else None


def _probe_batch_ms(conn, model: str, kind: str, samples, batch: int) -> tuple[float, str] | None:
    from dinov2_triton.serve.triton_access import TritonError

    make = _inputs(kind, samples, batch)
    times = []
    try:
        conn.infer(model, make(conn))     # warm
        for _ in range(PROBE_REQUESTS):
            t0 = time.perf_counter()
            conn.infer(model, make(conn))
            times.append(time.perf_counter() - t0)
    except TritonError:
        return None
    return max(times) * 1000.0, (f"the slowest of {PROBE_REQUESTS} sequential batch-{batch} requests before the "
                                 f"burst (median {statistics.median(times) * 1000:.1f} ms), client-timed")


def _check_input(kind: str, config: Mapping[str, Any], samples) -> str | None:
    """Why the samples cannot be sent to this model (None: they can)."""
    inp = (config.get("input") or [{}])[0]
    if kind == "ensemble":
        return None if samples.encoded else "no encoded images among the samples"
    dims = [int(d) for d in inp.get("dims", [])]
    have = list(samples.pixel_values.shape[1:])
    if len(dims) != len(have) or any(d not in (-1, h) for d, h in zip(dims, have)):
        return f"its input {inp.get('name')} has dims {dims}, the samples are {have}"
    return None


def check_target(conn, model: str, kind: str, samples, settings: OverloadSettings, *,
                 sweep: Mapping[str, Any] | None = None, probe_seconds: float = 1.5,
                 say: Callable[[str], None] = lambda m: None) -> OverloadTarget:
    """The burst against ``model`` (``kind`` ensemble: encoded images; classifier: pixel_values)
    and its three claims."""
    from dinov2_triton.qa.reliability import measure_capacity, scenario_overload
    from dinov2_triton.serve.triton_access import TritonError

    what = ("one encoded image per request" if kind == "ensemble"
            else f"pixel_values [1, {', '.join(str(d) for d in samples.pixel_values.shape[1:])}] per request")
    t = OverloadTarget(model=model, kind=kind, inputs=what, protocol=settings.protocol)
    try:
        config = conn.model_config(model)
        steps = ensemble_steps(config)
        t.policies = [served_policy(conn.model_config(m)) for m in steps] if steps else [served_policy(config)]
    except TritonError as exc:
        t.skipped = f"cannot read its served config: {exc}"
        return t
    why = _check_input(kind, config, samples)
    if why:
        t.skipped = why
        return t
    make = _inputs(kind, samples)
    try:
        before, v_before = _good_logits(conn, model, _inputs(kind, samples))
    except TritonError as exc:
        t.skipped = f"the good request before the burst failed: {exc}"
        return t

    max_batch = int(config.get("max_batch_size") or 1)
    cap = sweep_capacity(sweep, model)
    if cap is None:
        # enough clients to fill a batch on every instance of the slowest step (capped: on a few cores
        # more client threads measure the client)
        full = min(16, max(max(p.max_batch_size, 1) * (p.instances or 1) for p in t.policies))
        clients = sorted({max(1, full // 2), full})
        say(f"overload: {model}: capacity (closed loop at {' and '.join(map(str, clients))} clients, "
            f"{probe_seconds:g} s each)")
        cap = (measure_capacity(conn, model, make, concurrency=clients, seconds=probe_seconds),
               f"closed loop at {' and '.join(map(str, clients))} clients, {probe_seconds:g} s each "
               f"(no sweep point)")
    t.capacity_rps, t.capacity_source = round(cap[0], 2), cap[1]
    probe = _probe_batch_ms(conn, model, kind, samples, max_batch)
    if probe:
        t.batch_ms, t.batch_source = round(probe[0], 3), probe[1]
    timeouts = [p.timeout_ms for p in t.policies if p.timeout_ms]
    t.queue_timeout_ms = sum(timeouts) if timeouts else None

    # no timeout: the queue holds the whole burst; enough threads that it stays open loop
    wait_s = (t.queue_timeout_ms / 1000.0) if t.queue_timeout_ms else settings.seconds * settings.factor
    say(f"overload: {model}: {settings.factor:g}x {t.capacity_rps:.1f} req/s for up to {settings.seconds:g} s "
        f"(at most {settings.max_requests} requests, {settings.protocol})")
    stats0 = {p.model: batch_compute(conn, p.model) for p in t.policies}
    t0 = time.perf_counter()
    res = scenario_overload(conn, model, make, factor=settings.factor, seconds=settings.seconds,
                            capacity_rps=t.capacity_rps, queue_timeout_s=wait_s, max_requests=settings.max_requests)
    t.wall_s = round(time.perf_counter() - t0, 3)
    during = burst_batches(stats0, {p.model: batch_compute(conn, p.model) for p in t.policies})
    if during:
        t.burst_batch_ms, t.burst_batch_source = round(during[0], 3), during[1]
    t.rate_rps = round(res["offered_rps"], 2)
    t.seconds = round(min(settings.seconds, (settings.max_requests + 0.5) / res["offered_rps"]), 3)
    t.send_s = res["send_s"]
    t.achieved_rps = round(res["sent"] / res["send_s"], 2) if res["send_s"] else None
    t.client_threads, t.offered, t.accepted = res["client_threads"], res["sent"], res["ok"]
    t.shed, t.failed, t.messages = res["shed"], res["failed"], dict(res["errors"])
    t.p50_ms = None if res["p50_ms"] is None else round(res["p50_ms"], 2)
    t.p99_ms = None if res["p99_ms"] is None else round(res["p99_ms"], 2)
    try:
        after, v_after = _good_logits(conn, model, _inputs(kind, samples))
    except TritonError as exc:
        after, v_after = None, None
        t.same_logits = Claim(passed=False, detail=f"the good request after the burst failed: {exc}")
    t.versions = [v or "?" for v in (v_before, v_after)]
    return judge(t, before, after)


# --------------------------------------------------------------------------- the claims
def judge(t: OverloadTarget, before: np.ndarray | None, after: np.ndarray | None) -> OverloadTarget:
    """Fill in the three claims and the verdict of a measured target (pure: numbers in, words out)."""
    names = ", ".join(p.model for p in t.policies)
    shedding = [p for p in t.policies if p.has_policy]
    p99 = "-" if t.p99_ms is None else f"{t.p99_ms:.0f} ms"
    if not shedding:
        t.sheds = Claim(passed=None, detail=f"no queue policy in the served config of {names} (dynamic_batching has "
                                            f"no default_queue_policy): Triton queues every request, so nothing is "
                                            f"shed (shed {t.shed} of {t.offered}); latency grows instead "
                                            f"(accepted p99 {p99})")
    elif t.shed == 0:
        t.sheds = Claim(passed=False, detail=f"nothing shed: {t.offered} requests sent at {t.achieved_rps} req/s "
                                             f"(asked {t.rate_rps}, {_factor_text(t)}), failed {t.failed}: the "
                                             f"burst did not overload the server")
    else:
        top = max(t.messages, key=t.messages.get) if t.messages else ""
        t.sheds = Claim(passed=t.failed == 0,
                        detail=f"shed {t.shed} of {t.offered} ({SHED_WORDS}, \"{top}\"), accepted {t.accepted}, "
                               f"failed {t.failed}")
    unbounded = [p.model for p in t.policies if not p.timeout_ms]
    if t.queue_timeout_ms is None:
        t.p99_bounded = Claim(passed=None, detail=f"no queue timeout in the served config of {names}: nothing bounds "
                                                  f"the queueing (accepted p99 {p99})")
    elif t.p99_ms is None:
        t.p99_bounded = Claim(passed=None, detail="no request was accepted")
    elif t.batch_ms is None:
        t.p99_bounded = Claim(passed=None, detail=f"accepted p99 {p99}; no batch service time was measured")
    else:
        batch, which = t.one_batch_ms()
        t.bound_ms = round(t.queue_timeout_ms + batch, 2)
        ok = t.p99_ms <= t.bound_ms
        note = f" ({', '.join(unbounded)}: no queue timeout, not in the bound)" if unbounded else ""
        t.p99_bounded = Claim(passed=ok, detail=f"accepted p99 {t.p99_ms:.1f} ms {'<=' if ok else '>'} "
                                                f"{t.queue_timeout_ms:g} ms queue timeout{note} + "
                                                f"{batch:.1f} ms one batch ({which}) = {t.bound_ms:.1f} ms "
                                                f"({'margin' if ok else 'over by'} "
                                                f"{abs(t.bound_ms - t.p99_ms):.1f} ms)")
    if before is not None and after is not None:
        same = before.shape == after.shape and bool(np.array_equal(before, after))
        diff = float(np.max(np.abs(before - after))) if before.shape == after.shape else None
        t.logits_max_abs_diff = diff
        if len(set(t.versions)) > 1:
            t.same_logits = Claim(passed=None, detail=f"version {t.versions[0]} answered before and "
                                                      f"{t.versions[1]} after: not the same served model")
        else:
            t.same_logits = Claim(passed=same, detail=(
                f"identical ({before.size} values, tolerance 0; version {t.versions[0]} before and after)" if same
                else f"differ: shapes {list(before.shape)} / {list(after.shape)}, max |diff| {diff}"))
    claims = (t.sheds, t.p99_bounded, t.same_logits)
    t.passed = None if t.sheds.passed is None else all(c.passed is not False for c in claims)
    return t


def _factor_text(t: OverloadTarget) -> str:
    return f"{t.rate_rps / t.capacity_rps:.1f}x the capacity {t.capacity_rps} req/s" if (
        t.rate_rps and t.capacity_rps) else "capacity unknown"


def problems(check: OverloadCheck) -> list[str]:
    """One line per target that did not pass: a FAILed claim, no queue policy, not measured."""
    out = []
    for t in check.targets:
        if t.skipped:
            out.append(f"{t.model}: not measured: {t.skipped}")
            continue
        if t.sheds.passed is None:
            out.append(f"{t.model}: {t.sheds.detail}")
        for name, c in (("sheds", t.sheds), ("p99 <= timeout + one batch", t.p99_bounded),
                        ("same logits", t.same_logits)):
            if c.passed is False:
                out.append(f"{t.model}: {name} FAIL: {c.detail}")
    return out


# --------------------------------------------------------------------------- the check
def run_overload_check(url: str, samples, settings: OverloadSettings | Mapping[str, Any] | None = None, *,
                       ensemble: str = "dinov2", sweep: Mapping[str, Any] | None = None,
                       api_key: str | None = None, probe_seconds: float = 1.5,
                       say: Callable[[str], None] = lambda m: None) -> OverloadCheck:
    """The check against the server at ``url`` (host:port of ``settings.protocol``; loopback
    only): ``ensemble`` with encoded images, then the classifier its served config calls.
    ``sweep``: the bench run's perf_analyzer section (the capacity); without it the
    capacity is measured here. Server trouble is recorded per target, never raised."""
    from dinov2_triton.bench.targets import LOCAL_HOSTS, host_port
    from dinov2_triton.serve.triton_access import TritonError

    st = settings if isinstance(settings, OverloadSettings) else OverloadSettings(**dict(settings or {}))
    check = OverloadCheck(settings=st, url=url,
                          load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    host, _ = host_port(url)
    if host not in LOCAL_HOSTS:
        check.summary = f"not run: {url} is not on loopback (a burst over capacity is only sent to a local server)"
        check.problems = [check.summary]
        return check
    timeout_s = 60.0 + st.max_requests / 5.0       # a queue without a timeout drains the whole burst
    conn = _connect(url, st, api_key, timeout_s)
    try:
        targets: list[tuple[str, str]] = [(ensemble, "ensemble")]
        try:
            classifier = logits_step(conn.model_config(ensemble))
            if classifier:
                targets.append((classifier, "classifier"))
        except TritonError as exc:
            check.targets.append(OverloadTarget(model=ensemble, kind="ensemble", protocol=st.protocol,
                                                skipped=f"not served: {exc}"))
            targets = []
        for model, kind in targets:
            check.targets.append(check_target(conn, model, kind, samples, st, sweep=sweep,
                                              probe_seconds=probe_seconds, say=say))
    finally:
        conn.close()
    check.problems = problems(check)
    verdicts = [t.passed for t in check.targets]
    check.passed = (False if False in verdicts else None if (None in verdicts or not verdicts) else True)
    check.summary = summary(check)
    return check


def summary(check: OverloadCheck) -> str:
    """One line: each target's verdict and shed counts."""
    words = {True: "PASS", False: "FAIL", None: "no verdict"}
    parts = []
    for t in check.targets:
        if t.skipped:
            parts.append(f"{t.model} not measured")
        elif t.sheds.passed is None:
            parts.append(f"{t.model} no queue policy (nothing shed)")
        else:
            parts.append(f"{t.model} {words[t.passed]} (shed {t.shed}/{t.offered}, p99 "
                         f"{'-' if t.p99_ms is None else f'{t.p99_ms:.0f}'} ms, bound "
                         f"{'-' if t.bound_ms is None else f'{t.bound_ms:.0f}'} ms)")
    return f"overload check {words[check.passed]}: " + "; ".join(parts)


def strict_errors(check: OverloadCheck) -> list[str]:
    """The run errors of a strict check (``settings.strict``): every problem; [] otherwise."""
    return [f"overload check: {p}" for p in check.problems] if check.settings.strict else []
