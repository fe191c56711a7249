"""``dinov2-triton``: the one command. Each subcommand is a thin
``main(argv, *, prog)`` of the package that owns it, imported only when that
subcommand runs, so ``--help`` at every level answers without loading torch.

    dinov2-triton pipeline [--recipe demo] [--images DIR] [--workdir DIR]
    dinov2-triton data | train | export | serve ... | classify | bench | tune | report ...
    dinov2-triton qa {parity,reliability,failover,gpu-check,gpu-acceptance}
    dinov2-triton train-bench | cpu-threads          (measurements of this host)

The contract of a subcommand module: ``main(argv: Sequence[str] | None = None,
*, prog: str | None = None) -> int`` parses ``argv`` with an argparse parser
whose ``prog`` is ``prog`` (so its usage and errors name the command the user
typed, e.g. ``dinov2-triton qa parity``) and returns the exit code; nothing
heavier than the standard library is imported before the arguments are parsed.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

#: subcommand -> (module with ``main(argv, *, prog)``, one line of help). Groups map to nested tables.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "pipeline": ("dinov2_triton.pipeline.runner",
                 "the main job from a recipe: data -> train -> export -> serve -> bench -> report"),
    "data": ("dinov2_triton.data.load",
             "stage 1: the embedded Fashion-MNIST or an image folder -> a validated data folder"),
    "train": ("dinov2_triton.train.finetune", "stage 2: fine-tune DINOv2 (linear, full, LoRA, last-N); torchrun-able"),
    "export": ("dinov2_triton.export.cli", "stage 3: verified, gated variants published into a Triton repository"),
    "serve": ("dinov2_triton.serve.cli",
              "stage 4: the local Triton server, replicas, rollout, the NVIDIA container, Kubernetes"),
    "classify": ("dinov2_triton.client.cli", "classify images through a served model (HTTP or gRPC)"),
    "bench": ("dinov2_triton.pipeline.bench_stage",
              "stage 5: in-process benchmark, perf_analyzer sweeps, capacity, live parity, report"),
    "tune": ("dinov2_triton.tune.search", "search the serving configuration with the most capacity at a latency SLO"),
    "report": ("dinov2_triton.report.cli",
               "reports from measured results: render a run, compare CPUs, publish benchmarks/"),
    "qa": {
        "parity": ("dinov2_triton.qa.parity", "served variants against the FP32 reference through the live endpoint"),
        "reliability": ("dinov2_triton.qa.reliability", "how the served repository behaves when things go wrong"),
        "failover": ("dinov2_triton.qa.failover", "failover and scale-out of N replicas behind the balancer"),
        "gpu-check": ("dinov2_triton.qa.gpu_check", "PyTorch on a CUDA GPU: the fine-tuned model, eager vs CUDA"),
        "gpu-acceptance": ("dinov2_triton.qa.gpu_acceptance",
                           "first run on a GPU host: engines, the NVIDIA container, sweeps, one table"),
    },
    "train-bench": ("dinov2_triton.train.benchmark",
                    "training throughput and peak memory per mode and image size on this host"),
    "cpu-threads": ("dinov2_triton.bench.cpu_threads",
                    "one instance with every core vs several with fewer threads, measured in process"),
}


def _usage(prog: str, table: dict) -> str:
    width = max(len(name) for name in table)
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)", "", "commands:"]
    for name, entry in table.items():
        text = entry[1] if isinstance(entry, tuple) else "{" + ",".join(entry) + "}"
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, prog: str = "dinov2-triton") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    table: dict = COMMANDS
    while True:
        if not args or args[0] in ("-h", "--help"):
            print(_usage(prog, table), file=sys.stdout if args else sys.stderr)
            return 0 if args else 2
        if table is COMMANDS and args[0] == "--version":
            from dinov2_triton import __version__

            print(f"{prog} {__version__}")
            return 0
        name, args = args[0], args[1:]
        entry = table.get(name)
        if entry is None:
            print(f"{prog}: unknown command {name!r}; one of: {', '.join(table)}", file=sys.stderr)
            return 2
        prog = f"{prog} {name}"
        if isinstance(entry, dict):
            table = entry
            continue
        module = importlib.import_module(entry[0])
        return int(module.main(args, prog=prog) or 0)


if __name__ == "__main__":
    sys.exit(main())
