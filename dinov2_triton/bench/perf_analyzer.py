"""Run Triton's perf_analyzer over a sweep and parse what it measured.

One perf_analyzer process per point (model, protocol, batch size,
concurrency), so a failing point names itself and the other points still run
when asked to (`keep_going`). Every point:

- sends REAL inputs: a `--input-data` JSON written from test-split images
  (perf/input_data.py), never perf_analyzer's random tensors;
- uses the shapes of the server's own model config (`--shape
  pixel_values:3,H,W`, read through dinov2_triton.serve.triton_access), and batch sizes up
  to its `max_batch_size` only;
- measures in time windows with a stability threshold and a trial limit that
  hold on a 2-core machine (`-p 10000 -s 20` by default, docs/environment.md);
- writes a verbose CSV whose client and server-side breakdown (send, network,
  queue, compute input/infer/output, receive, p50..p99) is parsed here.

The API key: this module reads the model configs with it (through
dinov2_triton.serve.triton_access, which sends it as the HTTP header or the prefixed gRPC
metadata). perf_analyzer itself is never given the key: it calls only the
inference, metadata, config and statistics APIs, which the local server
does not restrict; its `-H` flag reaches HTTP requests only (ignored for
gRPC); and its command line is written to the logs and the report.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dinov2_triton.bench.input_data import Samples, shape_args, write_input_data
from dinov2_triton.core.artifact_io import atomic_write_text

log = logging.getLogger("dinov2_triton.bench.perf_analyzer")

PROTOCOLS = ("grpc", "http")
MEASUREMENT_MODES = ("time_windows", "count_windows")

# CSV column -> key in a parsed row (values in microseconds except throughput).
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Request Rate": "request_rate",          # request-rate mode (open loop) writes this instead
    "Inferences/Second": "throughput_infer_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_send_recv_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_latency_us",
    "p90 latency": "p90_latency_us",
    "p95 latency": "p95_latency_us",
    "p99 latency": "p99_latency_us",
    "Avg latency": "avg_latency_us",
    "request/response": "request_response_us",
    "response wait": "response_wait_us",
    "Avg GPU Utilization": "avg_gpu_utilization",
    "Avg GPU Power Usage": "avg_gpu_power_w",
    "Max GPU Memory Usage": "max_gpu_memory_bytes",
    "Total GPU Memory": "total_gpu_memory_bytes",
}
REQUIRED_CSV_COLUMNS = ("Inferences/Second", "p50 latency", "p99 latency")
#: the load column: one of these (concurrency mode, request-rate mode)
LOAD_CSV_COLUMNS = ("Concurrency", "Request Rate")
REQUEST_DISTRIBUTIONS = ("poisson", "constant")
# The server-side parts of one request, in the order they happen.
SERVER_BREAKDOWN = ("server_queue_us", "server_compute_input_us", "server_compute_infer_us",
                    "server_compute_output_us")


class PerfAnalyzerError(RuntimeError):
    """A perf_analyzer run failed; the message names the point and carries
    perf_analyzer's own words. `kind` is one of: not_installed, unreachable,
    model_not_found, unstable, request_error, shed (the server's queue policy
    refused requests: overload, not a fault), timeout, bad_input, failed."""

    def __init__(self, message: str, *, kind: str = "failed", model: str | None = None,
                 protocol: str | None = None, batch_size: int | None = None,
                 concurrency: int | None = None, output: str = "", command: str = ""):
        super().__init__(message)
        self.kind = kind
        self.model, self.protocol = model, protocol
        self.batch_size, self.concurrency = batch_size, concurrency
        self.output, self.command = output, command
        self.partial: dict | None = None  # the sweep so far, set by run_sweep


# ----------------------------------------------------------------------------- binary + environment
def find_perf_analyzer() -> Path:
    """The perf_analyzer binary: $PERF_ANALYZER, this venv's bin/, then PATH.

    The tritonclient 2.50.0 wheel is the last that ships it (docs/environment.md)."""
    env = os.environ.get("PERF_ANALYZER")
    candidates = [Path(env)] if env else []
    candidates.append(Path(sys.prefix) / "bin" / "perf_analyzer")
    which = shutil.which("perf_analyzer")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise PerfAnalyzerError(
        "perf_analyzer not found (looked at $PERF_ANALYZER, "
        f"{Path(sys.prefix) / 'bin' / 'perf_analyzer'} and PATH). It ships in the "
        "tritonclient==2.50.0 wheel (pip install 'tritonclient[all]==2.50.0'), or set "
        "PERF_ANALYZER=/path/to/perf_analyzer", kind="not_installed")


def _cuda_runtime_lib_dirs() -> list[str]:
    """libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel (perf_analyzer
    links against it even on a CPU-only host; it never uses the GPU here)."""
    dirs = []
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "lib").is_dir():
                dirs.append(str(Path(loc) / "lib"))
    if not dirs:
        for p in Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"):
            dirs.append(str(p))
    return dirs


def perf_analyzer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment perf_analyzer needs: the CUDA runtime wheel's lib folder
    prepended to LD_LIBRARY_PATH (the one place this is handled)."""
    env = dict(os.environ if base is None else base)
    extra = [d for d in _cuda_runtime_lib_dirs() if d not in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)]
    if extra:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


