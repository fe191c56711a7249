"""How the served repository behaves when things go wrong, measured against
the REAL local Triton server: ``dinov2-triton qa reliability [--repository DIR]
[--seconds 10] [--out runs/reliability.json]`` (it starts and stops its own
servers on free loopback ports).

Scenarios, each on its own server started here on free loopback ports, over
a temporary copy of the repository (the rollout publishes versions; the
user's repository is never touched):

- **overload**: an open-loop load at ``--overload-factor`` x the model's
  measured capacity for ``--seconds``: offered, accepted, shed (UNAVAILABLE),
  failed, p50/p99 latency of the accepted requests;
- **bombs**: decompression bombs (a ~400 KB PNG declaring 20000 x 20000
  pixels) sent to the ensemble, one and six at once: time to refusal, the
  server's memory (tritonserver + backend stubs) before and after;
- **rollout**: a new version published and loaded (dinov2_triton.serve.rollout) under a
  closed-loop load, then a rollback: requests, failed, versions seen;
- **shutdown**: a stop (SIGTERM, Triton's drain) with requests in flight:
  in flight, answered, lost, refused after the stop, seconds to exit;
- **bad requests**: each malformed request with Triton's HTTP status
  (:func:`bad_request_cases`; where 2.51 answers 500 for a client error,
  the table says so).

The library parts (:func:`open_loop`, :func:`closed_loop`, :func:`png_bomb`,
:func:`server_rss`, :func:`bad_request_cases`) are what
tests/test_serving_limits.py and tests/test_rollout.py use too.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


# --------------------------------------------------------------------------- inputs
def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid all-black 8-bit grey PNG of width x height: ~1/1000 of its
    decoded size (20000 x 20000: ~390 KB encoded, 400 MB grey, 1.2 GB as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    rows = b"\0" * (width + 1) * max(1, min(height, (1 << 22) // (width + 1)))   # ~4 MB of rows
    per = len(rows) // (width + 1)
    parts, done = [], 0
    while done < height:
        n = min(per, height - done)
        parts.append(comp.compress(rows[: n * (width + 1)]))
        done += n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def pixel_request(config: dict[str, Any], batch: int = 1, seed: int = 0) -> np.ndarray:
    """A deterministic pixel_values batch shaped for ``config`` (a normalised model config)."""
    dims = [int(d) for d in config["input"][0]["dims"]]
    return np.random.default_rng(seed).standard_normal((batch, *dims)).astype(np.float32)


# --------------------------------------------------------------------------- load
@dataclass
class LoadResult:
    """Answers of a load run: ok / shed (Overloaded) / failed, latencies of
    the ok ones, the model versions that answered."""

    seconds: float = 0.0
    offered_rps: float | None = None
    sent: int = 0
    ok: int = 0
    shed: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    #: per request (sent, answered, "ok" | "shed" | "failed", error message), perf_counter seconds
    records: list[tuple[float, float, str, str]] = field(default_factory=list)

    def percentile_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else None

    @property
    def accepted_rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "offered_rps": self.offered_rps, "sent": self.sent,
                "ok": self.ok, "shed": self.shed, "failed": self.failed,
                "accepted_rps": round(self.accepted_rps, 2),
                "p50_ms": self.percentile_ms(50), "p99_ms": self.percentile_ms(99),
                "errors": dict(self.errors.most_common(5)), "versions": dict(self.versions),
                # first to last send: sent / send_s is the rate the client reached
                "send_s": round(max(r[0] for r in self.records) - min(r[0] for r in self.records), 3)
                if self.records else 0.0}


class _Recorder:
    def __init__(self) -> None:
        self.result = LoadResult()
        self.lock = threading.Lock()

    def send(self, conn, model: str, make_inputs: Callable[[Any], list]) -> str:
        """One request; returns its outcome ("ok", "shed" or "failed")."""
        from dinov2_triton.client.classifier import response_model_version
        from dinov2_triton.serve.triton_access import Overloaded, TritonError

        inputs = make_inputs(conn)
        t0 = time.perf_counter()
        try:
            answer = conn.infer(model, inputs)
        except Overloaded as exc:   # the queue policy (or a stopping server) refused it
            self._error(t0, "shed", exc)
            return "shed"
        except TritonError as exc:  # ServerUnreachable included: after a stop, refused
            self._error(t0, "failed", exc)
            return "failed"
        t1 = time.perf_counter()
        with self.lock:
            self.result.ok += 1
            self.result.latencies_s.append(t1 - t0)
            self.result.versions[response_model_version(answer) or "?"] += 1
            self.result.records.append((t0, t1, "ok", ""))
        return "ok"

    def _error(self, t0: float, outcome: str, exc: BaseException) -> None:
        message = " ".join(str(exc).split())
        with self.lock:
            setattr(self.result, outcome, getattr(self.result, outcome) + 1)
            self.result.errors[message[-70:]] += 1
            self.result.records.append((t0, time.perf_counter(), outcome, message))



def open_loop(conn, model: str, make_inputs: Callable[[Any], list], *, rate: float, seconds: float,
              workers: int = 128) -> LoadResult:
    """Send ``rate`` requests/s for ``seconds`` whatever the answers (open loop:
    overload piles up as it would from many independent clients); wait for
    every answer. ``workers`` threads bound what can be in flight at once."""
    rec, total = _Recorder(), int(rate * seconds)
    counter = iter(range(total))
    take = threading.Lock()
    t0 = time.perf_counter()

    def worker() -> None:
        while True:
            with take:
                i = next(counter, None)
            if i is None:
                return
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            rec.send(conn, model, make_inputs)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(workers, total))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.result.seconds, rec.result.sent, rec.result.offered_rps = time.perf_counter() - t0, total, rate
    return rec.result


def closed_loop(conn, model: str, make_inputs: Callable[[Any], list], *, concurrency: int,
                seconds: float | None = None, stop: threading.Event | None = None,
                quit_on_error: threading.Event | None = None) -> LoadResult:
    """``concurrency`` clients, each sending its next request when the last is
    answered, for ``seconds`` or until ``stop`` is set. Once ``quit_on_error``
    is set, a client that gets an error stops (a stopped server refuses at
    once: the clients would otherwise spin)."""
    if (seconds is None) == (stop is None):
        raise ValueError("closed_loop: give seconds or stop")
    rec, stop = _Recorder(), stop or threading.Event()
    t0 = time.perf_counter()

    def worker() -> None:
        while not stop.is_set() and (seconds is None or time.perf_counter() - t0 < seconds):
            with rec.lock:
                rec.result.sent += 1
            outcome = rec.send(conn, model, make_inputs)
            if quit_on_error is not None and quit_on_error.is_set() and outcome != "ok":
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.result.seconds = time.perf_counter() - t0
    return rec.result


def server_rss(pid: int) -> int:
    """Resident bytes of the server and its children (the Python backend stubs run the models)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


