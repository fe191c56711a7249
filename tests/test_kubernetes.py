"""deploy/kubernetes and serve/kubernetes.py, verified offline.

Every overlay is rendered with ``kubectl kustomize`` and every built-in
object validated strictly (unknown fields are errors) against the
Kubernetes OpenAPI schemas of dinov2_triton.serve.kubernetes.KUBERNETES_VERSION
(kubernetes-validate). CRDs (ServiceMonitor, InferenceService) have no
schema there; their fields that matter are checked below. Then the
semantics that break deployments: ports and probe paths against the server
flags, the flags against those of ``dinov2-triton serve container``
(dinov2_triton.serve.container), the HPA's metric against the
Prometheus-adapter rule and the rule's series against the /metrics of the
real local server, the image tag against the pin, the grace period against
the exit timeout, the security context, the NetworkPolicy; and the overlay
``dinov2-triton serve kubernetes`` writes for an exported repository.
"""
from __future__ import annotations

import re
import shutil
import urllib.request
from pathlib import Path

import kubernetes_validate as kv
import numpy as np
import pytest
import yaml

from dinov2_triton.core.release_pin import load_pin
from dinov2_triton.serve import kubernetes as k8s
from dinov2_triton.serve.errors import ServeError
from dinov2_triton.serve.kubernetes import DEPLOY_DIR

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = DEPLOY_DIR
SOURCES = {"gpu": DEPLOY / "overlays" / "gpu", "cpu": DEPLOY / "overlays" / "cpu", "kserve": DEPLOY / "kserve"}
CRDS = {"ServiceMonitor", "InferenceService"}
pytestmark = pytest.mark.kubectl  # every overlay is rendered by the real kubectl: the integration tier
DEPLOYMENT_KINDS = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                    "HorizontalPodAutoscaler", "ServiceMonitor"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl not found: it is part of this machine's tools (docs/environment.md)")
    return {name: k8s.render(path) for name, path in SOURCES.items()}


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def container(docs) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def flags(args) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in args:
        if a.startswith("--"):
            key, _, value = a.partition("=")
            out.setdefault(key, []).append(value)
    return out


