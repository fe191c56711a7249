"""config.pbtxt generation: protobuf messages, text round trip, contract content."""
from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from dinov2_triton.export.registry import get_variant, load_builtin_variants
from dinov2_triton.export.triton_config import (
    ConfigError,
    classifier_config,
    ensemble_config,
    parse_config,
    preprocess_config,
    to_text,
    validate_config,
)

load_builtin_variants()


def _classifier(name="onnx", **kw):
    args = dict(image_size=28, num_classes=3, embed_dim=96, max_batch_size=8, instances=2,
                device="cpu", preferred_batch_sizes=(4, 8), max_queue_delay_us=1500,
                parameters={"source_checkpoint_sha256": "abc"})
    args.update(kw)
    return classifier_config(get_variant(name), **args)


def test_classifier_config_round_trip_and_content():
    cfg = _classifier()
    text = validate_config(cfg)
    back = text_format.Parse(text, pb.ModelConfig())   # what Triton does with the file
    assert back == cfg
    assert back.name == "dinov2_onnx" and back.platform == "onnxruntime_onnx"
    assert back.max_batch_size == 8
    assert [i.name for i in back.input] == ["pixel_values"]
    assert list(back.input[0].dims) == [3, 28, 28] and back.input[0].data_type == pb.TYPE_FP32
    assert [o.name for o in back.output] == ["logits", "embedding"]
    assert list(back.output[0].dims) == [3] and back.output[0].label_filename == "labels.txt"
    assert list(back.output[1].dims) == [96] and back.output[1].label_filename == ""
    assert list(back.dynamic_batching.preferred_batch_size) == [4, 8]
    assert back.dynamic_batching.max_queue_delay_microseconds == 1500
    assert len(back.instance_group) == 1
    assert back.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert back.instance_group[0].count == 2
    assert back.version_policy.latest.num_versions == 1
    (warm,) = back.model_warmup
    assert warm.batch_size == 1
    wi = warm.inputs["pixel_values"]
    assert wi.random_data and list(wi.dims) == [3, 28, 28] and wi.data_type == pb.TYPE_FP32
    assert back.parameters["precision"].string_value == "fp32"
    assert back.parameters["source_checkpoint_sha256"].string_value == "abc"


def test_torchscript_outputs_in_traced_order_and_gpu_kind():
    cfg = _classifier("torchscript", device="gpu")
    assert cfg.platform == "pytorch_libtorch" and cfg.default_model_filename == "model.pt"
    # the libtorch backend binds outputs by position: logits first, as the trace returns them
    assert [o.name for o in cfg.output] == ["logits", "embedding"]
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert "logits" in to_text(cfg).split("embedding")[0]


def test_preferred_batch_sizes_above_max_are_dropped_and_validation_catches_hand_edits():
    cfg = _classifier(max_batch_size=4, preferred_batch_sizes=(2, 4, 8))
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    cfg.dynamic_batching.preferred_batch_size.append(16)
    with pytest.raises(ConfigError, match="preferred_batch_size 16 > max_batch_size 4"):
        validate_config(cfg)
    bad = _classifier()
    bad.output[0].name = "output__0"
    with pytest.raises(ConfigError, match="classifier I/O"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="does not parse"):
        parse_config("name: 'x'\nmax_batch_size: eight\n")


def test_preprocess_config():
    cfg = preprocess_config(image_size=112, max_batch_size=8, instances=3, preferred_batch_sizes=(4, 8))
    back = parse_config(validate_config(cfg))
    assert back.name == "dinov2_preprocess" and back.backend == "python" and back.platform == ""
    assert back.input[0].name == "image" and back.input[0].data_type == pb.TYPE_STRING
    assert list(back.input[0].dims) == [1]
    assert back.output[0].name == "pixel_values" and list(back.output[0].dims) == [3, 112, 112]
    assert back.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert back.instance_group[0].count == 3
    assert list(back.dynamic_batching.preferred_batch_size) == [4, 8]
    assert back.model_warmup[0].inputs["image"].input_data_file == "sample_image"


def test_ensemble_config_steps_and_mappings():
    cfg = ensemble_config("dinov2_onnx", num_classes=3, embed_dim=96, image_size=28, max_batch_size=8)
    back = parse_config(validate_config(cfg))
    assert back.platform == "ensemble" and back.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in back.input] == [("image", pb.TYPE_STRING, [1])]
    assert [o.name for o in back.output] == ["logits", "embedding"]
    assert back.output[0].label_filename == "labels.txt"
    pre, cls = back.ensemble_scheduling.step
    assert (pre.model_name, pre.model_version) == ("dinov2_preprocess", -1)
    assert dict(pre.input_map) == {"image": "image"}
    assert dict(cls.input_map) == {"pixel_values": pre.output_map["pixel_values"]}
    assert cls.model_name == "dinov2_onnx"
    assert dict(cls.output_map) == {"logits": "logits", "embedding": "embedding"}
    broken = ensemble_config("dinov2_onnx", num_classes=3, embed_dim=96, image_size=28, max_batch_size=8)
    broken.ensemble_scheduling.step[1].input_map["pixel_values"] = "nothing_produces_this"
    with pytest.raises(ConfigError, match="reads"):
        validate_config(broken)