# --------------------------------------------------------------------------- bad requests
#: Triton 2.51 answers these client errors with HTTP 500 instead of 4xx
#: (pinned by tests/test_serving_limits.py, so a server upgrade that fixes
#: them is noticed)
HTTP_500_CLIENT_ERRORS = ("malformed JSON", "data shorter than its shape", "negative dimension")


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:   # noqa: S310 - loopback server
            return r.status, r.read(200).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode(errors="replace")


def bad_request_cases(http_url: str, pixel_model: str, pixel_dims: Sequence[int], max_batch: int, *,
                      image_model: str | None = None, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Send each malformed request over raw HTTP; per case its status code,
    the server's message and the time to answer."""
    base = f"http://{http_url}"
    js = {"Content-Type": "application/json"}
    n = int(np.prod(pixel_dims))
    good = {"name": "pixel_values", "shape": [1, *pixel_dims], "datatype": "FP32", "data": [0.5] * n}

    def infer(model: str, inputs: list[dict[str, Any]]) -> tuple[str, bytes, dict[str, str]]:
        return f"{base}/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode(), js

    def binary(model: str, name: str, datatype: str, shape: list[int], payload: bytes):
        header = json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                         "parameters": {"binary_data_size": len(payload)}}]}).encode()
        return (f"{base}/v2/models/{model}/infer", header + payload,
                {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})

    def blob(data: bytes) -> bytes:   # one BYTES element: 4-byte little-endian length + bytes
        return struct.pack("<I", len(data)) + data

    cases: list[tuple[str, tuple]] = [
        ("good request", infer(pixel_model, [good])),
        ("wrong input name", infer(pixel_model, [{**good, "name": "pixels"}])),
        ("wrong dtype", infer(pixel_model, [{**good, "datatype": "INT32", "data": [1] * n}])),
        ("wrong shape", infer(pixel_model, [{**good, "shape": [1, *pixel_dims[:-1], pixel_dims[-1] + 1],
                                             "data": [0.5] * (n + n // pixel_dims[-1])}])),
        (f"batch {max_batch + 1} > max_batch_size {max_batch}",
         infer(pixel_model, [{**good, "shape": [max_batch + 1, *pixel_dims], "data": [0.5] * n * (max_batch + 1)}])),
        ("unknown model", infer("no_such_model", [good])),
        ("repository index without the API key", (f"{base}/v2/repository/index", b"{}", js)),
        ("model load without the API key", (f"{base}/v2/repository/models/{pixel_model}/load", b"{}", js)),
        ("malformed JSON", (f"{base}/v2/models/{pixel_model}/infer", b'{"inputs": [{"name": ', js)),
        ("data shorter than its shape", infer(pixel_model, [{**good, "data": [0.5] * 10}])),
        ("negative dimension", infer(pixel_model, [{**good, "shape": [1, -pixel_dims[0], *pixel_dims[1:]]}])),
        ("80 MB body for a 1-image tensor",
         binary(pixel_model, "pixel_values", "FP32", [1, *pixel_dims], b"\0" * (80 << 20))),
    ]
    if image_model:
        from dinov2_triton.export.serving_models import sample_png

        png = sample_png(32)
        cases += [
            ("good image (ensemble)", binary(image_model, "image", "BYTES", [1, 1], blob(png))),
            ("garbage bytes as an image", binary(image_model, "image", "BYTES", [1, 1], blob(b"not an image" * 10))),
            ("truncated PNG", binary(image_model, "image", "BYTES", [1, 1], blob(png[: len(png) // 2]))),
            ("decompression bomb (20000 x 20000 PNG)",
             binary(image_model, "image", "BYTES", [1, 1], blob(png_bomb()))),
            ("image over max_image_bytes (21 MB)",
             binary(image_model, "image", "BYTES", [1, 1], blob(png + b"\0" * 21_000_000))),
        ]
    out = []
    for name, (url, body, headers) in cases:
        t0 = time.perf_counter()
        try:
            status, message = _post(url, body, headers, timeout)
        except OSError as exc:
            status, message = -1, f"{type(exc).__name__}: {exc}"
        out.append({"case": name, "status": status, "message": " ".join(message.split())[:160],
                    "ms": round((time.perf_counter() - t0) * 1000, 1)})
    return out


# --------------------------------------------------------------------------- scenarios
def _link_or_copy(src: str, dst: str) -> None:
    import os

    try:
        os.link(src, dst)        # model files can be large; the copy never writes into them
    except OSError:
        shutil.copy2(src, dst)


def copy_repository(src: str | Path, dst: str | Path, models: Sequence[str]) -> Path:
    """``models`` of repository ``src`` into ``dst`` (hard links where possible):
    the rollout publishes versions into the copy, never into ``src``."""
    dst = Path(dst)
    for m in models:
        if not (Path(src) / m / "config.pbtxt").is_file():
            raise ValueError(f"{Path(src) / m}: no such model (config.pbtxt) in the repository")
        shutil.copytree(Path(src) / m, dst / m, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(".staging-*"))
    return dst


def publish_copy_of_latest(repository: str | Path, model: str) -> int:
    """Publish the newest version of ``model`` again as a new version (the
    export stage's atomic StagedVersion); returns its number."""
    from dinov2_triton.export.repository import StagedVersion, latest_version

    model_dir = Path(repository) / model
    latest = model_dir / str(latest_version(model_dir))
    with StagedVersion(repository, model) as staged:
        for f in latest.rglob("*"):
            if f.is_file():
                target = staged.path / f.relative_to(latest)
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(str(f), str(target))
        staged.publish(config_text=(model_dir / "config.pbtxt").read_text(), keep=3)
    return int(staged.version)


def measure_capacity(conn, model: str, make_inputs, *, concurrency: Sequence[int] = (1, 2, 4),
                     seconds: float = 1.5) -> float:
    """Requests/s the model answers: the best closed loop over ``concurrency``.
    More clients than that measure the client: on a shared 2-core machine a
    client with many threads takes the CPU the model needs (measured: 37
    req/s with 1 client, 14 with 16)."""
    conn.infer(model, make_inputs(conn))   # warm
    return max(closed_loop(conn, model, make_inputs, concurrency=c, seconds=seconds).accepted_rps
               for c in concurrency)


def scenario_overload(conn, model: str, make_inputs, *, factor: float, seconds: float, capacity_rps: float,
                      queue_timeout_s: float = 2.0, max_requests: int | None = None) -> dict[str, Any]:
    """Open loop at ``factor`` x the measured capacity, with enough client
    threads to keep sending while accepted requests wait up to the queue
    timeout; at most ``max_requests`` (the send time is shortened to fit)."""
    rate = max(1.0, factor * capacity_rps)
    if max_requests is not None:
        seconds = min(seconds, (int(max_requests) + 0.5) / rate)
    workers = int(min(512, max(16, rate * (queue_timeout_s + 0.5))))
    res = open_loop(conn, model, make_inputs, rate=rate, seconds=seconds, workers=workers)
    return {"capacity_rps": round(capacity_rps, 2), "factor": factor, "client_threads": workers, **res.to_dict()}


def scenario_bombs(handle, ensemble: str, good: bytes, bomb: bytes, *, at_once: int = 6) -> dict[str, Any]:
    """One bomb, then ``at_once`` concurrently, to the ensemble; a good image
    before and after (same logits)."""
    with handle.connect("grpc") as conn:
        def send(blob: bytes):
            return conn.infer(ensemble, [conn.bytes_input("image", [blob])])

        before_logits = send(good).as_numpy("logits")
        rss_before = server_rss(handle.pid)
        timings, messages = [], []
        from dinov2_triton.serve.triton_access import RequestError

        def one() -> None:
            t0 = time.perf_counter()
            try:
                send(bomb)
                messages.append("ACCEPTED")
            except RequestError as exc:
                messages.append(str(exc))
            timings.append(time.perf_counter() - t0)

        one()
        threads = [threading.Thread(target=one) for _ in range(at_once)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_after = server_rss(handle.pid)
        after_logits = send(good).as_numpy("logits")
    return {"bomb_bytes": len(bomb), "sent": 1 + at_once, "refused": sum(m != "ACCEPTED" for m in messages),
            "max_ms": round(max(timings) * 1000, 1), "single_ms": round(timings[0] * 1000, 1),
            "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
            "message": messages[0][:200], "same_logits_after": bool(np.array_equal(before_logits, after_logits))}


def scenario_rollout(handle, repository: Path, model: str, make_inputs, *, concurrency: int = 4,
                     settle_s: float = 1.5) -> dict[str, Any]:
    """Closed-loop load on ``model`` while a new version is published and
    loaded, then rolled back."""
    from dinov2_triton.serve.rollout import reload_model, rollback_model

    stop = threading.Event()
    holder: dict[str, LoadResult] = {}
    with handle.connect("grpc") as conn, handle.connect("http") as admin:
        load = threading.Thread(target=lambda: holder.setdefault("r", closed_loop(
            conn, model, make_inputs, concurrency=concurrency, stop=stop)))
        load.start()
        time.sleep(settle_s)
        new = publish_copy_of_latest(repository, model)
        up = reload_model(admin, model, repository=repository)
        time.sleep(settle_s)
        back = rollback_model(admin, model, repository=repository)
        time.sleep(settle_s)
        stop.set()
        load.join()
    res = holder["r"]
    return {"published_version": new, "reload": up.describe(), "rollback": back.describe(),
            "requests": res.ok + res.shed + res.failed, "ok": res.ok, "shed": res.shed, "failed": res.failed,
            "versions_answered": dict(res.versions), "p99_ms": res.percentile_ms(99),
            "errors": dict(res.errors.most_common(3))}


#: Triton's words for a request refused at the door by a stopping server:
#: never accepted, so not lost
STOPPING = "Server is stopping"


def shutdown_accounting(records: Sequence[tuple[float, float, str, str]], t_stop: float) -> dict[str, int]:
    """Requests around a stop at ``t_stop``: in flight = sent before and answered
    after it; of those, answered (ok), refused by the stopping server (it
    never accepted them: they were still on the wire), shed by the queue
    timeout while draining (answered 503: load, not the stop) and lost
    (failed otherwise: what a drain must avoid); sent after the stop."""
    in_flight = [r for r in records if r[0] < t_stop < r[1]]
    refused = [r for r in in_flight if r[2] != "ok" and STOPPING in r[3]]
    shed = [r for r in in_flight if r[2] == "shed" and STOPPING not in r[3]]
    return {"in_flight_at_stop": len(in_flight), "answered": sum(r[2] == "ok" for r in in_flight),
            "refused_at_stop": len(refused),
            # the queue timeout still applies while draining: a shed request got its 503
            "shed_while_draining": len(shed),
            "lost": sum(r[2] == "failed" and STOPPING not in r[3] for r in in_flight),
            "sent_after_stop": sum(1 for r in records if r[0] >= t_stop),
            "accepted_after_stop": sum(1 for r in records if r[0] >= t_stop and r[2] == "ok")}


def scenario_shutdown(start: Callable[[], Any], model: str, make_inputs, *, concurrency: int = 8,
                      warm_s: float = 1.0) -> dict[str, Any]:
    """A fresh server under closed-loop load is stopped (SIGTERM; Triton drains)."""
    handle = start()
    stop_load, stopping = threading.Event(), threading.Event()
    holder: dict[str, LoadResult] = {}
    with handle.connect("grpc") as conn:
        load = threading.Thread(target=lambda: holder.setdefault("r", closed_loop(
            conn, model, make_inputs, concurrency=concurrency, stop=stop_load, quit_on_error=stopping)))
        load.start()
        time.sleep(warm_s)
        stopping.set()
        t_stop = time.perf_counter()
        handle.stop()
        exit_s = time.perf_counter() - t_stop
        stop_load.set()
        load.join()
    recs = holder["r"].records
    lost = [r[3] for r in recs if r[0] < t_stop < r[1] and r[2] == "failed" and STOPPING not in r[3]]
    return {"exit_timeout_s": handle.exit_timeout_s, "exit_s": round(exit_s, 2), "concurrency": concurrency,
            "answered_before_stop": sum(1 for r in recs if r[1] <= t_stop and r[2] == "ok"),
            **shutdown_accounting(recs, t_stop), "lost_errors": lost[:3], "alive_after": handle.is_alive()}


# --------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    o, b, r, s = (report.get(k) for k in ("overload", "bombs", "rollout", "shutdown"))
    lines = [f"Machine: {report['cpu']}; Triton {report.get('triton_version', '?')}; model `{report['model']}` "
             f"(batch {report['batch_size']} requests), ensemble `{report['ensemble']}`.", "",
             "| scenario | measured |", "|---|---|"]
    if o:
        lines.append(f"| overload: {o['factor']}x capacity ({o['capacity_rps']} req/s) for {o['seconds']:.0f} s | "
                     f"offered {o['offered_rps']:.0f} req/s ({o['sent']}), accepted {o['ok']} "
                     f"({o['accepted_rps']} req/s), shed {o['shed']} (UNAVAILABLE), failed {o['failed']}; "
                     f"accepted p50 {_ms(o['p50_ms'])}, p99 {_ms(o['p99_ms'])} |")
    if b:
        lines.append(f"| decompression bombs ({b['bomb_bytes'] // 1000} KB PNG, 20000 x 20000): 1, then "
                     f"{b['sent'] - 1} at once | refused {b['refused']}/{b['sent']}, slowest "
                     f"{b['max_ms']} ms (single {b['single_ms']} ms); server RSS {b['rss_before_mb']} -> "
                     f"{b['rss_after_mb']} MB; same logits after: {b['same_logits_after']} |")
    if r:
        lines.append(f"| rollout under load (publish + reload, then rollback) | {r['requests']} requests, "
                     f"failed {r['failed']}, shed {r['shed']}; versions answered {r['versions_answered']} |")
    if s:
        lines.append(f"| stop under load (SIGTERM, exit timeout {s['exit_timeout_s']} s) | in flight "
                     f"{s['in_flight_at_stop']} ({s['refused_at_stop']} of them still on the wire, refused "
                     f"\"{STOPPING}\"), answered {s['answered']}, shed by the queue timeout "
                     f"{s['shed_while_draining']}, lost {s['lost']}; sent after the stop "
                     f"{s['sent_after_stop']}, accepted {s['accepted_after_stop']}; exited in {s['exit_s']} s |")
    if report.get("bad_requests"):
        lines += ["", "| bad request | HTTP status | server's answer |", "|---|---|---|"]
        for c in report["bad_requests"]:
            note = " (a client error answered as a server error by Triton 2.51)" if (
                c["case"] in HTTP_500_CLIENT_ERRORS and c["status"] == 500) else ""
            lines.append(f"| {c['case']} | {c['status']}{note} | {c['message'][:110]} |")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def cpu_description() -> str:
    """``lscpu`` model name, core count and the vector/matrix flags that matter here."""
    import os
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return f"unknown CPU, {os.cpu_count()} cores"
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(wanted) or 'no AVX2'}"


SCENARIOS = ("overload", "bombs", "rollout", "shutdown", "bad_requests")


def run_reliability(repository: str | Path, *, model: str | None = None, ensemble: str = "dinov2",
                    batch_size: int = 8, overload_factor: float = 3.0, seconds: float = 5.0,
                    scenarios: Sequence[str] = SCENARIOS,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every scenario against a local server on a copy of ``repository``."""
    from dinov2_triton.export.triton_config import PREPROCESS_MODEL
    from dinov2_triton.serve.local_server import find_free_ports, start_server

    repository = Path(repository)
    if model is None:
        text = (repository / ensemble / "config.pbtxt").read_text() if (repository / ensemble).is_dir() else ""
        from dinov2_triton.export.triton_config import parse_config

        model = parse_config(text).parameters["classifier_model"].string_value if text else "dinov2_onnx"
    models = [model, PREPROCESS_MODEL, ensemble]
    report: dict[str, Any] = {"cpu": cpu_description(), "model": model, "ensemble": ensemble,
                              "batch_size": batch_size, "repository": str(repository)}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        repo = copy_repository(repository, Path(tmp) / "repo", models)
        servers = []

        def start(load: Sequence[str]):
            http, grpc, metrics = find_free_ports(3)
            handle = start_server(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                  load_models=list(load), log_file=Path(tmp) / f"triton-{len(servers)}.log")
            servers.append(handle)
            handle.wait_ready(timeout=300)
            return handle

        try:
            say(f"starting the server on a copy of {repository} ({', '.join(models)})")
            handle = start(models)
            report["triton_version"] = handle.server_metadata().get("version")
            with handle.connect("grpc") as conn:
                config = conn.model_config(model)
                batch = min(batch_size, int(config["max_batch_size"]) or 1)
                report["batch_size"] = batch
                pixels = pixel_request(config, batch)
                report["queue_policy"] = (config.get("dynamic_batching") or {}).get("default_queue_policy")

                def make_inputs(c):
                    return [c.tensor_input("pixel_values", pixels)]

                if "overload" in scenarios:
                    say("measuring capacity (closed loop at 1, 2 and 4 clients, 1.5 s each)")
                    cap = measure_capacity(conn, model, make_inputs)
                    timeout_s = float((report["queue_policy"] or {}).get("default_timeout_microseconds", 0)) / 1e6
                    say(f"overload: {overload_factor}x {cap:.1f} req/s for {seconds:.0f} s")
                    report["overload"] = scenario_overload(conn, model, make_inputs, factor=overload_factor,
                                                           seconds=seconds, capacity_rps=cap,
                                                           queue_timeout_s=timeout_s)
            if "bombs" in scenarios:
                from dinov2_triton.export.serving_models import sample_png

                say("decompression bombs")
                report["bombs"] = scenario_bombs(handle, ensemble, sample_png(64), png_bomb())
            if "rollout" in scenarios:
                say("rollout + rollback under load")
                report["rollout"] = scenario_rollout(handle, repo, model, make_inputs)
            if "bad_requests" in scenarios:
                say("bad requests")
                report["bad_requests"] = bad_request_cases(handle.url_http, model, config["input"][0]["dims"],
                                                           int(config["max_batch_size"]), image_model=ensemble)
            if "shutdown" in scenarios:
                say("stop under load (a second server)")
                report["shutdown"] = scenario_shutdown(lambda: start([model]), model, make_inputs)
        finally:
            for h in servers:
                if h.is_alive():
                    h.stop()
    return report


PROG = "dinov2-triton qa reliability"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--repository", default="model_repository",
                   help="the repository to test; a temporary copy is served (default: %(default)s)")
    p.add_argument("--model", default=None, help="classifier to load (default: the ensemble's)")
    p.add_argument("--ensemble", default="dinov2", help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="images per request (default: %(default)s)")
    p.add_argument("--overload-factor", type=float, default=3.0,
                   help="offered load in multiples of the measured capacity (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="overload duration (default: %(default)s)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog or PROG).parse_args(argv)
    unknown = [s for s in args.scenarios.split(",") if s and s not in SCENARIOS]
    if unknown:
        print(f"error: --scenarios: unknown {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})",
              file=sys.stderr)
        return 2
    from dinov2_triton.core.artifact_io import atomic_write_json
    from dinov2_triton.serve.errors import ServeError
    from dinov2_triton.serve.triton_access import TritonError

    try:
        report = run_reliability(args.repository, model=args.model, ensemble=args.ensemble,
                                 batch_size=args.batch_size, overload_factor=args.overload_factor,
                                 seconds=args.seconds, scenarios=[s for s in args.scenarios.split(",") if s],
                                 say=lambda m: print(f"[reliability] {m}", file=sys.stderr, flush=True))
    except (ServeError, TritonError, ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(markdown(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"\nwrote {args.out}")
    return 0
