"""The perf report: one page that puts accuracy next to latency, throughput,
size and memory, and names the variant to deploy.

    generate_report(results, out_dir) -> Report(md, html, json, plots, results)
    dinov2-triton report render --results <reports>/<run-id>/results.json

``results`` is the :class:`dinov2_triton.bench.results.PerfResults` that dinov2_triton.pipeline.bench_stage collects.
The rows and the recommendation come from dinov2_triton.report.ranking, the figures from
dinov2_triton.report.plots; this module lays them out as document blocks, renders them as
report.md and a self-contained report.html (plots as base64 PNG, no external
assets) and writes results.json back (through dinov2_triton.bench.results.write_results)
with the derived ``rows`` and ``recommendation``.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from dinov2_triton.bench.results import RESULTS_FILE, PerfResults, Recommendation, VariantRow
from dinov2_triton.report.capacity import capacity_blocks, search_blocks, serving_blocks
from dinov2_triton.report.overload import overload_blocks
from dinov2_triton.report.ranking import (
    BREAKDOWN,
    choose_recommendation,
    inprocess_entry,
    operating_point,
    points,
    summarize,
)


# ----------------------------------------------------------------------------- small helpers
def _f(x: Any, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _mb(n: Any) -> str:
    return _f(n / 1e6 if isinstance(n, (int, float)) else None, ".1f")


def _pct(x: Any, spec: str = ".1%") -> str:
    return _f(x, spec)


def _ms(us: Any) -> float | None:
    return us / 1000.0 if isinstance(us, (int, float)) else None


def _gate_text(passed: bool | None) -> str:
    return "PASS" if passed else ("FAIL" if passed is False else "-")


def _pts(delta: float | None) -> str:
    return _f(delta * 100 if isinstance(delta, (int, float)) else None, "+.2f")


# ----------------------------------------------------------------------------- document blocks
def build_blocks(results: PerfResults, rows: Sequence[VariantRow], rec: Recommendation,
                 plots: Sequence[Mapping[str, str]]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p"|"banner"|"ul"|"table"|"img"|"pre", ...)."""
    b: list[tuple] = []
    op = operating_point(results)
    model = results.model
    b.append(("h1", f"Perf report {results.run_id}"))
    b.append(("p", f"Created {results.created}; git {results.git_revision}; "
                   f"checkpoint `{_attr(model, 'checkpoint')}` ({backbone_name(_attr(model, 'arch', None))}, "
                   f"{_attr(model, 'img_size')} px, {_attr(model, 'num_classes')} classes)."))
    b += _banners(results, rows)
    b += _recommendation_blocks(rows, rec, op)
    b += _summary_blocks(rows, rec)
    if plots:
        b.append(("h2", "Plots"))
        for p in plots:
            b.append(("img", p["file"], p["title"], p["caption"]))
    b += capacity_blocks(results)
    b += search_blocks(results, rows)
    b += serving_blocks(results)
    b += overload_blocks(results)
    b += _served_blocks(results)
    b += _in_process_blocks(results)
    b += _accuracy_blocks(results, rows)
    b += _memory_blocks(results, rows, op)
    items = [f"{r.key} ({r.status}): {'; '.join(x for x in r.reasons if x)}" for r in rows if r.status != "OK"]
    said = {x for r in rows if r.status != "OK" for x in r.reasons}   # a skipped variant's row says it already
    items += [f"{s.what}: {s.reason}" for s in results.skipped if s.reason not in said]
    items = list(dict.fromkeys(items))
    if items:
        b.append(("h2", "Skipped or failed"))
        b.append(("ul", items))
    b += _how_to_read()
    b += _machine_blocks(results)
    return b


def backbone_name(arch: str | None) -> str:
    """'DINOv3 dinov3_vits16', 'DINOv2 vits14': the family (dinov2_triton.train.archs) and the
    arch; an arch the table does not know is shown as it is, None as '?'."""
    from dinov2_triton.train.archs import arch_spec

    if not arch:
        return "?"
    try:
        return f"{arch_spec(arch).family_name} {arch}"
    except ValueError:
        return arch


def _attr(obj: Any, name: str, default: Any = "?") -> Any:
    """A field of an optional section (``default`` when the section is absent)."""
    val = getattr(obj, name, None) if obj is not None else None
    return default if val is None else val


