"""Run Triton's perf_analyzer over a sweep and parse what it measured.

One perf_analyzer process per point (model, protocol, batch size,
concurrency), so a failing point names itself and the other points still run
when asked to (`keep_going`). Every point:

- sends REAL inputs: a `--input-data` JSON written from test-split images
  (preprocessed `pixel_values` for the bare variants, the encoded image file
  bytes for the ensemble), never perf_analyzer's random tensors;
- uses the shapes of the server's own model config (`--shape
  pixel_values:3,H,W`), and batch sizes up to its `max_batch_size` only
  (FIELD_NOTES 7 and 10);
- measures in time windows with a stability threshold and a trial limit that
  hold on a 2-core machine (`-p 10000 -s 20` by default, ENVIRONMENT.md);
- writes a verbose CSV whose client and server-side breakdown (send, network,
  queue, compute input/infer/output, receive, p50..p99) is parsed here.

The input-data JSON format (perf_analyzer docs, "Real Input Data"): one entry
per batch-1 request, `{"data": [{"<input>": {"b64": "..."}}, ...]}`; a batch
of b takes b consecutive entries. For FP32 tensors the b64 payload is the
little-endian row-major bytes. For BYTES tensors perf_analyzer sends the
decoded b64 payload AS IS, so it must already be Triton's serialized string
tensor (4-byte little-endian length, then the bytes, per element); a bare
PNG in b64 is rejected by the server ("expected 1 string elements, got 0"),
and a `content` string would be sent as text, not as the image bytes.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger("perf.perf_analyzer")

PROTOCOLS = ("grpc", "http")
MEASUREMENT_MODES = ("time_windows", "count_windows")

# CSV column -> key in a parsed row (values in microseconds except throughput).
CSV_COLUMNS = {
    "Concurrency": "concurrency",
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
REQUIRED_CSV_COLUMNS = ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency")
# The server-side parts of one request, in the order they happen.
SERVER_BREAKDOWN = ("server_queue_us", "server_compute_input_us", "server_compute_infer_us",
                    "server_compute_output_us")


class PerfAnalyzerError(RuntimeError):
    """A perf_analyzer run failed; the message names the point and carries
    perf_analyzer's own words. `kind` is one of: not_installed, unreachable,
    model_not_found, unstable, request_error, timeout, bad_input, failed."""

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

    The tritonclient 2.50.0 wheel is the last that ships it (ENVIRONMENT.md)."""
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
    threshold held (ENVIRONMENT.md). Tests use ~1 s windows."""
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
def _client(url: str, protocol: str, headers: Mapping[str, str] | None = None):
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(url=url)
    if protocol == "http":
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(url=url)
    raise ValueError(f"protocol {protocol!r}: choose one of {PROTOCOLS}")


def _normalize_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """gRPC's JSON config has int64 dims as strings; make both protocols alike."""
    def io(entries):
        return [{"name": e["name"], "data_type": e.get("data_type", "TYPE_INVALID"),
                 "dims": [int(d) for d in e.get("dims", [])]} for e in entries or []]

    return {"name": cfg.get("name"), "platform": cfg.get("platform", ""), "backend": cfg.get("backend", ""),
            "max_batch_size": int(cfg.get("max_batch_size", 0) or 0),
            "input": io(cfg.get("input")), "output": io(cfg.get("output")),
            "ensemble": bool(cfg.get("ensemble_scheduling"))}


