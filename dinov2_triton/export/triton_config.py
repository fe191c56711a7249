"""config.pbtxt for every model of the repository, built as
`tritonclient.grpc.model_config_pb2.ModelConfig` protobufs (never string
templates) and written with protobuf's text_format, then parsed back to
validate. Names and shapes follow docs/architecture.md ("Serving contract")."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb

INPUT = "pixel_values"
OUTPUTS = ("logits", "embedding")
LABELS_FILE = "labels.txt"
PREPROCESS_MODEL = "dinov2_preprocess"
ENSEMBLE_MODEL = "dinov2"
IMAGE_INPUT = "image"
WARMUP_IMAGE_FILE = "sample_image"   # under <model>/warmup/
DEVICE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# Registry platforms that Triton knows only as a backend name (no `platform`
# string exists for them): their config says `backend: "<name>"`.
BACKEND_PLATFORMS = ("openvino",)
# Triton's OpenVINO backend reads these model-config parameters (its README
# and src/openvino.cc; values are case-insensitive strings there).
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")

# Queue policy (dynamic_batching.default_queue_policy): load shedding, ON by
# default on every model with a dynamic batcher (every classifier variant and
# dinov2_preprocess; the `dinov2` ensemble has no batcher and is shed by its
# steps: "in ensemble 'dinov2', Request timeout expired"). Without a policy
# Triton queues without limit: under overload every request is eventually
# answered, minutes late (3,000 batch-8 requests at ~150/s: p99 95 s). With
# it the server sheds what it cannot serve (gRPC UNAVAILABLE / HTTP 503) and
# the accepted requests keep their latency. `--queue-timeout-ms 0` turns it off.
#
# The policy comes with the instance default below, because Triton 2.51 (the
# CPU server this project runs, with the Python-backend stand-ins of
# serve/resources/backends; the native backends of the NVIDIA container are
# not measured) pays for ANY non-empty queue policy on a model with ONE busy
# instance: the dynamic batcher misses the wake-up of a request that arrives
# while the instance is busy and sleeps its 500 ms idle wait (docs/field-notes.md
# #13; measured here, same server, configs swapped through the repository
# API, dinov2_onnx 56 px, 2-core AMD EPYC: closed loop concurrency 4, batch 1:
# 76 instead of 266 img/s; perf_analyzer never stabilises). Two instances
# hide it: dinov2_onnx_int8 56 px, 2 instances x 1 thread, closed loop b1/c4
# 243.5 infer/s with the policy vs 246.4 without, same run (2-core Intel
# Xeon); the one-instance export could not be measured with it (the stall)
# and collapsed under overload (90 of 3,000 requests served).
# tests/test_serving_limits.py pins the one-instance stall (strict xfail), so
# an upgrade that fixes it is noticed. The pipeline's tune stage
# (dinov2_triton.pipeline.capacity_stage.run_tune) measures, on the serving
# host, capacity at the SLO of the chosen configuration with and without the
# policy in the same run, and moves to another configuration where the
# policy costs capacity.
#
# Two bounds, and which one acts matters:
# - the queue TIMEOUT bounds latency: a request still queued after it is
#   rejected ("Request timeout expired") and the model keeps running at full
#   throughput (measured with Triton 2.51: 200 req/s offered to a 70 req/s
#   model, 84 req/s served, p99 = timeout + one batch);
# - the queue SIZE is a memory cap, sized to stay out of the way: while the
#   queue is full, Triton 2.51's dynamic batcher forms about one batch per
#   0.5 s (measured: 8 req/s served instead of 70, "Exceeds maximum queue
#   size" for the rest, queued requests 2-7 s late), so the size must not be
#   the bound that acts first (tests/test_serving_limits.py pins this). A
#   queue holds at most what arrives within one timeout beyond what is
#   served, so the default size (:func:`default_max_queue_size`) is at least
#   MIN_SHED_RATE_RPS x the timeout: the timeout acts first at every offered
#   rate below that (2048 requests at 2 s: 1024 req/s, above the fastest
#   batch-1 capacity measured on 2 cores, 940 img/s INT8 at 56 px,
#   docs/capacity.md).
#: the timeout to shed with: covers the bench stage's own sweeps (batch 8,
#: concurrency <= 4 at 56 px, <= 2 at 224 px on a 2-core CPU: at most ~1.5 s
#: of queueing), so they are never shed
SHEDDING_QUEUE_TIMEOUT_MS = 2000
#: the default: shedding on (``--queue-timeout-ms 0``: no queue policy at all)
DEFAULT_QUEUE_TIMEOUT_MS = SHEDDING_QUEUE_TIMEOUT_MS
#: queue cap per instance, in full batches (what a short timeout gets: 256
#: requests for max_batch_size 4, one instance and 0.2 s) ...
QUEUE_BATCHES_PER_INSTANCE = 64
#: ... and at least this many requests per second of timeout (2048 for 2 s):
#: the cap is reached before the timeout only when requests arrive faster
#: than max_queue_size / timeout
MIN_SHED_RATE_RPS = 1024
#: instances of every batching model: two, so that the queue policy does not
#: stall (Triton 2.51, above); two instances x one thread each also won every
#: configuration search on 2 cores that could reach it (docs/capacity.md:
#: 738.9 vs 400.0 img/s for the one-instance export, 1.85x)
DEFAULT_INSTANCES = 2
#: no preferred batch sizes: the batcher forms the largest batch it can within
#: max_queue_delay (the search measured no gain from 4, 8 on a CPU), and a
#: Model Analyzer run can vary max_batch_size on the exported repository
#: (its brute search skips every candidate below a fixed preferred size)
DEFAULT_PREFERRED_BATCH_SIZES: tuple[int, ...] = ()
#: model-config parameter holding the intra-op thread count of one instance,
#: per Triton backend (its onnxruntime backend ``intra_op_thread_count``, its
#: pytorch backend ``INTRA_OP_THREAD_COUNT``, its openvino backend
#: ``INFERENCE_NUM_THREADS``; the CPU stand-ins read the same names)
THREAD_PARAMETERS = {"onnxruntime": "intra_op_thread_count", "pytorch": "INTRA_OP_THREAD_COUNT",
                     "openvino": "INFERENCE_NUM_THREADS"}
#: Triton's platform names -> the backend that runs them
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch", "tensorrt_plan": "tensorrt"}
#: model-config parameters of dinov2_preprocess read by its model.py
PREPROCESS_LIMIT_PARAMETERS = ("max_image_bytes", "max_image_pixels")


class ConfigError(ValueError):
    """A generated config that does not survive the text round trip or breaks the contract."""


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def default_max_queue_size(max_batch_size: int, instances: int,
                           queue_timeout_ms: float = DEFAULT_QUEUE_TIMEOUT_MS) -> int:
    """Requests a model may hold waiting: QUEUE_BATCHES_PER_INSTANCE full
    batches for each instance, and at least MIN_SHED_RATE_RPS x the timeout,
    so that the timeout, not the size, is the bound that acts first (2048 for
    max_batch_size 8, two instances and 2 s)."""
    per_batches = QUEUE_BATCHES_PER_INSTANCE * int(max_batch_size) * int(instances)
    return max(per_batches, math.ceil(MIN_SHED_RATE_RPS * float(queue_timeout_ms) / 1000))


def usable_cores() -> int:
    """Physical cores this process may run on (dinov2_triton.core.cpu_features.physical_cores)."""
    from dinov2_triton.core.cpu_features import physical_cores

    return physical_cores()


def default_threads(instances: int, cores: int | None = None) -> int:
    """Intra-op threads of one CPU instance: the host's cores shared by the
    instances (two instances on two cores: one thread each, not two each)."""
    return max(1, (usable_cores() if cores is None else int(cores)) // max(1, int(instances)))


def backend_of(cfg) -> str:
    """The backend that runs a ModelConfig (its ``backend``, else its ``platform``'s)."""
    return cfg.backend or PLATFORM_BACKENDS.get(cfg.platform, cfg.platform)


def thread_parameter(cfg) -> str | None:
    """The config parameter holding the intra-op threads of ``cfg``'s backend (None: it has none)."""
    return THREAD_PARAMETERS.get(backend_of(cfg))


def _batching(cfg, *, max_batch_size: int, preferred_batch_sizes: Sequence[int], max_queue_delay_us: int,
              instances: int, max_queue_size: int | None, queue_timeout_ms: float) -> None:
    preferred = sorted({int(b) for b in preferred_batch_sizes if 1 <= int(b) <= max_batch_size})
    batching = cfg.dynamic_batching
    batching.preferred_batch_size.extend(preferred)
    batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    if (max_queue_size is not None and int(max_queue_size) < 0) or float(queue_timeout_ms) < 0:
        raise ConfigError(f"{cfg.name}: max_queue_size {max_queue_size} and queue timeout "
                          f"{queue_timeout_ms} ms must be >= 0 (0: no limit)")
    if float(queue_timeout_ms) == 0 and not max_queue_size:
        return          # shedding turned off (--queue-timeout-ms 0): no policy at all
    if max_queue_size is None:
        max_queue_size = default_max_queue_size(max_batch_size, instances, queue_timeout_ms)
    policy = batching.default_queue_policy
    policy.max_queue_size = int(max_queue_size)
    policy.default_timeout_microseconds = int(round(float(queue_timeout_ms) * 1000))
    policy.timeout_action = _pb().ModelQueuePolicy.REJECT
    # a client may ask for a shorter wait than the default, never a longer one
    policy.allow_timeout_override = True


def _instances(cfg, *, kind: str, count: int) -> None:
    pb = _pb()
    group = cfg.instance_group.add()
    group.kind = pb.ModelInstanceGroup.Kind.Value(kind)
    group.count = int(count)


def _parameters(cfg, params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        cfg.parameters[str(key)].string_value = str(value)


def openvino_parameters(*, performance_hint: str = "LATENCY", num_streams: str | int = "1",
                        inference_num_threads: int | None = None, batch_padding: bool = True,
                        hint_bf16: bool = False) -> dict[str, str]:
    """The `parameters` of a `backend: "openvino"` model, checked the way the
    backend checks them. ENABLE_BATCH_PADDING=YES: the backend compiles the
    model for exactly max_batch_size and, without it, fails every smaller
    batch ("expected requests with batch size ..."); with it, it pads.
    HINT_BF16=YES is the backend's INFERENCE_PRECISION_HINT=bf16 (its only
    precision parameter; it reads no key named INFERENCE_PRECISION_HINT)."""
    hint = str(performance_hint).upper()
    if hint not in OPENVINO_HINTS:
        raise ConfigError(f"PERFORMANCE_HINT {performance_hint!r}: choose from {OPENVINO_HINTS}")
    streams = str(num_streams).upper()
    if streams not in ("AUTO", "NUMA") and not (streams.isdigit() and int(streams) >= 1):
        raise ConfigError(f"NUM_STREAMS {num_streams!r}: AUTO, NUMA or a number >= 1")
    params = {"PERFORMANCE_HINT": hint, "NUM_STREAMS": streams}
    if inference_num_threads is not None:
        if int(inference_num_threads) < 1:
            raise ConfigError(f"INFERENCE_NUM_THREADS {inference_num_threads}: must be >= 1 (leave it unset "
                              f"for every core)")
        params["INFERENCE_NUM_THREADS"] = str(int(inference_num_threads))
    if batch_padding:
        params["ENABLE_BATCH_PADDING"] = "YES"
    if hint_bf16:
        params["HINT_BF16"] = "YES"
    return params


def _latest_one(cfg) -> None:
    # Serve only the newest version: publishing a new version switches traffic
    # to it atomically and the previous one stays on disk for a rollback.
    cfg.version_policy.latest.num_versions = 1


def classifier_config(variant, *, image_size: int, num_classes: int, embed_dim: int, max_batch_size: int,
                      instances: int = DEFAULT_INSTANCES, device: str = "cpu",
                      preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
                      max_queue_delay_us: int = 2000, max_queue_size: int | None = None,
                      queue_timeout_ms: float = DEFAULT_QUEUE_TIMEOUT_MS, threads: int | str | None = "auto",
                      parameters: Mapping[str, Any] | None = None) -> "pb.ModelConfig":
    """The config of `dinov2_<variant>`: FP32 pixel_values [3,H,W] -> logits [C]
    (with labels.txt, so Triton's classification extension works) and
    embedding [D], dynamic batching with a queue policy (``max_queue_size``
    None: :func:`default_max_queue_size`), instance group, batch-1 warm-up.
    ``threads``: intra-op threads per instance, in the backend's parameter
    (:data:`THREAD_PARAMETERS`; CPU instances only); "auto":
    :func:`default_threads` of this host; None: the backend's own default. A
    thread count in the variant's or the caller's parameters wins."""
    pb = _pb()
    cfg = pb.ModelConfig(name=variant.model_name, max_batch_size=int(max_batch_size))
    if variant.platform in BACKEND_PLATFORMS:
        cfg.backend = variant.platform
    else:
        cfg.platform = variant.platform
    cfg.default_model_filename = variant.filename
    inp = cfg.input.add(name=INPUT, data_type=pb.TYPE_FP32)
    inp.dims.extend([3, image_size, image_size])
    # Order matters for pytorch_libtorch: the libtorch backend binds outputs
    # by position when the names are not `output__<i>`, and the traced module
    # returns (logits, embedding). The other platforms bind by name.
    out = cfg.output.add(name="logits", data_type=pb.TYPE_FP32, label_filename=LABELS_FILE)
    out.dims.append(num_classes)
    out = cfg.output.add(name="embedding", data_type=pb.TYPE_FP32)
    out.dims.append(embed_dim)
    _batching(cfg, max_batch_size=max_batch_size, preferred_batch_sizes=preferred_batch_sizes,
              max_queue_delay_us=max_queue_delay_us, instances=instances, max_queue_size=max_queue_size,
              queue_timeout_ms=queue_timeout_ms)
    _instances(cfg, kind=DEVICE_KINDS[device], count=instances)
    _latest_one(cfg)
    # Warm-up: one random batch-1 request per instance at load time, so the
    # first real request does not pay for lazy initialisation (cuDNN/TensorRT
    # tactic selection, ORT arena growth).
    warm = cfg.model_warmup.add(name="random_batch1", batch_size=1)
    wi = warm.inputs[INPUT]
    wi.data_type = pb.TYPE_FP32
    wi.dims.extend([3, image_size, image_size])
    wi.random_data = True
    params: dict[str, Any] = {"precision": variant.precision}
    param = thread_parameter(cfg)
    if param and device == "cpu" and threads is not None:
        if threads == "auto":
            threads = default_threads(instances)
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"{cfg.name}: threads {threads!r}: a count >= 1, 'auto' or None")
        params[param] = threads
    params.update({**dict(variant.config_parameters), **dict(parameters or {})})
    _parameters(cfg, params)
    return cfg


def preprocess_config(*, image_size: int, max_batch_size: int, instances: int = DEFAULT_INSTANCES,
                      preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
                      max_queue_delay_us: int = 2000,
                      max_queue_size: int | None = None, queue_timeout_ms: float = DEFAULT_QUEUE_TIMEOUT_MS,
                      max_image_bytes: int | None = None, max_image_pixels: int | None = None,
                      parameters: Mapping[str, Any] | None = None, warmup_file: bool = True) -> "pb.ModelConfig":
    """`dinov2_preprocess`: Python backend, encoded image bytes [1] ->
    pixel_values FP32 [3,H,W]. Always KIND_CPU: it decodes with PIL. The
    hostile-image limits (encoded bytes, decoded pixels; None: the defaults of
    dinov2_triton.core.image_limits) are model-config parameters, so the container serves
    the limits this export chose."""
    from dinov2_triton.core.image_limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

    pb = _pb()
    cfg = pb.ModelConfig(name=PREPROCESS_MODEL, backend="python", max_batch_size=int(max_batch_size))
    inp = cfg.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING)
    inp.dims.append(1)
    out = cfg.output.add(name=INPUT, data_type=pb.TYPE_FP32)
    out.dims.extend([3, image_size, image_size])
    _batching(cfg, max_batch_size=max_batch_size, preferred_batch_sizes=preferred_batch_sizes,
              max_queue_delay_us=max_queue_delay_us, instances=instances, max_queue_size=max_queue_size,
              queue_timeout_ms=queue_timeout_ms)
    _instances(cfg, kind="KIND_CPU", count=instances)
    _latest_one(cfg)
    if warmup_file:
        # A real encoded image (warmup/sample_image: 4-byte length + PNG bytes,
        # Triton's layout for TYPE_STRING elements): random bytes would not decode.
        warm = cfg.model_warmup.add(name="sample_image_batch1", batch_size=1)
        wi = warm.inputs[IMAGE_INPUT]
        wi.data_type = pb.TYPE_STRING
        wi.dims.append(1)
        wi.input_data_file = WARMUP_IMAGE_FILE
    limits = {"max_image_bytes": DEFAULT_MAX_IMAGE_BYTES if max_image_bytes is None else int(max_image_bytes),
              "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else int(max_image_pixels)}
    for key, value in limits.items():
        if value < 1:
            raise ConfigError(f"{PREPROCESS_MODEL}: {key} {value} must be >= 1")
    _parameters(cfg, {**limits, **dict(parameters or {})})
    return cfg


def ensemble_config(classifier_model: str, *, num_classes: int, embed_dim: int, image_size: int,
                    max_batch_size: int, parameters: Mapping[str, Any] | None = None) -> "pb.ModelConfig":
    """`dinov2`: image bytes -> dinov2_preprocess -> <classifier_model> ->
    logits (with labels.txt: classification works through the ensemble) and
    embedding. Steps use the latest version (-1) of each model.

    No dynamic_batching and so no queue policy here: in ModelConfig they are
    one oneof with ensemble_scheduling, and Triton 2.51 refuses such an
    ensemble ("ensemble scheduling must be set"). The steps' own configs
    carry the queue policy: an overloaded step sheds the ensemble request
    with UNAVAILABLE ("in ensemble 'dinov2', Request timeout expired")."""
    pb = _pb()
    cfg = pb.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=int(max_batch_size))
    inp = cfg.input.add(name=IMAGE_INPUT, data_type=pb.TYPE_STRING)
    inp.dims.append(1)
    out = cfg.output.add(name="logits", data_type=pb.TYPE_FP32, label_filename=LABELS_FILE)
    out.dims.append(num_classes)
    out = cfg.output.add(name="embedding", data_type=pb.TYPE_FP32)
    out.dims.append(embed_dim)
    step = cfg.ensemble_scheduling.step.add(model_name=PREPROCESS_MODEL, model_version=-1)
    step.input_map[IMAGE_INPUT] = IMAGE_INPUT
    step.output_map[INPUT] = "preprocessed_pixel_values"
    step = cfg.ensemble_scheduling.step.add(model_name=classifier_model, model_version=-1)
    step.input_map[INPUT] = "preprocessed_pixel_values"
    step.output_map["logits"] = "logits"
    step.output_map["embedding"] = "embedding"
    _latest_one(cfg)
    _parameters(cfg, {"classifier_model": classifier_model, **dict(parameters or {})})
    return cfg