def _weights_source(results: PerfResults) -> str:
    return str((results.model.weights_source if results.model else None)
               or (results.export.weights_source if results.export else None) or "unknown")


def _banners(results: PerfResults, rows: Sequence[VariantRow]) -> list[tuple]:
    b: list[tuple] = []
    ws = _weights_source(results)
    if results.model is not None and results.model.pretrained is False:
        b.append(("banner", "NOT pretrained weights: accuracy numbers are not representative. "
                            f"The checkpoint's weights_source is: {ws}"))
    elif results.model is not None and results.model.pretrained is None:
        b.append(("banner", "UNKNOWN whether the weights were pretrained (the model's record does not say): "
                            f"accuracy numbers may not be representative. weights_source: {ws}"))
    ip, pa = results.in_process, results.perf_analyzer
    inp = (ip.input_data if ip else None) or (pa.input_data if pa else None)
    if inp is not None and inp.synthetic:
        b.append(("banner", "Inputs were SYNTHETIC (no --data_path): speed is representative, accuracy is not "
                            "measured on real images."))
    for e in results.errors:
        b.append(("banner", f"ERROR: {e}"))
    return b


def _recommendation_blocks(rows: Sequence[VariantRow], rec: Recommendation, op) -> list[tuple]:
    b: list[tuple] = [("h2", "Recommendation")]
    if rec.variant:
        b.append(("p", f"**Deploy `{rec.variant}`** ({rec.label or ''}): {rec.reason}."))
        for w in rec.warnings:
            b.append(("banner", w))
    else:
        b.append(("p", f"**No variant recommended**: {rec.reason}."))
    if rec.rejected:
        b.append(("ul", [f"`{x.variant}` not chosen: {x.reason}" for x in rec.rejected]))
    slower = [w for r in rows for w in r.slower_than_parent]
    if slower:
        b.append(("p", "**Faster on paper, slower measured** (do not ship these for speed):"))
        b.append(("ul", slower))
    if rec.source == "export":
        b.append(("p", "Chosen by the export (`--variants auto`): the fastest variant that passed its gate in this "
                       "run's in-process benchmark on this host; the `dinov2` ensemble calls it. Every gated variant, "
                       "served and in process, is in the table below."))
        return b
    if rec.source in ("capacity", "search"):
        b.append(("p", f"Ranked on capacity at p99 <= {rec.slo_p99_ms:g} ms under open-loop Poisson load "
                       f"({'the configuration search' if rec.source == 'search' else 'the served configurations'}; "
                       "dinov2_triton.bench.capacity)."))
        return b
    b.append(("p", f"Operating point: batch {op.batch_size}, concurrency {op.concurrency}, protocol "
                   f"{op.protocol}" + (f", p99 budget {op.max_p99_ms} ms" if op.max_p99_ms else "")
                   + f"; ranked on {'server-side (perf_analyzer)' if rec.source == 'server' else 'in-process'} "
                     "throughput."))
    return b


def _own_peak(fraction: float | None, peak: str | None) -> str:
    """e.g. "41.0% INT8": the fraction of the variant's own arithmetic's peak, naming it."""
    return "-" if fraction is None else f"{_pct(fraction)} {peak or 'FP32'}"


def _summary_blocks(rows: Sequence[VariantRow], rec: Recommendation) -> list[tuple]:
    head = ["variant", "precision", "arithmetic (unit)", "status", "gates", "top-1 agree", "acc delta (pts)",
            "size MB", "served img/s @op", "served p99 ms @op", "in-proc img/s @op", "in-proc b1 p50 ms",
            "% of own peak"]
    body = []
    for r in rows:
        a, s, ip = r.accuracy, r.server, r.in_process
        body.append([f"`{r.key}`" + (" (recommended)" if r.key == rec.variant else ""), r.precision,
                     r.arithmetic or "-", r.status, _gate_text(r.gate.passed), _pct(a.top1_agreement, ".2%"),
                     _pts(a.accuracy_delta), _mb(r.file_bytes), _f(s.op_images_per_s, ".1f"),
                     _f(s.op_p99_ms, ".1f"), _f(ip.op_images_per_s, ".1f"), _f(ip.b1_p50_ms, ".2f"),
                     _own_peak(ip.efficiency, ip.efficiency_peak)])
    return [("h2", "Summary"), ("table", head, body),
            ("p", "Gates: top-1 agreement / cosine / accuracy-drop thresholds per precision "
                  "(the export gates, overridable with dinov2-triton export --gates). "
                  "Gate source per variant is in the accuracy table.")]


