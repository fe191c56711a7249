"""The pinned NVIDIA Triton container on a GPU host: ``dinov2-triton serve container``.

The same model repository the local CPU server reads, served by the NVIDIA
Triton container of the release pin (dinov2_triton.core.release_pin) with
its native backends (TensorRT, ONNX Runtime, PyTorch, OpenVINO, Python):

* the image is the pinned ``tritonserver`` image plus Pillow for the
  ``dinov2_preprocess`` Python model (serve/resources/Dockerfile), built as
  ``dinov2-triton-serve:<TRITON_CONTAINER_TAG>``; the Pillow is
  :data:`PILLOW_REQUIREMENT`, the one of requirements/lock-gpu.txt (a test
  keeps the two equal: an installed package has no requirements/ folder);
* the server flags come from the repository: explicit model control with
  ``--load-model`` per model (``*`` for all), and
  ``--backend-config=tensorrt,version-compatible=true`` when a selected
  TensorRT plan was built version-compatible (its config.pbtxt says
  ``version_compatible: "true"``: the plan carries a lean runtime that only
  trusted plans may run);
* the model-repository API (load/unload/index) is restricted to a new random
  key, written to a file with mode 0600 (HTTP header ``triton-api-key``,
  gRPC metadata ``triton-grpc-protocol-triton-api-key``);
* on ``docker stop`` Triton drains for ``--exit-timeout-secs`` (the local
  server's default, and the Kubernetes manifests'), and docker waits
  :data:`STOP_GRACE_S` longer before SIGKILL;
* ensemble back-pressure where the pinned Triton has it
  (``ModelEnsembling.max_inflight_requests``,
  dinov2_triton.core.release_pin.ENSEMBLE_MAX_INFLIGHT_SINCE): the local
  server (Triton 2.51) cannot parse that field, so the repository's
  config.pbtxt never carries it. Each ensemble gets a per-deployment copy,
  ``<model>/configs/triton-<TRITON_CONTAINER_TAG>.pbtxt`` (config.pbtxt plus
  the limit, :func:`ensemble_backpressure`), which the container reads
  because it is started with ``--model-config-name=triton-<tag>``; Triton
  falls back to config.pbtxt for every model without such a file, and a
  server started without the flag (the local one) never reads it. The copy
  is written (again, from the current config.pbtxt) just before the
  container starts, and by ``serve kubernetes``.

:func:`plan_container` returns the ``docker build`` and ``docker run`` argv
lists and the ensemble copies to write (tests compare them with the
Kubernetes manifests); :func:`check_host`
says clearly what a host lacks; :func:`run_container` runs the server in
the foreground, :func:`start_container` in the background.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from dinov2_triton.core.release_pin import ReleasePin, load_pin
from dinov2_triton.core.resources import resource_path
from dinov2_triton.serve.errors import ServeError
from dinov2_triton.serve.local_server import DEFAULT_EXIT_TIMEOUT_S
from dinov2_triton.serve.triton_access import API_KEY_HEADER

#: the derived image (pinned Triton + Pillow); its tag is the pin's TRITON_CONTAINER_TAG
IMAGE_NAME = "dinov2-triton-serve"
#: Pillow for the preprocessing model, = the pin of requirements/lock-gpu.txt (tests/test_gpu_stack.py)
PILLOW_REQUIREMENT = "pillow==13.0.0"
DEFAULT_NAME = "dinov2-triton"
DEFAULT_API_KEY_FILE = "logs/triton-container.api_key"
#: docker waits this long beyond Triton's own drain (--exit-timeout-secs) before SIGKILL
STOP_GRACE_S = 10
#: the flag that lets Triton's TensorRT backend load version-compatible plans
VERSION_COMPATIBLE_FLAG = "--backend-config=tensorrt,version-compatible=true"
#: where the repository is mounted (read-only) inside the container
CONTAINER_REPOSITORY = "/models"
#: the server's ports inside the container
CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
LOCAL_HINT = "on a machine without one, serve on the CPU: dinov2-triton serve start"
#: folder of a model's per-deployment configurations (Triton's --model-config-name looks there)
CONFIGS_FOLDER = "configs"
#: in-flight requests per ensemble step, in full batches of each step's instances: one batch
#: executing and one formed behind it, so the limit never idles an instance
BACKPRESSURE_BATCHES = 2


class ContainerError(ServeError):
    """The container cannot be built or run here; str() says what is missing and what to do."""


@dataclass(frozen=True)
class EnsembleCopy:
    """The container's copy of one ensemble's config.pbtxt, with back-pressure."""

    model: str
    path: Path                  # <repository>/<model>/configs/<config name>.pbtxt
    text: str
    max_inflight_requests: int


@dataclass(frozen=True)
class ContainerLaunch:
    """Everything ``serve container`` runs, decided before anything runs."""

    pin: ReleasePin
    image: str                          # the derived image, dinov2-triton-serve:<tag>
    repository: Path                    # absolute
    models: tuple[str, ...]             # () = every model (--load-model=*)
    version_compatible: tuple[str, ...]  # selected models with version-compatible TensorRT plans
    name: str
    host: str
    ports: dict                         # {"http": ..., "grpc": ..., "metrics": ...} on the host
    exit_timeout_s: int
    build_argv: list[str]
    run_argv: list[str]
    ensemble_copies: tuple[EnsembleCopy, ...] = ()

    @property
    def stop_timeout_s(self) -> int:
        return self.exit_timeout_s + STOP_GRACE_S


def dockerfile() -> Path:
    return resource_path("dinov2_triton.serve", "Dockerfile")


def image_tag(pin: ReleasePin) -> str:
    return f"{IMAGE_NAME}:{pin.container_tag}"


def _is_version_compatible(config_path: Path) -> bool:
    from dinov2_triton.serve.model_plan import read_model_config

    try:
        cfg = read_model_config(config_path)
    except Exception as exc:  # noqa: BLE001 - protobuf's ParseError and OSError alike name the problem
        raise ContainerError(f"{config_path}: cannot be parsed as a model configuration "
                             f"({' '.join(str(exc).split())[:200]})") from None
    params = cfg.parameters
    return "version_compatible" in params and params["version_compatible"].string_value.lower() == "true"


def select_models(repository: str | os.PathLike, models: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(models to load, those of them with version-compatible TensorRT plans)``.

    ``models`` None or empty: every model folder with a config.pbtxt (the
    server is started with ``--load-model=*``). A named model that is not in
    the repository, or a config.pbtxt that does not parse, is an error naming it."""
    repo = Path(repository)
    if not repo.is_dir():
        raise ContainerError(f"model repository {repo} does not exist (write it with the export stage: "
                             f"dinov2-triton export)")
    present = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    if models:
        unknown = [m for m in models if m not in present]
        if unknown:
            raise ContainerError(f"--models: {', '.join(unknown)} not in {repo} (it holds: "
                                 f"{', '.join(present) or 'no model'})")
        chosen = list(dict.fromkeys(models))
    else:
        if not present:
            raise ContainerError(f"model repository {repo} holds no model (no <model>/config.pbtxt); run the "
                                 f"export stage first: dinov2-triton export")
        chosen = present
    vc = [m for m in chosen if _is_version_compatible(repo / m / "config.pbtxt")]
    return (chosen if models else [], vc)


