"""The load balancer in front of N local Triton replicas: HAProxy.

HAProxy (Debian package ``haproxy``, installed by scripts/setup_env.sh) is
started in the foreground (``-db``) as a child process with a generated
configuration:

* ``fe_http`` (HTTP/1.1) -> ``be_http`` and ``fe_grpc`` (HTTP/2 cleartext,
  ``proto h2``) -> ``be_grpc``: gRPC is proxied per request (per HTTP/2
  stream), so requests of one client connection spread over the replicas,
  which a TCP (layer 4) balancer cannot do;
* ``balance leastconn``: an inference request holds a server for its whole
  compute time, so the replica with the fewest requests in flight gets the
  next one;
* active health checks on every replica's HTTP port: ``/v2/health/ready``
  and then ``/v2/models/<m>/ready`` for every model the set serves. A
  replica is in rotation only when it serves all of them (a balancer cannot
  route gRPC by model: the model name is inside the protobuf). The gRPC
  backend runs the same checks against the replica's HTTP port (``check
  port``, ``check-proto h1``) rather than ``track``ing the HTTP backend, so
  that its own passive check can take a replica out too;
* passive checks (``observe layer4``): a refused connection on live
  traffic marks the replica down at once instead of waiting for the next
  check; ``retries`` + ``option redispatch`` resend a request whose
  connection failed to another replica, so a killed replica costs only the
  requests that were in flight on it;
* one access-log line per request on stdout (the balancer's log file):
  request start, backend/server, status, termination flags, retries, total
  time and the client's ``x-request-id`` header (dinov2_triton.qa.failover matches
  failed requests to the replica that held them);
* an admin socket (mode 0600, private folder) for ``show stat``
  (:meth:`BalancerHandle.server_states`) and a stats frontend on the
  metrics port: ``/metrics`` (HAProxy's Prometheus exporter) and ``/stats``.

The model-repository API (load/unload/index) through the balancer reaches
ONE replica; control each replica at its own address
(``dinov2-triton serve status`` lists them).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dinov2_triton.serve.errors import ServeError

log = logging.getLogger("dinov2_triton.serve")

BACKEND_HTTP = "be_http"
BACKEND_GRPC = "be_grpc"
REQUEST_ID_HEADER = "x-request-id"
#: the access-log fields, in order (dinov2_triton.qa.failover parses them with parse_access_line)
LOG_FIELDS = ("accept_time", "handshake_ms", "idle_ms", "backend", "server", "status", "termination", "retries",
              "total_ms", "request_id")
# %Ts.%ms: when the connection (or, on a kept-alive one, the stream) was accepted; the request
# itself started %Th + %Ti ms later (HAProxy 2.6 has no request_date fetch); %Ta: from then to the end
_LOG_FORMAT = "%Ts.%ms %Th %Ti %b %s %ST %tsc %rc %Ta %[capture.req.hdr(0)]"


@dataclass(frozen=True)
class Upstream:
    """One replica as the balancer sees it."""

    name: str           # server name in HAProxy: r0, r1, ...
    http_port: int
    grpc_port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class CheckSettings:
    """Health-check timing. Loopback checks are cheap, so they run often:
    a dead replica is out after about ``fall`` x ``interval_ms`` (at once
    under traffic, through the passive check)."""

    interval_ms: int = 500
    fall: int = 2
    rise: int = 2
    timeout_ms: int = 2000
    retries: int = 2
    #: longest inference request the balancer waits for (big batches on CPU)
    server_timeout_s: int = 300


def find_haproxy() -> Path:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if not path:
        raise ServeError("haproxy not found (the load balancer of --replicas): run scripts/setup_env.sh "
                         "as root or apt-get install haproxy")
    return Path(path)


def _health_check_lines(models: Sequence[str]) -> list[str]:
    lines = ["    option httpchk"]
    for uri in ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in models]:
        # one connection per step: Triton's answer to a failed step closes nothing we rely on
        lines += ["    http-check connect",
                  f"    http-check send meth GET uri {uri} ver HTTP/1.1 hdr Host localhost",
                  "    http-check expect status 200"]
    return lines


def haproxy_config(upstreams: Sequence[Upstream], *, host: str, http_port: int, grpc_port: int,
                   stats_port: int, stats_socket: str | os.PathLike, models: Sequence[str],
                   checks: CheckSettings | None = None) -> str:
    """The HAProxy configuration described in the module docstring."""
    if not upstreams:
        raise ServeError("the balancer needs at least one replica")
    for m in models:
        if not m or any(c.isspace() or c in "/#\"'" for c in m):
            raise ServeError(f"model name {m!r} cannot be used in a health-check path")
    c = checks or CheckSettings()
    out = [
        "# Generated by dinov2_triton.serve.balancer (dinov2-triton serve start --replicas N); edits are overwritten.",
        "global",
        "    log stdout format raw local0 info",
        f"    stats socket {stats_socket} mode 600 level admin",
        # one thread: the cores belong to the replicas (each has its share)
        "    nbthread 1",
        "    maxconn 4096",
        "defaults",
        "    mode http",
        "    log global",
        f"    log-format \"{_LOG_FORMAT}\"",
        f"    timeout connect {c.timeout_ms}ms",
        f"    timeout client {c.server_timeout_s}s",
        f"    timeout server {c.server_timeout_s}s",
        f"    timeout check {c.timeout_ms}ms",
        "    timeout http-keep-alive 60s",
        # a request whose connection failed (replica gone) goes to another replica
        f"    retries {c.retries}",
        "    option redispatch 1",
        f"    default-server inter {c.interval_ms}ms fastinter {max(50, c.interval_ms // 2)}ms "
        f"fall {c.fall} rise {c.rise}",
    ]
    for name, port, proto, backend in (("fe_http", http_port, "", BACKEND_HTTP),
                                       ("fe_grpc", grpc_port, " proto h2", BACKEND_GRPC)):
        out += [f"frontend {name}",
                f"    bind {host}:{port}{proto}",
                "    declare capture request len 64",
                f"    http-request capture req.hdr({REQUEST_ID_HEADER}) id 0",
                f"    default_backend {backend}"]
    out += ["frontend fe_stats",
            f"    bind {host}:{stats_port}",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 5s",
            f"backend {BACKEND_HTTP}",
            "    balance leastconn"]
    out += _health_check_lines(models)
    out += [f"    server {u.name} {u.host}:{u.http_port} check observe layer4 error-limit 1 on-error mark-down"
            for u in upstreams]
    out += [f"backend {BACKEND_GRPC}", "    balance leastconn"]
    out += _health_check_lines(models)
    out += [f"    server {u.name} {u.host}:{u.grpc_port} proto h2 check port {u.http_port} check-proto h1 "
            f"observe layer4 error-limit 1 on-error mark-down" for u in upstreams]
    return "\n".join(out) + "\n"


def check_config(path: str | os.PathLike) -> None:
    """``haproxy -c``: raise ServeError with HAProxy's own words if it refuses the file."""
    proc = subprocess.run([str(find_haproxy()), "-c", "-f", str(path)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        alerts = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "[ALERT]" in ln]
        raise ServeError(f"{path}: haproxy refused the configuration: {alerts[0] if alerts else proc.stderr[-300:]}")


# --------------------------------------------------------------------------- stats socket
def socket_command(socket_path: str | os.PathLike, command: str, timeout: float = 5.0) -> str:
    """Send one command to HAProxy's admin socket and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


@dataclass(frozen=True)
class ServerState:
    """One server line of ``show stat``."""

    backend: str
    server: str
    status: str         # UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" (coming up), MAINT, no check
    current: int        # requests in flight on it now (scur)
    total: int          # requests sent to it so far (stot)
    check: str          # last check result, e.g. L7OK, L4CON, L7STS
    redispatched: int = 0  # requests sent to it whose connection failed and that went to another server (wredis)

    @property
    def up(self) -> bool:
        """In rotation: "UP", or "UP 1/2" (a check failed, not yet ``fall`` of them)."""
        return self.status.split(" ")[0] == "UP"


def parse_show_stat(text: str) -> list[ServerState]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        raise ServeError(f"unexpected answer to 'show stat': {text[:120]!r}")
    header = lines[0][2:].split(",")
    idx = {name: i for i, name in enumerate(header)}
    missing = [c for c in ("pxname", "svname", "status", "scur", "stot", "check_status", "wredis") if c not in idx]
    if missing:
        raise ServeError(f"'show stat' has no column {', '.join(missing)}: {lines[0][:120]!r}")
    states = []
    for line in lines[1:]:
        row = line.split(",")
        if row[idx["svname"]] in ("FRONTEND", "BACKEND"):
            continue
        states.append(ServerState(
            backend=row[idx["pxname"]], server=row[idx["svname"]], status=row[idx["status"]],
            current=int(row[idx["scur"]] or 0), total=int(row[idx["stot"]] or 0),
            check=row[idx["check_status"]], redispatched=int(row[idx["wredis"]] or 0)))
    return states


# --------------------------------------------------------------------------- access log
def parse_access_line(line: str) -> dict | None:
    """One access-log line as a dict of LOG_FIELDS (None for other lines,
    e.g. health-check state changes). ``start_time``: when the request's first
    byte arrived, Unix seconds (millisecond resolution); ``total_ms``: from
    then until the answer was sent (or the request failed)."""
    parts = line.split()
    if len(parts) not in (len(LOG_FIELDS), len(LOG_FIELDS) - 1) or parts[3] not in (BACKEND_HTTP, BACKEND_GRPC):
        return None
    parts = parts + ["-"] * (len(LOG_FIELDS) - len(parts))
    entry = dict(zip(LOG_FIELDS, parts))
    try:
        delay_ms = max(0, int(entry.pop("handshake_ms"))) + max(0, int(entry.pop("idle_ms")))
        entry["start_time"] = float(entry.pop("accept_time")) + delay_ms / 1000.0
        entry["status"] = int(entry["status"])
        entry["retries"] = int(entry["retries"].lstrip("+"))
        entry["total_ms"] = int(entry["total_ms"])
    except ValueError:
        return None
    return entry


# --------------------------------------------------------------------------- process
def _process_matches(pid: int, started: float | None, exe_name: str) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        ok = Path(proc.exe()).name == exe_name
    except psutil.Error:
        return False
    return ok and (started is None or abs(proc.create_time() - started) < 1.0)


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass
class BalancerHandle:
    """A running HAProxy started by :func:`start_balancer` (or rebuilt from a record)."""

    pid: int
    started: float | None
    host: str
    http_port: int
    grpc_port: int
    stats_port: int
    config_file: Path
    log_file: Path
    stats_socket: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _process_matches(self.pid, self.started, "haproxy")

    def server_states(self, backend: str | None = BACKEND_HTTP) -> dict[str, ServerState]:
        """``{server: ServerState}`` of ``backend`` (None: every backend, keyed "be/server")."""
        try:
            states = parse_show_stat(socket_command(self.stats_socket, "show stat"))
        except OSError as exc:
            raise ServeError(f"balancer admin socket {self.stats_socket}: {exc}") from None
        if backend is None:
            return {f"{s.backend}/{s.server}": s for s in states}
        return {s.server: s for s in states if s.backend == backend}

    def in_rotation(self) -> list[str]:
        """Replicas that take both HTTP and gRPC traffic now."""
        states = self.server_states(None)
        names = [s.server for s in states.values() if s.backend == BACKEND_HTTP]
        return [n for n in names if all(states.get(f"{b}/{n}") and states[f"{b}/{n}"].up
                                        for b in (BACKEND_HTTP, BACKEND_GRPC))]

    def wait_status(self, server: str, up: bool, timeout: float, poll_s: float = 0.02,
                    backends: Sequence[str] = (BACKEND_HTTP, BACKEND_GRPC)) -> float:
        """Poll until ``server`` is UP in every one of ``backends`` (``up=True``)
        or UP in none of them; return the seconds it took. Raises ServeError
        after ``timeout``."""
        t0 = time.monotonic()
        while True:
            states = self.server_states(None)
            mine = [states.get(f"{b}/{server}") for b in backends]
            if any(s is None for s in mine):
                raise ServeError(f"the balancer has no server {server!r} in {list(backends)}")
            if (all(s.up for s in mine) if up else not any(s.up for s in mine)):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                seen = ", ".join(f"{s.backend} {s.status} (check {s.check})" for s in mine)
                raise ServeError(f"replica {server} not {'UP' if up else 'DOWN'} after {timeout:.0f} s: {seen}; "
                                 f"balancer log {self.log_file}")
            time.sleep(poll_s)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"<cannot read {self.log_file}: {exc}>"

    def stop(self, timeout: float = 10.0) -> None:
        """Soft stop (SIGUSR1: finish the requests in flight, accept no new
        ones), SIGKILL after ``timeout``; removes the admin socket folder."""
        if self.is_alive():
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.is_alive():
                log.warning("haproxy pid %d still running %.0f s after a soft stop: killing it", self.pid, timeout)
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process is not None:
            self.process.wait(timeout=10)
        shutil.rmtree(self.stats_socket.parent, ignore_errors=True)


def _wait_listening(handle: BalancerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not handle.is_alive():
            raise ServeError(f"haproxy exited before it listened; last lines of {handle.log_file}:\n"
                             f"{handle.log_tail()}")
        if handle.stats_socket.exists():
            try:
                handle.server_states()
                return
            except ServeError:
                pass
        if time.monotonic() > deadline:
            raise ServeError(f"haproxy did not answer on {handle.stats_socket} within {timeout:.0f} s")
        time.sleep(0.05)


def start_balancer(upstreams: Sequence[Upstream], *, host: str, http_port: int, grpc_port: int,
                   stats_port: int, models: Sequence[str], config_file: str | os.PathLike,
                   log_file: str | os.PathLike, checks: CheckSettings | None = None,
                   timeout: float = 15.0) -> BalancerHandle:
    """Write the configuration, check it (``haproxy -c``), start HAProxy and
    wait until its admin socket answers (not until replicas are UP: see
    :meth:`BalancerHandle.wait_status`)."""
    binary = find_haproxy()
    sock_dir = Path(tempfile.mkdtemp(prefix="dinov2-haproxy-"))  # short path: AF_UNIX limits it to 107 bytes
    sock = sock_dir / "admin.sock"
    config_file, log_file = Path(config_file).resolve(), Path(log_file).resolve()
    config_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    from dinov2_triton.core.artifact_io import atomic_write_text

    atomic_write_text(config_file, haproxy_config(upstreams, host=host, http_port=http_port, grpc_port=grpc_port,
                                                  stats_port=stats_port, stats_socket=sock, models=models,
                                                  checks=checks))
    try:
        check_config(config_file)
        with open(log_file, "w") as out:
            process = subprocess.Popen([str(binary), "-db", "-f", str(config_file)], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    except BaseException:
        shutil.rmtree(sock_dir, ignore_errors=True)
        raise
    handle = BalancerHandle(pid=process.pid, started=_create_time(process.pid), host=host, http_port=http_port,
                            grpc_port=grpc_port, stats_port=stats_port, config_file=config_file,
                            log_file=log_file, stats_socket=sock, process=process)
    try:
        _wait_listening(handle, timeout)
    except BaseException:
        handle.stop(timeout=2.0)
        raise
    log.info("haproxy pid %d: http %s:%d, grpc %s:%d, stats http://%s:%d/stats, log %s", handle.pid, host,
             http_port, host, grpc_port, host, stats_port, log_file)
    return handle
