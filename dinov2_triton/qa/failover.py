"""Failover and scale-out through the load balancer, measured.

``dinov2-triton qa failover --repository model_repository --model dinov2_onnx``
(writes reports/failover-<run id>/failover.{json,md}; run it on a quiet
machine: the replicas, the balancer and the load share the same cores)

1. **Failover.** Two replicas behind HAProxy (dinov2_triton.serve.replicas), steady
   closed-loop load through the balancer (:class:`SteadyLoad`: ``concurrency``
   threads, each with its own connection, one request after the other, each
   stamped with an ``x-request-id`` header). One replica is killed with
   SIGKILL. Reported: requests sent, failed, and which failed requests were
   in flight on the killed replica at the kill (the balancer's access log
   names the replica, the request's start and its duration for every
   request id); the time until the balancer took the replica out of
   rotation (its admin socket, polled every 10 ms) and the last request it
   still routed there; then the killed replica is started again and the
   times until it was ready, back in rotation and served a request.
2. **Scale-out on this machine.** perf_analyzer (the same runner as
   ``dinov2-triton bench``) through the balancer against 1 replica x all CPUs and
   against N replicas x 1 CPU each, same model, batch size and concurrency.

Inputs are random tensors of the model's input shape (the numbers measured
here are about serving, not accuracy: compute does not depend on pixel
values). Everything runs on loopback ports picked free at start.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("dinov2_triton.qa.failover")


# --------------------------------------------------------------------------- load
@dataclass
class Outcome:
    request_id: str
    start: float       # wall clock (time.time()) when the client sent it
    end: float
    ok: bool
    error: str | None = None


class SteadyLoad:
    """Closed-loop load: ``concurrency`` threads send requests back to back
    through ``url`` until :meth:`stop`. Every request carries a unique
    ``x-request-id`` header (the balancer logs it)."""

    def __init__(self, url: str, protocol: str, model: str, *, input_name: str, shape: Sequence[int],
                 datatype: str = "FP32", concurrency: int = 4, api_key: str | None = None,
                 timeout_s: float = 60.0, tag: str = "load") -> None:
        self.url, self.protocol, self.model = url, protocol, model
        self.input_name, self.shape, self.datatype = input_name, list(shape), datatype
        self.concurrency, self.api_key, self.timeout_s, self.tag = concurrency, api_key, timeout_s, tag
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _worker(self, k: int) -> None:
        import numpy as np

        from dinov2_triton.serve.balancer import REQUEST_ID_HEADER
        from dinov2_triton.serve.triton_access import ServerUnreachable, TritonError, connect

        x = np.random.default_rng(k).standard_normal(self.shape).astype(np.float32)
        n = 0
        conn = connect(self.url, self.protocol, api_key=self.api_key, timeout_s=self.timeout_s)
        base = dict(conn.headers)
        inputs = [conn.tensor_input(self.input_name, x, self.datatype)]
        try:
            while not self._stop.is_set():
                rid = f"{self.tag}-{k}-{n}"
                n += 1
                # one connection per thread: its headers are this thread's alone
                conn.headers = {**base, REQUEST_ID_HEADER: rid}
                t0 = time.time()
                try:
                    conn.infer(self.model, inputs)
                    outcome = Outcome(rid, t0, time.time(), True)
                except TritonError as exc:
                    outcome = Outcome(rid, t0, time.time(), False, str(exc)[:300])
                    if isinstance(exc, ServerUnreachable):
                        time.sleep(0.05)  # the balancer itself is gone: do not spin
                with self._lock:
                    self.outcomes.append(outcome)
        finally:
            conn.close()

    def start(self) -> "SteadyLoad":
        self._threads = [threading.Thread(target=self._worker, args=(k,), daemon=True)
                         for k in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self.outcomes), sum(1 for o in self.outcomes if not o.ok)

    def stop(self, timeout: float = 120.0) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        with self._lock:
            return list(self.outcomes)


# --------------------------------------------------------------------------- analysis
def read_access_lines(path: str | os.PathLike) -> list[dict]:
    """Every request line of the balancer's access log (dinov2_triton.serve.balancer.parse_access_line), in order."""
    from dinov2_triton.serve.balancer import parse_access_line

    lines = (parse_access_line(line) for line in Path(path).read_text(errors="replace").splitlines())
    return [e for e in lines if e is not None and e["request_id"] not in ("-", "")]