def config_name(pin: ReleasePin) -> str:
    """The ``--model-config-name`` of the pinned container: ``triton-<TRITON_CONTAINER_TAG>``
    (a copy written for one release is never read by another)."""
    return f"triton-{pin.container_tag}"


def model_config_name_flag(name: str) -> str:
    return f"--model-config-name={name}"


def _read_config(path: Path):
    from dinov2_triton.serve.model_plan import read_model_config

    if not path.is_file():
        raise ContainerError(f"{path} not found (an ensemble step without its model; re-run the export stage)")
    try:
        return read_model_config(path)
    except Exception as exc:  # noqa: BLE001 - protobuf's ParseError and OSError alike name the problem
        raise ContainerError(f"{path}: cannot be parsed as a model configuration "
                             f"({' '.join(str(exc).split())[:200]})") from None


def backpressure_limit(repository: str | os.PathLike, ensemble_cfg) -> int:
    """``max_inflight_requests`` for an ensemble: over its steps, the largest of
    :data:`BACKPRESSURE_BATCHES` x max_batch_size x instances + the step's own
    queue-policy ``max_queue_size``. The limit then bounds how many preprocessed
    tensors wait between steps (without it they pile up without bound when the
    classifier is the slower step) without ever holding back a request the step would run at once or
    its queue policy would accept: overload is still shed by the step's queue
    policy when the export set one."""
    repo = Path(repository)
    limit = 1
    for step in ensemble_cfg.ensemble_scheduling.step:
        cfg = _read_config(repo / step.model_name / "config.pbtxt")
        instances = sum(max(1, g.count) * max(1, len(g.gpus)) for g in cfg.instance_group) or 1
        queue = cfg.dynamic_batching.default_queue_policy.max_queue_size if cfg.HasField("dynamic_batching") else 0
        limit = max(limit, BACKPRESSURE_BATCHES * max(1, cfg.max_batch_size) * instances + int(queue))
    return limit