def fetch_model_config(url: str, protocol: str, model: str,
                       headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The served model's config (normalized: name, platform, max_batch_size,
    input/output name + data_type + dims). Raises PerfAnalyzerError when the
    server is unreachable or the model is not ready."""
    try:
        client = _client(url, protocol)
        if not client.is_model_ready(model, headers=dict(headers or {})):
            raise PerfAnalyzerError(f"model {model!r} is not ready on {protocol}://{url} (load it first, "
                                    f"or check the server log)", kind="model_not_found", model=model,
                                    protocol=protocol)
        if protocol == "grpc":
            cfg = client.get_model_config(model, headers=dict(headers or {}), as_json=True)["config"]
        else:
            cfg = client.get_model_config(model, headers=dict(headers or {}))
    except PerfAnalyzerError:
        raise
    except Exception as exc:  # noqa: BLE001 - tritonclient raises several types
        raise PerfAnalyzerError(f"cannot read the config of model {model!r} from {protocol}://{url}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                kind="unreachable", model=model, protocol=protocol) from exc
    return _normalize_config(cfg)


def list_ready_models(url: str, protocol: str, candidates: Iterable[str] | None = None,
                      headers: Mapping[str, str] | None = None) -> list[str]:
    """Ready models on the server: `candidates` filtered by readiness, or the
    repository index when no candidates are given (that API may need the
    server's API key in `headers`)."""
    client = _client(url, protocol)
    if candidates is None:
        try:
            index = client.get_model_repository_index(headers=dict(headers or {}),
                                                      **({"as_json": True} if protocol == "grpc" else {}))
        except Exception as exc:  # noqa: BLE001
            raise PerfAnalyzerError(
                f"cannot list the models of {protocol}://{url} ({str(exc).splitlines()[0]}); the "
                f"repository index may need an API key: pass the model names (--models a,b) or "
                f"--repository", kind="unreachable", protocol=protocol) from exc
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted(m["name"] for m in models if m.get("state") == "READY")
    ready = []
    for name in candidates:
        try:
            if client.is_model_ready(name, headers=dict(headers or {})):
                ready.append(name)
        except Exception:  # noqa: BLE001 - a model the server never heard of
            pass
    return ready


# ----------------------------------------------------------------------------- input data
@dataclass
class Samples:
    """Real inputs for the load generators: preprocessed tensors for the bare
    variants, the encoded files for the ensemble (what a real client sends)."""
    pixel_values: np.ndarray                 # float32 [N,3,H,W]
    encoded: list[bytes]                     # image files as stored (PNG/JPEG...)
    names: list[str]
    source: str                              # e.g. "test split of ./data (32 images)" or "synthetic"
    labels: list[int] | None = None
    synthetic: bool = False

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self.names), "synthetic": self.synthetic,
                "pixel_values_shape": list(self.pixel_values.shape),
                "mean_encoded_bytes": float(np.mean([len(b) for b in self.encoded])) if self.encoded else None}


def load_samples(data_path: str | os.PathLike | None, preprocessing: Mapping[str, Any] | Any, *, n: int = 32,
                 split: str = "test", seed: int = 0) -> Samples:
    """n images of `split` (seeded choice, manifest order) from the data folder,
    preprocessed with the checkpoint's record. Without a data folder: loudly
    synthetic inputs (noise images), flagged in the report."""
    from train.preprocessing import PreprocessConfig, preprocess_source

    cfg = preprocessing if isinstance(preprocessing, PreprocessConfig) else PreprocessConfig.from_dict(preprocessing)
    if data_path is None:
        return synthetic_samples((3, cfg.image_size, cfg.image_size), n=n, seed=seed,
                                 encoded_size=cfg.resize_size)
    from train.datasets import read_manifest

    records = read_manifest(data_path, split)
    if not records and split == "test":
        records = read_manifest(data_path, "val")
        split = "val (no test split)"
    if not records:
        raise ValueError(f"{Path(data_path) / 'manifest.csv'}: no {split} images to measure with")
    rng = np.random.default_rng(seed)
    if len(records) > n:
        keep = sorted(rng.permutation(len(records))[:n].tolist())
        records = [records[i] for i in keep]
    pix = np.stack([preprocess_source(r.file(data_path), cfg, name=r.path) for r in records]).astype(np.float32)
    enc = [r.file(data_path).read_bytes() for r in records]
    return Samples(pix, enc, [r.path for r in records], f"{split} split of {data_path} ({len(records)} images)",
                   labels=[r.label for r in records])


def synthetic_samples(chw: Sequence[int], *, n: int = 16, seed: int = 0, encoded_size: int | None = None) -> Samples:
    """Random tensors and noise PNGs, for tests and for runs without data."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pix = rng.standard_normal((n, *chw)).astype(np.float32)
    side = encoded_size or chw[-1]
    enc = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        enc.append(buf.getvalue())
    return Samples(pix, enc, [f"random-{i}" for i in range(n)],
                   f"SYNTHETIC random tensors / noise images ({n}); no --data_path given", synthetic=True)


def serialize_bytes_element(data: bytes) -> bytes:
    """Triton's serialized BYTES element: uint32 little-endian length + bytes."""
    return struct.pack("<I", len(data)) + data


_NUMPY_TYPES = {"TYPE_FP32": "<f4", "TYPE_FP16": "<f2", "TYPE_FP64": "<f8", "TYPE_INT8": "i1",
                "TYPE_UINT8": "u1", "TYPE_INT32": "<i4", "TYPE_INT64": "<i8"}


