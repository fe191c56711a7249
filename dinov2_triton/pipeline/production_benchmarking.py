"""The seed's ``python production_benchmarking.py``: the in-process benchmark of the
fine-tuned model and every exported variant, as a report.

    python production_benchmarking.py --model-path ./models/model_final.pth \\
        [--repository ./model_repository] [--data-path ./data] [--batch-sizes 1,8] \\
        [--threads 1,2,4] [--seconds 5] [--warmup 10] [--url localhost:8001]

(the root script also takes the seed's spellings, ``--model_path`` and
``--data_path``). Installed, the same run is ``dinov2-triton bench``, which
has every option; this module is the seed's smaller command over it.

A thin CLI over dinov2_triton.pipeline.bench_stage.run_perf (which runs
dinov2_triton.bench.inprocess.run_inprocess_benchmark and writes
reports/<run-id>/{report.md, report.html, results.json}).
With ``--url`` the perf_analyzer sweep and the live-endpoint parity run as
well, as in ``dinov2-triton bench``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

PROG = "python production_benchmarking.py"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        description="In-process latency/throughput/memory of the fine-tuned model and every exported "
                    "variant; with --url also the perf_analyzer sweep and live parity (dinov2-triton bench "
                    "has every option). Writes a report under --out.")
    req = p.add_argument_group("Required")
    req.add_argument("--model-path", required=True, help="the fine-tuned checkpoint (model_final.pth)")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--repository", default="./model_repository",
                     help="model repository with export_manifest.json (default: %(default)s)")
    opt.add_argument("--data-path", default=None, help="data folder: inputs are its test-split images")
    opt.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: %(default)s)")
    opt.add_argument("--threads", default="1,2,4",
                     help="concurrent client threads sharing one model (default: %(default)s)")
    opt.add_argument("--seconds", type=float, default=5.0, help="measurement time per cell (default: %(default)s)")
    opt.add_argument("--warmup", type=int, default=10,
                     help="warm-up calls per batch size, excluded (default: %(default)s)")
    opt.add_argument("--variants", default="all", help="all, or comma-separated names (pytorch = eager)")
    opt.add_argument("--torch-threads", type=int, default=None, help="intra-op threads (default: torch's)")
    opt.add_argument("--no-isolate", action="store_true",
                     help="run every variant in this process (faster; memory peaks then mix)")
    opt.add_argument("--url", default=None,
                     help="gRPC address of a running Triton (host:8001): also run the perf_analyzer sweep "
                          "and the parity client")
    opt.add_argument("--http-url", default=None, help="HTTP address (host:8000) for the HTTP sweep")
    opt.add_argument("--out", default="reports", help="reports folder (default: %(default)s)")
    opt.add_argument("--json", default=None, help="also write the raw in-process results to this file")
    opt.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from dinov2_triton.pipeline.bench_stage import PerfInputError, parse_ints, parse_names, print_run, run_perf

    try:
        run = run_perf(
            model_path=args.model_path, repository=args.repository, data_path=args.data_path,
            url=args.url, http_url=args.http_url, protocols=["grpc", "http"] if args.http_url else ["grpc"],
            batch_sizes=parse_ints(args.batch_sizes, "--batch-sizes"), threads=parse_ints(args.threads, "--threads"),
            seconds=args.seconds, warmup=args.warmup, variants=parse_names(args.variants),
            torch_threads=args.torch_threads, isolate=not args.no_isolate, out=args.out,
            cli_settings={k: v for k, v in vars(args).items()},
            progress=(lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None)
    except (PerfInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return print_run(run, in_process_json=args.json)