def with_max_inflight(cfg, limit: int) -> str:
    """The text of ensemble config ``cfg`` with ``ensemble_scheduling { max_inflight_requests: limit }``.

    With a model_config_pb2 that knows the field (tritonclient >= 2.63) it is set
    on the message; with an older one (the local 2.51 stack) the line is added to
    the canonical text at the place text_format prints it (after the steps, field 2)."""
    from google.protobuf import text_format

    if not cfg.HasField("ensemble_scheduling"):
        raise ContainerError(f"model {cfg.name!r} is not an ensemble (no ensemble_scheduling)")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ContainerError(f"max_inflight_requests {limit!r}: a whole number >= 1")
    ensembling = cfg.ensemble_scheduling
    if "max_inflight_requests" in ensembling.DESCRIPTOR.fields_by_name:
        out = type(cfg)()
        out.CopyFrom(cfg)
        out.ensemble_scheduling.max_inflight_requests = limit
        return text_format.MessageToString(out)
    lines = text_format.MessageToString(cfg).splitlines()
    start = lines.index("ensemble_scheduling {")
    end = lines.index("}", start)
    lines.insert(end, f"  max_inflight_requests: {limit}")
    return "\n".join(lines) + "\n"


def ensemble_backpressure(repository: str | os.PathLike, models: Sequence[str] = (), *, pin: ReleasePin,
                          max_inflight: int | None = None) -> list[EnsembleCopy]:
    """The per-deployment copies of the selected ensembles (``models`` empty: every
    model) with ``max_inflight_requests`` (None: :func:`backpressure_limit`; 0: none),
    or [] when the pinned Triton has no ensemble back-pressure. Nothing is written."""
    import hashlib

    if not pin.ensemble_max_inflight or max_inflight == 0:
        return []
    if max_inflight is not None and (not isinstance(max_inflight, int) or isinstance(max_inflight, bool)
                                     or max_inflight < 0):
        raise ContainerError(f"max_inflight_requests {max_inflight!r}: a whole number >= 0 (0: no limit)")
    repo = Path(repository)
    names = list(models) or sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    name = config_name(pin)
    copies = []
    for model in names:
        path = repo / model / "config.pbtxt"
        cfg = _read_config(path)
        if not cfg.HasField("ensemble_scheduling"):
            continue
        limit = max_inflight or backpressure_limit(repo, cfg)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        header = (f"# {model}/config.pbtxt + ensemble back-pressure, for Triton {pin.triton_server} "
                  f"(NGC {pin.container_tag}) started with {model_config_name_flag(name)}.\n"
                  f"# Written by dinov2-triton serve container / serve kubernetes from config.pbtxt sha256 "
                  f"{digest};\n# the local server (Triton {pin.local_triton_server}) cannot parse "
                  f"max_inflight_requests and never reads this file.\n")
        copies.append(EnsembleCopy(model=model, path=repo / model / CONFIGS_FOLDER / f"{name}.pbtxt",
                                   text=header + with_max_inflight(cfg, limit), max_inflight_requests=limit))
    return copies


def write_ensemble_copies(copies: Sequence[EnsembleCopy]) -> list[Path]:
    """Write the copies (atomically, creating ``configs/``); ContainerError naming a path that cannot be written."""
    from dinov2_triton.core.artifact_io import atomic_write_text

    written = []
    for copy in copies:
        try:
            copy.path.parent.mkdir(exist_ok=True)
            atomic_write_text(copy.path, copy.text)
        except OSError as exc:
            raise ContainerError(f"cannot write the container's copy of {copy.model}'s config to {copy.path} "
                                 f"({exc.strerror or exc}); the repository must be writable here") from None
        written.append(copy.path)
    return written


