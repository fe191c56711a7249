"""What the local server's CPU stand-in costs over running the same model in process.

The local Triton 2.51 serves ONNX and OpenVINO models through Python-based
stand-ins of the native backends (dinov2_triton/serve/resources/backends/).
This benchmark puts one exported model side by side, on the same cores and
in the same run:

- **in process**: the runtime the stand-in uses (ONNX Runtime or OpenVINO)
  on the model file, with the threads the served instance gets (the
  config's ``intra_op_thread_count`` / ``INFERENCE_NUM_THREADS``, else the
  stand-in's default), one caller sending batches back to back, in a process
  of its own session as the server is (:class:`InProcess` says why);
- **served**: the same model through ``tritonserver`` started here on free
  loopback ports, driven by the project's client (dinov2_triton.serve.triton_access,
  gRPC by default) with ``concurrency`` closed-loop callers, each building
  its request from a numpy batch as a user's client does. The client runs
  on the same cores as the server: its cost is part of the served number;
- **where a served request's time goes**: the client's latency; Triton's
  statistics (queue, compute input = the request copied to the stub's
  shared memory, compute infer = the stub's turn, compute output); and,
  inside the stub's turn, the stand-in's own phases from its profile
  (``STANDIN_PROFILE_FILE``: fetch and check inputs, join requests, the
  runtime call, build responses), plus what is left (the stub's IPC and
  copying the outputs into shared memory).

Throughput counts every request by the part of it that falls in the
measured window (a batch of 1 s half inside a 30 s window counts half), so
windows a few requests long are not biased by where they end. Several
stand-in versions can be compared in one run (``--backend LABEL=FOLDER``,
FOLDER a copy of serve/resources/backends at another revision); their
servers are started once and measured in turns (A/B/A/B), with the in-process
number measured in each turn too, since other work on shared cores drifts.

    run_study(repository, "dinov2_onnx_int8", batch_size=8, concurrency=(1, 2)) -> dict
    render(study) -> text

``dinov2-triton`` has no subcommand for it; run it as
``python -c "from dinov2_triton.bench.standin_overhead import main; main([...])"``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dinov2_triton.bench.closed_loop import (
    InProcess,
    closed_loop,
    config_threads,
    cpu_seconds,
    input_batch,
    read_config,
    runtime_of,
)
from dinov2_triton.core.cpu_features import physical_cores

PROFILE_PARAMETER = "STANDIN_PROFILE_FILE"  # standin_common.PROFILE_PARAMETER
PHASES = ("parse", "feed", "run", "respond")  # standin_common.PHASES
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


# --------------------------------------------------------------------------- backends and servers
def backend_dir_from(sources: Path, target: Path) -> Path:
    """A server backend directory: the Python backend of this Triton install
    plus the stand-in files of ``sources`` (a copy of serve/resources/backends)."""
    from dinov2_triton.serve.install import find_triton

    install = find_triton()
    files = {"python/libtriton_python.so": install.python_backend / "libtriton_python.so",
             "python/triton_python_backend_utils.py": install.python_backend / "triton_python_backend_utils.py",
             "python/triton_python_backend_stub": install.stub}
    for rel in ("standin_common.py", "onnxruntime/model.py", "openvino/model.py", "pytorch/model.py"):
        if not (sources / rel).is_file():
            raise ValueError(f"--backend folder {sources}: {rel} is missing (give a copy of "
                             f"dinov2_triton/serve/resources/backends)")
        files[rel] = sources / rel
    for rel, src in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target / rel)
    return target


def overlay_repository(repository: Path, model: str, target: Path, *, profile_file: Path | None,
                       threads: int | None, runtime: str, instances: int | None = None) -> Path:
    """``target/<model>``: the model's files linked, its config.pbtxt copied
    with the profile parameter (and a thread count, an instance count) added."""
    src = repository / model
    dst = target / model
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "config.pbtxt":
            (dst / entry.name).symlink_to(entry.resolve())
    extra = {}
    if profile_file is not None:
        extra[PROFILE_PARAMETER] = str(profile_file)
    if threads is not None:
        extra["intra_op_thread_count" if runtime == "onnxruntime" else "INFERENCE_NUM_THREADS"] = str(threads)
    from google.protobuf import text_format

    from dinov2_triton.serve.model_plan import read_model_config

    cfg = read_model_config(src / "config.pbtxt")
    for key, value in extra.items():
        cfg.parameters[key].string_value = value
    if instances is not None:
        if not cfg.instance_group:
            cfg.instance_group.add()
        del cfg.instance_group[1:]
        cfg.instance_group[0].count = instances
    (dst / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return target


def read_profile(path: Path, wall: Sequence[float]) -> list[dict[str, Any]]:
    """The stand-in's profile lines whose execute ended inside ``wall`` [t0, t1] (seconds): the
    requests Triton's success counter counted between two statistics snapshots taken then."""
    if not path.is_file():
        return []
    lo, hi = wall[0] * 1e9, wall[1] * 1e9
    lines = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if lo <= record["end_ns"] <= hi:
                lines.append(record)
    return lines


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request milliseconds of Triton's stages between two statistics snapshots."""
    def part(stats, key):
        entry = (stats.get("inference_stats") or {}).get(key) or {}
        return int(entry.get("count", 0) or 0), int(entry.get("ns", 0) or 0)

    count = part(after, "success")[0] - part(before, "success")[0]
    out: dict[str, Any] = {"requests": count,
                           "executions": int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))}
    for key in ("success",) + STAGES:
        ns = part(after, key)[1] - part(before, key)[1]
        out[f"{'request' if key == 'success' else key}_ms"] = ns / count / 1e6 if count else None
    return out