def _served_blocks(results: PerfResults) -> list[tuple]:
    pa = results.perf_analyzer
    if pa is None:
        return []
    st = pa.settings
    b: list[tuple] = [("h2", "Through Triton (perf_analyzer)")]
    b.append(("p", f"Window {st.window_ms} ms ({st.measurement_mode}), stability {st.stability_pct} %, "
                   f"max {st.max_trials} trials; protocols {', '.join(st.protocols)}; inputs: "
                   f"{pa.input_data.source}. Shapes are the server's model config."))
    head = ["model", "proto", "batch", "conc", "img/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
            "client send", "network+server", "queue", "compute in", "infer", "compute out", "client recv"]
    body = []
    for p in points(results):
        m = p.metrics
        body.append([p.model, p.protocol, p.batch_size, p.concurrency, _f(m.get("throughput_infer_per_s"), ".1f")]
                    + [_f(_ms(m.get(k)), ".2f") for k in ("p50_latency_us", "p90_latency_us", "p95_latency_us",
                                                          "p99_latency_us")]
                    + [_f(_ms(m.get(k)), ".2f") for k, _ in BREAKDOWN])
    b.append(("table", head, body))
    b.append(("p", "Breakdown columns are average milliseconds per request."))
    if pa.failures:
        b.append(("h3", "Failed points"))
        b.append(("ul", [f.reason for f in pa.failures]))
    return b


