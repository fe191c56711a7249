"""Start, stop and inspect the real Triton Inference Server on this CPU machine.

The server is the tritonserver binary of nvidia-pytriton, run with the
backend directory of :mod:`dinov2_triton.serve.install` (Python-based stand-ins for the
onnxruntime and pytorch backends), so the project's model repository loads
unchanged here and in the NVIDIA container. Which models load, and why the
others do not (TensorRT plans need a GPU), is :mod:`dinov2_triton.serve.model_plan`.

Defaults are the safe ones: explicit model control (only what can run is
loaded), addresses bound to 127.0.0.1, and the model-repository API (load,
unload, index) restricted to requests carrying the API key header of
:mod:`dinov2_triton.serve.triton_access`; the key is written to a file with 0600
permissions.

Public API: :func:`start_server` -> :class:`ServerHandle`
(``wait_ready``, ``stop``, ``connect``, ``url_http``, ``url_grpc``, ``pid``),
:func:`stop_server`, :func:`server_status`, :func:`find_free_ports`,
:func:`ports_in_use`, :func:`write_api_key`, :func:`container_versions`
(the pinned NVIDIA container, core/resources/triton_release.env).
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from dinov2_triton.core.artifact_io import atomic_write_json, atomic_write_text, read_json
from dinov2_triton.serve.errors import PortsBusyError, ServeError
from dinov2_triton.serve.install import TritonInstall, build_backend_dir, find_triton, server_env
from dinov2_triton.serve.model_plan import ModelPlan, plan_models
from dinov2_triton.serve.triton_access import API_KEY_HEADER, TritonConnection, TritonError, connect, read_api_key

log = logging.getLogger("dinov2_triton.serve")

#: APIs that need the key unless start_server(restricted_apis=...) says otherwise
DEFAULT_RESTRICTED_APIS = ("model-repository",)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
#: tritonserver --exit-timeout-secs (Triton's own default): on SIGTERM the
#: server refuses new requests and answers the ones it holds for up to this
#: long before it exits. `serve container` and the Kubernetes manifests use the same value.
DEFAULT_EXIT_TIMEOUT_S = 30
#: stop waits this much longer than the exit timeout before SIGKILL (unloading
#: the models and the Python backend stubs after the drain)
STOP_GRACE_S = 10

# --------------------------------------------------------------------------- ports
def find_free_ports(n: int = 3, host: str = DEFAULT_HOST) -> list:
    """Return ``n`` distinct TCP ports that are free on ``host`` right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ports_in_use(ports: Mapping[str, int] | Iterable[int], host: str = DEFAULT_HOST) -> list:
    """Return the ports of ``ports`` (a list, or ``{"http": 8000, ...}``) that cannot be bound."""
    busy = []
    for port in (ports.values() if isinstance(ports, Mapping) else ports):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                s.bind((host, int(port)))
            except OSError:
                busy.append(int(port))
    return busy


def _check_ports(ports: Mapping[str, int], host: str) -> None:
    if len(set(ports.values())) != len(ports):
        raise ServeError(f"the HTTP, gRPC and metrics ports must differ, got {dict(ports)}")
    busy = set(ports_in_use(ports, host))
    if busy:
        taken = ", ".join(f"{port} ({label})" for label, port in ports.items() if port in busy)
        raise PortsBusyError(
            f"cannot start Triton on {host}: port {taken} already in use. Another server is "
            f"probably running: check it with `dinov2-triton serve status`, stop it with "
            f"`dinov2-triton serve stop`, or pick free ports "
            f"(--http-port/--grpc-port/--metrics-port or HTTP_PORT/GRPC_PORT/METRICS_PORT).")


# --------------------------------------------------------------------------- API key
def write_api_key(path: str | os.PathLike, key: str | None = None) -> str:
    """Write ``key`` (or a new random one) to ``path`` with mode 0600 and return it
    (read it back with :func:`dinov2_triton.serve.triton_access.read_api_key`)."""
    key = key or secrets.token_urlsafe(32)
    atomic_write_text(path, key + "\n", mode=0o600)
    return key


# --------------------------------------------------------------------------- helpers
def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


