"""``dinov2-triton report``: reports from measured results; nothing here measures.

    dinov2-triton report render  --results RUN/results.json [--out DIR]   report.md / report.html of a run
    dinov2-triton report compare RESULTS.json [...] [--out table.md]     the side-by-side CPU table
    dinov2-triton report publish RESULTS.json [...] --out benchmarks/    benchmarks/<date>-<cpu>.md + .json
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

#: subcommand -> one line of help (the modules are imported only when one runs)
SUBCOMMANDS = {
    "render": "re-generate report.md / report.html from a run's results.json",
    "compare": "the side-by-side CPU table (in process and served, batch 1 and 8) of results files",
    "publish": "write benchmarks/<date>-<cpu>.md and .json from results files (numbers a README can cite)",
}


def _usage(prog: str) -> str:
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<8}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def build_publish_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Publish measured results as data: <out>/<date>-<cpu>.md and the same numbers as "
                               ".json (the date the runs were measured, a slug of the CPU model).")
    p.add_argument("results", nargs="+",
                   help="results.json of `dinov2-triton bench` runs made on one machine, or a pipeline work folder "
                        "(its newest reports/<run>/results.json) or a sweep's (each run's); runs of several archs "
                        "make one backbone comparison, <date>-<cpu>-backbones")
    req = p.add_argument_group("Required")
    req.add_argument("--out", required=True, help="the folder of published results, e.g. benchmarks/")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--readme", default=None,
                     help="also rewrite this README's results block (between its results:begin/end markers)")
    opt.add_argument("--force", action="store_true",
                     help="replace a file of the same name that holds other runs")
    return p


def publish_main(argv: Sequence[str] | None = None, *, prog: str = "dinov2-triton report publish") -> int:
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.report.published import (
        collect_results,
        publication_from_results,
        update_readme,
        write_publication,
    )

    args = build_publish_parser(prog).parse_args(argv)
    try:
        inputs = collect_results(args.results)
        pub = publication_from_results(inputs)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        md, js = write_publication(args.out, pub, force=args.force)
    except (FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"published: {md}\n           {js}")
    if args.readme:
        try:
            print(f"updated:   {update_readme(args.readme, pub, md)}")
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "dinov2-triton report") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(prog))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    sub = f"{prog} {name}"
    if name == "render":
        from dinov2_triton.report.report import main as render_main

        return render_main(rest, prog=sub)
    if name == "compare":
        from dinov2_triton.report.cpu_compare import main as compare_main

        return compare_main(rest, prog=sub)
    if name == "publish":
        return publish_main(rest, prog=sub)
    print(f"{prog}: unknown command {name!r}; one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
    return 2
