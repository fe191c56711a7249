"""First run on a GPU host: ``dinov2-triton qa gpu-acceptance`` (or scripts/gpu_acceptance.sh):
what works, measured, in one table.

Runs what the host allows and says what it skipped, in about 10 minutes:

1. host: GPU, compute capability, driver (nvidia-smi, else torch);
2. versions: Python, torch and its CUDA, TensorRT, docker, against the pin
   (dinov2_triton.core.release_pin): driver and compute capability minimums,
   the CUDA major of torch;
3. with docker: the pin's UNVERIFIED figures read from the pinned containers
   themselves (TensorRT, Python, ONNX Runtime and OpenVINO versions; the
   Triton version too while it is unverified);
4. dinov2_triton.qa.gpu_check: AMP fine-tune steps, eager FP32/FP16/BF16, TorchScript, parity;
5. with TensorRT: FP16 and INT8 plans built (strongly typed) from the
   CPU-built ONNX files of the repository (dinov2_onnx_fp16,
   dinov2_onnx_int8) and their parity against ONNX Runtime FP32
   (dinov2_onnx) on the same inputs;
6. with docker and the plans: the plans served by the pinned Triton
   container (dinov2_triton.serve.container, as ``dinov2-triton serve
   container``) and a short perf_analyzer sweep through ``dinov2-triton
   bench`` (needs --model-path and --data-path).

Every step is OK, SKIPPED or FAILED with its reason; the table is printed and
written to <out>/acceptance.md (+ acceptance.json, gpu_check.md); default
<out>: ./reports/gpu-acceptance-<time>. The whole run stops after
--time-limit seconds (the pulls of the pinned images are the slow part the
first time; each step has its own timeout as well).
Exit code: 0 all OK or SKIPPED, 1 a step FAILED, 2 no GPU.
Standard library at import; each step imports what it needs, so it runs on
a host with only PyTorch + CUDA (no TensorRT, Triton or docker) and skips
what that host lacks."""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

PROG = "dinov2-triton qa gpu-acceptance"
TRT_MODELS = {"trt_fp16": ("dinov2_onnx_fp16", "fp16"), "trt_int8": ("dinov2_onnx_int8", "int8")}


class Skip(Exception):
    """The step cannot run on this host; str() is the reason."""