def test_published_configs_parse_and_every_batching_model_sheds(tiny_repository):
    """The tiny export (export's defaults for the queue and the instances): every
    config parses and passes the checker; every model with a dynamic batcher
    has the queue policy with the shedding timeout, the ensemble has none (its
    steps shed), and no batching model has a single instance (Triton 2.51's
    stall with a policy)."""
    from dinov2_triton.export.triton_config import DEFAULT_INSTANCES, SHEDDING_QUEUE_TIMEOUT_MS

    batching = []
    for model in ("dinov2_torchscript", "dinov2_onnx", "dinov2_preprocess", "dinov2"):
        text = (tiny_repository / model / "config.pbtxt").read_text()
        cfg = parse_config(text)
        assert cfg.name == model
        validate_config(cfg)
        if model != "dinov2_preprocess":
            assert (tiny_repository / model / "labels.txt").read_text().split() == ["cat", "dog", "fox"]
        if cfg.platform == "ensemble":
            assert not cfg.HasField("dynamic_batching")
            assert {s.model_name for s in cfg.ensemble_scheduling.step} == {"dinov2_preprocess", "dinov2_onnx"}
            continue
        batching.append(model)
        policy = cfg.dynamic_batching.default_queue_policy
        assert cfg.dynamic_batching.HasField("default_queue_policy"), model
        assert policy.default_timeout_microseconds == SHEDDING_QUEUE_TIMEOUT_MS * 1000, model
        assert policy.timeout_action == pb.ModelQueuePolicy.REJECT and policy.max_queue_size > 0, model
        assert sum(g.count for g in cfg.instance_group) == DEFAULT_INSTANCES >= 2, model
    assert batching == ["dinov2_torchscript", "dinov2_onnx", "dinov2_preprocess"]


