"""Run the real Triton Inference Server that ships in nvidia-pytriton, on CPU.

nvidia-pytriton 0.7.0 carries a tritonserver 2.51.0 binary (the server of
the NVIDIA container 24.10, see scripts/triton_version.sh) with only the
``python`` backend. To serve the project's model repository UNCHANGED, this
module builds a backend directory::

    <backend_dir>/python/       libtriton_python.so, triton_python_backend_utils.py,
                                triton_python_backend_stub (3.11)
    <backend_dir>/onnxruntime/model.py   <- serve/backends/onnxruntime/model.py
    <backend_dir>/pytorch/model.py       <- serve/backends/pytorch/model.py
    <backend_dir>/standin_common.py      <- serve/backends/standin_common.py
                                            (both model.py load it from one folder up)

Triton maps ``platform: "onnxruntime_onnx"`` to the backend ``onnxruntime``
and ``pytorch_libtorch`` to ``pytorch``; finding no ``libtriton_<name>.so``
but a ``model.py`` in ``<backend_dir>/<name>/``, it runs that file through
the Python backend ("Python-based backends"). ``tensorrt_plan`` models
cannot run here: they are not loaded, and the log says why.

Defaults are the safe ones: explicit model control (only what can run is
loaded), addresses bound to 127.0.0.1, and the model-repository API (load,
unload, index) restricted to requests carrying an API key header; the key is
written to a file with 0600 permissions.

Public API: :func:`start_server` -> :class:`ServerHandle`
(``wait_ready``, ``stop``, ``url_http``, ``url_grpc``, ``pid``),
:func:`stop_server`, :func:`server_status`, :func:`plan_models`,
:func:`find_free_ports`, :func:`ports_in_use`, :func:`build_backend_dir`,
:func:`container_versions` (the pinned NVIDIA container, scripts/triton_version.sh).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

log = logging.getLogger("serve")

ROOT = Path(__file__).resolve().parents[1]
STANDIN_BACKENDS = ROOT / "serve" / "backends"
#: HTTP header that carries the API key. Over gRPC Triton expects the metadata
#: key GRPC_API_KEY_HEADER ("triton-grpc-protocol-" + the same name).
API_KEY_HEADER = "triton-api-key"
GRPC_API_KEY_HEADER = "triton-grpc-protocol-" + API_KEY_HEADER
#: APIs that need the key unless start_server(restricted_apis=...) says otherwise
DEFAULT_RESTRICTED_APIS = ("model-repository",)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TENSORRT_REASON = "needs an NVIDIA GPU and TensorRT"


class ServeError(RuntimeError):
    """The local server cannot be started, reached or stopped."""


class PortsBusyError(ServeError):
    """A port the server needs is taken (usually: a server is already running)."""


# --------------------------------------------------------------------------- install
@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    lib_dir: Path
    python_backend: Path  # folder with libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version


def find_triton() -> TritonInstall:
    """Locate tritonserver and its Python backend inside the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nvidia-pytriton is not installed in this environment; "
                         "run scripts/setup_env.sh (it ships the tritonserver binary)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ts = pkg / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=ts / "bin" / "tritonserver",
        lib_dir=pkg.parent / "nvidia_pytriton.libs",
        python_backend=ts / "backends" / "python",
        stub=ts / "python_backend_stubs" / py / "triton_python_backend_stub",
    )
    for path in (install.binary, install.lib_dir, install.python_backend / "libtriton_python.so",
                 install.stub):
        if not path.exists():
            raise ServeError(f"incomplete nvidia-pytriton install: {path} is missing")
    return install


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dinov2-triton"


def build_backend_dir(cache_dir: str | os.PathLike | None = None,
                      install: TritonInstall | None = None) -> Path:
    """Create (once) and return the backend directory described in the module doc.

    It lives under ``cache_dir`` (default ``$XDG_CACHE_HOME/dinov2-triton`` or
    ``~/.cache/dinov2-triton``, never inside the repository) in a folder named
    after a hash of its sources, so editing a stand-in makes a fresh copy.
    """
    install = install or find_triton()
    sources = {
        "python/libtriton_python.so": install.python_backend / "libtriton_python.so",
        "python/triton_python_backend_utils.py":
            install.python_backend / "triton_python_backend_utils.py",
        "python/triton_python_backend_stub": install.stub,
        "onnxruntime/model.py": STANDIN_BACKENDS / "onnxruntime" / "model.py",
        "pytorch/model.py": STANDIN_BACKENDS / "pytorch" / "model.py",
        "standin_common.py": STANDIN_BACKENDS / "standin_common.py",
    }
    digest = hashlib.sha256()
    for rel, src in sorted(sources.items()):
        digest.update(rel.encode())
        digest.update(src.read_bytes())
    root = Path(cache_dir) if cache_dir else _cache_root()
    target = root / f"backends-{digest.hexdigest()[:16]}"
    if (target / "python" / "libtriton_python.so").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=root))
    try:
        for rel, src in sources.items():
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        os.chmod(staging, 0o755)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "python" / "libtriton_python.so").exists():  # lost a race: fine
            raise
    return target