# --------------------------------------------------------------------------- server
@dataclass
class ServerHandle:
    """A running tritonserver started by :func:`start_server`."""

    process: subprocess.Popen | None
    pid: int
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path
    log_file: Path
    api_key: str = field(repr=False)
    api_key_file: Path
    plan: ModelPlan
    pid_file: Path | None = None
    exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S

    # Addresses in the form tritonclient's InferenceServerClient(url=...) and
    # perf_analyzer's -u expect (host:port, no scheme).
    @property
    def url_http(self) -> str:
        return f"{_client_host(self.host)}:{self.http_port}"

    @property
    def url_grpc(self) -> str:
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def url_metrics(self) -> str:
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    def url(self, protocol: str) -> str:
        return self.url_grpc if protocol == "grpc" else self.url_http

    def connect(self, protocol: str = "http", *, with_key: bool = True,
                timeout_s: float = 30.0) -> TritonConnection:
        """A connection to this server (carrying its API key unless ``with_key=False``)."""
        return connect(self.url(protocol), protocol, api_key=self.api_key if with_key else None,
                       timeout_s=timeout_s)

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _is_our_server(self.pid)

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_file, lines)

    def server_metadata(self) -> dict:
        """``{"name", "version", "extensions"}``, or {} when the server does not answer."""
        try:
            with self.connect(timeout_s=5.0) as conn:
                return conn.server_metadata()
        except TritonError:
            return {}

    def repository_index(self) -> list:
        """Model states and load errors (the repository index, with the API key)."""
        try:
            with self.connect() as conn:
                return conn.repository_index()
        except TritonError as exc:
            raise ServeError(f"repository index failed: {exc}") from None

    def is_ready(self) -> bool:
        try:
            with self.connect(with_key=False, timeout_s=2.0) as conn:
                return conn.is_ready()
        except TritonError:
            return False

    def wait_ready(self, timeout: float = 120.0, poll_s: float = 0.25) -> dict:
        """Poll the server's readiness until it is ready; return model states.

        Returns ``{model: "READY" | "UNAVAILABLE: <reason>"}`` for the models
        it was asked to load. Raises :class:`ServeError` with the tail of the
        server log if the process exits or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                code = self.process.returncode if self.process is not None else "?"
                raise ServeError(f"tritonserver exited (code {code}) before it was ready; "
                                 f"last lines of {self.log_file}:\n{self.log_tail()}")
            if self.is_ready():
                break
            if time.monotonic() > deadline:
                raise ServeError(f"tritonserver not ready after {timeout:.0f} s (http {self.url_http}); "
                                 f"last lines of {self.log_file}:\n{self.log_tail()}")
            time.sleep(poll_s)
        states = self.model_states()
        for name, state in states.items():
            if state != "READY":
                log.warning("model %s did not load: %s", name, state)
        return states

    def model_states(self) -> dict:
        """``{model: "READY" | "<STATE>: <reason>"}`` for the models it was asked to load."""
        index = {m.get("name"): m for m in self.repository_index()}
        states = {}
        for name in self.plan.load:
            entry = index.get(name, {})
            state = entry.get("state") or "UNKNOWN"
            states[name] = state if state == "READY" else f"{state}: {entry.get('reason', '')}"
        return states

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server: SIGTERM (Triton drains: requests it holds are answered,
        new ones refused), SIGKILL after ``timeout`` s (default: its exit timeout
        + STOP_GRACE_S); removes its pid file."""
        _terminate(self.pid, self.process, self.exit_timeout_s + STOP_GRACE_S if timeout is None else timeout)
        if self.pid_file is not None:
            _remove_pid_file(self.pid_file, self.pid)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_command(install: TritonInstall, repository: Path, backend_dir: Path, *, host: str,
                   http_port: int, grpc_port: int, metrics_port: int, model_control: str,
                   load: Sequence[str], api_key: str, restricted_apis: Sequence[str],
                   exit_timeout_s: int, extra_args: Sequence[str] = ()) -> list:
    cmd = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backend_dir}",
        f"--model-control-mode={model_control}",
        # keep serving the models that loaded when one of them fails
        "--exit-on-error=false",
        # readiness = "server up"; per-model readiness is checked by wait_ready
        "--strict-readiness=false",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        # no CUDA here: skip the pinned host memory pool (it only warns). The
        # remaining "CudaDriverHelper has not been initialized" line is harmless.
        "--pinned-memory-pool-byte-size=0",
        f"--exit-timeout-secs={exit_timeout_s}",
    ]
    if model_control == "explicit":
        cmd += [f"--load-model={m}" for m in load]
    if restricted_apis:
        # One header name for both protocols: over gRPC Triton expects it with the
        # triton-grpc-protocol- prefix (dinov2_triton.serve.triton_access.headers_for adds it).
        apis = ",".join(restricted_apis)
        cmd += [f"--http-restricted-api={apis}:{API_KEY_HEADER}={api_key}",
                f"--grpc-restricted-protocol={apis}:{API_KEY_HEADER}={api_key}"]
    return cmd + list(extra_args)


def _redact(cmd: Sequence[str], secret: str) -> str:
    return " ".join(c.replace(secret, "***") for c in cmd)


