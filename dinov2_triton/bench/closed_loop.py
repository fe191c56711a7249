"""One exported model under closed-loop load, in process and counted fairly: the load
generator and window accounting, CPU time of a process tree, and the in-process runner of
an ONNX or OpenVINO model with the threads its Triton config gives it (in a process of its
own session, as the server is). Used by dinov2_triton.bench.standin_overhead."""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


# --------------------------------------------------------------------------- timing
def window_images(spans: Sequence[tuple[float, float, int]], t0: float, t1: float) -> float:
    """Images done in [t0, t1]: each (start, end, images) counted by the share
    of its duration that falls in the window."""
    done = 0.0
    for start, end, images in spans:
        overlap = min(end, t1) - max(start, t0)
        if overlap > 0 and end > start:
            done += images * overlap / (end - start)
    return done


def closed_loop(call: Callable[[], int], *, concurrency: int, warmup_s: float, seconds: float
                ) -> dict[str, Any]:
    """``concurrency`` threads calling ``call()`` (-> images done) back to back
    until the window [start + warmup_s, + seconds] has passed; throughput and
    latency of the window."""
    spans: list[tuple[float, float, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    t_begin = time.perf_counter()
    t0, t1 = t_begin + warmup_s, t_begin + warmup_s + seconds

    def worker() -> None:
        while time.perf_counter() < t1 and not errors:
            start = time.perf_counter()
            try:
                images = call()
            except BaseException as exc:  # noqa: BLE001 - reported once, stops every worker
                with lock:
                    errors.append(exc)
                return
            with lock:
                spans.append((start, time.perf_counter(), images))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    in_window = [s for s in spans if s[1] > t0 and s[0] < t1]
    latencies = sorted((end - start) * 1e3 for start, end, _ in in_window)
    now_wall, now = time.time(), time.perf_counter()
    return {"images_per_s": window_images(spans, t0, t1) / seconds, "requests": len(in_window),
            "latency_ms_mean": statistics.fmean(latencies) if latencies else None,
            "latency_ms_p50": latencies[len(latencies) // 2] if latencies else None,
            "window_s": seconds, "wall": [now_wall - (now - t0), now_wall - (now - t1)],
            # every request of the point, warm-up included: what Triton's statistics and the profile cover
            "all_requests": len(spans), "all_images": sum(n for _, _, n in spans),
            "all_latency_ms_mean": statistics.fmean((e - s) * 1e3 for s, e, _ in spans) if spans else None,
            "all_wall": [now_wall - (now - t_begin), now_wall]}


def cpu_seconds(processes: Sequence[Any]) -> float:
    """User + system CPU seconds of these psutil processes so far (gone ones count 0)."""
    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
        except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends
            continue
        total += t.user + t.system
    return total


# --------------------------------------------------------------------------- model
def read_config(model_dir: Path) -> dict[str, Any]:
    """config.pbtxt as a dict of config field names (json_format)."""
    from google.protobuf import json_format

    from dinov2_triton.serve.model_plan import read_model_config

    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is {model_dir.name} a model of the repository?)")
    return json_format.MessageToDict(read_model_config(path), preserving_proto_field_name=True)


def _parameter(config: Mapping[str, Any], name: str) -> str | None:
    value = (config.get("parameters") or {}).get(name, {}).get("string_value")
    return value if value not in (None, "") else None


def runtime_of(config: Mapping[str, Any]) -> str:
    if config.get("platform") == "onnxruntime_onnx" or config.get("backend") == "onnxruntime":
        return "onnxruntime"
    if config.get("backend") == "openvino":
        return "openvino"
    raise ValueError(f"model '{config.get('name')}': platform {config.get('platform') or config.get('backend')!r}; "
                     f"this benchmark measures the onnxruntime and openvino stand-ins")


def config_threads(config: Mapping[str, Any]) -> int | None:
    """The intra-op threads the config gives an instance, or None (the backend's default)."""
    key = "intra_op_thread_count" if runtime_of(config) == "onnxruntime" else "INFERENCE_NUM_THREADS"
    value = _parameter(config, key)
    return int(value) if value is not None and int(value) > 0 else None


def model_file(model_dir: Path, config: Mapping[str, Any]) -> Path:
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise ValueError(f"{model_dir}: no version folder")
    default = "model.onnx" if runtime_of(config) == "onnxruntime" else "model.xml"
    path = versions[-1] / (config.get("default_model_filename") or default)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return path


def in_process_runner(model_dir: Path, config: Mapping[str, Any], threads: int, *, spinning: bool = True
                      ) -> Callable[[Any], Any]:
    """``run(batch)`` on the model file with the runtime's defaults and ``threads`` intra-op threads
    (ONNX Runtime: ``spinning=False`` sets session.intra_op.allow_spinning=0, as the stand-in does)."""
    path = model_file(model_dir, config)
    input_name = config["input"][0]["name"]
    if runtime_of(config) == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {input_name: x})
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    mbs = int(config.get("max_batch_size", 0))
    if mbs > 0:
        model.reshape({p.get_any_name(): [mbs] + [d.get_length() for d in list(p.get_partial_shape())[1:]]
                       for p in model.inputs})
    props = {k: (int(v) if str(v).isdigit() else str(v).upper()) for k, v in (
        (k, _parameter(config, k)) for k in ("PERFORMANCE_HINT", "NUM_STREAMS")) if v}
    props["INFERENCE_NUM_THREADS"] = threads
    if _parameter(config, "HINT_BF16"):
        props["INFERENCE_PRECISION_HINT"] = "bf16"
    request = core.compile_model(model, "CPU", props).create_infer_request()
    return lambda x: request.infer({input_name: x})


def input_batch(config: Mapping[str, Any], batch_size: int, seed: int = 0):
    import numpy as np

    dims = [int(d) for d in config["input"][0]["dims"]]
    if any(d < 0 for d in dims):
        raise ValueError(f"model '{config.get('name')}': input dims {dims} are not fixed")
    mbs = int(config.get("max_batch_size", 0))
    if mbs and not 1 <= batch_size <= mbs:
        raise ValueError(f"--batch-size {batch_size}: model '{config.get('name')}' takes 1..{mbs}")
    return np.random.default_rng(seed).standard_normal([batch_size] + dims, dtype=np.float32)


class InProcess:
    """The in-process measurement, in a child process of its own session.

    tritonserver runs in a session of its own (start_server), and Linux
    scheduler autogroups (``/proc/sys/kernel/sched_autogroup_enabled``) share
    CPU time between sessions, not threads: on cores other work also uses,
    the in-process runtime gets the same share as the server only in a
    session of its own too.
    """

    def __init__(self, model_dir: Path, batch_size: int, threads: int, log_file: Path, *,
                 spinning: bool = True) -> None:
        import subprocess

        spec = json.dumps({"model_dir": str(model_dir), "batch_size": batch_size, "threads": threads,
                           "spinning": spinning})
        self._log = open(log_file, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from dinov2_triton.bench.closed_loop import _worker; "
             "_worker(sys.argv[1])", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, start_new_session=True)
        self._read()  # "ready" once loaded

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(f"in-process worker exited (code {self.process.returncode}); see {self._log.name}")
        return json.loads(line)

    def measure(self, warmup_s: float, seconds: float) -> dict[str, Any]:
        self.process.stdin.write(json.dumps({"warmup_s": warmup_s, "seconds": seconds}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self._log.close()


def _worker(spec_json: str) -> None:
    """InProcess's child: load once, then one measurement per line of stdin."""
    import resource

    spec = json.loads(spec_json)
    model_dir = Path(spec["model_dir"])
    config = read_config(model_dir)
    batch = input_batch(config, spec["batch_size"])
    run = in_process_runner(model_dir, config, spec["threads"], spinning=spec.get("spinning", True))
    n = int(batch.shape[0])

    def call() -> int:
        run(batch)
        return n

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        c0 = cpu()
        point = closed_loop(call, concurrency=1, warmup_s=ask["warmup_s"], seconds=ask["seconds"])
        point["cpu_ms_per_image"] = (cpu() - c0) * 1e3 / point["all_images"]
        print(json.dumps(point), flush=True)


