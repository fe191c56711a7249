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
def read_access_log(path: str | os.PathLike) -> dict[str, dict]:
    """``{request_id: entry}`` from the balancer's access log (dinov2_triton.serve.balancer.parse_access_line)."""
    from dinov2_triton.serve.balancer import parse_access_line

    entries = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        e = parse_access_line(line)
        if e is not None and e["request_id"] not in ("-", ""):
            entries[e["request_id"]] = e
    return entries


def analyse_kill(outcomes: Sequence[Outcome], entries: dict[str, dict], *, killed: str, kill_time: float,
                 until: float | None = None, slack_s: float = 0.005) -> dict[str, Any]:
    """Sort the requests of a kill by what the client saw and the balancer logged.

    A failed request counts as *in flight on the killed replica* when it was
    outstanding at the kill (sent before, answered after, ``slack_s`` for
    clock resolution) and the balancer either logged it on the killed
    replica or logged nothing for it (HAProxy 2.6 writes no line for an
    HTTP/2 stream it resets with REFUSED_STREAM when the replica's
    connection dies). Every other failure is listed in ``failed_elsewhere``:
    the claim "only the requests in flight on the killed replica fail" holds
    when it is empty. ``until``: the restart (requests after it are not
    about the kill)."""
    until = until if until is not None else float("inf")
    failed = [o for o in outcomes if not o.ok]
    in_flight, unlogged, elsewhere = [], 0, []
    for o in failed:
        e = entries.get(o.request_id)
        outstanding = o.start <= kill_time + slack_s and o.end >= kill_time - slack_s
        if outstanding and (e is None or e["server"] == killed):
            in_flight.append(o.request_id)
            unlogged += e is None
        else:
            elsewhere.append({"request_id": o.request_id, "error": o.error,
                              "log": {k: e[k] for k in ("server", "status", "termination", "retries")} if e else None,
                              "sent_after_kill_s": round(o.start - kill_time, 4)})
    window = [e for e in entries.values() if kill_time - slack_s < e["start_time"] < until]
    # after the kill a request routed to the dead replica either failed there (logged on it)
    # or found its connection refused and was resent to another replica (logged there with retries > 0)
    routed = [e["start_time"] - kill_time for e in window if e["server"] == killed or e["retries"] > 0]
    return {"sent": len(outcomes), "ok": len(outcomes) - len(failed), "failed": len(failed),
            "outstanding_at_kill": sum(1 for o in outcomes if o.start <= kill_time <= o.end),
            "failed_in_flight_on_killed": len(in_flight), "failed_in_flight_unlogged": unlogged,
            "failed_elsewhere": elsewhere,
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
    load = SteadyLoad(rs.url(protocol), protocol, model, input_name=name, shape=shape, datatype=dtype,
                      concurrency=concurrency, api_key=None, tag=f"{protocol}{os.getpid()}").start()
    result: dict[str, Any] = {"model": model, "protocol": protocol, "concurrency": concurrency,
                              "batch_size": batch_size, "replicas": len(rs.replicas), "killed": killed}
    try:
        time.sleep(warmup_s)
        sent, failed = load.counts()
        if sent == 0 or failed:
            raise RuntimeError(f"the load did not run cleanly before the kill ({sent} sent, {failed} failed)")
        backend = BACKEND_GRPC if protocol == "grpc" else BACKEND_HTTP
        result["on_killed_before_kill"] = rs.balancer.server_states(backend)[killed].current
        kill_wall = time.time()
        t_kill = rs.kill_replica(victim)
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
    result.update(analyse_kill(outcomes, read_access_log(rs.balancer.log_file), killed=killed,
                               kill_time=kill_wall, until=restart_wall))
    return result


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


if __name__ == "__main__":
    sys.exit(main())