def write_input_data(path: str | os.PathLike, model_config: Mapping[str, Any], samples: Samples) -> Path:
    """Write perf_analyzer's --input-data JSON for this model from real samples.

    Tensor inputs get `samples.pixel_values` (checked against the config's
    dims), BYTES inputs get the encoded images. Raises ValueError naming the
    model and input when the samples do not fit."""
    path = Path(path)
    entries: list[dict[str, Any]] = [{} for _ in range(len(samples.names))]
    name = model_config.get("name")
    for inp in model_config["input"]:
        dtype, dims = inp["data_type"], list(inp["dims"])
        if dtype in ("TYPE_STRING", "BYTES"):
            count = int(np.prod(dims)) if dims else 1
            if count != 1:
                raise ValueError(f"model {name}: BYTES input {inp['name']} has dims {dims}; only one "
                                 f"encoded image per item is supported")
            for e, img in zip(entries, samples.encoded):
                e[inp["name"]] = {"b64": base64.b64encode(serialize_bytes_element(img)).decode("ascii")}
        elif dtype in _NUMPY_TYPES:
            want = [d if d > 0 else s for d, s in zip(dims, samples.pixel_values.shape[1:])]
            if len(dims) != samples.pixel_values.ndim - 1 or list(samples.pixel_values.shape[1:]) != want:
                raise ValueError(
                    f"model {name}: input {inp['name']} expects dims {dims} but the samples are "
                    f"{list(samples.pixel_values.shape[1:])} (image size of the checkpoint's preprocessing "
                    f"record vs the served config); measure the model the checkpoint was exported from")
            arr = samples.pixel_values.astype(_NUMPY_TYPES[dtype])
            for e, a in zip(entries, arr):
                e[inp["name"]] = {"b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}
        else:
            raise ValueError(f"model {name}: input {inp['name']} has type {dtype}, not supported here")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


def shape_args(model_config: Mapping[str, Any], samples: Samples | None = None) -> list[str]:
    """`--shape name:dims` for every tensor input, from the server's config
    (variable dims filled from the samples), so the load matches the config."""
    args = []
    for inp in model_config["input"]:
        dims = list(inp["dims"])
        if inp["data_type"] in ("TYPE_STRING", "BYTES"):
            dims = [d if d > 0 else 1 for d in dims]
        elif any(d < 0 for d in dims):
            if samples is None:
                raise ValueError(f"model {model_config.get('name')}: input {inp['name']} has variable dims "
                                 f"{dims}; give samples to fill them")
            dims = [d if d > 0 else s for d, s in zip(dims, samples.pixel_values.shape[1:])]
        args.append(f"--shape={inp['name']}:{','.join(str(d) for d in dims)}")
    return args


def bytes_per_item(model_config: Mapping[str, Any], samples: Samples | None = None) -> dict[str, float]:
    """Bytes on the wire per image: inputs (tensors or the encoded file) and outputs."""
    size = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_FP64": 8, "TYPE_INT8": 1, "TYPE_UINT8": 1,
            "TYPE_INT32": 4, "TYPE_INT64": 8}
    def total(entries, is_input):
        n = 0.0
        for e in entries:
            if e["data_type"] in ("TYPE_STRING", "BYTES"):
                if is_input and samples is not None and samples.encoded:
                    n += float(np.mean([len(b) + 4 for b in samples.encoded]))
                continue
            n += size.get(e["data_type"], 4) * float(np.prod([max(d, 1) for d in e["dims"]]))
        return n
    return {"input_bytes": total(model_config["input"], True), "output_bytes": total(model_config["output"], False)}


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


def classify_failure(output: str, returncode: int | None) -> tuple[str, str]:
    """(kind, perf_analyzer's own message) from its output and exit code."""
    m = _THREAD_ERR.search(output)
    if m:
        return "request_error", m.group(1).strip()
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
    "unreachable": "is the server up at this address and protocol (gRPC default port 8001, HTTP 8000)?",
    "model_not_found": "the model is not loaded on the server; load it or leave it out of --models",
    "timeout": "raise --point-timeout or shorten --window-ms / --max-trials",
    "not_installed": "see ENVIRONMENT.md, 'perf_analyzer on CPU'",
}


def build_command(binary: str | os.PathLike, *, model: str, url: str, protocol: str, batch_size: int,
                  concurrency: int, settings: MeasurementSettings, input_data: str | os.PathLike | None,
                  shapes: Sequence[str], csv_path: str | os.PathLike, metrics_url: str | None) -> list[str]:
    cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
           f"--concurrency-range={concurrency}:{concurrency}",
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