def read_access_log(path: str | os.PathLike) -> dict[str, dict]:
    """``{request_id: entry}`` from the balancer's access log (the last line of an id wins)."""
    return {e["request_id"]: e for e in read_access_lines(path)}


#: the first termination flag of an access-log line when the server side ended the request (HAProxy: S = server)
_SERVER_ABORT = "S"


def analyse_kill(outcomes: Sequence[Outcome], log_lines: Sequence[dict], *, killed: str, kill_time: float,
                 until: float | None = None,
                 server_counts: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Sort the failed requests of a kill by what the balancer says about each.

    * A failed request with an access-log line was routed to the replica the
      line names: *in flight on the killed replica* when that is ``killed``,
      the line says the server side ended it (termination flag ``S``: its
      connection died, it was not an answer of the replica) and it reached
      the balancer before the restart (``until``); a failure elsewhere
      otherwise.
    * A failed request with no log line: HAProxy writes none for a request
      whose server connection closed before the server answered (it resets
      the HTTP/2 stream with REFUSED_STREAM, or closes the HTTP/1.1 client
      connection, so that the client may retry; haproxy/haproxy#3414). Which
      server it was sent to comes from the balancer's own counts over the
      whole run (``server_counts``: ``{server: (requests assigned, requests
      redispatched to another server)}``, show stat's stot and wredis after
      the load minus before it): a server's requests without a log line are
      those assigned to it, less its log lines, less those resent elsewhere.
      The killed replica's explain as many unlogged failures; any more, or
      any request without a log line on another replica (or no counts), make
      them failures elsewhere.

    ``log_lines``: the balancer's access-log lines (lines of other runs are
    ignored). Client-side timestamps never decide: a request sent a few
    milliseconds after the kill was asked for may still reach the replica
    before it dies (seen: 20-30 ms under load). ``failed_elsewhere`` empty is
    the claim "only the requests in flight on the killed replica fail"."""
    until = until if until is not None else float("inf")
    ids = {o.request_id for o in outcomes}
    lines = [e for e in log_lines if e["request_id"] in ids]  # the log outlives a run
    entries = {e["request_id"]: e for e in lines}
    failed = sorted((o for o in outcomes if not o.ok), key=lambda o: o.start)
    in_flight, elsewhere, unlogged = [], [], []

    def other(o: Outcome, e: dict | None, why: str) -> dict:
        return {"request_id": o.request_id, "error": o.error, "why": why,
                "log": {k: e[k] for k in ("server", "status", "termination", "retries")} if e else None,
                "sent_after_kill_s": round(o.start - kill_time, 4)}

    for o in failed:
        e = entries.get(o.request_id)
        if e is None:
            unlogged.append(o)
        elif e["server"] != killed:
            elsewhere.append(other(o, e, f"routed to {e['server']}"))
        elif e["start_time"] >= until:
            elsewhere.append(other(o, e, f"on {killed} after its restart"))
        elif not e["termination"].startswith(_SERVER_ABORT):
            elsewhere.append(other(o, e, f"{killed} answered it (status {e['status']}), it did not die with it"))
        else:
            in_flight.append(o.request_id)
    logged: dict[str, int] = {}
    for e in lines:
        logged[e["server"]] = logged.get(e["server"], 0) + 1
    silent = {srv: assigned - logged.get(srv, 0) - resent for srv, (assigned, resent) in (server_counts or {}).items()}
    silent_elsewhere = {srv: n for srv, n in silent.items() if srv != killed and n}
    explained = 0 if server_counts is None or silent_elsewhere else max(0, silent.get(killed, 0))
    for k, o in enumerate(unlogged):
        if k < explained:
            in_flight.append(o.request_id)
        elif server_counts is None:
            elsewhere.append(other(o, None, "no log line and no request counts from the balancer"))
        elif silent_elsewhere:
            where = ", ".join(f"{srv} ({n})" for srv, n in sorted(silent_elsewhere.items()))
            elsewhere.append(other(o, None, f"no log line, and the balancer's counts leave requests without a log "
                                            f"line on {where}"))
        else:
            elsewhere.append(other(o, None, f"no log line, beyond the {explained} requests without one that the "
                                            f"balancer sent to {killed}"))
    window = [e for e in entries.values() if kill_time < e["start_time"] < until]
    # after the kill a request routed to the dead replica either failed there (logged on it)
    # or found its connection refused and was resent to another replica (logged there with retries > 0)
    routed = [e["start_time"] - kill_time for e in window if e["server"] == killed or e["retries"] > 0]
    return {"sent": len(outcomes), "ok": len(outcomes) - len(failed), "failed": len(failed),
            "outstanding_at_kill": sum(1 for o in outcomes if o.start <= kill_time <= o.end),
            "failed_in_flight_on_killed": len(in_flight),
            "failed_in_flight_unlogged": min(len(unlogged), explained),
            "failed_elsewhere": elsewhere,
            "unlogged_by_server": silent,
            "routed_to_killed_after_kill": len(routed),
            "last_routed_to_killed_s": round(max(routed), 4) if routed else 0.0,
            "redispatched_ok": sum(1 for e in window if e["retries"] > 0 and e["status"] == 200)}


# --------------------------------------------------------------------------- scenarios
def model_input(rs, model: str) -> tuple[str, list[int], str, int]:
    """(input name, dims without batch, Triton datatype, max_batch_size) of ``model``, through the balancer."""
    with rs.connect("http") as conn:
        cfg = conn.model_config(model)
    inputs = cfg["input"]
    if len(inputs) != 1 or inputs[0]["data_type"] in ("TYPE_STRING", "BYTES"):
        raise ValueError(f"model '{model}': the failover load sends one tensor input; pick a classifier "
                         f"variant (e.g. dinov2_onnx), not {[i['name'] for i in inputs]}")
    return inputs[0]["name"], [int(d) for d in inputs[0]["dims"]], inputs[0]["data_type"][5:], cfg["max_batch_size"]


def models_with_steps(repository: str | os.PathLike, model: str) -> list[str]:
    """``model`` and, for an ensemble, the models it calls (they load with it)."""
    from dinov2_triton.serve.model_plan import read_model_config

    out, todo = [], [model]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.append(name)
        path = Path(repository) / name / "config.pbtxt"
        if not path.is_file():
            raise ValueError(f"model '{name}' is not in {repository} (no {path})")
        cfg = read_model_config(path)
        todo += [s.model_name for s in cfg.ensemble_scheduling.step]
    return out


def _wait_first_success(log_file: Path, server: str, after: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in read_access_log(log_file).values():
            if e["server"] == server and e["status"] == 200 and e["start_time"] >= after:
                return e["start_time"]
        time.sleep(0.05)
    return None


def run_failover(rs, model: str, *, protocol: str = "grpc", concurrency: int = 4, batch_size: int = 1,
                 warmup_s: float = 3.0, after_kill_s: float = 3.0, after_restart_s: float = 3.0,
                 victim: int = 0, restart: bool = True, restart_timeout: float = 180.0) -> dict[str, Any]:
    """Kill replica ``victim`` of the running set ``rs`` under steady load; see the module docstring."""
    name, dims, dtype, max_batch = model_input(rs, model)
    if max_batch and batch_size > max_batch:
        raise ValueError(f"--batch-size {batch_size} > max_batch_size {max_batch} of '{model}'")
    shape = ([batch_size] if max_batch else []) + dims
    from dinov2_triton.serve.balancer import BACKEND_GRPC, BACKEND_HTTP

    killed = rs.name(victim)
    restart_wall = None
    backend = BACKEND_GRPC if protocol == "grpc" else BACKEND_HTTP
    before = rs.balancer.server_states(backend)  # the balancer's counts before the first request of this run
    # request ids unique to this run: the balancer's log outlives it (a set is killed more than once)
    load = SteadyLoad(rs.url(protocol), protocol, model, input_name=name, shape=shape, datatype=dtype,
                      concurrency=concurrency, api_key=None, tag=f"{protocol}-{uuid.uuid4().hex[:8]}").start()
    result: dict[str, Any] = {"model": model, "protocol": protocol, "concurrency": concurrency,
                              "batch_size": batch_size, "replicas": len(rs.replicas), "killed": killed}
    try:
        time.sleep(warmup_s)
        sent, failed = load.counts()
        if sent == 0 or failed:
            raise RuntimeError(f"the load did not run cleanly before the kill ({sent} sent, {failed} failed)")
        result["on_killed_before_kill"] = rs.balancer.server_states(backend)[killed].current
        t_kill = rs.kill_replica(victim)
        kill_wall = time.time() - (time.monotonic() - t_kill)  # the SIGKILL, on the wall clock of the log
        while rs.balancer.server_states(backend)[killed].up:
            if time.monotonic() - t_kill > 60:
                raise RuntimeError(f"the balancer kept {killed} in rotation 60 s after it was killed")
            time.sleep(0.01)
        result["out_of_rotation_s"] = round(time.monotonic() - t_kill, 4)
        time.sleep(after_kill_s)
        with load._lock:
            result["survivor_ok_after_kill"] = sum(1 for o in load.outcomes if o.ok and o.start > kill_wall + 0.5)
        restart_wall = time.time()
        if restart:
            t0, wall0 = time.monotonic(), restart_wall
            rs.restart_replica(victim, timeout=restart_timeout)
            result["restart_ready_s"] = round(time.monotonic() - t0, 3)
            rs.balancer.wait_status(killed, up=True, timeout=60, backends=(backend,))
            result["back_in_rotation_s"] = round(time.monotonic() - t0, 3)
            first = _wait_first_success(rs.balancer.log_file, killed, wall0, timeout=30)
            result["first_request_served_s"] = round(first - wall0, 3) if first else None
            time.sleep(after_restart_s)
    finally:
        outcomes = load.stop()
    lines = _complete_log(rs.balancer.log_file, outcomes)
    after = rs.balancer.server_states(backend)
    counts = {srv: (after[srv].total - before[srv].total, after[srv].redispatched - before[srv].redispatched)
              for srv in after if srv in before}
    result.update(analyse_kill(outcomes, lines, killed=killed, kill_time=kill_wall, until=restart_wall,
                               server_counts=counts))
    return result


def _complete_log(log_file: Path, outcomes: Sequence[Outcome], timeout: float = 10.0) -> list[dict]:
    """The access log once it holds a line for every request that succeeded
    (HAProxy writes a line when a stream ends, a moment after the client has
    its answer); raises if lines are still missing after ``timeout``."""
    ok = {o.request_id for o in outcomes if o.ok}
    deadline = time.monotonic() + timeout
    while True:
        lines = read_access_lines(log_file)
        missing = ok - {e["request_id"] for e in lines}
        if not missing:
            return lines
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log_file}: no access-log line for {len(missing)} answered requests after "
                               f"{timeout:.0f} s (e.g. {sorted(missing)[:3]})")
        time.sleep(0.05)


def compare_layouts(repository: str | os.PathLike, model: str, *, layouts: Sequence[int] = (1, 2),
                    protocol: str = "grpc", batch_size: int = 1, concurrency: int = 4, log_dir: Path,
                    settings=None, cpus: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """perf_analyzer through the balancer for each number of replicas in
    ``layouts`` (the CPUs split evenly between them)."""
    from dinov2_triton.bench import perf_analyzer as pa
    from dinov2_triton.bench.input_data import shape_args, synthetic_samples, write_input_data
    from dinov2_triton.serve import local_server as ls
    from dinov2_triton.serve import replicas as rp

    settings = settings or pa.MeasurementSettings(collect_metrics=False)
    rows = []
    for n in layouts:
        http, grpc, stats = ls.find_free_ports(3)
        rs = rp.start_replica_set(repository, n, http_port=http, grpc_port=grpc, metrics_port=stats,
                                  models=models_with_steps(repository, model), log_dir=log_dir / f"x{n}",
                                  record_file=None, cpus=cpus)
        threads = len(rs.shares[0])
        row = {"layout": f"{n} replica{'s' if n > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
               "replicas": n, "threads_per_replica": threads}
        try:
            with rs.connect("http") as conn:
                cfg = conn.model_config(model)
                version = next(m["version"] for m in conn.repository_index()
                               if m["name"] == model and m["state"] == "READY")
            _, dims, _, _ = model_input(rs, model)
            # The version explicitly (-x): perf_analyzer reads server statistics before and after
            # each window, and through a balancer the two answers may come from different replicas;
            # without -x it failed with "failed to find the requested model version" (measured).
            settings_n = dataclasses.replace(settings, extra_args=tuple(settings.extra_args) + ("-x", version))
            samples = synthetic_samples(dims, n=8)
            data = write_input_data(log_dir / f"x{n}" / "input_data.json", cfg, samples)
            point = pa.run_point(model=model, url=rs.url(protocol), protocol=protocol, batch_size=batch_size,
                                 concurrency=concurrency, settings=settings_n, input_data=data,
                                 shapes=shape_args(cfg, samples), out_dir=log_dir / f"x{n}")
            m = point["metrics"]
            row.update(infer_per_s=m["throughput_infer_per_s"], img_per_s=m["throughput_infer_per_s"] * batch_size,
                       p50_ms=m["p50_latency_us"] / 1000, p99_ms=m["p99_latency_us"] / 1000,
                       command=point["command"])
        except pa.PerfAnalyzerError as exc:  # one layout's failure is its row, the others still run
            row["error"] = str(exc)
        finally:
            rs.stop()
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report
def cpu_description() -> str:
    """lscpu's model name and the SIMD flags that decide CPU inference speed."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile"]
    have = " ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)
    return f"{model}, {os.cpu_count()} CPUs, flags: {have}"


def markdown(result: dict[str, Any]) -> str:
    f = result["failover"]
    lines = [f"Failover: {f['replicas']} replicas, SIGKILL {f['killed']} under {f['concurrency']} concurrent "
             f"{f['protocol']} requests (model {f['model']}, batch {f['batch_size']}); {result['cpu']}", "",
             "| measure | value |", "|---|---|"]
    rows = [("requests sent", f["sent"]), ("requests failed", f["failed"]),
            ("failed that were in flight on the killed replica", f"{f['failed_in_flight_on_killed']} "
             f"(balancer: {f['on_killed_before_kill']} in flight there just before the kill; "
             f"{f['outstanding_at_kill']} outstanding in all)"),
            ("failed otherwise", len(f["failed_elsewhere"])),
            ("resent by the balancer after a failed connection, then OK", f["redispatched_ok"]),
            ("kill -> out of rotation (balancer)", f"{f['out_of_rotation_s'] * 1000:.0f} ms"),
            ("requests routed to the dead replica after the kill (resent or failed)",
             f"{f['routed_to_killed_after_kill']}, the last {f['last_routed_to_killed_s'] * 1000:.0f} ms after it")]
    if "restart_ready_s" in f:
        rows += [("restart -> ready with its models", f"{f['restart_ready_s']:.1f} s"),
                 ("restart -> back in rotation", f"{f['back_in_rotation_s']:.1f} s"),
                 ("restart -> first request served by it",
                  f"{f['first_request_served_s']:.1f} s" if f["first_request_served_s"] is not None else "none")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if result.get("layouts"):
        lines += ["", f"Throughput through the balancer (perf_analyzer, {f['protocol']}, batch "
                      f"{result['layout_batch_size']}, concurrency {result['layout_concurrency']}):", "",
                  "| layout | infer/s | img/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['layout']} | {r['infer_per_s']:.1f} | {r['img_per_s']:.1f} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} |" if "error" not in r else f"| {r['layout']} | FAILED: {r['error'][:160]} ||||"
                  for r in result["layouts"]]
    return "\n".join(lines)


PROG = "dinov2-triton qa failover"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                epilog="Exit code: 0 no failure outside the killed replica's in-flight requests and "
                                       "every layout measured, 1 bad input or a server error, 2 failures elsewhere, "
                                       "3 a layout failed.")
    p.add_argument("--repository", default="model_repository", help="model repository (default: %(default)s)")
    p.add_argument("--model", default="dinov2_onnx", help="classifier variant to load (default: %(default)s)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default: %(default)s")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="default: %(default)s")
    p.add_argument("--replicas", type=int, default=2, help="replicas for the failover (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0, help="load before the kill, after it and after "
                                                             "the restart (default: %(default)s)")
    p.add_argument("--no-layouts", action="store_true", help="skip the 1-replica vs N-replica throughput")
    p.add_argument("--stability-pct", type=float, default=20.0,
                   help="perf_analyzer stability threshold (default: %(default)s)")
    p.add_argument("--window-ms", type=int, default=10000,
                   help="perf_analyzer window; 2 cores need ~10 s (default: %(default)s)")
    p.add_argument("--out", default=None, help="folder for failover.json, failover.md and the logs "
                                               "(default: reports/failover-<run id>)")
    return p