# --------------------------------------------------------------------------- models
def read_model_config(config_path: str | os.PathLike):
    """Parse a config.pbtxt into ``tritonclient.grpc.model_config_pb2.ModelConfig``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())


def _gpu_reason(cfg) -> str | None:
    """Why a model cannot run on this CPU-only machine, or None."""
    if cfg.platform == "tensorrt_plan" or cfg.backend == "tensorrt":
        return TENSORRT_REASON
    from tritonclient.grpc import model_config_pb2

    if any(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group):
        return "instance_group KIND_GPU needs an NVIDIA GPU"
    return None


@dataclass
class ModelPlan:
    load: list = field(default_factory=list)  # names to pass as --load-model
    skipped: dict = field(default_factory=dict)  # name -> reason


def plan_models(repository: str | os.PathLike, models: str | Sequence[str] = "*") -> ModelPlan:
    """Decide which models of ``repository`` to load, reading each config.pbtxt.

    ``models``: ``"*"`` for every model that can run here, or a list of names
    (a name not in the repository raises ``ValueError``). TensorRT plans,
    KIND_GPU instance groups, unreadable configs and ensembles that use a
    skipped model are skipped with a reason.
    """
    repo = Path(repository)
    if not repo.is_dir():
        raise ServeError(f"model repository {repo} does not exist")
    configs, skipped = {}, {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg_path = model_dir / "config.pbtxt"
        if not cfg_path.is_file():
            continue
        try:
            configs[model_dir.name] = read_model_config(cfg_path)
        except Exception as exc:  # text_format.ParseError and friends
            skipped[model_dir.name] = f"config.pbtxt cannot be parsed: {exc}"
    available = set(configs) | set(skipped)
    if models == "*":
        wanted = sorted(available)
    else:
        wanted = list(dict.fromkeys(models))
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise ValueError(f"model(s) {unknown} not in {repo}; available: {sorted(available)}")
    for name, cfg in configs.items():
        reason = _gpu_reason(cfg)
        if reason:
            skipped[name] = reason
    changed = True
    while changed:  # an ensemble is only as runnable as its steps (nested ensembles too)
        changed = False
        for name, cfg in configs.items():
            if name in skipped or cfg.platform != "ensemble":
                continue
            for step in cfg.ensemble_scheduling.step:
                if step.model_name in skipped or step.model_name not in available:
                    why = skipped.get(step.model_name, "not in the repository")
                    skipped[name] = f"ensemble step '{step.model_name}' cannot load ({why})"
                    changed = True
                    break
    return ModelPlan(load=[m for m in wanted if m not in skipped],
                     skipped={m: skipped[m] for m in wanted if m in skipped})


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
            f"probably running: check it with `python -m serve status` / `scripts/serve.sh "
            f"status`, stop it with `scripts/serve.sh stop`, or pick free ports "
            f"(--http-port/--grpc-port/--metrics-port or HTTP_PORT/GRPC_PORT/METRICS_PORT).")


# --------------------------------------------------------------------------- API key
def write_api_key(path: str | os.PathLike, key: str | None = None) -> str:
    """Write ``key`` (or a new random one) to ``path`` with mode 0600 and return it."""
    key = key or secrets.token_urlsafe(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file existed with wider permissions
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    return key


def read_api_key(path: str | os.PathLike) -> str:
    return Path(path).read_text().strip()


# --------------------------------------------------------------------------- HTTP helpers
def _http(url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None,
          body: bytes | None = None, timeout: float = 5.0) -> tuple:
    """Return (status, body bytes); status 0 when nothing answers."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
        return 0, b""


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

    @property
    def api_key_headers(self) -> dict:
        """HTTP headers that unlock the restricted APIs (``headers=`` of tritonclient.http)."""
        return {API_KEY_HEADER: self.api_key}

    @property
    def grpc_api_key_headers(self) -> dict:
        """gRPC metadata that unlocks the restricted APIs (``headers=`` of tritonclient.grpc)."""
        return {GRPC_API_KEY_HEADER: self.api_key}

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _is_our_server(self.pid)

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_file, lines)

    def server_metadata(self) -> dict:
        status, body = _http(f"http://{self.url_http}/v2")
        return json.loads(body) if status == 200 else {}

    def repository_index(self) -> list:
        """Model states and load errors (``POST /v2/repository/index``, uses the API key)."""
        status, body = _http(f"http://{self.url_http}/v2/repository/index", method="POST",
                             headers=self.api_key_headers, body=b"{}")
        if status != 200:
            raise ServeError(f"repository index failed (HTTP {status}): {body[:300]!r}")
        return json.loads(body)

    def wait_ready(self, timeout: float = 120.0, poll_s: float = 0.25) -> dict:
        """Poll ``/v2/health/ready`` until the server is ready; return model states.

        Returns ``{model: "READY" | "UNAVAILABLE: <reason>"}`` for the models
        it was asked to load. Raises :class:`ServeError` with the tail of the
        server log if the process exits or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        url = f"http://{self.url_http}/v2/health/ready"
        while True:
            if not self.is_alive():
                code = self.process.returncode if self.process is not None else "?"
                raise ServeError(f"tritonserver exited (code {code}) before it was ready; "
                                 f"last lines of {self.log_file}:\n{self.log_tail()}")
            if _http(url, timeout=2.0)[0] == 200:
                break
            if time.monotonic() > deadline:
                raise ServeError(f"tritonserver not ready after {timeout:.0f} s ({url}); "
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
            state = entry.get("state", "UNKNOWN")
            states[name] = state if state == "READY" else f"{state}: {entry.get('reason', '')}"
        return states

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server: SIGTERM, SIGKILL after ``timeout`` s; removes its pid file."""
        _terminate(self.pid, self.process, timeout)
        if self.pid_file is not None:
            _remove_pid_file(self.pid_file, self.pid)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _venv_bin() -> Path:
    return Path(sys.prefix) / "bin"