def _in_process_blocks(results: PerfResults) -> list[tuple]:
    ipr = results.in_process
    if ipr is None or not ipr.variants:
        return []
    st = ipr.settings
    b: list[tuple] = [("h2", "In process")]
    where = "fresh process" if st.isolated_processes else "shared process (memory peaks mix)"
    b.append(("p", f"{st.seconds} s per cell after {st.warmup} warm-up calls per batch size; "
                   f"N client threads share one loaded model; torch intra-op threads {st.torch_threads}; "
                   f"each variant in a {where}; inputs: {ipr.input_data.source}."))
    head = ["variant", "batch", "threads", "img/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "% of own peak"]
    body = []
    for name, e in ipr.variants.items():
        eff = e.efficiency     # the variant's own arithmetic's peak
        for c in e.benchmark.grid if e.benchmark else []:
            frac = (c.images_per_s * eff.gflops_per_image / eff.peak_gflops
                    if eff and eff.peak_gflops and c.images_per_s else None)
            body.append([name, c.batch_size, c.threads, _f(c.images_per_s, ".1f"), _f(c.p50_ms, ".2f"),
                         _f(c.p90_ms, ".2f"), _f(c.p95_ms, ".2f"), _f(c.p99_ms, ".2f"),
                         _own_peak(frac, eff.arithmetic.upper() if eff else None)])
    b.append(("table", head, body))
    return b


def _accuracy_blocks(results: PerfResults, rows: Sequence[VariantRow]) -> list[tuple]:
    b: list[tuple] = [("h2", "Accuracy and parity")]
    par = results.parity
    if par is not None:
        ref = par.reference.get("metrics") or {}
        b.append(("p", f"Live parity through Triton ({par.protocol} {par.url}) on {par.n_images} "
                       f"{par.split} images; reference {par.reference.get('kind')} accuracy "
                       f"{_pct(ref.get('accuracy'), '.2%')}."))
    head = ["variant", "gate", "result", "source", "top-1 agree", "flipped", "accuracy", "acc delta (pts)",
            "max |d logit|", "failures"]
    body = []
    for r in rows:
        a, g = r.accuracy, r.gate
        body.append([r.key, g.name or "-", _gate_text(g.passed), g.source or "-", _pct(a.top1_agreement, ".2%"),
                     f"{a.flipped}/{a.n}" if a.flipped is not None else "-", _pct(a.accuracy, ".2%"),
                     _pts(a.accuracy_delta), _f(a.logit_max_abs_diff, ".3g"), "; ".join(g.failures) or "-"])
    b.append(("table", head, body))
    return b


def _memory_blocks(results: PerfResults, rows: Sequence[VariantRow], op) -> list[tuple]:
    from dinov2_triton.report.plots import peak_over_baseline

    b: list[tuple] = [("h2", "Size, memory and compute efficiency")]
    ipr = results.in_process
    flops = (ipr.flops if ipr else None) or results.flops
    peak = (ipr.matmul_peak if ipr else None) or results.matmul_peak
    peaks = dict(ipr.matmul_peaks) if ipr and ipr.matmul_peaks else ({"fp32": peak} if peak else {})
    if flops or peaks:
        gflops = _attr(flops, "gflops", None)
        b.append(("p", f"Model: {_f(gflops, '.3f')} GFLOP per image ({_attr(flops, 'method', '')}). Each variant's "
                       "efficiency is its achieved GFLOP/s over the measured matrix multiply peak of the arithmetic "
                       "it runs (its row's arithmetic, read from the engine by the export). Measured peaks of this "
                       "machine:"))
        items = [f"{arith.upper()}: {_f(p.gflops, '.1f')} G{'OP' if arith == 'int8' else 'FLOP'}/s "
                 f"({p.method or f'{p.dtype} {p.size}x{p.size}'}, {p.threads} threads"
                 + (f"; best of {', '.join(_f(x, '.1f') for x in p.measurements_gflops)}"
                    if p.measurements_gflops else "")
                 + f"), so {arith.upper()} cannot exceed about "
                 f"{_f(p.gflops / gflops if gflops else None, '.1f')} images/s here"
                 for arith, p in peaks.items()]
        items += [f"{arith.upper()}: not measured ({why})" for arith, why in (ipr.peaks_not_measured if ipr
                                                                               else {}).items()]
        b.append(("ul", items))
    head = ["variant", "file MB", "in-proc loaded MB", "in-proc run peak over baseline MB",
            "in-proc process peak RSS MB", "server proc RSS MB",
            "in bytes/img", "out bytes/img", "weight bytes/img @op batch", "best GFLOP/s", "% of own peak", "note"]
    body = []
    for r in rows:
        e = inprocess_entry(results, r)
        bm = e.bytes_moved if e is not None else None
        pb = bm.per_batch_size.get(str(op.batch_size)) if bm else None
        eff = e.efficiency if e is not None else None
        body.append([r.key, _mb(r.file_bytes), _mb(r.in_process.loaded_model_bytes),
                     _mb(peak_over_baseline(results, r)), _mb(r.in_process.peak_rss_bytes), _mb(r.server.rss_bytes),
                     _f(_attr(bm, "input_bytes_per_image", None), ".0f"),
                     _f(_attr(bm, "output_bytes_per_image", None), ".0f"),
                     _f(_attr(pb, "weight_bytes_per_image", None), ".0f"),
                     _f(eff.best.achieved_gflops if eff else None, ".1f"),
                     _own_peak(eff.best.fraction_of_peak, eff.arithmetic.upper()) if eff else "-",
                     (eff.caveat if eff else None) or ""])
    b.append(("table", head, body))
    smem = results.server.memory if results.server else None
    if smem is not None:
        tree = smem.peak_process_tree or {}
        items = []
        if tree:
            items.append(f"tritonserver process tree (pid {tree.get('pid')}, {tree.get('processes')} processes): peak "
                         f"{_mb(tree.get('total_rss_bytes'))} MB resident during the sweep (server itself "
                         f"{_mb(tree.get('server_rss_bytes'))} MB; each Python-backend model instance is its own "
                         "process)")
        if smem.peak_host_used_bytes is not None:
            items.append(f"metrics endpoint nv_cpu_memory_used_bytes (whole host, all processes): peak "
                         f"{_mb(smem.peak_host_used_bytes)} MB")
        for uuid, v in smem.peak_gpu_used_bytes.items():
            items.append(f"GPU {uuid}: peak nv_gpu_memory_used_bytes {_mb(v)} MB")
        for err in smem.errors:
            items.append(f"not measured: {err}")
        if items:
            b.append(("h3", "Server memory"))
            b.append(("ul", items))
    return b


def _how_to_read() -> list[tuple]:
    return [("h2", "How to read these numbers"), ("ul", [
        "**img/s** counts images (a batch-8 request is 8 inferences), so batch sizes are comparable.",
        "**Client side vs server side**: perf_analyzer's latency is what a client waits for. It splits into "
        "client send, network + server send/receive, the server-side parts, and client receive.",
        "**Server queue** is the time a request waits inside Triton before a model instance takes it: for a free "
        "instance, or for the dynamic batcher to gather a batch (bounded by max_queue_delay). Growing queue time "
        "with concurrency means the model is saturated: more clients add latency, not throughput.",
        "**Compute input / infer / output**: copying inputs into the backend, running the model, copying outputs "
        "back. Compute infer is the number to compare with the in-process latency; on this CPU the ONNX/PyTorch "
        "models run in Python-based stand-in backends, so their overhead is included.",
        "**The ensemble** (`dinov2`) includes server-side decoding and preprocessing; compare it with its "
        "classifier to see what preprocessing costs (docs/field-notes.md #11).",
        "**p99** is the latency 99 % of requests stay under; it is what a latency budget should be set on.",
        "**% of own peak**: achieved GFLOP/s (img/s x GFLOP per image) over this machine's measured matrix "
        "multiply peak of the arithmetic the variant runs (FP32 and BF16: torch.matmul; INT8: ONNX Runtime's "
        "integer GEMM, 2 operations per multiply-accumulate), named beside the number. Above 100 % means that "
        "peak measurement is lower than what the engine reached, not that the variant beat the hardware.",
        "**Shared machine**: the load generator (perf_analyzer), the server and any other process share the "
        "same cores; on a 2-core machine the numbers are lower bounds and vary run to run (~5 %).",
    ])]


def _machine_blocks(results: PerfResults) -> list[tuple]:
    mach = results.machine
    gpus = ", ".join(f"{g.name} ({_f(g.memory_mib, '.0f')} MiB)" for g in mach.gpus) or "none"
    server = results.server
    b: list[tuple] = [("h2", "Machine, versions and settings"), ("ul", [
        f"CPU: {mach.cpu_model} ({_attr(mach, 'usable_cores')} usable cores, "
        f"{_attr(mach, 'logical_cores')} logical; {', '.join(mach.cpu_flags) or 'flags n/a'})",
        f"Memory: {_f(mach.memory_total_bytes / 2**30, '.1f')} GiB; GPU: {gpus}",
        f"OS: {mach.os}, {mach.libc}; Python {mach.python}; load average at start {mach.load_average}",
        f"Weights: {_weights_source(results)}",
        "Triton: " + json.dumps((server.metadata if server else {}).get("version"))
        + f"; URL {(server.url if server else None) or 'none (in-process only)'}",
    ])]
    if results.versions:
        b.append(("p", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(results.versions.items()))))
    if results.settings:
        b.append(("pre", json.dumps(results.settings, indent=2, default=str)))
    return b