def test_every_generated_config_sheds_by_default_without_preferred_sizes():
    """Every registered variant's config and dinov2_preprocess, as export writes them
    by default: the queue policy (2 s, a size the timeout reaches first), no
    preferred batch size, two instances; a CPU instance gets its share of the
    cores as the backend's intra-op threads, a GPU one none."""
    from dinov2_triton.export.registry import variant_names
    from dinov2_triton.export.triton_config import (
        DEFAULT_INSTANCES,
        MIN_SHED_RATE_RPS,
        SHEDDING_QUEUE_TIMEOUT_MS,
        THREAD_PARAMETERS,
        backend_of,
        default_max_queue_size,
        default_threads,
        usable_cores,
    )

    configs = [classifier_config(get_variant(n), image_size=28, num_classes=3, embed_dim=96, max_batch_size=8,
                                 device="gpu" if get_variant(n).platform == "tensorrt_plan" else "cpu")
               for n in variant_names()]
    configs.append(preprocess_config(image_size=28, max_batch_size=8))
    assert len(configs) >= 8
    for cfg in configs:
        back = parse_config(validate_config(cfg))
        db = back.dynamic_batching
        assert db.HasField("default_queue_policy"), back.name
        assert db.default_queue_policy.default_timeout_microseconds == SHEDDING_QUEUE_TIMEOUT_MS * 1000
        size = db.default_queue_policy.max_queue_size
        assert size == default_max_queue_size(8, DEFAULT_INSTANCES) == 2048, back.name
        # the timeout acts first at any rate below size / timeout (a full queue stalls Triton 2.51)
        assert size / (SHEDDING_QUEUE_TIMEOUT_MS / 1000) >= MIN_SHED_RATE_RPS
        assert list(db.preferred_batch_size) == [], back.name
        assert back.instance_group[0].count == DEFAULT_INSTANCES == 2
        param = THREAD_PARAMETERS.get(backend_of(back))
        if param and back.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU:
            assert back.parameters[param].string_value == str(default_threads(DEFAULT_INSTANCES)), back.name
        else:
            assert not any(p in back.parameters for p in THREAD_PARAMETERS.values()), back.name
    assert default_threads(2, cores=2) == 1 and default_threads(2, cores=16) == 8 and default_threads(4, cores=2) == 1
    assert default_threads(DEFAULT_INSTANCES) == max(1, usable_cores() // 2)
    # a thread count the variant or the caller gives wins; None leaves the backend's default
    mine = _classifier("onnx", parameters={"intra_op_thread_count": 3})
    assert mine.parameters["intra_op_thread_count"].string_value == "3"
    assert "intra_op_thread_count" not in _classifier("onnx", threads=None).parameters
    assert _classifier("onnx", threads=4).parameters["intra_op_thread_count"].string_value == "4"
    with pytest.raises(ConfigError, match="threads 0"):
        _classifier("onnx", threads=0)


def test_the_export_command_and_options_default_to_shedding():
    from dinov2_triton.export.cli import build_parser
    from dinov2_triton.export.pipeline import DEFAULT_OPTIONS, validate_options
    from dinov2_triton.export.triton_config import DEFAULT_INSTANCES, SHEDDING_QUEUE_TIMEOUT_MS

    args = build_parser().parse_args(["--model-path", "m.pth"])
    assert args.queue_timeout_ms == SHEDDING_QUEUE_TIMEOUT_MS and args.max_queue_size is None
    assert args.instances == args.preprocess_instances == DEFAULT_INSTANCES
    opts = validate_options({"preferred_batch_sizes": args.preferred_batch_sizes})
    assert opts["preferred_batch_sizes"] == () and opts["instances"] == DEFAULT_OPTIONS["instances"] == 2
    assert opts["queue_timeout_ms"] == SHEDDING_QUEUE_TIMEOUT_MS


def test_queue_size_and_switching_shedding_off():
    from dinov2_triton.export.triton_config import (
        MIN_SHED_RATE_RPS,
        QUEUE_BATCHES_PER_INSTANCE,
        default_max_queue_size,
    )

    # --queue-timeout-ms 0 (and no --max-queue-size): no policy at all
    for cfg in (_classifier(max_batch_size=8, queue_timeout_ms=0),
                preprocess_config(image_size=28, max_batch_size=8, queue_timeout_ms=0)):
        assert not parse_config(validate_config(cfg)).dynamic_batching.HasField("default_queue_policy")
    # a short timeout: full batches per instance; a long one: MIN_SHED_RATE_RPS x the timeout
    assert default_max_queue_size(4, 1, 200) == QUEUE_BATCHES_PER_INSTANCE * 4 == 256
    assert default_max_queue_size(8, 2, 5000) == MIN_SHED_RATE_RPS * 5
    for cfg in (_classifier(max_batch_size=8, instances=2, queue_timeout_ms=300),
                preprocess_config(image_size=28, max_batch_size=8, instances=2, queue_timeout_ms=300)):
        back = parse_config(validate_config(cfg))
        policy = back.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == QUEUE_BATCHES_PER_INSTANCE * 8 * 2
        assert policy.default_timeout_microseconds == 300_000
        assert policy.timeout_action == pb.ModelQueuePolicy.REJECT
        assert policy.allow_timeout_override
    flags = parse_config(validate_config(_classifier(max_queue_size=5, queue_timeout_ms=250.5)))
    assert flags.dynamic_batching.default_queue_policy.max_queue_size == 5
    assert flags.dynamic_batching.default_queue_policy.default_timeout_microseconds == 250500
    assert "max_queue_size: 5" in to_text(_classifier(max_queue_size=5, queue_timeout_ms=0))
    with pytest.raises(ConfigError, match="must be >= 0"):
        _classifier(max_queue_size=-1)


def test_preprocess_limits_are_config_parameters():
    from dinov2_triton.core.image_limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

    default = parse_config(validate_config(preprocess_config(image_size=28, max_batch_size=8)))
    assert default.parameters["max_image_bytes"].string_value == str(DEFAULT_MAX_IMAGE_BYTES)
    assert default.parameters["max_image_pixels"].string_value == str(DEFAULT_MAX_IMAGE_PIXELS)
    mine = preprocess_config(image_size=28, max_batch_size=8, max_image_bytes=1000, max_image_pixels=4096)
    assert mine.parameters["max_image_bytes"].string_value == "1000"
    assert mine.parameters["max_image_pixels"].string_value == "4096"
    with pytest.raises(ConfigError, match="max_image_pixels 0 must be >= 1"):
        preprocess_config(image_size=28, max_batch_size=8, max_image_pixels=0)
    del mine.parameters["max_image_pixels"]
    with pytest.raises(ConfigError, match="no max_image_pixels parameter"):
        validate_config(mine)


def test_ensemble_cannot_carry_dynamic_batching():
    cfg = ensemble_config("dinov2_onnx", num_classes=3, embed_dim=96, image_size=28, max_batch_size=8)
    assert not cfg.HasField("dynamic_batching")
    cfg.dynamic_batching.default_queue_policy.max_queue_size = 4   # replaces ensemble_scheduling (a oneof)
    with pytest.raises(ConfigError, match="ensemble cannot have dynamic_batching"):
        validate_config(cfg)
