"""N local Triton replicas behind one load balancer: ``dinov2-triton serve start --replicas N``.

Each replica is the single local server of dinov2_triton.serve.local_server on its own
loopback ports, pinned to its share of this machine's CPUs (``taskset``;
:func:`cpu_shares` splits them evenly, never overlapping) with its models'
intra-op thread pools sized to that share. HAProxy (dinov2_triton.serve.balancer) listens
on the addresses a single server would use, so the client, parity and perf
stages run unchanged against it.

Threads per replica: the thread counts in the repository's config.pbtxt
files were sized for the whole host by the export (its cores shared among
the model's instances). Each replica therefore starts with no model and
loads every selected model through the model-repository API with its own
config plus the backend's thread parameters (``intra_op_thread_count`` for
onnxruntime, ``INTRA_OP_THREAD_COUNT`` for pytorch; inter-op 1) set to the
replica's CPU share divided among the model's instances (at least one), so
two replicas x two instances never run eight busy threads on two cores.
Ensembles are loaded after their steps.

One API key for the whole set (written once, 0600): a client holding it can
use the restricted APIs through the balancer, which reach ONE replica; load
or unload models at each replica's own address (``dinov2-triton serve status``).

Public API: :func:`start_replica_set` -> :class:`ReplicaSet` (``stop``,
``kill_replica``, ``restart_replica``, ``wait_in_rotation``, ``connect``),
:func:`stop_replica_set`, :func:`replica_set_status`, :func:`cpu_shares`.
The set's file is :class:`dinov2_triton.serve.replica_record.ReplicaSetRecord`.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dinov2_triton.serve import balancer as lb
from dinov2_triton.serve import local_server as ls
from dinov2_triton.serve.errors import ServeError
from dinov2_triton.serve.model_plan import ModelPlan, plan_models, read_model_config
from dinov2_triton.serve.replica_record import (
    DEFAULT_REPLICA_FILE,
    BalancerEntry,
    ReplicaEntry,
    ReplicaSetRecord,
    read_replica_set,
    write_replica_set,
)
from dinov2_triton.serve.triton_access import TritonConnection, TritonError, connect

log = logging.getLogger("dinov2_triton.serve")

#: (intra-op, inter-op) parameter names per backend, as the native backends read them
THREAD_PARAMETERS = {
    "onnxruntime": ("intra_op_thread_count", "inter_op_thread_count"),
    "pytorch": ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT"),
}
_PLATFORM_BACKEND = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}
#: backends whose compute is not worth a thread setting (decode/orchestration)
_NO_THREADS = {"python", "ensemble"}


# --------------------------------------------------------------------------- CPUs
def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_shares(n: int, cpus: Sequence[int] | None = None) -> list[list[int]]:
    """Split ``cpus`` (default: the ones this process may use) into ``n``
    contiguous, disjoint, as-even-as-possible shares."""
    cpus = sorted(cpus if cpus is not None else available_cpus())
    if n < 1:
        raise ServeError(f"--replicas must be at least 1, got {n}")
    if n > len(cpus):
        raise ServeError(f"--replicas {n} needs {n} CPUs (one share each); this process may use "
                         f"{len(cpus)}: {','.join(map(str, cpus))}")
    base, extra = divmod(len(cpus), n)
    shares, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        shares.append(cpus[start:start + size])
        start += size
    return shares


# --------------------------------------------------------------------------- loading
def _backend_of(cfg) -> str:
    return cfg.backend or _PLATFORM_BACKEND.get(cfg.platform, cfg.platform)


def _load_order(configs: dict) -> list[str]:
    """Models before the ensembles that call them (nested ensembles too)."""
    order, placed = [], set()
    pending = list(configs)
    while pending:
        progressed = False
        for name in list(pending):
            cfg = configs[name]
            steps = [s.model_name for s in cfg.ensemble_scheduling.step] if cfg.platform == "ensemble" else []
            if all(s in placed or s not in configs for s in steps):
                order.append(name)
                placed.add(name)
                pending.remove(name)
                progressed = True
        if not progressed:  # a cycle: let Triton say what is wrong with it
            order += pending
            break
    return order


def config_with_threads(cfg, threads: int) -> str | None:
    """JSON of ``cfg`` with the backend's thread parameters set to its share of
    ``threads`` (the replica's CPUs divided among the model's instances, at
    least one each); None when the backend has no such setting."""
    from google.protobuf import json_format

    names = THREAD_PARAMETERS.get(_backend_of(cfg))
    if names is None:
        return None
    cfg = type(cfg).FromString(cfg.SerializeToString())  # a copy: the caller's stays as read
    instances = sum(g.count or 1 for g in cfg.instance_group) or 1
    intra, inter = names
    for key, value in ((intra, max(1, threads // instances)), (inter, 1)):
        old = cfg.parameters[key].string_value if key in cfg.parameters else None
        if old not in (None, str(value)):
            log.info("model %s: %s %s -> %s for this replica's CPU share", cfg.name, key, old, value)
        cfg.parameters[key].string_value = str(value)
    return json_format.MessageToJson(cfg, preserving_proto_field_name=True)


def load_models(handle: ls.ServerHandle, models: Sequence[str], threads: int) -> dict[str, str]:
    """Load ``models`` on one replica with ``threads`` intra-op threads each;
    return ``{model: "READY" | "FAILED: <why>"}``."""
    repo = Path(handle.repository)
    configs = {m: read_model_config(repo / m / "config.pbtxt") for m in models}
    states = {}
    with handle.connect("http", timeout_s=300.0) as conn:
        for name in _load_order(configs):
            cfg = configs[name]
            override = config_with_threads(cfg, threads)
            if override is None and _backend_of(cfg) not in _NO_THREADS:
                log.warning("model %s (backend %s): no thread setting known; it uses the backend's default "
                            "on a %d-CPU share", name, _backend_of(cfg), threads)
            try:
                conn.load_model(name, config=override)
                states[name] = "READY" if conn.model_ready(name) else "FAILED: not ready after loading"
            except TritonError as exc:
                states[name] = f"FAILED: {exc}"
    return states


# --------------------------------------------------------------------------- the set
@dataclass
class ReplicaSet:
    """Replicas + balancer started by :func:`start_replica_set`."""

    repository: Path
    host: str
    plan: ModelPlan
    models: list                 # what every replica loads and the balancer checks
    failed: dict                 # selected models no replica could load -> why
    api_key: str = field(repr=False)
    api_key_file: Path = None
    balancer: lb.BalancerHandle = None
    replicas: list = field(default_factory=list)   # ServerHandle per replica
    shares: list = field(default_factory=list)     # CPU list per replica
    log_dir: Path = None
    record_file: Path | None = None
    exit_timeout_s: int | None = None

    # addresses a single server would have: the balancer's
    @property
    def url_http(self) -> str:
        return f"{ls._client_host(self.host)}:{self.balancer.http_port}"

    @property
    def url_grpc(self) -> str:
        return f"{ls._client_host(self.host)}:{self.balancer.grpc_port}"

    @property
    def url_stats(self) -> str:
        return f"http://{ls._client_host(self.host)}:{self.balancer.stats_port}/stats"

    def url(self, protocol: str) -> str:
        return self.url_grpc if protocol == "grpc" else self.url_http

    def connect(self, protocol: str = "http", *, with_key: bool = True, timeout_s: float = 30.0
                ) -> TritonConnection:
        """A connection through the balancer."""
        return connect(self.url(protocol), protocol, api_key=self.api_key if with_key else None,
                       timeout_s=timeout_s)

    def name(self, i: int) -> str:
        return f"r{i}"

    # ----------------------------------------------------------------- replicas
    def _start(self, i: int, ports: tuple[int, int, int]) -> ls.ServerHandle:
        kwargs = {} if self.exit_timeout_s is None else {"exit_timeout_s": self.exit_timeout_s}
        handle = ls.start_server(
            self.repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
            host="127.0.0.1", load_models=[], log_file=self.log_dir / f"triton-{self.name(i)}.log",
            api_key=self.api_key, api_key_file=self.api_key_file,
            pid_file=self.log_dir / f"triton-{self.name(i)}.pid", cpus=self.shares[i], **kwargs)
        return handle

    def _ready(self, handle: ls.ServerHandle, i: int, timeout: float) -> dict[str, str]:
        handle.wait_ready(timeout=timeout)
        states = load_models(handle, self.models, threads=len(self.shares[i]))
        handle.plan = ModelPlan(load=list(self.models), skipped=dict(self.plan.skipped))
        return states

    def kill_replica(self, i: int) -> float:
        """SIGKILL replica ``i`` (and its model stubs); returns the time.monotonic() of the kill."""
        import psutil

        handle = self.replicas[i]
        try:
            stubs = psutil.Process(handle.pid).children(recursive=True)
        except psutil.Error:
            stubs = []
        t = time.monotonic()
        os.kill(handle.pid, signal.SIGKILL)
        if handle.process is not None:
            handle.process.wait(timeout=10)
        for stub in stubs:
            try:
                stub.kill()
            except psutil.Error:
                pass
        return t

    def restart_replica(self, i: int, timeout: float = 180.0) -> ls.ServerHandle:
        """Start replica ``i`` again on its ports and CPUs (after a crash or a
        kill) and load its models; the balancer's checks put it back."""
        old = self.replicas[i]
        if old.is_alive():
            raise ServeError(f"replica {self.name(i)} (pid {old.pid}) is still running")
        handle = self._start(i, (old.http_port, old.grpc_port, old.metrics_port))
        try:
            states = self._ready(handle, i, timeout)
        except BaseException:
            handle.stop()
            raise
        self.replicas[i] = handle
        bad = {m: s for m, s in states.items() if s != "READY"}
        if bad:
            log.warning("replica %s restarted without %s: it stays out of rotation", self.name(i), bad)
        self.write_record()
        return handle

    def wait_in_rotation(self, timeout: float = 60.0, names: Sequence[str] | None = None) -> None:
        for name in names or [self.name(i) for i in range(len(self.replicas))]:
            self.balancer.wait_status(name, up=True, timeout=timeout)

    # ----------------------------------------------------------------- record
    def record(self) -> ReplicaSetRecord:
        from dinov2_triton.core.artifact_io import utc_now

        b = self.balancer
        return ReplicaSetRecord.new(
            created=utc_now(), repository=str(self.repository), api_key_file=str(self.api_key_file),
            models=list(self.models), failed=dict(self.failed), skipped=dict(self.plan.skipped),
            balancer=BalancerEntry(pid=b.pid, started=b.started, host=b.host, http_port=b.http_port,
                                   grpc_port=b.grpc_port, stats_port=b.stats_port,
                                   config_file=str(b.config_file), log_file=str(b.log_file),
                                   stats_socket=str(b.stats_socket)),
            replicas=[ReplicaEntry(name=self.name(i), pid_file=str(h.pid_file), log_file=str(h.log_file),
                                   http_port=h.http_port, grpc_port=h.grpc_port, metrics_port=h.metrics_port,
                                   cpus=list(self.shares[i]), threads=len(self.shares[i]))
                      for i, h in enumerate(self.replicas)])

    def write_record(self) -> None:
        if self.record_file is not None:
            write_replica_set(self.record(), self.record_file)

    def stop(self, timeout: float | None = None) -> None:
        """Balancer first (no new requests), then every replica (each drains its own;
        ``timeout`` None: its exit timeout + dinov2_triton.serve.local_server.STOP_GRACE_S)."""
        if self.balancer is not None:
            self.balancer.stop()
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            list(pool.map(lambda h: h.stop(timeout=timeout), self.replicas))
        if self.record_file is not None:
            Path(self.record_file).unlink(missing_ok=True)

    def __enter__(self) -> "ReplicaSet":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_replica_set(repository: str | os.PathLike, n: int, *, host: str = ls.DEFAULT_HOST,
                      http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                      models: str | Sequence[str] = "*", log_dir: str | os.PathLike = "logs",
                      record_file: str | os.PathLike | None = DEFAULT_REPLICA_FILE,
                      api_key_file: str | os.PathLike | None = None, timeout: float = 180.0,
                      cpus: Sequence[int] | None = None, checks: lb.CheckSettings | None = None,
                      exit_timeout_s: int | None = None) -> ReplicaSet:
    """Start ``n`` replicas and the balancer on ``host``:``http_port``/``grpc_port``
    (``metrics_port``: the balancer's stats; each replica's own metrics are on
    its own port), wait until every replica is ready and in rotation, and
    write the record. On any failure everything started is stopped again."""
    checks = checks or lb.CheckSettings()
    front = {"http": int(http_port), "grpc": int(grpc_port), "metrics": int(metrics_port)}
    if len(set(front.values())) != 3:
        raise ServeError(f"the HTTP, gRPC and metrics ports must differ, got {front}")
    busy = ls.ports_in_use(front, host)
    if busy:
        raise ServeError(f"cannot start the balancer on {host}: port(s) {busy} already in use (is a server "
                         f"running? dinov2-triton serve status; stop it with dinov2-triton serve stop)")
    if record_file is not None:
        existing = read_replica_set(record_file)
        if existing is not None and lb._process_matches(existing.balancer.pid, existing.balancer.started,
                                                        "haproxy"):
            raise ServeError(f"a replica set recorded in {record_file} is running (balancer pid "
                             f"{existing.balancer.pid}); stop it first: dinov2-triton serve stop")
    lb.find_haproxy()
    shares = cpu_shares(n, cpus)
    repository = Path(repository).resolve()
    plan = plan_models(repository, models)
    if not plan.load:
        raise ServeError(f"nothing to load from {repository} (skipped: {plan.skipped or 'none'})")
    log_dir = Path(log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    api_key_file = Path(api_key_file or log_dir / "triton-replicas.api_key").resolve()
    api_key = ls.write_api_key(api_key_file)
    rs = ReplicaSet(repository=repository, host=host, plan=plan, models=list(plan.load), failed={},
                    api_key=api_key, api_key_file=api_key_file, shares=shares, log_dir=log_dir,
                    record_file=Path(record_file).resolve() if record_file else None,
                    exit_timeout_s=exit_timeout_s)
    try:
        ports = ls.find_free_ports(3 * n, "127.0.0.1")
        # start every replica before waiting: they load in parallel
        rs.replicas = [rs._start(i, tuple(ports[3 * i:3 * i + 3])) for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            states = list(pool.map(lambda i: rs._ready(rs.replicas[i], i, timeout), range(n)))
        # a model no replica could load is reported (as the single server does) and not
        # health-checked; one that fails on some replicas only keeps those out of rotation
        rs.failed = {m: states[0][m] for m in plan.load if all(s[m] != "READY" for s in states)}
        rs.models = [m for m in plan.load if m not in rs.failed]
        if not rs.models:
            raise ServeError(f"no model loaded on any replica: {rs.failed}; see {rs.replicas[0].log_file}")
        for i, st in enumerate(states):
            bad = {m: s for m, s in st.items() if s != "READY" and m not in rs.failed}
            if bad:
                log.warning("replica %s failed to load %s: it stays out of rotation", rs.name(i), bad)
        upstreams = [lb.Upstream(rs.name(i), h.http_port, h.grpc_port) for i, h in enumerate(rs.replicas)]
        rs.balancer = lb.start_balancer(upstreams, host=host, http_port=front["http"], grpc_port=front["grpc"],
                                        stats_port=front["metrics"], models=rs.models,
                                        config_file=log_dir / "haproxy.cfg", log_file=log_dir / "haproxy.log",
                                        checks=checks)
        healthy = [rs.name(i) for i, st in enumerate(states) if all(st[m] == "READY" for m in rs.models)]
        rs.wait_in_rotation(timeout=max(10.0, 4 * checks.rise * checks.interval_ms / 1000), names=healthy)
        rs.write_record()
    except BaseException:
        rs.stop()
        raise
    return rs


# --------------------------------------------------------------------------- from the record
def _balancer_from(entry: BalancerEntry) -> lb.BalancerHandle:
    return lb.BalancerHandle(pid=entry.pid, started=entry.started, host=entry.host, http_port=entry.http_port,
                             grpc_port=entry.grpc_port, stats_port=entry.stats_port,
                             config_file=Path(entry.config_file), log_file=Path(entry.log_file),
                             stats_socket=Path(entry.stats_socket))


def stop_replica_set(record_file: str | os.PathLike = DEFAULT_REPLICA_FILE, timeout: float | None = None) -> bool:
    """Stop the balancer and every replica of the set recorded in ``record_file``.
    Returns False when no set was recorded there."""
    record = read_replica_set(record_file)
    if record is None:
        return False
    _balancer_from(record.balancer).stop()
    with ThreadPoolExecutor(max(1, len(record.replicas))) as pool:
        list(pool.map(lambda r: ls.stop_server(r.pid_file, timeout=timeout), record.replicas))
    Path(record_file).unlink(missing_ok=True)
    return True


def replica_set_status(record_file: str | os.PathLike = DEFAULT_REPLICA_FILE) -> dict:
    """The set recorded in ``record_file``: balancer addresses, and per replica
    whether it runs, is ready and is in the balancer's rotation."""
    record = read_replica_set(record_file)
    if record is None:
        return {"running": False, "replica_file": str(record_file)}
    bal = _balancer_from(record.balancer)
    alive = bal.is_alive()
    states = {}
    if alive:
        try:
            states = bal.server_states(None)
        except ServeError as exc:
            log.warning("%s", exc)
    host = ls._client_host(record.balancer.host)
    status = {"running": alive, "replica_file": str(record_file),
              "http": f"{host}:{record.balancer.http_port}", "grpc": f"{host}:{record.balancer.grpc_port}",
              "stats": f"http://{host}:{record.balancer.stats_port}/stats", "balancer_pid": record.balancer.pid,
              "balancer_log": record.balancer.log_file, "api_key_file": record.api_key_file,
              "models": record.models, "failed": record.failed, "replicas": []}
    for r in record.replicas:
        s = ls.server_status(r.pid_file)
        mine = [states.get(f"{b}/{r.name}") for b in (lb.BACKEND_HTTP, lb.BACKEND_GRPC)]
        seen = ", ".join(f"{st.backend[3:]} {st.status}" for st in mine if st) or "unknown"
        status["replicas"].append({
            "name": r.name, "running": s["running"], "ready": s.get("ready", False), "pid": s.get("pid"),
            "http": f"127.0.0.1:{r.http_port}", "grpc": f"127.0.0.1:{r.grpc_port}",
            "metrics": f"http://127.0.0.1:{r.metrics_port}/metrics", "cpus": r.cpus, "threads": r.threads,
            "balancer_state": seen, "in_rotation": all(st is not None and st.up for st in mine),
            "log_file": r.log_file})
    status["ready"] = alive and any(r["in_rotation"] for r in status["replicas"])
    return status