def main(argv=None, *, prog: str | None = None) -> int:
    args = build_parser(prog or PROG).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[failover] %(message)s")
    from dinov2_triton.bench import perf_analyzer as pa
    from dinov2_triton.core.artifact_io import atomic_write_json, atomic_write_text, new_run_id, utc_now
    from dinov2_triton.serve import local_server as ls
    from dinov2_triton.serve import replicas as rp
    from dinov2_triton.serve.errors import ServeError

    out = Path(args.out or f"reports/failover-{new_run_id()}")
    result: dict[str, Any] = {"created": utc_now(), "cpu": cpu_description(), "repository": str(args.repository),
                              "host_load_1min": os.getloadavg()[0]}
    try:
        models = models_with_steps(args.repository, args.model)
        http, grpc, stats = ls.find_free_ports(3)
        with rp.start_replica_set(args.repository, args.replicas, http_port=http, grpc_port=grpc,
                                  metrics_port=stats, models=models, log_dir=out / "failover",
                                  record_file=None) as rs:
            result["failover"] = run_failover(rs, args.model, protocol=args.protocol, concurrency=args.concurrency,
                                              batch_size=args.batch_size, warmup_s=args.seconds,
                                              after_kill_s=args.seconds, after_restart_s=args.seconds)
        if not args.no_layouts:
            settings = pa.MeasurementSettings(window_ms=args.window_ms, stability_pct=args.stability_pct,
                                              collect_metrics=False)
            result["layout_batch_size"], result["layout_concurrency"] = args.batch_size, args.concurrency
            result["layouts"] = compare_layouts(args.repository, args.model, layouts=(1, args.replicas),
                                                protocol=args.protocol, batch_size=args.batch_size,
                                                concurrency=args.concurrency, log_dir=out / "layouts",
                                                settings=settings)
    except (ServeError, ValueError, RuntimeError, pa.PerfAnalyzerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    atomic_write_json(out / "failover.json", result)
    text = markdown(result)
    failed_layouts = [r["layout"] for r in result.get("layouts", []) if "error" in r]
    atomic_write_text(out / "failover.md", text + "\n")
    print(text)
    print(f"\n(written to {out}/failover.json and failover.md)")
    return 2 if result["failover"]["failed_elsewhere"] else (3 if failed_layouts else 0)