def start_server(repository: str | os.PathLike, *,
                 http_port: int = DEFAULT_PORTS["http"],
                 grpc_port: int = DEFAULT_PORTS["grpc"],
                 metrics_port: int = DEFAULT_PORTS["metrics"],
                 host: str = DEFAULT_HOST,
                 model_control: str = "explicit",
                 load_models: str | Sequence[str] = "*",
                 log_file: str | os.PathLike = "logs/triton.log",
                 api_key: str | None = None,
                 api_key_file: str | os.PathLike | None = None,
                 restricted_apis: Sequence[str] = DEFAULT_RESTRICTED_APIS,
                 pid_file: str | os.PathLike | None = None,
                 backend_dir: str | os.PathLike | None = None,
                 exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S,
                 extra_args: Sequence[str] = (),
                 cpus: Sequence[int] | None = None,
                 cwd: str | os.PathLike | None = None) -> ServerHandle:
    """Start tritonserver on ``repository`` in the background and return its handle.

    Does not wait: call ``handle.wait_ready()``. Refuses busy ports with
    :class:`PortsBusyError`. ``load_models``: ``"*"`` (all that can run here)
    or a list of names; only used with ``model_control="explicit"`` (with
    "none"/"poll" Triton loads everything itself, TensorRT plans included,
    which then fail). The server's stdout and stderr, preceded by a header
    saying what was loaded and what was skipped and why, go to ``log_file``.
    The API key (``api_key`` or a new random one) is written with mode 0600
    to ``api_key_file`` (default: the log file with suffix ``.api_key``).
    ``cpus``: run the server on these CPUs only (``taskset``, which every
    thread and model stub inherits) with ``OMP_NUM_THREADS`` = their count
    (dinov2_triton.serve.replicas gives each replica its share this way).
    ``cwd``: the server's working directory (default: the repository).
    """
    if model_control not in ("explicit", "none", "poll"):
        raise ValueError(f"model_control must be explicit, none or poll, not {model_control!r}")
    repository = Path(repository).resolve()
    ports = {"http": int(http_port), "grpc": int(grpc_port), "metrics": int(metrics_port)}
    _check_ports(ports, host)
    install = find_triton()
    plan = plan_models(repository, load_models)
    backend_dir = Path(backend_dir) if backend_dir else build_backend_dir(install=install)

    log_file = Path(log_file).resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    api_key_file = Path(api_key_file) if api_key_file else log_file.with_suffix(".api_key")
    api_key = write_api_key(api_key_file, api_key)
    cmd = server_command(install, repository, backend_dir, host=host, model_control=model_control,
                         load=plan.load, api_key=api_key, restricted_apis=restricted_apis,
                         exit_timeout_s=exit_timeout_s, extra_args=extra_args, **{
                             f"{k}_port": v for k, v in ports.items()})

    header = [f"[serve] {time.strftime('%Y-%m-%d %H:%M:%S')} starting tritonserver",
              f"[serve] repository: {repository}",
              f"[serve] backend directory: {backend_dir}",
              f"[serve] loading: {', '.join(plan.load) or '(nothing)'}"]
    header += [f"[serve] {name}: not loaded: {why}" for name, why in plan.skipped.items()]
    env = server_env(install)
    if cpus:
        # taskset execs tritonserver in place: the pid stays the server's
        cmd = ["taskset", "--cpu-list", ",".join(str(int(c)) for c in cpus)] + cmd
        env["OMP_NUM_THREADS"] = str(len(cpus))
    header += [f"[serve] command: {_redact(cmd, api_key)}", ""]
    for name, why in plan.skipped.items():
        log.warning("%s: not loaded: %s", name, why)
    with open(log_file, "w") as out:
        out.write("\n".join(header))
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env,
                                   cwd=str(cwd or repository), start_new_session=True)
    handle = ServerHandle(process=process, pid=process.pid, host=host, http_port=ports["http"],
                          grpc_port=ports["grpc"], metrics_port=ports["metrics"],
                          repository=repository, log_file=log_file, api_key=api_key,
                          api_key_file=api_key_file.resolve(), plan=plan,
                          pid_file=Path(pid_file).resolve() if pid_file else None,
                          exit_timeout_s=int(exit_timeout_s))
    if handle.pid_file is not None:
        _write_pid_file(handle)
    log.info("tritonserver pid %d: http %s, grpc %s, metrics %s, log %s", handle.pid,
             handle.url_http, handle.url_grpc, handle.url_metrics, log_file)
    return handle