def server_env(install: TritonInstall | None = None) -> dict:
    """Environment for tritonserver: its libraries, and this venv first on PATH.

    The Python stub embeds libpython in isolated mode (PYTHONPATH is ignored);
    it finds the venv's packages through the ``python3`` first on PATH.
    """
    install = install or find_triton()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")]).rstrip(os.pathsep)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(install.lib_dir), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


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
        # /v2/health/ready = "server up"; per-model readiness is checked by wait_ready
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
                 exit_timeout_s: int = 5,
                 extra_args: Sequence[str] = ()) -> ServerHandle:
    """Start tritonserver on ``repository`` in the background and return its handle.

    Does not wait: call ``handle.wait_ready()``. Refuses busy ports with
    :class:`PortsBusyError`. ``load_models``: ``"*"`` (all that can run here)
    or a list of names; only used with ``model_control="explicit"`` (with
    "none"/"poll" Triton loads everything itself, TensorRT plans included,
    which then fail). The server's stdout and stderr, preceded by a header
    saying what was loaded and what was skipped and why, go to ``log_file``.
    The API key (``api_key`` or a new random one) is written with mode 0600
    to ``api_key_file`` (default: the log file with suffix ``.api_key``).
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
    header += [f"[serve] command: {_redact(cmd, api_key)}", ""]
    for name, why in plan.skipped.items():
        log.warning("%s: not loaded: %s", name, why)
    with open(log_file, "w") as out:
        out.write("\n".join(header))
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=server_env(install),
                                   cwd=str(repository), start_new_session=True)
    handle = ServerHandle(process=process, pid=process.pid, host=host, http_port=ports["http"],
                          grpc_port=ports["grpc"], metrics_port=ports["metrics"],
                          repository=repository, log_file=log_file, api_key=api_key,
                          api_key_file=api_key_file.resolve(), plan=plan,
                          pid_file=Path(pid_file).resolve() if pid_file else None)
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
    }
    handle.pid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = handle.pid_file.with_name(handle.pid_file.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, handle.pid_file)


def read_pid_file(pid_file: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(pid_file).read_text())
    except (OSError, ValueError):
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
    return ServerHandle(
        process=None, pid=record["pid"], host=record["host"], http_port=record["http_port"],
        grpc_port=record["grpc_port"], metrics_port=record["metrics_port"],
        repository=Path(record["repository"]), log_file=Path(record["log_file"]),
        api_key=read_api_key(key_file) if key_file.exists() else "", api_key_file=key_file,
        plan=ModelPlan(load=record.get("load", []), skipped=record.get("skipped", {})),
        pid_file=Path(pid_file).resolve())


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


def stop_server(pid_file: str | os.PathLike, timeout: float = 30.0) -> bool:
    """Stop the server recorded in ``pid_file``. Returns False if none was running."""
    record = read_pid_file(pid_file)
    if record is None:
        return False
    pid = record["pid"]
    if not _is_our_server(pid, record.get("started")):
        Path(pid_file).unlink(missing_ok=True)  # stale: the process is gone or not ours
        return False
    _terminate(pid, None, timeout)
    Path(pid_file).unlink(missing_ok=True)
    return True


def server_status(pid_file: str | os.PathLike) -> dict:
    """Describe the server recorded in ``pid_file`` (running, urls, ready, models)."""
    handle = handle_from_pid_file(pid_file)
    if handle is None:
        return {"running": False, "pid_file": str(pid_file)}
    ready = _http(f"http://{handle.url_http}/v2/health/ready")[0] == 200
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
VERSIONS_FILE = ROOT / "scripts" / "triton_version.sh"


def container_versions(path: str | os.PathLike = VERSIONS_FILE) -> dict:
    """The pinned Triton container release (``KEY=VALUE`` lines of scripts/triton_version.sh)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip().strip('"')
        for k, v in values.items():
            value = value.replace("${" + k + "}", v)
        values[key.strip()] = value
    return values