def profile_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean per request (ms) of the stand-in's phases, and requests per execute."""
    requests = sum(r["requests"] for r in records)
    if not requests:
        return None
    out = {f"{p}_ms": sum(r[f"{p}_ns"] for r in records) / requests / 1e6 for p in PHASES + ("execute",)}
    out["requests_per_execute"] = requests / len(records)
    return out


class Served:
    """One tritonserver serving the overlay of one model with one backend folder."""

    def __init__(self, label: str, repository: Path, model: str, work: Path, *, backend_sources: Path | None,
                 threads: int | None, runtime: str, profile: bool, protocol: str,
                 instances: int | None = None) -> None:
        from dinov2_triton.serve.install import build_backend_dir
        from dinov2_triton.serve.local_server import find_free_ports, start_server

        self.label, self.model, self.protocol = label, model, protocol
        root = work / label
        root.mkdir(parents=True)
        self.profile_file = root / "profile.jsonl" if profile else None
        repo = overlay_repository(repository, model, root / "repository", profile_file=self.profile_file,
                                  threads=threads, runtime=runtime, instances=instances)
        backend = backend_dir_from(backend_sources, root / "backends") if backend_sources else build_backend_dir()
        http, grpc, metrics = find_free_ports(3)
        self.handle = start_server(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                   load_models=[model], log_file=root / "triton.log", backend_dir=backend,
                                   exit_timeout_s=5)
        try:
            states = self.handle.wait_ready(timeout=600)
            if states.get(model) != "READY":
                raise RuntimeError(f"{label}: {model} did not load: {states.get(model)} "
                                   f"(log {root / 'triton.log'})")
        except BaseException:
            self.handle.stop()
            raise
        self.connections: list[Any] = []

    def processes(self) -> list[Any]:
        """tritonserver and its backend stubs (psutil)."""
        import psutil

        server = psutil.Process(self.handle.pid)
        return [server] + server.children(recursive=True)

    def statistics(self) -> dict[str, Any]:
        with self.handle.connect(self.protocol) as conn:
            return conn.inference_statistics(self.model)

    def caller(self, batch, input_name: str, output_names: Sequence[str]) -> Callable[[], int]:
        """A closed-loop call: one request built from ``batch`` per call, as a client does."""
        local = threading.local()
        n = int(batch.shape[0])

        def call() -> int:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = self.handle.connect(self.protocol, with_key=False)
                self.connections.append(conn)
            result = conn.infer(self.model, [conn.tensor_input(input_name, batch)],
                                [conn.requested_output(o) for o in output_names])
            got = result.as_numpy(output_names[0])
            if got is None or got.shape[0] != n:
                raise RuntimeError(f"{self.label}: {self.model} answered {None if got is None else got.shape} "
                                   f"for a batch of {n}")
            return n

        return call

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.handle.stop()


