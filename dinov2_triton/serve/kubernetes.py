"""Kubernetes manifests for one exported repository: ``dinov2-triton serve kubernetes``.

``deploy/kubernetes/`` holds a Kustomize base (the server flags of
``dinov2-triton serve container``, probes, Service, PodDisruptionBudget,
NetworkPolicy, ServiceMonitor, HPA on queue time per request), hardware
components (``gpu``, the default, and ``cpu``), the overlays that load every
model (``--load-model=*``) and a KServe InferenceService alternative.

:func:`write_kubernetes` writes an overlay for one repository into ``--out``
(two kustomizations: ``<out>/`` over the base, ``<out>/kserve/`` over the
InferenceService), filled in from what cannot be typed in by hand without
drifting:

* the models: one ``--load-model`` per model of the repository the export
  stage published into, read with dinov2_triton.serve.model_plan (on ``--hardware cpu``
  only those that run without a GPU, with the reason for the others);
* the image: ``<--image>:<TRITON_CONTAINER_TAG>`` from the pin file
  (dinov2_triton.core.release_pin), the derived image of serve/resources/Dockerfile;
* memory: an estimate from the model files (below), unless ``--memory``;
* TensorRT plans built version-compatible get the backend flag
  dinov2_triton.serve.container gives them;
* ensembles get the back-pressure of ``serve container`` (where the pinned
  Triton has it): the same per-deployment copy
  ``<model>/configs/triton-<tag>.pbtxt`` is written into the repository and
  the server gets ``--model-config-name=triton-<tag>``; the repository the
  pods read (object storage or the volume) must be uploaded after this
  command, as after every export.

The model list comes from the repository itself, not from the export
manifest: serve sits below export (it may not import it), and the
repository's config.pbtxt files are exactly what the server loads.

:data:`EXIT_TIMEOUT_S` (= dinov2_triton.serve.local_server.DEFAULT_EXIT_TIMEOUT_S) is the
``--exit-timeout-secs`` of the manifests; the test suite checks that the
YAML, this constant and the grace periods agree.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dinov2_triton.core.resources import resource_path
from dinov2_triton.serve.container import (
    IMAGE_NAME,
    VERSION_COMPATIBLE_FLAG,
    config_name,
    ensemble_backpressure,
    model_config_name_flag,
    write_ensemble_copies,
)
from dinov2_triton.serve.errors import ServeError
from dinov2_triton.serve.local_server import DEFAULT_EXIT_TIMEOUT_S

DEPLOY_DIR = resource_path("dinov2_triton.serve", "kubernetes")
ADAPTER_VALUES = DEPLOY_DIR / "monitoring" / "prometheus-adapter-values.yaml"
HARDWARE = ("gpu", "cpu")
# IMAGE_NAME: the image `serve container` builds (kustomize `images:` name), from dinov2_triton.serve.container
#: --exit-timeout-secs of the manifests: Triton's drain time for in-flight requests on SIGTERM,
#: the local server's default (one value for `serve start`, `serve container` and Kubernetes)
EXIT_TIMEOUT_S = DEFAULT_EXIT_TIMEOUT_S
#: preStop sleep: the endpoint leaves the Service before Triton stops answering
PRESTOP_SLEEP_S = 10
#: the Kubernetes version the manifests are validated against (kubernetes-validate schemas)
KUBERNETES_VERSION = "1.34.0"
#: the custom metric of the HPAs, defined by the rule in ADAPTER_VALUES
QUEUE_METRIC = "triton_queue_time_per_request_us"
PVC_NAME = "dinov2-triton-models"

# Memory estimate (host RAM, not a measurement): the server itself, then per
# model twice its files (the framework's copy while it builds its own), and a
# Python-backend stub process per Python model.
_BASE_BYTES = 1 << 30
_PER_PYTHON_MODEL_BYTES = 512 << 20
_ROUND = 256 << 20


@dataclass(frozen=True)
class ServedModel:
    name: str
    backend: str            # platform or backend of its config.pbtxt
    size_bytes: int         # every file of its folder
    max_queue_delay_us: int  # dynamic batching's deliberate wait (0 without)
    version_compatible: bool  # a TensorRT plan built with hardware/version compatibility


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def repository_models(repository: str | os.PathLike, hardware: str = "gpu"
                      ) -> tuple[list[ServedModel], dict[str, str]]:
    """The models the server loads from ``repository`` on ``hardware``, and
    ``{name: why not}`` for the others (dinov2_triton.serve.model_plan's reasons on CPU;
    unreadable configs on both)."""
    from dinov2_triton.serve.model_plan import plan_models, read_model_config

    if hardware not in HARDWARE:
        raise ServeError(f"--hardware {hardware!r}: choose one of {', '.join(HARDWARE)}")
    repo = Path(repository)
    plan = plan_models(repo, "*")  # raises ServeError when the folder does not exist
    if hardware == "cpu":
        names, skipped = plan.load, dict(plan.skipped)
    else:  # a GPU runs everything whose config parses (TensorRT plans and KIND_GPU included)
        skipped = {m: why for m, why in plan.skipped.items() if "cannot be parsed" in why}
        names = sorted(set(plan.load) | (set(plan.skipped) - set(skipped)))
    models = []
    for name in names:
        cfg = read_model_config(repo / name / "config.pbtxt")
        vc = cfg.parameters["version_compatible"].string_value if "version_compatible" in cfg.parameters else ""
        models.append(ServedModel(
            name=name, backend=cfg.backend or cfg.platform, size_bytes=_folder_bytes(repo / name),
            max_queue_delay_us=int(cfg.dynamic_batching.max_queue_delay_microseconds),
            version_compatible=vc.lower() == "true"))
    if not models:
        raise ServeError(f"{repo}: no model to serve on {hardware} (skipped: {skipped or 'none'}); "
                         f"run the export stage first")
    return models, skipped


def memory_estimate(models: Sequence[ServedModel]) -> str:
    """The memory request (= limit) for ``models``, e.g. "2304Mi" (see the module's estimate)."""
    total = _BASE_BYTES + sum(2 * m.size_bytes for m in models)
    total += _PER_PYTHON_MODEL_BYTES * sum(1 for m in models if m.backend == "python")
    return f"{-(-total // _ROUND) * _ROUND >> 20}Mi"


def image_reference(image: str, pin_file: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(name, tag)`` of the image to deploy: ``image`` (``registry/name``)
    with the pinned container tag. A tag in ``image`` must be that tag."""
    from dinov2_triton.core.release_pin import PIN_FILE, load_pin

    pin = load_pin(pin_file or PIN_FILE)
    name, tag = image, None
    last = image.rsplit("/", 1)[-1]
    if "@" in image:
        raise ServeError(f"--image {image!r}: give registry/name; the tag comes from {pin.file}")
    if ":" in last:
        name, tag = image.rsplit(":", 1)
    if not name or any(c.isspace() for c in name):
        raise ServeError(f"--image {image!r}: not an image name")
    if tag is not None and tag != pin.container_tag:
        raise ServeError(f"--image {image!r}: tag {tag!r} is not the pinned TRITON_CONTAINER_TAG "
                         f"{pin.container_tag!r} of {pin.file} (the image serve/Dockerfile derives from "
                         f"that release); leave the tag out or rebuild for the pin")
    return name, pin.container_tag


def _json_patch(ops: list[dict[str, Any]]) -> str:
    """A JSON 6902 patch, one operation per line (kustomize reads it as YAML)."""
    return "[\n" + ",\n".join("  " + json.dumps(op) for op in ops) + "\n]\n"


def _kustomization(resources: list[str], components: list[str], image: tuple[str, str],
                   patches: list[dict[str, Any]], header: str) -> str:
    import yaml

    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}
    if components:
        body["components"] = components
    body["images"] = [{"name": IMAGE_NAME, "newName": image[0], "newTag": image[1]}]
    body["patches"] = patches

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):  # the patches as readable block scalars
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return header + yaml.dump(body, Dumper=Dumper, sort_keys=False, width=200)


def write_kubernetes(repository: str | os.PathLike, *, image: str, out: str | os.PathLike,
                     hardware: str = "gpu", storage_uri: str | None = None, volume: bool = False,
                     memory: str | None = None, queue_target_us: int | None = None,
                     pin_file: str | os.PathLike | None = None, max_inflight: int | None = None) -> dict[str, Any]:
    """Write ``<out>/kustomization.yaml`` (Deployment path) and
    ``<out>/kserve/kustomization.yaml`` for ``repository``, and the ensembles'
    back-pressure copies into ``repository`` (``max_inflight``: see
    dinov2_triton.serve.container.ensemble_backpressure); return what was filled
    in (models, skipped, image, memory, files, ensemble_max_inflight)."""
    from dinov2_triton.core.artifact_io import atomic_write_text
    from dinov2_triton.core.release_pin import PIN_FILE, load_pin

    if storage_uri and volume:
        raise ServeError("give --storage-uri or --volume, not both")
    if storage_uri and storage_uri.split("://", 1)[0] not in ("s3", "gs", "as"):
        raise ServeError(f"--storage-uri {storage_uri!r}: Triton reads s3://, gs:// or as:// itself")
    models, skipped = repository_models(repository, hardware)
    max_delay = max(m.max_queue_delay_us for m in models)
    if queue_target_us is not None and queue_target_us <= max_delay:
        raise ServeError(f"--queue-target-us {queue_target_us} is not above the largest dynamic-batching "
                         f"delay of the models ({max_delay} us): the HPA would scale on batching alone")
    ref = image_reference(image, pin_file)
    pin = load_pin(pin_file or PIN_FILE)
    copies = ensemble_backpressure(repository, [m.name for m in models], pin=pin, max_inflight=max_inflight)
    mem = memory or memory_estimate(models)
    out = Path(out).resolve()
    (out / "kserve").mkdir(parents=True, exist_ok=True)
    rel = lambda p, base=out: os.path.relpath(p, base)  # noqa: E731 - kustomize wants relative paths
    header = (f"# Generated by `dinov2-triton serve kubernetes --repository {Path(repository).resolve()} "
              f"--hardware {hardware}`;\n# regenerate it after the next export instead of editing it.\n"
              f"# models: {', '.join(m.name for m in models)}\n"
              + "".join(f"# not loaded: {name}: {why}\n" for name, why in skipped.items())
              + f"# memory {mem}: {'given' if memory else 'estimated from the model files'}\n")

    args = [f"--load-model={m.name}" for m in models]
    if hardware == "gpu" and any(m.version_compatible for m in models):
        args.append(VERSION_COMPATIBLE_FLAG)  # as `serve container` does
    if copies:
        args.append(model_config_name_flag(config_name(pin)))  # the ensembles' back-pressure copies
        header += "".join(f"# {c.model}: max_inflight_requests {c.max_inflight_requests} per step "
                          f"({c.model}/{c.path.parent.name}/{c.path.name}; upload the repository after this "
                          f"command)\n" for c in copies)
    container = "/spec/template/spec/containers/0"
    ops = [{"op": "add", "path": f"{container}/args/-", "value": a} for a in args]
    ops += [{"op": "replace", "path": f"{container}/resources/requests/memory", "value": mem},
            {"op": "replace", "path": f"{container}/resources/limits/memory", "value": mem}]
    patches = [{"target": {"kind": "Deployment", "name": "dinov2-triton"}, "patch": _json_patch(ops)}]
    if storage_uri:
        patches.append({"target": {"kind": "ConfigMap", "name": "dinov2-triton-config"},
                        "patch": _json_patch([{"op": "replace", "path": "/data/MODEL_REPOSITORY",
                                               "value": storage_uri}])})
    if queue_target_us is not None:
        patches.append({"target": {"kind": "HorizontalPodAutoscaler", "name": "dinov2-triton"},
                        "patch": _json_patch([{"op": "replace", "path": "/spec/metrics/0/pods/target/averageValue",
                                               "value": str(queue_target_us)}])})
    components = [rel(DEPLOY_DIR / "components" / hardware)]
    if volume:
        components.append(rel(DEPLOY_DIR / "components" / "volume-repository"))
    main = _kustomization([rel(DEPLOY_DIR / "base")], components, ref, patches, header)
    atomic_write_text(out / "kustomization.yaml", main)

    model = "/spec/predictor/model"
    kops = [{"op": "remove", "path": f"{model}/args/{_kserve_load_all_index()}"}]
    kops += [{"op": "add", "path": f"{model}/args/-", "value": a} for a in args]
    kops += [{"op": "replace", "path": f"{model}/resources/requests/memory", "value": mem},
             {"op": "replace", "path": f"{model}/resources/limits/memory", "value": mem}]
    if hardware == "cpu":
        kops += [{"op": "remove", "path": f"{model}/resources/requests/nvidia.com~1gpu"},
                 {"op": "remove", "path": f"{model}/resources/limits/nvidia.com~1gpu"}]
    if storage_uri or volume:
        kops.append({"op": "replace", "path": f"{model}/storageUri",
                     "value": storage_uri or f"pvc://{PVC_NAME}/"})
    kpatches = [{"target": {"kind": "InferenceService", "name": "dinov2-triton"}, "patch": _json_patch(kops)}]
    if queue_target_us is not None:
        kpatches.append({"target": {"kind": "HorizontalPodAutoscaler", "name": "dinov2-triton-predictor"},
                         "patch": _json_patch([{"op": "replace", "path": "/spec/metrics/0/pods/target/averageValue",
                                                "value": str(queue_target_us)}])})
    kserve = _kustomization([rel(DEPLOY_DIR / "kserve", out / "kserve")], [], ref, kpatches, header)
    atomic_write_text(out / "kserve" / "kustomization.yaml", kserve)
    copied = write_ensemble_copies(copies)  # ContainerError (a ServeError) names a path it cannot write
    return {"models": [m.name for m in models], "skipped": skipped, "image": f"{ref[0]}:{ref[1]}",
            "memory": mem, "hardware": hardware,
            "ensemble_max_inflight": {c.model: c.max_inflight_requests for c in copies},
            "files": [str(out / "kustomization.yaml"), str(out / "kserve" / "kustomization.yaml"),
                      *map(str, copied)]}


def _kserve_load_all_index() -> int:
    """Index of ``--load-model=*`` in the InferenceService's args (the generated overlay replaces it)."""
    import yaml

    doc = yaml.safe_load((DEPLOY_DIR / "kserve" / "inferenceservice.yaml").read_text())
    args = doc["spec"]["predictor"]["model"]["args"]
    if "--load-model=*" not in args:
        raise ServeError(f"{DEPLOY_DIR / 'kserve' / 'inferenceservice.yaml'}: no --load-model=* in the model's "
                         f"args to replace")
    return args.index("--load-model=*")


def render(kustomization_dir: str | os.PathLike, timeout: float = 60.0) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR`` (offline) as a list of objects; ServeError with kubectl's message."""
    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ServeError("kubectl not found: it renders the manifests (kubectl kustomize); install kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(kustomization_dir)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise ServeError(f"kubectl kustomize {kustomization_dir}: {proc.stderr.strip().splitlines()[-1:]}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]