class Acceptance:
    def __init__(self, out: Path):
        self.out = out
        self.rows: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {}

    def step(self, name: str, fn: Callable[[], str]) -> bool:
        t0 = time.perf_counter()
        try:
            result, status = fn(), "OK"
        except Skip as exc:
            result, status = str(exc), "SKIPPED"
        except Exception as exc:  # noqa: BLE001 - a failed step is reported; the next steps still run
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            result, status = f"{type(exc).__name__}: {first[:300]}", "FAILED"
        row = {"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "result": result}
        self.rows.append(row)
        print(f"[gpu_acceptance] {name}: {status} ({row['seconds']} s) {result}", file=sys.stderr, flush=True)
        return status == "OK"

    def table(self) -> str:
        lines = ["| step | status | seconds | result |", "|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {r['result'].replace('|', '/')} |")
        return "\n".join(lines)


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# ----------------------------------------------------------------------------- steps
def step_host(acc: Acceptance) -> str:
    from dinov2_triton.export.trt_build_main import TensorRTUnavailable, gpu_info

    try:
        gpu = gpu_info()
    except TensorRTUnavailable as exc:
        raise Skip(str(exc).replace("not built: needs an NVIDIA GPU and TensorRT ", "no GPU ")) from None
    acc.facts["gpu"] = gpu
    others = len(gpu["gpus"]) - 1
    return (f"{gpu['gpu_name']}, compute capability {gpu['compute_capability']}, driver "
            f"{gpu.get('driver_version') or 'unknown (no nvidia-smi)'}"
            + (f", {others} more GPU(s)" if others else "") + f" (via {gpu['source']})")


def step_versions(acc: Acceptance, pin) -> str:
    parts = [f"Python {platform.python_version()}"]
    problems = []
    try:
        import torch

        parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
        if torch.version.cuda and int(torch.version.cuda.split(".")[0]) != pin.cuda_major:
            problems.append(f"torch is a CUDA {torch.version.cuda} build, the pin is CUDA {pin.cuda}")
    except ImportError:
        parts.append("torch not installed")
    try:
        import tensorrt

        acc.facts["tensorrt"] = tensorrt.__version__
        parts.append(f"TensorRT {tensorrt.__version__} (pin {pin.tensorrt})")
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
        parts.append(f"TensorRT not importable ({type(exc).__name__})")
    docker = shutil.which("docker") and _run(["docker", "info"], 60).returncode == 0
    acc.facts["docker"] = bool(docker)
    parts.append("docker available" if docker else "no docker")
    gpu = acc.facts.get("gpu")
    if gpu:
        if tuple(gpu["cc"]) < pin.min_compute_capability:
            problems.append(f"compute capability {gpu['compute_capability']} < {pin.file}'s minimum "
                            f"{'.'.join(map(str, pin.min_compute_capability))}")
        driver = gpu.get("driver_version")
        if driver and int(driver.split(".")[0]) < pin.min_driver:
            problems.append(f"driver {driver} < the pinned release's minimum R{pin.min_driver}")
    parts.append(f"pin: Triton {pin.container_tag} (CUDA {pin.cuda}, TensorRT {pin.tensorrt})")
    if problems:
        raise RuntimeError("; ".join(problems) + " | " + ", ".join(parts))
    return ", ".join(parts)


def _backend_library_version(library: str) -> Callable[[str], str | None]:
    """Parse ``ls`` of a Triton backend folder: the version of ``lib<library>.so.X.Y.Z``."""
    pattern = re.compile(rf"lib{re.escape(library)}\.so\.(\d+\.\d+\.\d+)")

    def parse(out: str) -> str | None:
        found = sorted({m.group(1) for m in pattern.finditer(out)}, key=lambda v: tuple(map(int, v.split("."))))
        return found[-1] if found else None
    return parse


def _last_line(out: str) -> str | None:
    return out.strip().splitlines()[-1] if out.strip() else None


def container_checks(pin) -> dict[str, tuple[str, list[str], Callable[[str], str | None]]]:
    """``{pin key: (pinned value, docker run arguments, parse(stdout) -> value)}`` for every
    UNVERIFIED key of the pin that a container can answer."""
    backends = "/opt/tritonserver/backends"
    checks = {
        "TRITON_TENSORRT_VERSION": (pin.tensorrt, [pin.tensorrt_image, "python3", "-c",
                                                   "import tensorrt; print(tensorrt.__version__)"], _last_line),
        "TRITON_PYTHON_VERSION": (pin.python, [pin.tensorrt_image, "python3", "-c",
                                               "import sys; print('%d.%d' % sys.version_info[:2])"], _last_line),
        "TRITON_SERVER_VERSION": (pin.triton_server, [pin.triton_image, "cat", "/opt/tritonserver/TRITON_VERSION"],
                                  _last_line),
        "TRITON_ONNXRUNTIME_VERSION": (pin.onnxruntime, [pin.triton_image, "ls", f"{backends}/onnxruntime"],
                                       _backend_library_version("onnxruntime")),
        "TRITON_OPENVINO_VERSION": (pin.openvino or "", [pin.triton_image, "ls", f"{backends}/openvino"],
                                    _backend_library_version("openvino")),
    }
    return {key: check for key, check in checks.items() if pin.is_unverified(key)}


def step_pin_in_containers(acc: Acceptance, pin) -> str:
    """Read the UNVERIFIED figures of the pin from the containers (pulls them)."""
    if not acc.facts.get("docker"):
        raise Skip(f"no docker: cannot read {', '.join(pin.unverified)} from the containers")
    seen, wrong = [], []
    for key, (want, cmd, parse) in container_checks(pin).items():
        proc = _run(["docker", "run", "--rm", *cmd], 900)
        got = parse(proc.stdout) if proc.returncode == 0 else None
        if got is None:
            wrong.append(f"{key}: `docker run --rm {' '.join(cmd)}` failed: {(proc.stderr or '').strip()[-200:]}")
        elif got != want:
            wrong.append(f"{key}={want} in the pin, the container says {got}")
        else:
            seen.append(f"{key}={got}")
    if wrong:
        raise RuntimeError("; ".join(wrong) + (" (confirmed: " + ", ".join(seen) + ")" if seen else ""))
    return "confirmed in the containers: " + ", ".join(seen) + f" (mark them verified in {Path(pin.file).name})"


def step_gpu_check(acc: Acceptance, args) -> str:
    if not acc.facts.get("gpu"):
        raise Skip("no GPU")
    from dinov2_triton.qa.gpu_check import format_table, run_gpu_check

    info = run_gpu_check(img_size=args.img_size, batch=args.batch, train_steps=10, iters=20)
    table = format_table(info)
    (acc.out / "gpu_check.md").write_text(table + "\n")
    acc.facts["gpu_check"] = info
    counts = {s: sum(r["status"] == s for r in info["rows"]) for s in ("OK", "SKIPPED", "FAILED")}
    summary = f"{counts['OK']} OK, {counts['SKIPPED']} SKIPPED, {counts['FAILED']} FAILED (table: gpu_check.md)"
    failed = [f"{r['what']}: {r['note']}" for r in info["rows"] if r["status"] == "FAILED"]
    if failed:
        raise RuntimeError(summary + "; " + "; ".join(failed))
    return summary


def _latest_version_dir(model_dir: Path) -> Path | None:
    versions = sorted((p for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return versions[-1] if versions else None


def step_trt_plan(acc: Acceptance, args, variant: str, pin) -> str:
    source_model, precision = TRT_MODELS[variant]
    if "tensorrt" not in acc.facts:
        raise Skip("TensorRT not importable here (a host with torch only): "
                   "dinov2-triton export --in-container builds inside the pinned TensorRT container")
    if not acc.facts.get("gpu"):
        raise Skip("no GPU")
    version_dir = _latest_version_dir(args.repository / source_model)
    onnx_path = version_dir / "model.onnx" if version_dir else None
    if onnx_path is None or not onnx_path.is_file():
        raise Skip(f"no CPU-built {source_model} in {args.repository} (dinov2-triton export --variants "
                   f"onnx,onnx_fp16,onnx_int8 on any machine, then copy the repository here)")
    from dinov2_triton.export.trt_build_main import build_plan, types_text
    from dinov2_triton.export.variants.tensorrt import engine_runner

    plan = acc.out / "model_repository" / f"dinov2_{variant}" / "1" / "model.plan"
    info = build_plan(onnx_path, plan, precision=precision, max_batch=args.max_batch,
                      allow_version_mismatch=True)
    acc.facts.setdefault("plans", {})[variant] = {"plan": str(plan), "info": info, "source": str(version_dir)}
    import numpy as np

    x = np.random.default_rng(0).standard_normal((args.parity_inputs, *info["profile"]["max"][1:])).astype(np.float32)
    logits, _ = engine_runner(plan, allow_host_code=False)(x)
    note = "" if info["version_check"]["match"] else " (TensorRT differs from the pin: Triton would not load it)"
    try:
        import onnxruntime as ort
    except ImportError:
        return (f"built in {info['build_seconds']:.0f} s, {info['plan_bytes'] / 1e6:.1f} MB{note}; parity SKIPPED: "
                f"onnxruntime not installed")
    fp32 = _latest_version_dir(args.repository / "dinov2_onnx") / "model.onnx"
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(["logits"], {"pixel_values": x[i:i + args.max_batch]})[0]
                          for i in range(0, len(x), args.max_batch)])
    agree = float((ref.argmax(1) == logits.argmax(1)).mean())
    cos = float(np.mean(np.sum(ref * logits, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(logits, axis=1))))
    return (f"built in {info['build_seconds']:.0f} s, {info['plan_bytes'] / 1e6:.1f} MB, "
            f"layer outputs {types_text(info['tensor_types'])}{note}; "
            f"vs ONNX Runtime FP32 on {len(x)} random inputs: "
            f"top-1 agreement {agree:.2%}, logit cosine {cos:.5f}, max abs diff {np.abs(ref - logits).max():.4f}")


def _write_trt_configs(acc: Acceptance, args) -> list[str]:
    from dinov2_triton.export.registry import get_variant
    from dinov2_triton.export.triton_config import classifier_config, parse_config, validate_config
    from dinov2_triton.export.variants.tensorrt import TRT_FP16  # noqa: F401 - registers the TensorRT variants

    onnx_cfg = parse_config((args.repository / "dinov2_onnx" / "config.pbtxt").read_text())
    dims = list(onnx_cfg.input[0].dims)
    outs = {o.name: list(o.dims) for o in onnx_cfg.output}
    names = []
    for variant, built in acc.facts.get("plans", {}).items():
        info = built["info"]
        cfg = classifier_config(get_variant(variant), image_size=dims[-1], num_classes=outs["logits"][0],
                                embed_dim=outs["embedding"][0], max_batch_size=args.max_batch, device="gpu",
                                parameters=info["config_parameters"])
        for group in cfg.instance_group:
            group.gpus.extend(info["instance_gpus"])
        model_dir = Path(built["plan"]).parent.parent   # <model>/<version>/model.plan -> <model>
        (model_dir / "config.pbtxt").write_text(validate_config(cfg))
        labels = args.repository / "dinov2_onnx" / "labels.txt"
        if labels.is_file():
            shutil.copyfile(labels, model_dir / "labels.txt")
        names.append(cfg.name)
    return names


def _wait_ready(http: int, models: list[str], server: subprocess.Popen, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    ready: list[str] = []
    while time.monotonic() < deadline and server.poll() is None:
        ready = []
        for m in models:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{m}/ready", timeout=5) as r:
                    if r.status == 200:
                        ready.append(m)
            except OSError:
                pass
        if len(ready) == len(models):
            break
        time.sleep(3)
    return ready


def bench_command(args, *, grpc: int, http: int, metrics: int, key_file: Path, repository: Path,
                  models: list[str], out: Path) -> list[str]:
    """The short perf sweep through the served plans: ``dinov2-triton bench`` with this interpreter."""
    return [sys.executable, "-m", "dinov2_triton.cli", "bench", "--model-path", str(args.model_path),
            "--data-path", str(args.data_path), "--url", f"127.0.0.1:{grpc}", "--http-url", f"127.0.0.1:{http}",
            "--metrics-url", f"127.0.0.1:{metrics}", "--api-key-file", str(key_file),
            "--repository", str(repository), "--models", ",".join(models), "--protocols", "grpc",
            "--concurrency", "1,4", "--batch-sizes", f"1,{args.max_batch}", "--window-ms", "2000", "--keep-going",
            "--no-in-process", "--out", str(out)]


def step_serve_and_sweep(acc: Acceptance, args) -> str:
    if not acc.facts.get("docker"):
        raise Skip("no docker: the pinned Triton container cannot run here")
    if not acc.facts.get("plans"):
        raise Skip("no TensorRT plans were built in this run")
    from dinov2_triton.serve import container as box
    from dinov2_triton.serve.local_server import find_free_ports, write_api_key

    models = _write_trt_configs(acc, args)
    repository = acc.out / "model_repository"
    http, grpc, metrics = find_free_ports(3)
    key_file = acc.out / "triton-container.api_key"
    launch = box.plan_container(repository, api_key=write_api_key(key_file), models=models, http_port=http,
                                grpc_port=grpc, metrics_port=metrics, name=f"dinov2-acceptance-{os.getpid()}")
    box.build_image(launch)
    log = acc.out / "triton-container.log"
    server = box.start_container(launch, log)
    try:
        ready = _wait_ready(http, models, server, args.server_timeout)
        if len(ready) != len(models):
            raise RuntimeError(f"{sorted(set(models) - set(ready))} not ready after {args.server_timeout:.0f} s "
                               f"(see {log})")
        served = f"{', '.join(models)} ready in {launch.pin.triton_image}"
        if not (args.model_path and args.data_path):
            return served + "; perf sweep SKIPPED: needs --model-path and --data-path"
        cmd = bench_command(args, grpc=grpc, http=http, metrics=metrics, key_file=key_file, repository=repository,
                            models=models, out=acc.out / "perf")
        proc = _run(cmd, args.sweep_timeout)
        (acc.out / "perf_run.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{served}; dinov2-triton bench exit {proc.returncode} (perf_run.log): "
                               f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
        return f"{served}; perf sweep: {acc.out / 'perf'} (report.md)"
    finally:
        box.stop_container(launch.name)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


# ----------------------------------------------------------------------------- CLI
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="repository holding CPU-built dinov2_onnx / dinov2_onnx_int8 (default: %(default)s)")
    p.add_argument("--model-path", type=Path, default=None, help="model_final.pth, for the perf sweep's parity")
    p.add_argument("--data-path", type=Path, default=None, help="prepared data folder, for the perf sweep")
    p.add_argument("--out", type=Path, default=None, help="default: reports/gpu-acceptance-<time>")
    p.add_argument("--img-size", type=int, default=224, help="gpu-check image size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="gpu-check large batch (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="TensorRT profile max = Triton max_batch_size (default: %(default)s)")
    p.add_argument("--parity-inputs", type=int, default=64, help="default: %(default)s")
    p.add_argument("--server-timeout", type=float, default=240, help="seconds (default: %(default)s)")
    p.add_argument("--sweep-timeout", type=float, default=240, help="seconds (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=1500,
                   help="stop the whole run after this many seconds, printing where it was (default: %(default)s)")
    return p


def print_host_line(pin) -> None:
    """The interpreter, the pin and nvidia-smi's view of the GPUs, before any step (stderr)."""
    unverified = " ".join(pin.unverified) or "none"
    print(f"[gpu_acceptance] Python {platform.python_version()} ({sys.executable}); pin: Triton {pin.container_tag}, "
          f"CUDA {pin.cuda}, TensorRT {pin.tensorrt} (unverified: {unverified})", file=sys.stderr, flush=True)
    if shutil.which("nvidia-smi"):
        try:
            proc = _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                         "--format=csv,noheader"], 60)
            print(proc.stdout.strip() or "[gpu_acceptance] nvidia-smi failed", file=sys.stderr, flush=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"[gpu_acceptance] nvidia-smi failed: {exc}", file=sys.stderr, flush=True)


def main(argv=None, *, prog: str | None = None) -> int:
    args = build_parser(prog or PROG).parse_args(argv)
    from dinov2_triton.qa.gpu_check import time_limit

    with time_limit(args.time_limit):
        return run_acceptance(args)


def run_acceptance(args) -> int:
    from dinov2_triton.core.release_pin import load_pin

    pin = load_pin()
    print_host_line(pin)
    out = args.out or Path("reports") / time.strftime("gpu-acceptance-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    acc = Acceptance(out)
    acc.facts["triton_image"] = pin.triton_image
    acc.step("host", lambda: step_host(acc))
    acc.step("versions vs pin", lambda: step_versions(acc, pin))
    acc.step("pin read from the containers", lambda: step_pin_in_containers(acc, pin))
    acc.step("gpu_check (AMP train, FP32/FP16/BF16, TorchScript)", lambda: step_gpu_check(acc, args))
    for variant in TRT_MODELS:
        acc.step(f"{variant} plan + parity", lambda v=variant: step_trt_plan(acc, args, v, pin))
    acc.step("serve in the Triton container + perf sweep", lambda: step_serve_and_sweep(acc, args))
    table = acc.table()
    header = (f"GPU acceptance {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}; pin: Triton "
              f"{pin.container_tag} ({pin.file})")
    (out / "acceptance.md").write_text(header + "\n\n" + table + "\n")
    from dinov2_triton.core.artifact_io import atomic_write_json

    atomic_write_json(out / "acceptance.json", {"header": header, "rows": acc.rows,
                                                "facts": {k: v for k, v in acc.facts.items() if k != "gpu_check"}})
    print(header + "\n\n" + table)
    gpu_table = out / "gpu_check.md"
    if gpu_table.is_file():
        print("\n" + gpu_table.read_text())
    print(f"\n(written to {out})")
    if not acc.facts.get("gpu"):
        return 2
    return 1 if any(r["status"] == "FAILED" for r in acc.rows) else 0