# --------------------------------------------------------------------------- study
def run_study(repository: str | os.PathLike, model: str, *, batch_size: int = 8,
              concurrency: Sequence[int] = (1, 2), seconds: float = 30.0, warmup_s: float = 5.0,
              rounds: int = 1, backends: Mapping[str, Path | None] | None = None, threads: int | None = None,
              instances: int | None = None, protocol: str = "grpc", profile: bool = True,
              in_process_no_spin: bool = False, work_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """In-process vs served throughput of ``model`` (see the module doc).

    ``backends``: {label: stand-in source folder or None for the installed
    stand-ins}; default {"current": None}. Each round measures in process,
    then every backend at every concurrency, in turn. ``threads`` /
    ``instances``: written into the served config (threads: in process too);
    None: the config's (in process: its threads, else every physical core).
    ``in_process_no_spin``: also measure in process with ONNX Runtime's
    threads not spinning (what the stand-in runs), each round.
    """
    from dinov2_triton.bench.system_info import machine_info

    repository = Path(repository)
    backends = dict(backends or {"current": None})
    config = read_config(repository / model)
    runtime = runtime_of(config)
    n_threads = threads or config_threads(config) or physical_cores()
    batch = input_batch(config, batch_size)
    input_name = config["input"][0]["name"]
    output_names = [o["name"] for o in config["output"]]
    machine = machine_info()
    study: dict[str, Any] = {
        "model": model, "repository": str(repository.resolve()), "runtime": runtime, "batch_size": batch_size,
        "image_size": list(batch.shape[1:]), "input_mb": batch.nbytes / 1e6,
        "threads": {"in_process": n_threads, "served": threads or config_threads(config) or "stand-in default"},
        "instances": instances or sum(int(g.get("count", 1)) for g in config.get("instance_group") or [{}]),
        "protocol": protocol, "concurrency": list(concurrency), "seconds": seconds, "rounds": rounds,
        "cpu": {"model": machine["cpu_model"], "flags": machine["cpu_flags"], "cores": machine["usable_cores"]},
        "client": f"dinov2_triton.serve.triton_access ({protocol}) in this process, same cores as the server",
        "in_process": [], "in_process_no_spin": [], "served": [], "failed": {},
        "backends": {k: str(v) if v else "installed" for k, v in backends.items()},
    }
    log(f"{model}: {runtime}, batch {batch_size} x {list(batch.shape[1:])} ({batch.nbytes / 1e6:.1f} MB), "
        f"{n_threads} thread(s); CPU {machine['cpu_model']} [{', '.join(machine['cpu_flags'])}], "
        f"{machine['usable_cores']} cores")
    work = Path(tempfile.mkdtemp(prefix="standin-overhead-", dir=work_dir))
    servers: dict[str, Served] = {}
    in_process = InProcess(repository / model, batch_size, n_threads, work / "in_process.log")
    no_spin = (InProcess(repository / model, batch_size, n_threads, work / "in_process_no_spin.log",
                         spinning=False) if in_process_no_spin and runtime == "onnxruntime" else None)
    try:
        for label, sources in backends.items():
            log(f"starting tritonserver with the {label} stand-ins ...")
            servers[label] = Served(label, repository, model, work, backend_sources=sources,
                                    threads=threads, runtime=runtime, profile=profile, protocol=protocol,
                                    instances=instances)
        import psutil

        me = [psutil.Process()]
        for r in range(rounds):
            load = os.getloadavg()[0]
            point = in_process.measure(warmup_s, seconds)
            point.update(round=r, load_before=load, load_after=os.getloadavg()[0])
            study["in_process"].append(point)
            log(f"round {r + 1}/{rounds} in process: {point['images_per_s']:.2f} img/s, "
                f"{point['cpu_ms_per_image']:.0f} CPU ms/image (load {load:.2f})")
            if no_spin is not None:
                load = os.getloadavg()[0]
                point = no_spin.measure(warmup_s, seconds)
                point.update(round=r, load_before=load, load_after=os.getloadavg()[0])
                study["in_process_no_spin"].append(point)
                log(f"round {r + 1}/{rounds} in process, threads not spinning: {point['images_per_s']:.2f} "
                    f"img/s, {point['cpu_ms_per_image']:.0f} CPU ms/image (load {load:.2f})")
            for label, server in servers.items():
                for c in concurrency:
                    if label in study["failed"]:
                        continue
                    load, procs = os.getloadavg()[0], server.processes()
                    try:
                        before, cpu_client, cpu_server = server.statistics(), cpu_seconds(me), cpu_seconds(procs)
                        stats_wall = [time.time()]
                        point = closed_loop(server.caller(batch, input_name, output_names), concurrency=c,
                                            warmup_s=warmup_s, seconds=seconds)
                        stats_wall.append(time.time())
                    except Exception as exc:  # noqa: BLE001 - a server that fails ends its own points only
                        study["failed"][label] = (f"round {r + 1}, concurrency {c}: {exc} (log "
                                                  f"{server.handle.log_file})")
                        log(f"round {r + 1}/{rounds} served {label} c{c}: FAILED: {exc}; no more points for {label}")
                        continue
                    client_ms = (cpu_seconds(me) - cpu_client) * 1e3 / point["all_images"]
                    server_ms = (cpu_seconds(procs) - cpu_server) * 1e3 / point["all_images"]
                    point.update(round=r, backend=label, concurrency=c, load_before=load,
                                 load_after=os.getloadavg()[0], triton=stats_delta(before, server.statistics()),
                                 client_cpu_ms_per_image=client_ms, server_cpu_ms_per_image=server_ms,
                                 cpu_ms_per_image=client_ms + server_ms,
                                 standin=profile_summary(read_profile(server.profile_file, stats_wall))
                                 if server.profile_file else None)
                    study["served"].append(point)
                    log(f"round {r + 1}/{rounds} served {label} c{c}: {point['images_per_s']:.2f} img/s, "
                        f"{point['cpu_ms_per_image']:.0f} CPU ms/image (client {client_ms:.1f}) (load {load:.2f})")
    finally:
        in_process.close()
        if no_spin is not None:
            no_spin.close()
        for server in servers.values():
            server.close()
        study["logs"] = str(work)
    study["summary"] = summarize(study)
    return study


def summarize(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (backend, concurrency): mean served img/s over the rounds and
    its ratio to the in-process img/s of the same rounds, and the breakdown."""
    in_proc = {p["round"]: p["images_per_s"] for p in study["in_process"]}
    in_cpu = {p["round"]: p["cpu_ms_per_image"] for p in study["in_process"]}
    no_spin = {p["round"]: p["images_per_s"] for p in study.get("in_process_no_spin") or []}
    rows = []
    keys = sorted({(p["backend"], p["concurrency"]) for p in study["served"]},
                  key=lambda k: (list(study["backends"]).index(k[0]), k[1]))
    for backend, c in keys:
        points = [p for p in study["served"] if p["backend"] == backend and p["concurrency"] == c]
        ratios = [p["images_per_s"] / in_proc[p["round"]] for p in points if in_proc.get(p["round"])]
        row: dict[str, Any] = {
            "backend": backend, "concurrency": c,
            "served_images_per_s": statistics.fmean(p["images_per_s"] for p in points),
            "in_process_images_per_s": statistics.fmean(in_proc[p["round"]] for p in points),
            "ratio": statistics.fmean(ratios) if ratios else None,
            "ratios": ratios, "latency_ms": statistics.fmean(p["all_latency_ms_mean"] for p in points),
            "cpu_ms_per_image": statistics.fmean(p["cpu_ms_per_image"] for p in points),
            "client_cpu_ms_per_image": statistics.fmean(p["client_cpu_ms_per_image"] for p in points),
            "in_process_cpu_ms_per_image": statistics.fmean(in_cpu[p["round"]] for p in points),
            "in_process_no_spin_images_per_s": statistics.fmean(no_spin[p["round"]] for p in points)
            if no_spin else None,
            "ratio_no_spin": statistics.fmean(p["images_per_s"] / no_spin[p["round"]] for p in points)
            if no_spin else None,
            "load": statistics.fmean(p["load_before"] for p in points)}
        for key in ("request_ms",) + tuple(f"{s}_ms" for s in STAGES):
            vals = [p["triton"][key] for p in points if p["triton"].get(key) is not None]
            row[key] = statistics.fmean(vals) if vals else None
        prof = [p["standin"] for p in points if p.get("standin")]
        for key in tuple(f"{ph}_ms" for ph in PHASES + ("execute",)) + ("requests_per_execute",):
            row[key] = statistics.fmean(p[key] for p in prof) if prof else None
        rows.append(row)
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(study: Mapping[str, Any]) -> str:
    cpu = study["cpu"]
    lines = [f"CPU: {cpu['model']} [{', '.join(cpu['flags'])}], {cpu['cores']} cores; "
             f"model {study['model']} ({study['runtime']}), batch {study['batch_size']} x {study['image_size']} "
             f"({study['input_mb']:.1f} MB per request), {study['instances']} instance(s) x "
             f"{study['threads']['served']} thread(s) served, {study['threads']['in_process']} in process",
             f"client: {study['client']}; {study['rounds']} round(s) of {study['seconds']:.0f} s windows",
             "",
             "backend  conc  served img/s  in-process img/s  served/in-process  CPU ms/img served (client) "
             "/ in process  load  (per-round ratios)"]
    for row in study["summary"]:
        ratios = ", ".join(f"{r:.1%}" for r in row["ratios"])
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.1%}"
        lines.append(f"{row['backend']:<8} {row['concurrency']:>4}  {row['served_images_per_s']:>12.2f}  "
                     f"{row['in_process_images_per_s']:>16.2f}  {ratio:>17}  {row['cpu_ms_per_image']:>8.1f} "
                     f"({row['client_cpu_ms_per_image']:.1f}) / {row['in_process_cpu_ms_per_image']:.1f}  "
                     f"{row['load']:>4.2f}  ({ratios})")
    if any(row.get("ratio_no_spin") is not None for row in study["summary"]):
        lines += ["", "in process with ONNX Runtime's threads not spinning (as the stand-in runs them):"]
        for row in study["summary"]:
            lines.append(f"{row['backend']:<8} {row['concurrency']:>4}  served {row['served_images_per_s']:.2f} vs "
                         f"{row['in_process_no_spin_images_per_s']:.2f} img/s in process: {row['ratio_no_spin']:.1%}")
    for label, why in (study.get("failed") or {}).items():
        lines += [f"{label}: FAILED {why}"]
    lines += ["", "per request (ms, every request of the point): client latency | Triton: request (server "
              "side), queue, compute input (to the stub's shared memory), compute infer (stub), compute output | "
              "stand-in inside compute infer: parse, feed, run, respond, rest of the stub's turn (IPC, outputs "
              "into shared memory)"]
    for row in study["summary"]:
        rest = (row["compute_infer_ms"] - row["execute_ms"]
                if row["compute_infer_ms"] is not None and row["execute_ms"] is not None else None)
        client_rest = (row["latency_ms"] - row["request_ms"] if row["request_ms"] is not None else None)
        lines.append(
            f"{row['backend']:<8} c{row['concurrency']}: latency {_ms(row['latency_ms'])} = client+gRPC "
            f"{_ms(client_rest)} + request {_ms(row['request_ms'])} [queue {_ms(row['queue_ms'])}, input "
            f"{_ms(row['compute_input_ms'])}, infer {_ms(row['compute_infer_ms'])} (parse {_ms(row['parse_ms'])}, "
            f"feed {_ms(row['feed_ms'])}, run {_ms(row['run_ms'])}, respond {_ms(row['respond_ms'])}, rest "
            f"{_ms(rest)}), output {_ms(row['compute_output_ms'])}]; requests/execute "
            f"{_ms(row['requests_per_execute'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", required=True, help="exported model repository")
    p.add_argument("--model", default=None,
                   help="model to measure (default: the classifier the dinov2 ensemble calls, from the manifest)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", default="1,2", help="closed-loop callers of the served model, comma-separated")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per point")
    p.add_argument("--warmup-seconds", type=float, default=5.0, help="before each window")
    p.add_argument("--rounds", type=int, default=1, help="in process + every backend, this many times in turn")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of each instance (written into the served config) and in process "
                        "(default: the config's; else the stand-in's default served, every physical core in "
                        "process)")
    p.add_argument("--instances", type=int, default=None,
                   help="instance count written into the served config (default: the config's)")
    p.add_argument("--backend", action="append", default=[], metavar="LABEL=FOLDER",
                   help="stand-ins to serve with: a copy of dinov2_triton/serve/resources/backends (e.g. from "
                        "another git revision), or LABEL=installed; repeatable (default: installed)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--in-process-no-spin", action="store_true",
                   help="also measure in process with ONNX Runtime's threads not spinning (as the stand-in runs)")
    p.add_argument("--no-profile", action="store_true",
                   help="do not set STANDIN_PROFILE_FILE (no stand-in breakdown)")
    p.add_argument("--work-dir", default=None, help="parent of the run's folder (server logs, profiles)")
    p.add_argument("--out", default=None,
                   help="write the study as JSON here, and its tables beside it (the same name, .md)")
    return p


def _default_model(repository: Path) -> str:
    manifest = repository / "export_manifest.json"
    if manifest.is_file():
        classifier = (json.loads(manifest.read_text()).get("ensemble") or {}).get("classifier")
        if classifier:
            return classifier
    raise ValueError(f"{repository}: no export manifest naming the ensemble's classifier; pass --model")


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        repository = Path(args.repository)
        if not repository.is_dir():
            raise ValueError(f"--repository {repository}: not a folder")
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
        if not concurrency or min(concurrency) < 1:
            raise ValueError(f"--concurrency {args.concurrency!r}: positive integers, comma-separated")
        if args.batch_size < 1 or args.seconds <= 0 or args.rounds < 1 or args.warmup_seconds < 0:
            raise ValueError("--batch-size, --rounds >= 1, --seconds > 0, --warmup-seconds >= 0")
        for flag, value in (("--threads", args.threads), ("--instances", args.instances)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: must be >= 1")
        backends: dict[str, Path | None] = {}
        for item in args.backend:
            label, sep, folder = item.partition("=")
            if not sep or not label or not folder:
                raise ValueError(f"--backend {item!r}: LABEL=FOLDER or LABEL=installed")
            backends[label] = None if folder == "installed" else Path(folder)
        model = args.model or _default_model(repository)
        study = run_study(repository, model, batch_size=args.batch_size, concurrency=concurrency,
                          seconds=args.seconds, warmup_s=args.warmup_seconds, rounds=args.rounds,
                          backends=backends or None, threads=args.threads, instances=args.instances,
                          protocol=args.protocol, in_process_no_spin=args.in_process_no_spin,
                          profile=not args.no_profile, work_dir=args.work_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render(study))
    if args.out:
        write_study(study, Path(args.out))
    return 0


def write_study(study: Mapping[str, Any], path: Path) -> tuple[Path, Path]:
    """The study as JSON at ``path`` and its tables (:func:`render`) at ``path`` with .md."""
    from dinov2_triton.core.artifact_io import atomic_write_json, atomic_write_text

    md = path.with_suffix(".md")
    title = (f"# Served vs in process: {study['model']}, batch {study['batch_size']}, "
             f"{study['cpu']['model']} [{', '.join(study['cpu']['flags'])}]")
    atomic_write_json(path, study)
    atomic_write_text(md, f"{title}\n\nWritten by dinov2_triton.bench.standin_overhead "
                          f"({path.name} has every number).\n\n```text\n{render(study)}\n```\n")
    return path, md


if __name__ == "__main__":
    sys.exit(main())