def run_point(*, model: str, url: str, protocol: str, batch_size: int, concurrency: int,
              settings: MeasurementSettings, input_data: str | os.PathLike | None, shapes: Sequence[str],
              out_dir: str | os.PathLike, metrics_url: str | None = None) -> dict[str, Any]:
    """Run perf_analyzer for one point; returns the parsed CSV row with the
    command and the wall time. Raises PerfAnalyzerError (with the point and
    perf_analyzer's message) on any failure, including an unstable measurement."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{model}_{protocol}_b{batch_size}_c{concurrency}"
    csv_path, log_path = out_dir / f"{tag}.csv", out_dir / f"{tag}.log"
    csv_path.unlink(missing_ok=True)
    where = f"perf_analyzer on model {model!r} over {protocol} (batch {batch_size}, concurrency {concurrency})"
    binary = find_perf_analyzer()
    cmd = build_command(binary, model=model, url=url, protocol=protocol, batch_size=batch_size,
                        concurrency=concurrency, settings=settings, input_data=input_data, shapes=shapes,
                        csv_path=csv_path, metrics_url=metrics_url)
    command = " ".join(cmd)
    ctx = dict(model=model, protocol=protocol, batch_size=batch_size, concurrency=concurrency, command=command)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True,
                              timeout=settings.point_timeout())
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log_path.write_text(command + "\n\n" + out)
        raise PerfAnalyzerError(f"{where}: timeout after {settings.point_timeout():.0f} s. Hint: "
                                f"{_HINTS['timeout']}", kind="timeout", output=out, **ctx) from exc
    except OSError as exc:
        raise PerfAnalyzerError(f"{where}: cannot start {binary}: {exc}", kind="not_installed", **ctx) from exc
    wall = time.monotonic() - t0
    output = (proc.stdout or "") + (("\n" + proc.stderr) if proc.stderr else "")
    log_path.write_text(command + "\n\n" + output)
    # A failing run can still exit 0 (e.g. a worker error with some requests
    # answered): trust the messages first, then the exit code and the CSV.
    kind, message = classify_failure(output, proc.returncode)
    if proc.returncode != 0 or kind in ("request_error", "unstable") or not csv_path.is_file():
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
    return {"model": model, "protocol": protocol, "batch_size": batch_size, "concurrency": concurrency,
            "status": "OK", "metrics": row, "csv": str(csv_path), "log": str(log_path), "command": command,
            "wall_s": round(wall, 2)}


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
              headers: Mapping[str, str] | None = None, input_dir: str | os.PathLike | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every (model, protocol, batch size, concurrency) point.

    urls: {"grpc": "host:8001", "http": "host:8000"} (only the protocols asked
    for are needed). Batch sizes above a model's max_batch_size are skipped
    (listed with the reason). A failing point raises PerfAnalyzerError (with
    `.partial` holding the sweep so far) unless keep_going, in which case it
    is recorded under "failures" and the sweep continues.

    The --input-data JSON files go to `input_dir` (default out_dir/input_data;
    they are large: ~0.8 MB per 224 px image), the CSVs and logs to out_dir/csv.

    Returns {"settings", "input_data", "model_configs", "points",
    "failures", "skipped"}; each point is run_point()'s dict."""
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
        entry = {"model": exc.model, "protocol": exc.protocol, "batch_size": exc.batch_size,
                 "concurrency": exc.concurrency, "status": "FAILED", "kind": exc.kind, "reason": str(exc),
                 "command": exc.command}
        result["failures"].append(entry)
        progress(f"FAILED: {exc}")
        if not keep_going:
            exc.partial = result
            raise exc

    config_proto = protocols[0]
    for model in models:
        try:
            cfg = fetch_model_config(urls[config_proto], config_proto, model, headers=headers)
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
        for protocol in protocols:
            for b in allowed:
                for c in concurrency:
                    progress(f"perf_analyzer {model} {protocol} batch {b} concurrency {c} ...")
                    try:
                        point = run_point(model=model, url=urls[protocol], protocol=protocol, batch_size=b,
                                          concurrency=c, settings=settings, input_data=data_file,
                                          shapes=shapes, out_dir=out_dir / "csv",
                                          metrics_url=metrics_url if use_metrics else None)
                    except PerfAnalyzerError as exc:
                        fail(exc)
                        continue
                    m = point["metrics"]
                    progress(f"  {m.get('throughput_infer_per_s')} infer/s, p99 "
                             f"{(m.get('p99_latency_us') or 0) / 1000:.1f} ms")
                    result["points"].append(point)
    return result