# ----------------------------------------------------------------------------- rendering
def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "banner":
            out.append(f"> **WARNING: {blk[1]}**")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif kind == "table":
            head, body = blk[1], blk[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n\n*{blk[3]}*")
        elif kind == "pre":
            out.append("```\n" + blk[1] + "\n```")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then the two markdown inlines the blocks use: **bold** and `code`."""
    import re

    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}.banner{background:#ffe3e3;border:2px solid #d33;padding:.7em 1em;
font-weight:bold;margin:1em 0}code{background:#f4f4f4;padding:0 3px}img{max-width:100%;border:1px solid #ddd}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}pre{background:#f7f7f7;padding:1em;overflow:auto;
font-size:12px}"""


def render_html(blocks: Sequence[tuple], image_dir: Path) -> str:
    """A self-contained page: the PNGs are embedded as base64 data URIs."""
    title = next((blk[1] for blk in blocks if blk[0] == "h1"), "Perf report")
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_html(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(blk[1])}</p>")
        elif kind == "banner":
            out.append(f"<div class=\"banner\">WARNING: {_inline_html(blk[1])}</div>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            head, body = blk[1], blk[2]
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in head)
                       + f"</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((image_dir / blk[1]).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(blk[2])}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption><strong>{html.escape(blk[2])}.</strong> {_inline_html(blk[3])}"
                       "</figcaption></figure>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(blk[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- entry points
@dataclass(frozen=True)
class Report:
    """What generate_report wrote; ``results`` carries the derived rows and recommendation."""
    md: Path
    html: Path
    json: Path
    plots: list[Path]
    results: PerfResults

    @property
    def rows(self) -> list[VariantRow]:
        return list(self.results.rows or [])

    @property
    def recommendation(self) -> Recommendation:
        return self.results.recommendation


def derive(results: PerfResults) -> PerfResults:
    """A copy of ``results`` with the completed operating point, the rows and
    the recommendation: what the report shows and ``report publish`` copies."""
    rows = summarize(results)
    op = operating_point(results)
    rec = choose_recommendation(results, rows, op)
    return results.model_copy(update={"operating_point": op, "rows": rows, "recommendation": rec})


def generate_report(results: PerfResults, out_dir: str | os.PathLike) -> Report:
    """Write report.md, report.html, results.json (with the completed operating
    point, the derived ``rows`` and ``recommendation``) and the PNG plots into
    out_dir. ``results`` itself is not modified."""
    from dinov2_triton.bench.results import write_results
    from dinov2_triton.report.plots import make_plots

    if not isinstance(results, PerfResults):
        raise TypeError(f"generate_report: expected PerfResults (dinov2_triton.bench.results.read_results), "
                        f"got {type(results).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = derive(results)
    rows, rec = list(final.rows or []), final.recommendation
    plots = make_plots(final, rows, out_dir)
    blocks = build_blocks(final, rows, rec, plots)
    from dinov2_triton.core.artifact_io import atomic_write_text

    md = atomic_write_text(out_dir / "report.md", render_markdown(blocks))
    page = atomic_write_text(out_dir / "report.html", render_html(blocks, out_dir))
    js = write_results(out_dir / RESULTS_FILE, final)
    return Report(md=md, html=page, json=js, plots=[out_dir / p["file"] for p in plots], results=final)


def summary_table(rows: Sequence[VariantRow], rec: Recommendation) -> str:
    """Plain-text table for the terminal."""
    head = ["variant", "status", "gates", "top-1", "served img/s", "p99 ms", "in-proc img/s", "size MB"]
    body = []
    for r in rows:
        s, ip = r.server, r.in_process
        body.append([r.key + (" *" if r.key == rec.variant else ""), r.status, _gate_text(r.gate.passed),
                     _pct(r.accuracy.top1_agreement, ".2%"), _f(s.op_images_per_s, ".1f"), _f(s.op_p99_ms, ".1f"),
                     _f(ip.op_images_per_s, ".1f"), _mb(r.file_bytes)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    lines.append(f"* recommended: {rec.variant or 'none'} ({rec.reason})")
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "dinov2-triton report render",
                                description="Re-generate a perf report from a stored results.json.")
    req = p.add_argument_group("Required")
    req.add_argument("--results", required=True, help="a run's results.json (<reports>/<run-id>/results.json)")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--out", default=None, help="output folder (default: the results file's folder)")
    opt.add_argument("--batch-size", type=int, default=None, help="operating point: batch size")
    opt.add_argument("--concurrency", type=int, default=None, help="operating point: concurrency")
    opt.add_argument("--protocol", choices=("grpc", "http"), default=None, help="operating point: protocol")
    opt.add_argument("--max-p99-ms", type=float, default=None, help="latency budget for the recommendation")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """``dinov2-triton report render``: re-generate report.md / report.html from a results.json."""
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.core.records import RecordError

    args = build_parser(prog).parse_args(argv)
    try:
        results = read_results(args.results)
    except RecordError as exc:
        print(f"error: --results {exc}", file=sys.stderr)
        return 2
    changes = {key: val for key, val in (("batch_size", args.batch_size), ("concurrency", args.concurrency),
                                         ("protocol", args.protocol), ("max_p99_ms", args.max_p99_ms))
               if val is not None}
    results = results.model_copy(update={"operating_point": results.operating_point.model_copy(update=changes)})
    out = Path(args.out) if args.out else Path(args.results).parent
    report = generate_report(results, out)
    print(summary_table(report.rows, report.recommendation))
    print(f"report: {report.md}\n        {report.html}")
    return 0