def tritonserver_args(*, api_key: str, models: Sequence[str] = (), version_compatible: bool = False,
                      exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S,
                      repository: str = CONTAINER_REPOSITORY, model_config_name: str | None = None) -> list[str]:
    """The ``tritonserver`` command line inside the container."""
    if not api_key or any(c.isspace() for c in api_key):
        raise ContainerError("the API key must be one word, not empty")
    load = [f"--load-model={m}" for m in models] or ["--load-model=*"]
    return ["tritonserver", f"--model-repository={repository}", "--model-control-mode=explicit", *load,
            *([VERSION_COMPATIBLE_FLAG] if version_compatible else []),
            *([model_config_name_flag(model_config_name)] if model_config_name else []),
            "--exit-on-error=false", f"--exit-timeout-secs={exit_timeout_s}",
            f"--http-restricted-api=model-repository:{API_KEY_HEADER}={api_key}",
            f"--grpc-restricted-protocol=model-repository:{API_KEY_HEADER}={api_key}"]


def build_argv(pin: ReleasePin, *, pillow: str = PILLOW_REQUIREMENT) -> list[str]:
    """``docker build`` of the derived image: the pinned Triton image + Pillow."""
    path = dockerfile()
    return ["docker", "build", "-q", "-t", image_tag(pin), "--build-arg", f"TRITON_IMAGE={pin.triton_image}",
            "--build-arg", f"PILLOW_REQUIREMENT={pillow}", "-f", str(path), str(path.parent)]


def _check_launch(host: str, ports: dict, exit_timeout_s: int, name: str) -> None:
    if not isinstance(exit_timeout_s, int) or isinstance(exit_timeout_s, bool) or exit_timeout_s < 0:
        raise ContainerError(f"--exit-timeout-secs {exit_timeout_s!r}: a whole number of seconds >= 0")
    for label, port in ports.items():
        if not 0 < int(port) < 65536:
            raise ContainerError(f"--{label}-port {port}: not a TCP port")
    if len(set(ports.values())) != len(ports):
        raise ContainerError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
    if not host or any(c.isspace() or c == ":" for c in host):
        raise ContainerError(f"--host {host!r}: an IPv4 address to bind, e.g. 127.0.0.1 or 0.0.0.0")
    if not name or not all(c.isalnum() or c in "_.-" for c in name):
        raise ContainerError(f"--name {name!r}: a container name is letters, digits, '_', '.' and '-'")


def plan_container(repository: str | os.PathLike, *, api_key: str, models: Sequence[str] | None = None,
                   host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                   metrics_port: int = 8002, exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S,
                   name: str = DEFAULT_NAME, pin: ReleasePin | None = None,
                   max_inflight: int | None = None) -> ContainerLaunch:
    """The ``docker build`` and ``docker run`` argv lists that serve ``repository``
    in the pinned Triton container, and the ensemble copies with back-pressure
    (``max_inflight``: see :func:`ensemble_backpressure`) that :func:`run_container`
    and :func:`start_container` write first (nothing is run or written here)."""
    pin = pin or load_pin()
    ports = {"http": int(http_port), "grpc": int(grpc_port), "metrics": int(metrics_port)}
    _check_launch(host, ports, exit_timeout_s, name)
    repo = Path(repository).resolve()
    chosen, vc = select_models(repo, models)
    copies = ensemble_backpressure(repo, chosen, pin=pin, max_inflight=max_inflight)
    server = tritonserver_args(api_key=api_key, models=chosen, version_compatible=bool(vc),
                               exit_timeout_s=exit_timeout_s, model_config_name=config_name(pin) if copies else None)
    publish = [w for label, inner in CONTAINER_PORTS.items() for w in ("-p", f"{host}:{ports[label]}:{inner}")]
    run = ["docker", "run", "--rm", "--name", name, "--gpus", "all", "--shm-size=1g",
           "--stop-timeout", str(exit_timeout_s + STOP_GRACE_S),
           "--ulimit", "memlock=-1", "--ulimit", "stack=67108864", *publish,
           "-v", f"{repo}:{CONTAINER_REPOSITORY}:ro", image_tag(pin), *server]
    return ContainerLaunch(pin=pin, image=image_tag(pin), repository=repo, models=tuple(chosen),
                           version_compatible=tuple(vc), name=name, host=host, ports=ports,
                           exit_timeout_s=exit_timeout_s, build_argv=build_argv(pin), run_argv=run,
                           ensemble_copies=tuple(copies))


