"""`dinov2-triton report compare RESULTS.json [RESULTS.json ...]`: the side-by-side
CPU table of the cpu-sweep recipe, from the bench stage's results files (one per
image size), read with dinov2_triton.bench.results.read_results.

Per variant and file: in-process and served (perf_analyzer, gRPC,
concurrency 1) throughput at batch 1 and 8, the served/in-process ratio at
batch 8 with where the served time went (server compute vs queue and
transport, from perf_analyzer's breakdown), top-1 agreement with eager FP32
through the live server and the gate verdict. Then, per file, the ratios the
issue asks for: the recommended served variant against every other gated
engine and against eager FP32 (in process).

Nothing is measured here; the numbers are the results files' own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from dinov2_triton.bench.results import EAGER, PerfResults

SERVED_BATCHES = (1, 8)
PROTOCOL = "grpc"


def _inproc(results: PerfResults, name: str, batch: int) -> tuple[float | None, float | None]:
    """(images/s, p50 ms) of one client at ``batch``."""
    v = results.in_process.variants.get(name) if results.in_process else None
    if v is None or v.benchmark is None:
        return None, None
    for c in v.benchmark.grid:
        if c.batch_size == batch and (c.threads or 1) == 1:
            return c.images_per_s, c.p50_ms
    cell = v.benchmark.latency.get(str(batch))
    return (cell.images_per_s, cell.p50_ms) if cell else (None, None)


def _served(results: PerfResults, model: str, batch: int) -> dict[str, Any]:
    for p in (results.perf_analyzer.points if results.perf_analyzer else []):
        if p.model == model and p.batch_size == batch and p.concurrency == 1 and p.protocol == PROTOCOL:
            return p.metrics
    return {}


def _ms(us) -> float | None:
    return us / 1000.0 if isinstance(us, (int, float)) else None


def table_rows(results: PerfResults) -> list[dict[str, Any]]:
    """One dict per variant (eager first), the numbers of the side-by-side table."""
    parity = {v.model: v for v in (results.parity.variants if results.parity else [])}
    rows = []
    names = list(results.in_process.variants) if results.in_process else []
    for name in names:
        v = results.in_process.variants[name]
        model = v.model_name
        ip1, _ = _inproc(results, name, 1)
        ip8, ip8_p50 = _inproc(results, name, 8)
        s1 = _served(results, model, 1) if model else {}
        s8 = _served(results, model, 8) if model else {}
        par = parity.get(model) if model else None
        pm = (par.parity or {}) if par else {}
        row = {"name": name, "model": model, "label": v.label, "status": v.status, "reason": v.reason,
               "precision": v.precision, "in_process_b1": ip1, "in_process_b8": ip8, "in_process_b8_p50_ms": ip8_p50,
               "served_b1": s1.get("throughput_infer_per_s"), "served_b8": s8.get("throughput_infer_per_s"),
               "served_b8_p50_ms": _ms(s8.get("p50_latency_us")),
               "served_b8_compute_ms": _ms(s8.get("server_compute_infer_us")),
               "served_b8_queue_ms": _ms(s8.get("server_queue_us")),
               "top1_agreement": pm.get("top1_agreement"), "n": pm.get("n"),
               "gate_passed": (par.passed if par else (v.export.gate_passed if v.export else None))
               if name != EAGER else True}
        row["served_over_in_process_b8"] = (row["served_b8"] / ip8 if row["served_b8"] and ip8 else None)
        rows.append(row)
    return rows


def _f(x, fmt=".1f") -> str:
    return "-" if x is None else format(x, fmt)


def render(results: PerfResults, source: str) -> str:
    rows = table_rows(results)
    m = results.machine
    size = results.model.img_size if results.model else None
    lines = [f"### {size} px ({source})", "",
             f"CPU: {m.cpu_model}, flags {', '.join(m.cpu_flags) or '-'}, {m.usable_cores or m.logical_cores} cores; "
             f"load average at start {', '.join(f'{x:.2f}' for x in (m.load_average or []))}", "",
             "| variant | in-process b1 img/s | in-process b8 img/s | served b1 img/s | served b8 img/s "
             "| served/in-process b8 | b8 p50 ms in-process / served (server compute, queue) | top-1 agreement "
             "(live) | gate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gate = "reference" if r["name"] == EAGER else {True: "pass", False: "FAIL", None: "-"}[r["gate_passed"]]
        if r["status"] != "OK":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason']} | | | | | | | |")
            continue
        agreement = (f"{r['top1_agreement']:.2%} of {r['n']}" if r["top1_agreement"] is not None else "-")
        lines.append(
            f"| {r['name']} ({r['label']}) | {_f(r['in_process_b1'])} | {_f(r['in_process_b8'])} | "
            f"{_f(r['served_b1'])} | {_f(r['served_b8'])} | {_f(r['served_over_in_process_b8'], '.0%')} | "
            f"{_f(r['in_process_b8_p50_ms'], '.2f')} / {_f(r['served_b8_p50_ms'], '.2f')} "
            f"({_f(r['served_b8_compute_ms'], '.2f')}, {_f(r['served_b8_queue_ms'], '.2f')}) | {agreement} | {gate} |")
    lines += ["", *ratio_lines(results, rows)]
    return "\n".join(lines)


def ratio_lines(results: PerfResults, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The recommended served variant against every other gated engine (served,
    batch 8) and against eager FP32 (in process, batch 8)."""
    rec = results.recommendation
    if rec is None or rec.variant is None:
        return ["No variant recommended (see the report's rejected list)."]
    by_model = {r["model"]: r for r in rows if r["model"]}
    best = by_model.get(rec.variant)
    out = [f"Recommended: **{rec.variant}**: {rec.reason}"]
    if best is None or not best["served_b8"]:
        return out + ["(no served batch-8 number for it in this file)"]
    ratios = [f"{r['name']} {best['served_b8'] / r['served_b8']:.2f}x" for r in rows
              if r["model"] and r["model"] != rec.variant and r["gate_passed"] and r["served_b8"]]
    out.append(f"Served batch 8, {rec.variant} vs the other gated engines: " + (", ".join(ratios) or "none"))
    eager = next((r for r in rows if r["name"] == EAGER), None)
    if eager and eager["in_process_b8"]:
        x = best["served_b8"] / eager["in_process_b8"]
        out.append(f"vs eager PyTorch FP32 in process (batch 8): {x:.2f}x"
                   + ("" if x >= 2 else f" (short of 2x by {2 - x:.2f}x)"))
    return out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "dinov2-triton report compare",
                                description="Side-by-side CPU table (in process and served, batch 1 and 8, top-1 "
                                            "agreement, ratios) from bench results.json files.")
    p.add_argument("results", nargs="+", help="results.json of `dinov2-triton bench` (<run folder>/results.json)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """``dinov2-triton report compare``: print (and with --out write) the side-by-side table."""
    args = build_parser(prog).parse_args(argv)
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.core.records import RecordError

    blocks = []
    for path in args.results:
        try:
            results = read_results(path)
        except (RecordError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        blocks.append(render(results, str(path)))
    text = "\n\n".join(blocks) + "\n"
    print(text)
    if args.out:
        from dinov2_triton.core.artifact_io import atomic_write_text

        atomic_write_text(Path(args.out), text)
    return 0