# --------------------------------------------------------------------------- pid file
def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _is_our_server(pid: int, started: float | None = None) -> bool:
    """True if ``pid`` is a live tritonserver (and, if given, started at ``started``)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        ok = Path(proc.exe()).name == "tritonserver"
    except psutil.Error:
        return False
    return ok and (started is None or abs(proc.create_time() - started) < 1.0)


def _write_pid_file(handle: ServerHandle) -> None:
    record = {
        "pid": handle.pid, "started": _start_time(handle.pid), "host": handle.host,
        "http_port": handle.http_port, "grpc_port": handle.grpc_port,
        "metrics_port": handle.metrics_port, "repository": str(handle.repository),
        "log_file": str(handle.log_file), "api_key_file": str(handle.api_key_file),
        "load": handle.plan.load, "skipped": handle.plan.skipped,
        "exit_timeout_s": handle.exit_timeout_s,
    }
    atomic_write_json(handle.pid_file, record)


def read_pid_file(pid_file: str | os.PathLike) -> dict | None:
    try:
        return read_json(pid_file, what="pid file")
    except (OSError, ValueError):  # no server recorded there (or a torn file): not running
        return None


def _remove_pid_file(pid_file: Path, pid: int) -> None:
    record = read_pid_file(pid_file)
    if record is not None and record.get("pid") == pid:
        Path(pid_file).unlink(missing_ok=True)


def handle_from_pid_file(pid_file: str | os.PathLike) -> ServerHandle | None:
    """Rebuild the handle of a server started by another process (None if not running)."""
    record = read_pid_file(pid_file)
    if record is None or not _is_our_server(record["pid"], record.get("started")):
        return None
    key_file = Path(record["api_key_file"])
    try:
        api_key = read_api_key(file=key_file) or ""
    except ValueError:  # key file gone or emptied: status still works, the index is not listed
        api_key = ""
    return ServerHandle(
        process=None, pid=record["pid"], host=record["host"], http_port=record["http_port"],
        grpc_port=record["grpc_port"], metrics_port=record["metrics_port"],
        repository=Path(record["repository"]), log_file=Path(record["log_file"]),
        api_key=api_key, api_key_file=key_file,
        plan=ModelPlan(load=record.get("load", []), skipped=record.get("skipped", {})),
        pid_file=Path(pid_file).resolve(),
        exit_timeout_s=int(record.get("exit_timeout_s", DEFAULT_EXIT_TIMEOUT_S)))


def _terminate(pid: int, process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM (Triton unloads its models, then exits); SIGKILL after ``timeout``.

    Python backend stubs it leaves behind are killed too (psutil checks the
    start time, so a recycled pid is never hit).
    """
    import psutil

    def alive() -> bool:
        if process is not None:
            return process.poll() is None
        return _is_our_server(pid)

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    if alive():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive():
            log.warning("tritonserver pid %d ignored SIGTERM for %.0f s: killing it", pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if process is not None:
        process.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def stop_server(pid_file: str | os.PathLike, timeout: float | None = None) -> bool:
    """Stop the server recorded in ``pid_file`` (SIGTERM: Triton drains; SIGKILL
    after ``timeout`` s, default its recorded exit timeout + STOP_GRACE_S).
    Returns False if none was running."""
    record = read_pid_file(pid_file)
    if record is None:
        return False
    pid = record["pid"]
    if not _is_our_server(pid, record.get("started")):
        Path(pid_file).unlink(missing_ok=True)  # stale: the process is gone or not ours
        return False
    if timeout is None:
        timeout = int(record.get("exit_timeout_s", DEFAULT_EXIT_TIMEOUT_S)) + STOP_GRACE_S
    _terminate(pid, None, timeout)
    Path(pid_file).unlink(missing_ok=True)
    return True


def server_status(pid_file: str | os.PathLike) -> dict:
    """Describe the server recorded in ``pid_file`` (running, urls, ready, models)."""
    handle = handle_from_pid_file(pid_file)
    if handle is None:
        return {"running": False, "pid_file": str(pid_file)}
    ready = handle.is_ready()
    status = {"running": True, "ready": ready, "pid": handle.pid, "http": handle.url_http,
              "grpc": handle.url_grpc, "metrics": handle.url_metrics,
              "repository": str(handle.repository), "log_file": str(handle.log_file),
              "api_key_file": str(handle.api_key_file),
              "version": handle.server_metadata().get("version"),
              "skipped": handle.plan.skipped}
    if ready and handle.api_key:
        try:
            models = {}
            for m in handle.repository_index():
                name = m.get("name")
                reason = m.get("reason") or handle.plan.skipped.get(name, "")
                models[name] = (m.get("state") or "not loaded") + (f": {reason}" if reason else "")
            status["models"] = models
        except ServeError as exc:
            status["models"] = str(exc)
    return status


# --------------------------------------------------------------------------- versions


def container_versions(path: str | os.PathLike | None = None) -> dict:
    """The pinned Triton container release (``KEY=VALUE`` lines of core/resources/triton_release.env),
    read by the one parser, dinov2_triton.core.release_pin.read_pin. The local server's own
    release is ``LOCAL_TRITON_SERVER_VERSION``; ``TRITON_SERVER_VERSION`` is the container's."""
    from dinov2_triton.core.release_pin import PIN_FILE, read_pin

    return read_pin(path or PIN_FILE)