def check_host(*, gpu: bool = True, which: Callable[[str], str | None] = shutil.which,
               run: Callable = subprocess.run, image: str | None = None) -> None:
    """Raise ContainerError unless docker (with a reachable daemon) and, with
    ``gpu``, an NVIDIA driver (nvidia-smi) are here."""
    image = image or "the pinned NVIDIA container"
    if which("docker") is None:
        raise ContainerError(f"docker not found: this runs {image} on a GPU host with docker and the NVIDIA "
                             f"Container Toolkit; {LOCAL_HINT}")
    try:
        info = run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ContainerError(f"`docker info` failed ({exc}): is the docker daemon running? {LOCAL_HINT}") from None
    if info.returncode != 0:
        said = (info.stderr or "").strip()[-200:]
        raise ContainerError("docker is installed but its daemon is not reachable (is it running? are you in "
                             f"the docker group?){': ' + said if said else ''}; {LOCAL_HINT}")
    if not gpu:
        return
    smi = which("nvidia-smi")
    ok = False
    if smi is not None:
        try:
            ok = run([smi, "-L"], capture_output=True, text=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
    if not ok:
        raise ContainerError("no NVIDIA GPU or driver found (nvidia-smi missing or failing): TensorRT plans and "
                             f"the GPU backends need one; {LOCAL_HINT}")


def build_image(launch: ContainerLaunch, *, timeout: float = 1800) -> None:
    """``docker build`` the derived image (cached by docker after the first time)."""
    try:
        proc = subprocess.run(launch.build_argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"building {launch.image} from {launch.pin.triton_image} took more than "
                             f"{timeout:.0f} s (pulling the image?)") from None
    if proc.returncode != 0:
        raise ContainerError(f"could not build {launch.image} from {launch.pin.triton_image} ({dockerfile()}): "
                             f"{(proc.stderr or proc.stdout or '').strip()[-400:]}")


def describe(launch: ContainerLaunch, api_key_file: str | os.PathLike) -> list[str]:
    """What is about to run, in a few lines (no key)."""
    pin, p = launch.pin, launch.ports
    lines = [f"{pin.triton_image} (Triton {pin.triton_server}, TensorRT {pin.tensorrt}, CUDA {pin.cuda}) "
             f"as {launch.image}, container {launch.name}",
             f"repository {launch.repository}: {', '.join(launch.models) or 'every model (--load-model=*)'}",
             f"http {launch.host}:{p['http']}  grpc {launch.host}:{p['grpc']}  metrics {launch.host}:{p['metrics']}",
             f"api key {api_key_file} (HTTP header {API_KEY_HEADER}); drain {launch.exit_timeout_s} s on stop"]
    if launch.version_compatible:
        lines.append(f"version-compatible TensorRT plans ({', '.join(launch.version_compatible)}): "
                     f"{VERSION_COMPATIBLE_FLAG}")
    for copy in launch.ensemble_copies:
        lines.append(f"ensemble {copy.model}: max_inflight_requests {copy.max_inflight_requests} per step "
                     f"({copy.path.relative_to(launch.repository)}, {model_config_name_flag(config_name(pin))})")
    return lines


def run_container(launch: ContainerLaunch) -> int:
    """Run the server in the foreground until it exits; Ctrl-C stops it
    (docker passes the signal on: Triton drains, then exits). Returns docker's exit code."""
    write_ensemble_copies(launch.ensemble_copies)
    proc = subprocess.Popen(launch.run_argv)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=launch.stop_timeout_s + 5)
        except subprocess.TimeoutExpired:
            stop_container(launch.name)
            return proc.wait()


def start_container(launch: ContainerLaunch, log: str | os.PathLike) -> subprocess.Popen:
    """Start the server in the background, docker's output to ``log``; stop it with :func:`stop_container`."""
    write_ensemble_copies(launch.ensemble_copies)
    with open(log, "ab") as out:
        return subprocess.Popen(launch.run_argv, stdout=out, stderr=subprocess.STDOUT)


def container_running(name: str) -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "ps", "-q", "--filter", f"name=^{name}$"], capture_output=True, text=True,
                          timeout=60)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def stop_container(name: str = DEFAULT_NAME, timeout: float | None = None) -> bool:
    """``docker stop`` the container ``name`` if it runs (its own stop timeout, set at
    ``docker run``, unless ``timeout``); True when one was stopped."""
    if not container_running(name):
        return False
    cmd = ["docker", "stop", *(["-t", str(int(timeout))] if timeout is not None else []), name]
    wait = (timeout if timeout is not None else DEFAULT_EXIT_TIMEOUT_S + STOP_GRACE_S) + 60
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=wait)
    if proc.returncode != 0:
        print(f"docker stop {name} failed: {proc.stderr.strip()[-200:]}", file=sys.stderr)
        return False
    return True
