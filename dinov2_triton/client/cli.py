"""Command line of the Triton image client: ``dinov2-triton classify PATH... | --data-path DIR``.

Classifies image files or folders (or a prepared data split, printing its
accuracy) with a DINOv2 model served by Triton; the work is done by
:class:`dinov2_triton.client.classifier.TritonClassifier`. One line per failed file on
stderr; exit 0 when every file was classified, 1 when one failed or the
server cannot be used, 2 for bad flags or files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, PREPROCESS_MODEL

PROG = "dinov2-triton classify"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        description="Classify image files or folders with a DINOv2 model served by Triton "
                    "(top-k labels through the classification extension, optional embeddings).")
    req = p.add_argument_group("Required (one of)")
    req.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (recursive)")
    req.add_argument("--data-path",
                     help="a prepared data folder: classify its --split and print the accuracy "
                          "against the manifest's labels")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--split", default="test", choices=("train", "val", "test"),
                     help="with --data-path: which split (default: %(default)s)")
    opt.add_argument("--quiet", action="store_true", help="no line per image, only the summary")
    opt.add_argument("--url", default=None,
                     help="Triton address host:port (default localhost:8001 for grpc, "
                          "localhost:8000 for http)")
    opt.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    opt.add_argument("--model", default=ENSEMBLE_MODEL,
                     help="served model: the ensemble 'dinov2' (encoded images) or a variant "
                          "such as dinov2_onnx (pixel_values) (default: %(default)s)")
    opt.add_argument("--variant-preprocess", choices=("client", "server"), default="client",
                     help="for a variant: preprocess here with the stored record (client) or "
                          "with the server's preprocessing model (server)")
    opt.add_argument("--preprocess-model", default=PREPROCESS_MODEL,
                     help="server preprocessing model (default: %(default)s)")
    src = opt.add_mutually_exclusive_group()
    src.add_argument("--model-path",
                     help="checkpoint whose 'preprocessing' record (and class names) to use")
    src.add_argument("--preprocessing", help="preprocessing.json (or export_manifest.json)")
    src.add_argument("--repository", help="local model repository: reads "
                                           "<preprocess-model>/<version>/preprocessing.json")
    opt.add_argument("--top-k", type=int, default=5, help="labels per image (default: %(default)s)")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="images per request (default and maximum: the model's max_batch_size)")
    opt.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    opt.add_argument("--embeddings", metavar="OUT.npy",
                     help="also save the embeddings of the classified images [N,D] here; "
                          "the file names go to OUT.files.txt in the same order")
    opt.add_argument("--json", action="store_true", help="print one JSON object per image")
    opt.add_argument("--api-key-file", help="file holding the local server's API key (lets the "
                                            "error for an unknown model list every model)")
    opt.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    opt.add_argument("--retries", type=int, default=3,
                     help="resend a request the server shed (overloaded: gRPC UNAVAILABLE / HTTP 503) up "
                          "to this many times, after a jittered exponential back-off of at most 2 s "
                          "(default: %(default)s; 0: never)")
    return p


def _format(pred) -> str:
    tops = ", ".join(f"{label} ({score:.4g})" for label, _, score in pred.top)
    return f"{pred.path}: {tops}"


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency}: must be >= 1")
    if args.retries < 0:
        parser.error(f"--retries {args.retries}: must be >= 0")
    if bool(args.paths) == bool(args.data_path):
        parser.error("give image PATHs or --data-path (not both)")
    import numpy as np

    from dinov2_triton.client.classifier import TritonClassifier
    from dinov2_triton.client.inputs import load_preprocessing, read_repository_labels
    from dinov2_triton.serve.triton_access import TritonError, one_line, read_api_key

    try:
        api_key = read_api_key(file=args.api_key_file)
        pre = labels = None
        if args.model_path or args.preprocessing or args.repository:
            pre = load_preprocessing(model_path=args.model_path, preprocessing=args.preprocessing,
                                     repository=args.repository,
                                     preprocess_model=args.preprocess_model)
        if args.model_path:
            from dinov2_triton.train.checkpoint import read_checkpoint

            labels = list(read_checkpoint(args.model_path).class_names)
        elif args.repository:
            labels = read_repository_labels(args.repository, args.model)
    except Exception as exc:  # noqa: BLE001 - bad flags or files: one line, exit 2
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2

    try:
        clf = TritonClassifier(args.url, args.protocol, args.model, preprocessing=pre,
                               variant_preprocess=args.variant_preprocess,
                               preprocess_model=args.preprocess_model, labels=labels,
                               batch_size=args.batch_size, concurrency=args.concurrency,
                               api_key=api_key, timeout_s=args.timeout, retries=args.retries)
    except ValueError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    truth: dict[str, int] = {}
    paths = list(args.paths)
    if args.data_path:
        from dinov2_triton.data.datasets import read_manifest

        try:
            records = read_manifest(args.data_path, split=args.split)
        except Exception as exc:  # noqa: BLE001 - bad data folder: one line, exit 2
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        paths = [str(r.file(args.data_path)) for r in records]
        truth = {path: r.label for path, r in zip(paths, records)}
    try:
        with clf:
            preds = clf.classify_paths(paths, args.top_k, embeddings=bool(args.embeddings))
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    failed = 0
    for pred in preds:
        if pred.ok:
            if not args.quiet:
                print(json.dumps(pred.to_dict()) if args.json else _format(pred))
        else:
            failed += 1
            print(f"error: {pred.path}: {pred.error}", file=sys.stderr)
    if args.embeddings:
        good = [p for p in preds if p.ok and p.embedding is not None]
        from dinov2_triton.core.artifact_io import atomic_write, atomic_write_text

        out = Path(args.embeddings)
        dim = good[0].embedding.shape[-1] if good else 0
        arr = np.stack([p.embedding for p in good]) if good else np.zeros((0, dim), np.float32)
        atomic_write(out, lambda fh: np.save(fh, arr))
        names = out.with_name(out.name.removesuffix(".npy") + ".files.txt")
        atomic_write_text(names, "".join(p.path + "\n" for p in good))
        print(f"saved {len(good)} embeddings to {out} (file names: {names})", file=sys.stderr)
    if truth:
        scored = [p for p in preds if p.ok and p.path in truth]
        correct = sum(p.top[0][1] == truth[p.path] for p in scored)
        acc = correct / len(scored) if scored else float("nan")
        print(f"{args.model} over {args.protocol} at {clf.url}: accuracy "
              f"{acc:.2%} ({correct}/{len(scored)}) on the {args.split} split of {args.data_path}")
    if clf.stats["shed"]:
        print(f"the server shed {clf.stats['shed']} request(s) (overloaded); {clf.stats['retries']} "
              f"retried (--retries {args.retries})", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(preds)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0