def perf_analyzer_version() -> str | None:
    try:
        out = subprocess.run([str(find_perf_analyzer()), "--version"], env=perf_analyzer_env(),
                             capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else None
    except Exception:  # noqa: BLE001 - informational only
        return None


# ----------------------------------------------------------------------------- settings
@dataclass
class MeasurementSettings:
    """How perf_analyzer measures one point (all of it goes into the report).

    On 2 CPU cores 5 s windows failed to stabilise; 10 s windows with a 20 %
    threshold held (docs/environment.md). Tests use ~1 s windows."""
    window_ms: int = 10000
    stability_pct: float = 20.0
    max_trials: int = 10
    measurement_mode: str = "time_windows"
    request_count: int = 50          # per window, count_windows mode only
    percentile: int | None = None    # stabilise on this latency percentile (None: the average)
    # A fixed number of requests in ONE pass, no stability check (smoke tests,
    # CI on a busy machine). None: windows until stable (the measurement).
    fixed_requests: int | None = None
    collect_metrics: bool = True     # server metrics columns (GPU); skipped if the endpoint is down
    timeout_s: float | None = None   # per point; None: derived from the window and trials
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.measurement_mode not in MEASUREMENT_MODES:
            raise ValueError(f"measurement mode {self.measurement_mode!r}: choose one of {MEASUREMENT_MODES}")
        if self.window_ms < 100:
            raise ValueError(f"--window-ms {self.window_ms}: at least 100 ms")
        if not 0 < self.stability_pct <= 100:
            raise ValueError(f"--stability-pct {self.stability_pct}: must be in (0, 100]")
        if self.max_trials < 3:
            raise ValueError(f"--max-trials {self.max_trials}: perf_analyzer needs at least 3 windows")
        if self.fixed_requests is not None and self.fixed_requests < 1:
            raise ValueError(f"--fixed-requests {self.fixed_requests}: must be >= 1")

    def point_timeout(self) -> float:
        if self.timeout_s:
            return float(self.timeout_s)
        # every trial is one window, plus start-up and the last windows' tail
        return self.window_ms / 1000 * (self.max_trials + 3) + 60

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d

# ----------------------------------------------------------------------------- model config
def fetch_model_config(url: str, protocol: str, model: str, *, api_key: str | None = None,
                       timeout_s: float = 30.0) -> dict[str, Any]:
    """The served model's config (dinov2_triton.serve.triton_access.normalise_config's shape).
    Raises PerfAnalyzerError (kind model_not_found / unreachable / failed)."""
    from dinov2_triton.serve.triton_access import ModelNotReady, ServerUnreachable, TritonError, connect

    try:
        with connect(url, protocol, api_key=api_key, timeout_s=timeout_s) as conn:
            return conn.model_config(model)
    except ModelNotReady as exc:
        raise PerfAnalyzerError(f"{exc}; load it first or leave it out of --models", kind="model_not_found",
                                model=model, protocol=protocol) from None
    except TritonError as exc:
        kind = "unreachable" if isinstance(exc, ServerUnreachable) else "failed"
        raise PerfAnalyzerError(f"cannot read the config of model {model!r} over {protocol}: {exc}", kind=kind,
                                model=model, protocol=protocol) from None


# ----------------------------------------------------------------------------- CSV
def _number(text: str) -> float | int | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if v.is_integer() and "." not in text else v


def parse_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a perf_analyzer CSV (`-f`, with or without --verbose-csv and
    --collect-metrics) as dicts keyed by CSV_COLUMNS' names, numbers parsed,
    plus `raw` (every column as written). Times are microseconds.

    perf_analyzer appends a blank line and, for some modes, extra sections
    after the table; parsing stops at the first blank line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PerfAnalyzerError(f"{path}: cannot read perf_analyzer's CSV ({exc})", kind="failed") from exc
    table = text.split("\n\n", 1)[0].strip().splitlines()
    if not table:
        raise PerfAnalyzerError(f"{path}: empty perf_analyzer CSV", kind="failed")
    reader = csv.DictReader(table)
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if not any(c in (reader.fieldnames or []) for c in LOAD_CSV_COLUMNS):
        missing.append(" or ".join(LOAD_CSV_COLUMNS))
    if missing:
        raise PerfAnalyzerError(f"{path}: not a perf_analyzer CSV (columns {reader.fieldnames}; missing "
                                f"{missing})", kind="failed")
    rows = []
    for raw in reader:
        row: dict[str, Any] = {key: _number(raw.get(col, "")) for col, key in CSV_COLUMNS.items() if col in raw}
        row["raw"] = {k: v for k, v in raw.items() if k is not None}
        parts = [row.get(k) for k in SERVER_BREAKDOWN]
        row["server_total_us"] = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- one point
_STABLE = re.compile(r"Failed to obtain stable measurement[^\n]*")
_THREAD_ERR = re.compile(r"Thread \[\d+\] had error: ([^\n]+)")
_ERROR_LINE = re.compile(r"^(?:error|Error|cb::Error)\s*:?\s*(.+)$", re.M)
#: Triton's words for a request its queue policy refused (dinov2_triton.export.triton_config)
SHED_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


def classify_failure(output: str, returncode: int | None) -> tuple[str, str]:
    """(kind, perf_analyzer's own message) from its output and exit code."""
    m = _THREAD_ERR.search(output)
    if m:
        message = m.group(1).strip()
        # the server's queue policy refused requests (UNAVAILABLE / 503): load
        # shed at this point, not a broken model or request
        if any(w in message for w in SHED_MESSAGES):
            return "shed", message
        return "request_error", message
    m = _STABLE.search(output)
    if m:
        return "unstable", m.group(0).strip()
    if "error while loading shared libraries" in output:
        lib = output.split("error while loading shared libraries:", 1)[1].strip().splitlines()[0]
        return "not_installed", (f"missing shared library: {lib} (libb64: apt-get install libb64-0d; "
                                 f"libcudart.so.12: pip install nvidia-cuda-runtime-cu12)")
    low = output.lower()
    if "not found" in low and ("unknown model" in low or "request for unknown model" in low):
        return "model_not_found", _first_error(output)
    if "failed to connect" in low or "connection refused" in low or "couldn't connect" in low \
            or "failed to get model metadata" in low or "unavailable" in low:
        return "unreachable", _first_error(output)
    if "unable to connect to metrics endpoint" in low:
        return "unreachable", _first_error(output) or "metrics endpoint unreachable"
    return "failed", _first_error(output) or f"exit code {returncode}"


def _first_error(output: str) -> str:
    m = _ERROR_LINE.search(output)
    if m:
        return m.group(0).strip()
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


_HINTS = {
    "unstable": "raise --window-ms or --stability-pct (2-core machines need ~10 s windows, 20 %), or "
                "--max-trials",
    "request_error": "the server rejected the requests; check the model config, the batch size and the "
                     "server log",
    "shed": "the server shed load at this point (its queue policy: export --max-queue-size / "
            "--queue-timeout-ms); lower the concurrency or raise the queue timeout",
    "unreachable": "is the server up at this address and protocol (gRPC default port 8001, HTTP 8000)?",
    "model_not_found": "the model is not loaded on the server; load it or leave it out of --models",
    "timeout": "raise --point-timeout or shorten --window-ms / --max-trials",
    "not_installed": "see docs/environment.md, 'perf_analyzer on CPU'",
}


def _load_args(concurrency: int | None, request_rate: float | None, request_distribution: str,
               max_threads: int | None, request_intervals: str | os.PathLike | None = None) -> list[str]:
    """Closed loop (``concurrency`` requests always in flight) or open loop
    (``request_rate`` requests/s whatever the answers do). Poisson arrivals
    come from ``request_intervals`` (dinov2_triton.bench.arrivals: perf_analyzer's own
    Poisson schedule offers ~16 % less than asked at low rates)."""
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give a concurrency (closed loop) or a request rate (open loop), exactly one")
    if concurrency is not None:
        return [f"--concurrency-range={concurrency}:{concurrency}"]
    if not request_rate > 0:
        raise ValueError(f"request rate {request_rate}: must be > 0")
    if request_distribution not in REQUEST_DISTRIBUTIONS:
        raise ValueError(f"request distribution {request_distribution!r}: choose one of {REQUEST_DISTRIBUTIONS}")
    # Asynchronous calls: in the default synchronous mode a thread waits for its
    # answer before it sends the next request, so a slow server would slow the
    # arrivals down (closed loop again; perf_analyzer then reports "delayed" requests).
    if request_distribution == "poisson":
        if request_intervals is None:
            raise ValueError("Poisson arrivals need a --request-intervals file "
                             "(dinov2_triton.bench.arrivals.write_poisson_schedule)")
        args = [f"--request-intervals={request_intervals}", "--async"]
    else:
        args = [f"--request-rate-range={request_rate:g}:{request_rate:g}:1",
                f"--request-distribution={request_distribution}", "--async"]
    if max_threads:
        args.append(f"--max-threads={int(max_threads)}")
    return args


def build_command(binary: str | os.PathLike, *, model: str, url: str, protocol: str, batch_size: int,
                  concurrency: int | None = None, settings: MeasurementSettings,
                  input_data: str | os.PathLike | None, shapes: Sequence[str], csv_path: str | os.PathLike,
                  metrics_url: str | None, request_rate: float | None = None,
                  request_distribution: str = "poisson", max_threads: int | None = None,
                  request_intervals: str | os.PathLike | None = None) -> list[str]:
    cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
           *_load_args(concurrency, request_rate, request_distribution, max_threads, request_intervals),
           f"--measurement-mode={settings.measurement_mode}",
           "-p", str(settings.window_ms), "-s", str(settings.stability_pct), "-r", str(settings.max_trials),
           "-f", str(csv_path), "--verbose-csv"]
    if settings.measurement_mode == "count_windows":
        cmd.append(f"--measurement-request-count={settings.request_count}")
    if settings.percentile:
        cmd.append(f"--percentile={settings.percentile}")
    if settings.fixed_requests:
        cmd.append(f"--request-count={settings.fixed_requests}")
    if input_data is not None:
        cmd.append(f"--input-data={input_data}")
    cmd += list(shapes)
    if metrics_url:
        cmd += ["--collect-metrics", f"--metrics-url={metrics_url}"]
    return cmd + list(settings.extra_args)


