"""``dinov2-triton export``: thin CLI over dinov2_triton.export.pipeline.run_export.

Exit codes: 0 every requested variant OK (or SKIPPED with a reason);
1 a variant FAILED or failed its accuracy gate (the manifest is written
first); 2 bad input (missing checkpoint, bad flags), with a message."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

PROG = "dinov2-triton export"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from dinov2_triton.core.image_limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
    from dinov2_triton.export.gates import FLAG, override_help
    from dinov2_triton.export.modelopt_worker import CALIB_METHODS
    from dinov2_triton.export.registry import ensemble_candidates, get_variant, variant_names
    from dinov2_triton.export.triton_config import (
        DEFAULT_INSTANCES,
        DEFAULT_PREFERRED_BATCH_SIZES,
        DEFAULT_QUEUE_TIMEOUT_MS,
        MIN_SHED_RATE_RPS,
        QUEUE_BATCHES_PER_INSTANCE,
    )

    names = variant_names()
    variants_help = "; ".join(
        f"{n} ({get_variant(n).precision}, {get_variant(n).platform}"
        + (f", from {get_variant(n).parent})" if get_variant(n).parent else ")") for n in names)
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        description="Export a fine-tuned DINOv2 checkpoint to a Triton model repository: build each "
                    "variant, verify it against eager FP32 on held-out images, measure its speed, and "
                    "publish it atomically as a new model version.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    req = p.add_argument_group("Required")
    req.add_argument("--model-path", required=True,
                     help="checkpoint written by dinov2-triton train (e.g. ./models/model_final.pth)")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--repository", default="./model_repository/", help="Triton model repository to publish into")
    opt.add_argument("--data-path", default=None,
                     help="data folder from dinov2-triton data: test split for verification, train split "
                          "for calibration (without it: random tensors, no accuracy)")
    opt.add_argument("--variants", default="auto",
                     help="'auto': every variant this host can run (the CPU ones; with an NVIDIA GPU also "
                          "TensorRT), and the dinov2 ensemble calls the fastest one that passed its gate, "
                          "measured in this run; or comma-separated names (exactly those are built, the "
                          "ensemble calls the registry's preferred one), or 'all': " + variants_help)
    opt.add_argument("--max-batch-size", type=int, default=8,
                     help="config max_batch_size (= TensorRT profile max) and the verification batch")
    opt.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    opt.add_argument("--onnx-exporter", choices=("dynamo", "legacy"), default="dynamo",
                     help="torch.onnx exporter (dynamo gives the cleaner graph here)")
    opt.add_argument("--instances", type=int, default=DEFAULT_INSTANCES,
                     help="instance_group count per classifier model; on a CPU each instance gets its share of "
                          "this host's cores as intra-op threads (with two, Triton 2.51's dynamic batcher "
                          "rarely stalls with a queue policy; with one it often does: docs/field-notes.md #13)")
    opt.add_argument("--preprocess-instances", type=int, default=DEFAULT_INSTANCES,
                     help="instance count of dinov2_preprocess")
    opt.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                     help="instance_group kind (KIND_CPU / KIND_GPU); TensorRT models are always KIND_GPU")
    opt.add_argument("--preferred-batch-sizes", default=",".join(map(str, DEFAULT_PREFERRED_BATCH_SIZES)),
                     help="dynamic_batching preferred_batch_size list (default: none, the batcher forms the "
                          "largest batch it can, and Model Analyzer may vary max_batch_size)")
    opt.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic_batching max queue delay")
    opt.add_argument("--queue-timeout-ms", type=float, default=DEFAULT_QUEUE_TIMEOUT_MS,
                     help="load shedding on every batching model: a request still queued after this long "
                          "is rejected (gRPC UNAVAILABLE / HTTP 503; clients may ask for less); 0: no queue "
                          "policy (requests queue without limit). Triton 2.51 stalls ~500 ms on some requests "
                          "when a model with ONE instance has a policy: keep --instances >= 2 "
                          "(docs/field-notes.md #13)")
    opt.add_argument("--max-queue-size", type=int, default=None,
                     help="with shedding on: requests a model may hold waiting before new ones are shed; "
                          f"default the larger of {QUEUE_BATCHES_PER_INSTANCE} x max_batch_size x instances "
                          f"and {MIN_SHED_RATE_RPS} x the timeout in seconds (2048 at 2 s), a memory cap that "
                          "the queue timeout, the latency bound, reaches first")
    opt.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="dinov2_preprocess refuses an encoded image larger than this, before decoding")
    opt.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                     help="dinov2_preprocess refuses an image whose header declares more pixels (width x "
                          "height) than this, before decoding (decompression bombs); the data stage "
                          "uses the same default")
    opt.add_argument("--reload", metavar="URL", default=None,
                     help="after publishing, load every published model on the Triton server at this "
                          "host:port (HTTP) through its key-protected repository API, so traffic "
                          "switches to the new versions (dinov2-triton serve reload)")
    opt.add_argument("--api-key-file", default=None,
                     help="with --reload: the server's API key file (default: $TRITON_API_KEY)")
    opt.add_argument(FLAG, dest="gates", nargs="*", default=[], metavar="SCOPE.FIELD=VALUE",
                     help=override_help() + ", e.g. fp16.min_top1_agreement=0.99 batch.max_rel_diff=1e-3")
    opt.add_argument("--allow-failed-gates", action="store_true",
                     help="publish variants that fail their gate (marked GATE_FAILED in the manifest)")
    opt.add_argument("--default-variant", default=None, choices=names,
                     help="classifier the dinov2 ensemble calls (default: the first published of "
                          f"{', '.join(ensemble_candidates())})")
    opt.add_argument("--eval-size", type=int, default=256, help="max held-out images used for verification")
    opt.add_argument("--bench-seconds", type=float, default=4.0,
                     help="in-process benchmark time per variant (0 disables)")
    opt.add_argument("--keep-versions", type=int, default=2, help="versions kept per model")
    opt.add_argument("--calib-size", type=int, default=512,
                     help="INT8 calibration images, drawn from the train split only (capped at its size)")
    opt.add_argument("--calib-method", default="entropy", choices=CALIB_METHODS,
                     help="INT8 calibration method (ModelOpt ONNX PTQ)")
    opt.add_argument("--accuracy-budget", type=float, default=0.01,
                     help="INT8 gate's allowed accuracy drop vs FP32 (0.01 = 1 point); when the "
                          "first INT8 attempt misses it, more conservative configurations are tried")
    opt.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                     help="extra option for variant builders (e.g. trt_workspace_gb=4); repeatable")
    opt.add_argument("--log-dir", default=None, help="also copy the manifest here")
    opt.add_argument("--work-dir", default=None, help="scratch folder (default: a temp folder, deleted)")
    opt.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    from dinov2_triton.export.container import add_container_flags

    add_container_flags(p)
    return p


def _extra_options(entries: Sequence[str]) -> dict:
    out = {}
    for e in entries:
        key, sep, value = e.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {e!r}: expected KEY=VALUE")
        v: object = value
        for conv in (int, float):
            try:
                v = conv(value)
                break
            except ValueError:
                continue
        if value.lower() in ("true", "false"):
            v = value.lower() == "true"
        out[key.strip().replace("-", "_")] = v
    return out


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.in_container:
        from dinov2_triton.export.container import main_in_container

        return main_in_container(argv, mode="export")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    from dinov2_triton.export.manifest import format_summary, manifest_path
    from dinov2_triton.export.pipeline import ExportInputError, run_export

    try:
        extra = _extra_options(args.extra)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    variants = args.variants
    gates = list(args.gates)
    try:
        manifest = run_export(
            args.model_path, args.repository, data_path=args.data_path, variants=variants,
            max_batch_size=args.max_batch_size, opset=args.opset, onnx_exporter=args.onnx_exporter,
            instances=args.instances, preprocess_instances=args.preprocess_instances, device=args.device,
            preferred_batch_sizes=args.preferred_batch_sizes, max_queue_delay_us=args.max_queue_delay_us,
            max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
            max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
            gates=gates, allow_failed_gates=args.allow_failed_gates,
            default_variant=args.default_variant, eval_size=args.eval_size, bench_seconds=args.bench_seconds,
            keep_versions=args.keep_versions, calib_size=args.calib_size, calib_method=args.calib_method,
            accuracy_budget=args.accuracy_budget, log_dir=args.log_dir, work_dir=args.work_dir, **extra)
    except ExportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was published (staging folders are removed)",
              file=sys.stderr)
        return 130
    print(format_summary(manifest))
    print(f"manifest: {manifest_path(manifest.repository)}")
    code = int(manifest.exit_code)
    if args.reload:
        code = max(code, _reload(args.reload, args.api_key_file, manifest))
    return code


def _reload(url: str, api_key_file: str | None, manifest) -> int:
    """Load what this run published on the live server; 1 when a load fails."""
    from dinov2_triton.serve.rollout import RolloutError, published_models, reload_models
    from dinov2_triton.serve.triton_access import TritonError, read_api_key

    models = published_models(manifest)
    if not models:
        print("reload: nothing was published by this run", file=sys.stderr)
        return 0
    try:
        for line in reload_models(url, models, api_key=read_api_key(file=api_key_file)):
            print(f"reload: {line}")
    except (RolloutError, TritonError, ValueError) as exc:
        print(f"error: reload at {url}: {exc}", file=sys.stderr)
        return 1
    return 0