def validate_strictly(docs) -> None:
    for d in docs:
        if d["kind"] in CRDS:  # no schema for CRDs in kubernetes-validate: checked by the tests below
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(d, k8s.KUBERNETES_VERSION, strict=True)
        else:
            kv.validate(d, k8s.KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- render + schemas
def test_every_overlay_renders_and_validates_strictly(rendered):
    for name in ("gpu", "cpu"):
        assert {d["kind"] for d in rendered[name]} == DEPLOYMENT_KINDS
        validate_strictly(rendered[name])
        assert {d["metadata"].get("namespace") for d in rendered[name] if d["kind"] != "Namespace"} == {"dinov2-triton"}
    assert sorted(d["kind"] for d in rendered["kserve"]) == ["HorizontalPodAutoscaler", "InferenceService"]
    validate_strictly(rendered["kserve"])


def test_strict_validation_can_fail(rendered):
    import copy

    dep = copy.deepcopy(one(rendered["gpu"], "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(dep, k8s.KUBERNETES_VERSION, strict=True)
    hpa = copy.deepcopy(one(rendered["gpu"], "HorizontalPodAutoscaler"))
    hpa["apiVersion"] = "autoscaling/v2beta2"  # what older Triton charts use: no longer served
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(hpa, k8s.KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_ports_probes_and_selectors_match_the_server(rendered, name):
    docs = rendered[name]
    c = container(docs)
    f = flags(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(f["--http-port"][0]), "grpc": int(f["--grpc-port"][0]),
                     "metrics": int(f["--metrics-port"][0])}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        n: (num, n) for n, num in ports.items()}
    assert [p["appProtocol"] for p in svc["spec"]["ports"] if p["name"] == "grpc"] == ["kubernetes.io/h2c"]
    selectors = {"Service": svc["spec"]["selector"],
                 "Deployment": one(docs, "Deployment")["spec"]["selector"]["matchLabels"],
                 "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 "NetworkPolicy": one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]}
    for kind, sel in selectors.items():
        assert sel and sel.items() <= pod_labels.items(), kind
    sm = one(docs, "ServiceMonitor")["spec"]
    assert sm["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_network_policy_opens_inference_to_all_and_metrics_to_monitoring(rendered, name):
    pol = one(rendered[name], "NetworkPolicy")["spec"]
    assert pol["policyTypes"] == ["Ingress"]
    rules = pol["ingress"]
    open_rules = [r for r in rules if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in open_rules] == [["grpc", "http"]]
    metrics = [r for r in rules if any(p["port"] == "metrics" for p in r["ports"])]
    assert metrics == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}], "ports": [{"port": "metrics", "protocol": "TCP"}]}]


def _container_flags() -> dict[str, list[str]]:
    """The tritonserver flags of `dinov2-triton serve container` for every model
    (--load-model=*), as its docker run line gives them."""
    from dinov2_triton.serve.container import tritonserver_args

    args = tritonserver_args(api_key="KEY")
    assert args[0] == "tritonserver" and "--load-model=*" in args
    return flags(args[1:])


def test_flags_are_those_of_serve_container(rendered):
    want = _container_flags()
    assert {"--model-control-mode", "--exit-on-error", "--http-restricted-api",
            "--grpc-restricted-protocol", "--load-model"} <= set(want)
    kserve_args = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]["model"]["args"]
    for name, args in (("gpu", container(rendered["gpu"])["args"]), ("cpu", container(rendered["cpu"])["args"]),
                       ("kserve", kserve_args)):
        got = flags(args)
        missing = set(want) - set(got) - ({"--model-repository"} if name == "kserve" else set())
        assert not missing, (name, missing)  # kserve: the runtime's --model-store is the repository
        for key in ("--model-control-mode", "--exit-on-error"):
            assert got[key] == want[key], (name, key)
        for key in ("--http-restricted-api", "--grpc-restricted-protocol"):
            assert got[key] == ["model-repository:triton-api-key=$(TRITON_API_KEY)"], (name, key)
        assert got["--load-model"] == ["*"] and got["--strict-readiness"] == ["true"], name
    env = {e["name"]: e for e in container(rendered["gpu"])["env"]}
    assert env["TRITON_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "dinov2-triton-api-key", "key": "api-key"}
    assert env["MODEL_REPOSITORY"]["valueFrom"]["configMapKeyRef"]["name"] == "dinov2-triton-config"
    assert flags(container(rendered["gpu"])["args"])["--model-repository"] == ["$(MODEL_REPOSITORY)"]


def test_grace_period_exceeds_the_drain(rendered):
    for name in ("gpu", "cpu"):
        c = container(rendered[name])
        assert flags(c["args"])["--exit-timeout-secs"] == [str(k8s.EXIT_TIMEOUT_S)]
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(k8s.PRESTOP_SLEEP_S)]
        grace = one(rendered[name], "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > k8s.PRESTOP_SLEEP_S + k8s.EXIT_TIMEOUT_S
    pred = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    assert flags(pred["model"]["args"])["--exit-timeout-secs"] == [str(k8s.EXIT_TIMEOUT_S)]
    assert pred["terminationGracePeriodSeconds"] > k8s.EXIT_TIMEOUT_S


def test_security_context_is_non_root_and_read_only(rendered):
    for name in ("gpu", "cpu"):
        spec = one(rendered[name], "Deployment")["spec"]["template"]["spec"]
        pod, c = spec["securityContext"], spec["containers"][0]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        sc = c["securityContext"]
        assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in vols[mounts["/tmp"]] and vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert spec["automountServiceAccountToken"] is False
        ns = one(rendered[name], "Namespace")["metadata"]["labels"]
        assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
    pred = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    assert pred["securityContext"]["runAsNonRoot"] is True
    assert pred["model"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_image_tag_is_the_pinned_release(rendered):
    pin = load_pin()
    want = f"{k8s.IMAGE_NAME}:{pin.container_tag}"
    assert container(rendered["gpu"])["image"] == want == container(rendered["cpu"])["image"]
    assert one(rendered["kserve"], "InferenceService")["spec"]["predictor"]["model"]["image"] == want
    # the name `serve container` builds the derived image under
    from dinov2_triton.serve.container import build_argv, image_tag

    assert image_tag(pin) == want and build_argv(pin)[build_argv(pin).index("-t") + 1] == want


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not(rendered):
    gpu = container(rendered["gpu"])["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    cpu = container(rendered["cpu"])
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"] and "cpu" not in cpu["resources"]["limits"]
    assert {"--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"} <= set(cpu["args"])


def _adapter_rule() -> dict:
    rules = yaml.safe_load(k8s.ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert len(rules) == 1
    return rules[0]


@pytest.mark.triton
def test_hpa_metric_is_the_adapter_rule_whose_series_the_real_server_exports(rendered, triton_server):
    rule = _adapter_rule()
    assert rule["name"]["as"] == k8s.QUEUE_METRIC
    hpas = {"gpu": (one(rendered["gpu"], "HorizontalPodAutoscaler"), "dinov2-triton"),
            "cpu": (one(rendered["cpu"], "HorizontalPodAutoscaler"), "dinov2-triton"),
            "kserve": (one(rendered["kserve"], "HorizontalPodAutoscaler"),
                       one(rendered["kserve"], "InferenceService")["metadata"]["name"] + "-predictor")}
    for name, (hpa, target) in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"], name
        # above the dynamic-batching delay export writes (2 ms): the HPA must not scale on batching alone
        assert int(metric["pods"]["target"]["averageValue"]) > 2000
    assert one(rendered["kserve"], "InferenceService")["metadata"]["annotations"][
        "serving.kserve.io/autoscalerClass"] == "external"
    # the series the rule reads: queue time over successful requests, grouped per pod
    series = set(re.findall(r"\b(nv_[a-z_]+)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    assert series == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_queue_duration_us")
    assert rule["metricsQuery"].count("<<.LabelMatchers>>") == 2 and "<<.GroupBy>>" in rule["metricsQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # ... and the real server exports them (after one request, with the model's labels)
    with triton_server.connect("http") as conn:
        x = np.zeros((1, 3, 8, 8), np.float32)
        conn.infer("tiny_onnx", [conn.tensor_input("pixel_values", x)])
    text = urllib.request.urlopen(triton_server.url_metrics, timeout=10).read().decode()
    for name in series:
        assert re.search(rf'^{name}\{{[^}}]*model="tiny_onnx"[^}}]*\}} \d', text, re.M), name


# --------------------------------------------------------------------------- the generator
def test_generated_overlay_lists_the_exported_models(tiny_repository, tmp_path, capsys):
    from dinov2_triton.serve.cli import main

    out = tmp_path / "k8s"
    assert main(["kubernetes", "--repository", str(tiny_repository), "--image", "registry.example/ml/dinov2-serve",
                 "--out", str(out), "--hardware", "cpu", "--storage-uri", "s3://bucket/models"]) == 0
    assert "4 model(s) dinov2, dinov2_onnx, dinov2_preprocess, dinov2_torchscript" in capsys.readouterr().out
    docs, kdocs = k8s.render(out), k8s.render(out / "kserve")
    validate_strictly(docs)
    validate_strictly(kdocs)
    models, _ = k8s.repository_models(tiny_repository, "cpu")
    mem = k8s.memory_estimate(models)
    c = container(docs)
    assert flags(c["args"])["--load-model"] == ["dinov2", "dinov2_onnx", "dinov2_preprocess", "dinov2_torchscript"]
    assert c["image"] == f"registry.example/ml/dinov2-serve:{load_pin().container_tag}"
    assert c["resources"]["requests"]["memory"] == mem == c["resources"]["limits"]["memory"]
    assert one(docs, "ConfigMap")["data"]["MODEL_REPOSITORY"] == "s3://bucket/models"
    model = one(kdocs, "InferenceService")["spec"]["predictor"]["model"]
    assert flags(model["args"])["--load-model"] == flags(c["args"])["--load-model"]
    assert model["storageUri"] == "s3://bucket/models" and model["image"] == c["image"]
    assert "nvidia.com/gpu" not in model["resources"]["requests"]
    # the HPA target stays above every model's batching delay
    target = int(one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["target"]["averageValue"])
    assert target > max(m.max_queue_delay_us for m in models) > 0


def test_gpu_and_cpu_model_lists_and_version_compatible_plans(tiny_model_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_repository, repo)
    cfg = repo / "tiny_trt_plan" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + '\nparameters { key: "version_compatible" value { string_value: "true" } }\n')
    gpu, gpu_skipped = k8s.repository_models(repo, "gpu")
    cpu, cpu_skipped = k8s.repository_models(repo, "cpu")
    assert [m.name for m in gpu] == ["tiny_broken_onnx", "tiny_onnx", "tiny_torchscript", "tiny_trt_plan"]
    assert gpu_skipped == {} and [m.name for m in gpu if m.version_compatible] == ["tiny_trt_plan"]
    assert "tiny_trt_plan" not in [m.name for m in cpu]
    assert cpu_skipped == {"tiny_trt_plan": "needs an NVIDIA GPU and TensorRT"}
    k8s.write_kubernetes(repo, image="reg/img", out=tmp_path / "gpu", hardware="gpu", volume=True)
    docs = k8s.render(tmp_path / "gpu")
    args = container(docs)["args"]
    assert "--backend-config=tensorrt,version-compatible=true" in args and "--load-model=tiny_trt_plan" in args
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
    assert one(docs, "ConfigMap")["data"]["MODEL_REPOSITORY"] == "/models"
    assert one(k8s.render(tmp_path / "gpu" / "kserve"), "InferenceService")["spec"]["predictor"]["model"][
        "storageUri"] == f"pvc://{k8s.PVC_NAME}/"
    k8s.write_kubernetes(repo, image="reg/img", out=tmp_path / "cpu", hardware="cpu")
    assert "--load-model=tiny_trt_plan" not in container(k8s.render(tmp_path / "cpu"))["args"]


def test_generator_refuses_what_would_drift_or_break(tiny_model_repository, tmp_path):
    tag = load_pin().container_tag
    assert k8s.image_reference(f"reg:5000/ml/img:{tag}") == ("reg:5000/ml/img", tag)
    assert k8s.image_reference("reg:5000/ml/img") == ("reg:5000/ml/img", tag)
    with pytest.raises(ServeError, match=r"tag '24.01' is not the pinned TRITON_CONTAINER_TAG"):
        k8s.image_reference("reg/img:24.01")
    with pytest.raises(ServeError, match="is not above the largest dynamic-batching delay"):
        k8s.write_kubernetes(tiny_model_repository, image="reg/img", out=tmp_path / "a", queue_target_us=10)
    with pytest.raises(ServeError, match=r"Triton reads s3://, gs:// or as://"):
        k8s.write_kubernetes(tiny_model_repository, image="reg/img", out=tmp_path / "b",
                             storage_uri="http://host/models")
    with pytest.raises(ServeError, match="does not exist"):
        k8s.write_kubernetes(tmp_path / "nope", image="reg/img", out=tmp_path / "c")
    with pytest.raises(ServeError, match="--hardware 'tpu'"):
        k8s.repository_models(tiny_model_repository, "tpu")
    assert k8s.memory_estimate([]) == "1024Mi"
    big = k8s.ServedModel("m", "onnxruntime_onnx", 300 << 20, 0, False)
    py = k8s.ServedModel("p", "python", 1 << 20, 0, False)
    assert k8s.memory_estimate([big, py]) == "2304Mi"  # 1024 + 600 + 2 + 512 = 2138 -> rounded up to 256 Mi