def run_point(*, model: str, url: str, protocol: str, batch_size: int, concurrency: int | None = None,
              settings: MeasurementSettings, input_data: str | os.PathLike | None, shapes: Sequence[str],
              out_dir: str | os.PathLike, metrics_url: str | None = None, request_rate: float | None = None,
              request_distribution: str = "poisson", max_threads: int | None = None) -> dict[str, Any]:
    """Run perf_analyzer for one point; returns the parsed CSV row with the
    command and the wall time. Raises PerfAnalyzerError (with the point and
    perf_analyzer's message) on any failure, including an unstable measurement.

    Closed loop with ``concurrency``; open loop with ``request_rate``
    (requests/s, arrivals by ``request_distribution``, asynchronous calls:
    the point's dict then has ``request_rate`` and ``concurrency`` None)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = f"c{concurrency}" if request_rate is None else f"r{request_rate:g}"
    tag = f"{model}_{protocol}_b{batch_size}_{load}"
    csv_path, log_path = out_dir / f"{tag}.csv", out_dir / f"{tag}.log"
    csv_path.unlink(missing_ok=True)
    load_words = (f"concurrency {concurrency}" if request_rate is None else
                  f"{request_rate:g} requests/s, {request_distribution} arrivals")
    where = f"perf_analyzer on model {model!r} over {protocol} (batch {batch_size}, {load_words})"
    binary = find_perf_analyzer()
    intervals = None
    if request_rate is not None and request_distribution == "poisson" and request_rate > 0:
        from dinov2_triton.bench.arrivals import write_poisson_schedule

        # one pass covers every window perf_analyzer may measure
        intervals = write_poisson_schedule(out_dir / f"{tag}.intervals", request_rate,
                                           settings.window_ms / 1000 * settings.max_trials)
    cmd = build_command(binary, model=model, url=url, protocol=protocol, batch_size=batch_size,
                        concurrency=concurrency, settings=settings, input_data=input_data, shapes=shapes,
                        csv_path=csv_path, metrics_url=metrics_url, request_rate=request_rate,
                        request_distribution=request_distribution, max_threads=max_threads,
                        request_intervals=intervals)
    command = " ".join(cmd)
    ctx = dict(model=model, protocol=protocol, batch_size=batch_size, concurrency=concurrency, command=command)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True,
                              timeout=settings.point_timeout())
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        atomic_write_text(log_path, command + "\n\n" + out)
        raise PerfAnalyzerError(f"{where}: timeout after {settings.point_timeout():.0f} s. Hint: "
                                f"{_HINTS['timeout']}", kind="timeout", output=out, **ctx) from exc
    except OSError as exc:
        raise PerfAnalyzerError(f"{where}: cannot start {binary}: {exc}", kind="not_installed", **ctx) from exc
    wall = time.monotonic() - t0
    output = (proc.stdout or "") + (("\n" + proc.stderr) if proc.stderr else "")
    atomic_write_text(log_path, command + "\n\n" + output)
    # A failing run can still exit 0 (e.g. a worker error with some requests
    # answered): trust the messages first, then the exit code and the CSV.
    kind, message = classify_failure(output, proc.returncode)
    if proc.returncode != 0 or kind in ("request_error", "shed", "unstable") or not csv_path.is_file():
        if kind == "failed" and proc.returncode == 0:
            message = f"no CSV written ({_first_error(output) or 'no output'})"
        hint = _HINTS.get(kind)
        raise PerfAnalyzerError(f"{where} failed ({kind}): {message.rstrip('.')}"
                                + (f". Hint: {hint}" if hint else "")
                                + f" [log: {log_path}]", kind=kind, output=output, **ctx)
    rows = parse_csv(csv_path)
    if not rows:
        raise PerfAnalyzerError(f"{where}: the CSV {csv_path} has no measurement row", kind="failed",
                                output=output, **ctx)
    row = rows[-1]
    point = {"model": model, "protocol": protocol, "batch_size": batch_size, "concurrency": concurrency,
             "status": "OK", "metrics": row, "csv": str(csv_path), "log": str(log_path), "command": command,
             "wall_s": round(wall, 2)}
    if request_rate is not None:
        point["request_rate"] = request_rate
    return point


# ----------------------------------------------------------------------------- sweep
def metrics_reachable(metrics_url: str | None, timeout: float = 3.0) -> bool:
    if not metrics_url:
        return False
    url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - user-given server URL
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def run_sweep(*, urls: Mapping[str, str], models: Sequence[str], protocols: Sequence[str] = ("grpc",),
              concurrency: Sequence[int] = (1, 2, 4), batch_sizes: Sequence[int] = (1, 8),
              settings: MeasurementSettings | None = None, samples: Samples, out_dir: str | os.PathLike,
              metrics_url: str | None = None, keep_going: bool = False,
              api_key: str | None = None, input_dir: str | os.PathLike | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every (model, protocol, batch size, concurrency) point.

    urls: {"grpc": "host:8001", "http": "host:8000"} (only the protocols asked
    for are needed). Batch sizes above a model's max_batch_size are skipped
    (listed with the reason). A failing point raises PerfAnalyzerError (with
    `.partial` holding the sweep so far) unless keep_going, in which case it
    is recorded under "failures" and the sweep continues.

    The --input-data JSON files go to `input_dir` (default out_dir/input_data;
    they are large: ~0.8 MB per 224 px image), the CSVs and logs to out_dir/csv.

    The model configs are read over the first protocol (with ``api_key``, if
    the server restricts its config API); perf_analyzer runs without it.

    Returns {"settings", "input_data", "model_configs", "points",
    "failures", "skipped"}; each point is run_point()'s dict and each config
    is dinov2_triton.serve.triton_access.normalise_config()'s shape."""
    settings = settings or MeasurementSettings()
    progress = progress or (lambda msg: log.info(msg))
    out_dir = Path(out_dir)
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"--protocols {p!r}: choose from {PROTOCOLS}")
        if not urls.get(p):
            raise ValueError(f"protocol {p} requested but no URL given for it (--url for gRPC, --http-url for HTTP)")
    use_metrics = settings.collect_metrics and metrics_reachable(metrics_url)
    result: dict[str, Any] = {
        "settings": {**settings.to_dict(), "protocols": list(protocols), "concurrency": list(concurrency),
                     "batch_sizes": list(batch_sizes), "urls": dict(urls), "metrics_url": metrics_url,
                     "metrics_collected": use_metrics, "keep_going": keep_going},
        "input_data": samples.describe(), "model_configs": {}, "points": [], "failures": [], "skipped": []}
    if settings.collect_metrics and not use_metrics:
        result["skipped"].append({"what": "perf_analyzer --collect-metrics",
                                  "reason": f"metrics endpoint {metrics_url!r} not reachable"})

    def fail(exc: PerfAnalyzerError) -> None:
        status = "SHED" if exc.kind == "shed" else "FAILED"   # overload is not a broken model
        entry = {"model": exc.model, "protocol": exc.protocol, "batch_size": exc.batch_size,
                 "concurrency": exc.concurrency, "status": status, "kind": exc.kind, "reason": str(exc),
                 "command": exc.command}
        result["failures"].append(entry)
        progress(f"{status}: {exc}")
        if not keep_going:
            exc.partial = result
            raise exc

    config_proto = protocols[0]
    # First every model's config and inputs (so the plan is known), then the
    # points: one progress line each, numbered against the plan, with an ETA
    # from the points measured so far (a sweep runs for minutes; a log or CI
    # must show where it is).
    plan = []
    for model in models:
        try:
            cfg = fetch_model_config(urls[config_proto], config_proto, model, api_key=api_key)
        except PerfAnalyzerError as exc:
            fail(exc)
            continue
        result["model_configs"][model] = cfg
        try:
            data_file = write_input_data(Path(input_dir or out_dir / "input_data") / f"{model}.json", cfg, samples)
            shapes = shape_args(cfg, samples)
        except ValueError as exc:
            fail(PerfAnalyzerError(str(exc), kind="bad_input", model=model))
            continue
        max_bs = cfg["max_batch_size"]
        allowed = [b for b in batch_sizes if (b <= max_bs if max_bs > 0 else b == 1)]
        for b in batch_sizes:
            if b not in allowed:
                result["skipped"].append({"what": f"{model} batch {b}",
                                          "reason": f"above the model's max_batch_size {max_bs}"})
            elif b > len(samples.names):
                result["skipped"].append({"what": f"{model} batch {b}",
                                          "reason": f"only {len(samples.names)} input samples"})
        allowed = [b for b in allowed if b <= len(samples.names)]
        plan += [(model, data_file, shapes, protocol, b, c)
                 for protocol in protocols for b in allowed for c in concurrency]

    t_sweep = time.monotonic()
    for i, (model, data_file, shapes, protocol, b, c) in enumerate(plan, 1):
        what = f"[perf {i}/{len(plan)}] {model} {protocol} batch {b} concurrency {c}"
        try:
            point = run_point(model=model, url=urls[protocol], protocol=protocol, batch_size=b,
                              concurrency=c, settings=settings, input_data=data_file,
                              shapes=shapes, out_dir=out_dir / "csv",
                              metrics_url=metrics_url if use_metrics else None)
        except PerfAnalyzerError as exc:
            progress(f"{what}: FAILED ({str(exc).splitlines()[0][:160]}){_eta(t_sweep, i, len(plan))}")
            fail(exc)
            continue
        m = point["metrics"]
        progress(f"{what}: {m.get('throughput_infer_per_s')} infer/s, p99 "
                 f"{(m.get('p99_latency_us') or 0) / 1000:.1f} ms{_eta(t_sweep, i, len(plan))}")
        result["points"].append(point)
    return result


def _eta(t_start: float, done: int, total: int) -> str:
    if done >= total:
        return ""
    left = (time.monotonic() - t_start) / done * (total - done)
    return f", ETA {left / 60:.1f} min" if left >= 60 else f", ETA {left:.0f} s"
