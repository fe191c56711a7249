"""Memory: peak resident memory of a run, and the server's memory.

- In-process runs measure themselves in a fresh process each
  (`dinov2_triton.bench.inprocess` spawns one per variant), so one variant's
  peak never mixes with another's: `rss_now()` before loading and
  `peak_rss()` (getrusage ru_maxrss) at the end.
- The server: on this host, the resident memory of the tritonserver process
  tree, split per model (every Python-backend model instance is its own stub
  process whose command line names the instance, e.g. `dinov2_onnx_0`); on
  any host, what Triton's metrics endpoint says. Measured with Triton 2.51
  on CPU the endpoint exposes only HOST-wide `nv_cpu_memory_used_bytes` /
  `nv_cpu_memory_total_bytes` (all processes, not the server's own) and, on
  GPU hosts, `nv_gpu_memory_used_bytes{gpu_uuid=...}` per GPU.
"""
from __future__ import annotations

import re
import sys
import threading
import urllib.request
from typing import Any, Iterable, Mapping


def rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _vm_hwm() -> int | None:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux >= 4.0:
    writing 5 to /proc/self/clear_refs), so the next peak_rss() is the peak
    of what runs from now on. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes (since start, or since
    reset_peak_rss()).

    Linux: VmHWM of /proc/self/status. Not getrusage's ru_maxrss: that one is
    kept across fork + execve, so a freshly spawned worker would report its
    PARENT's peak when the parent was bigger."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ----------------------------------------------------------------------------- metrics endpoint
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> {metric: [(labels, value), ...]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def _metrics_url(url: str) -> str:
    url = url if "://" in url else f"http://{url}"
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def scrape_metrics(metrics_url: str, timeout: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(_metrics_url(metrics_url), timeout=timeout) as r:  # noqa: S310 - user URL
        return parse_prometheus(r.read().decode("utf-8", errors="replace"))


def memory_from_metrics(metrics: Mapping[str, list]) -> dict[str, Any]:
    """The memory numbers of Triton's metrics: host (all processes) and per GPU."""
    def first(name):
        vals = metrics.get(name) or []
        return vals[0][1] if vals else None

    gpus = {}
    for labels, value in metrics.get("nv_gpu_memory_used_bytes", []):
        gpus.setdefault(labels.get("gpu_uuid", "?"), {})["used_bytes"] = value
    for labels, value in metrics.get("nv_gpu_memory_total_bytes", []):
        gpus.setdefault(labels.get("gpu_uuid", "?"), {})["total_bytes"] = value
    return {"host_used_bytes": first("nv_cpu_memory_used_bytes"),
            "host_total_bytes": first("nv_cpu_memory_total_bytes"),
            "host_note": "nv_cpu_memory_used_bytes is the whole host's used RAM, not the server's own",
            "gpus": gpus}


# ----------------------------------------------------------------------------- server process tree
def find_listening_pid(port: int) -> int | None:
    """The pid listening on a local TCP port (the server's gRPC/HTTP port), if visible."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except (psutil.AccessDenied, OSError):
        return None
    return None


def _instance_model(cmdline: list[str], models: Iterable[str]) -> str | None:
    """Model name of a Python-backend stub process (argv[8] is '<model>_<n>')."""
    names = sorted(models, key=len, reverse=True)
    for arg in cmdline[1:]:
        for name in names:
            if re.fullmatch(re.escape(name) + r"(_\d+)+", arg):
                return name
    return None


def process_tree_memory(pid: int, models: Iterable[str] = ()) -> dict[str, Any]:
    """RSS of the server process and its children (model stubs), per model when
    the stub's command line names one of `models`."""
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    total, per_model, server_rss = 0, {}, 0
    models = list(models)
    for p in procs:
        try:
            rss = p.memory_info().rss
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += rss
        if p.pid == pid:
            server_rss = rss
            continue
        name = _instance_model(cmd, models)
        if name:
            per_model[name] = per_model.get(name, 0) + rss
    return {"pid": pid, "total_rss_bytes": total, "server_rss_bytes": server_rss,
            "processes": len(procs), "per_model_rss_bytes": per_model}


class MemorySampler:
    """Samples the server's memory in a background thread while a load runs
    (context manager); `result()` gives the peaks seen. Either source may be
    missing (a remote server has no visible pid; a server may hide metrics)."""

    def __init__(self, *, pid: int | None = None, metrics_url: str | None = None,
                 models: Iterable[str] = (), interval_s: float = 1.0):
        self.pid, self.metrics_url, self.models = pid, metrics_url, list(models)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_tree: dict[str, Any] | None = None
        self.peak_per_model: dict[str, int] = {}
        self.peak_host_used: float | None = None
        self.peak_gpu_used: dict[str, float] = {}
        self.last_metrics: dict[str, Any] | None = None
        self.errors: list[str] = []
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1
        if self.pid:
            try:
                tree = process_tree_memory(self.pid, self.models)
                if self.peak_tree is None or tree["total_rss_bytes"] > self.peak_tree["total_rss_bytes"]:
                    self.peak_tree = tree
                for k, v in tree["per_model_rss_bytes"].items():
                    self.peak_per_model[k] = max(self.peak_per_model.get(k, 0), v)
            except Exception as exc:  # noqa: BLE001 - process gone: keep the peaks so far
                self._note(f"process {self.pid}: {exc}")
        if self.metrics_url:
            try:
                mem = memory_from_metrics(scrape_metrics(self.metrics_url))
                self.last_metrics = mem
                if mem["host_used_bytes"] is not None:
                    self.peak_host_used = max(self.peak_host_used or 0, mem["host_used_bytes"])
                for uuid, g in mem["gpus"].items():
                    if "used_bytes" in g:
                        self.peak_gpu_used[uuid] = max(self.peak_gpu_used.get(uuid, 0), g["used_bytes"])
            except Exception as exc:  # noqa: BLE001
                self._note(f"metrics {self.metrics_url}: {exc}")

    def _note(self, msg: str) -> None:
        if msg not in self.errors:
            self.errors.append(msg)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()

    def result(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "metrics_url": self.metrics_url, "samples": self.samples,
            "peak_process_tree": self.peak_tree,
            "peak_per_model_rss_bytes": dict(self.peak_per_model),
            "peak_host_used_bytes": self.peak_host_used,
            "peak_gpu_used_bytes": dict(self.peak_gpu_used),
            "metrics": self.last_metrics,
            "errors": list(self.errors),
        }