# ---------------------------------------------------------------------------
# text form
# ---------------------------------------------------------------------------
def to_text(cfg: "pb.ModelConfig") -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(text: str) -> "pb.ModelConfig":
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, _pb().ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from exc


def validate_config(cfg: "pb.ModelConfig") -> str:
    """Serialise, parse back, and check the round trip is lossless and the
    contract holds (names, FP32 I/O, batching bounds). Returns the text."""
    pb = _pb()
    text = to_text(cfg)
    back = parse_config(text)
    if back != cfg:
        raise ConfigError(f"{cfg.name}: config.pbtxt round trip changed the message")
    problems = []
    if not cfg.name:
        problems.append("no name")
    if cfg.max_batch_size < 1:
        problems.append(f"max_batch_size {cfg.max_batch_size} < 1 (the contract has a batch axis)")
    for b in cfg.dynamic_batching.preferred_batch_size:
        if b > cfg.max_batch_size:
            problems.append(f"preferred_batch_size {b} > max_batch_size {cfg.max_batch_size}")
    if cfg.backend == "python":
        missing = [k for k in PREPROCESS_LIMIT_PARAMETERS if k not in cfg.parameters]
        if missing:
            problems.append(f"no {', '.join(missing)} parameter (hostile-image limits)")
    names_in = [i.name for i in cfg.input]
    names_out = [o.name for o in cfg.output]
    if cfg.platform == "ensemble":
        if cfg.HasField("dynamic_batching"):
            # one protobuf oneof: dynamic_batching replaces ensemble_scheduling, and
            # Triton 2.51 refuses the model ("ensemble scheduling must be set")
            problems.append("an ensemble cannot have dynamic_batching (its steps batch and queue)")
        if names_in != [IMAGE_INPUT] or names_out != list(OUTPUTS):
            problems.append(f"ensemble I/O {names_in} -> {names_out}")
        produced = {IMAGE_INPUT}
        for step in cfg.ensemble_scheduling.step:
            missing = set(step.input_map.values()) - produced
            if missing:
                problems.append(f"step {step.model_name} reads {sorted(missing)} before any step produces it")
            produced |= set(step.output_map.values())
        if not set(OUTPUTS) <= produced:
            problems.append(f"no step produces {sorted(set(OUTPUTS) - produced)}")
    elif cfg.backend == "python":
        if names_in != [IMAGE_INPUT] or names_out != [INPUT]:
            problems.append(f"preprocess I/O {names_in} -> {names_out}")
    else:
        if names_in != [INPUT] or names_out != list(OUTPUTS):
            problems.append(f"classifier I/O {names_in} -> {names_out}, expected [{INPUT}] -> {list(OUTPUTS)}")
        for t in list(cfg.input) + list(cfg.output):
            if t.data_type != pb.TYPE_FP32:
                problems.append(f"{t.name}: {pb.DataType.Name(t.data_type)}, expected TYPE_FP32")
    if problems:
        raise ConfigError(f"{cfg.name}: invalid config: " + "; ".join(problems))
    return text
