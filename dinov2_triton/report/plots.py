"""The report's figures (matplotlib, Agg backend, PNG):

- throughput vs p99 latency over concurrency (served; in process without a server),
- accuracy delta vs throughput at the operating point (green passes its gates, red X fails),
- size and memory per variant,
- where a served request's time goes (perf_analyzer's client/server breakdown).

    make_plots(results, rows, out_dir) -> [{"file", "title", "caption"}]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dinov2_triton.bench.results import PerfResults, VariantRow
from dinov2_triton.report.ranking import BREAKDOWN, inprocess_entry, operating_point, points


def peak_over_baseline(results: PerfResults, r: VariantRow) -> int | None:
    """In-process run peak RSS over the fresh process's baseline."""
    e = inprocess_entry(results, r)
    return e.memory.peak_over_baseline_bytes if e is not None and e.memory else None


def make_plots(results: PerfResults, rows: Sequence[VariantRow], out_dir: Path) -> list[dict[str, str]]:
    """PNG plots (Agg backend); returns [{"file", "title", "caption"}]."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[dict[str, str]] = []
    op = operating_point(results)

    def save(fig, name, title, caption):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        plots.append({"file": name, "title": title, "caption": caption})

    _throughput_vs_p99(plt, save, results, rows)
    _accuracy_vs_throughput(plt, save, rows, op)
    _size_memory(plt, save, results, rows)
    _latency_breakdown(plt, save, rows, op)
    _p99_vs_offered_load(plt, save, results)
    return plots


def _p99_vs_offered_load(plt, save, results: PerfResults) -> None:
    """p99 against the offered rate of every capacity measurement (the capacity
    run's, else the search's same-run comparison), the SLO line, each capacity marked."""
    curves = []
    if results.capacity is not None:
        slo = results.capacity.settings.slo_p99_ms
        curves = [(f"{c.model} #{c.repeat}", c) for c in results.capacity.results]
    elif results.search is not None and results.search.comparison is not None:
        slo = results.search.settings.capacity.slo_p99_ms
        cmp = results.search.comparison
        curves = [(f"{cmp.model} exported default", cmp.default), (f"{cmp.model} search winner", cmp.winner)]
    curves = [(label, c) for label, c in curves if any(p.p99_ms is not None for p in c.points)]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, c in curves:
        pts = sorted((p for p in c.points if p.p99_ms is not None), key=lambda p: p.rate_rps)
        line, = ax.plot([p.rate_rps for p in pts], [p.p99_ms for p in pts], marker="o", label=label)
        if c.capacity_rps and c.p99_at_capacity_ms is not None:
            ax.plot([c.capacity_rps], [c.p99_at_capacity_ms], marker="*", markersize=16, color=line.get_color())
            ax.annotate(f"{c.capacity_img_s:.0f} img/s", (c.capacity_rps, c.p99_at_capacity_ms),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.axhline(slo, color="red", linestyle="--", label=f"SLO p99 {slo:g} ms")
    ax.set_xlabel("offered load (requests/s, Poisson arrivals)")
    ax.set_ylabel("p99 latency (ms, log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "p99_vs_offered_load.png", "p99 latency vs offered load",
         "Open-loop load (perf_analyzer, Poisson arrivals at the exact offered rate). Stars: capacity at the SLO "
         "(the highest rate that passed; a rate measured twice, its p99 near the SLO, has both drawn and the "
         "star at their mean). Rates that failed by errors or shedding have no latency and are not "
         "drawn.")


def _throughput_vs_p99(plt, save, results: PerfResults, rows: Sequence[VariantRow]) -> None:
    pts = [p for p in points(results) if p.status == "OK"]
    if pts:
        bss = sorted({p.batch_size for p in pts})
        fig, axes = plt.subplots(1, len(bss), figsize=(6 * len(bss), 4.5), squeeze=False)
        for ax, bs in zip(axes[0], bss):
            for (model, proto) in sorted({(p.model, p.protocol) for p in pts if p.batch_size == bs}):
                ser = sorted((p for p in pts if (p.model, p.protocol, p.batch_size) == (model, proto, bs)),
                             key=lambda p: p.concurrency)
                xs = [(p.metrics.get("p99_latency_us") or 0) / 1000 for p in ser]
                ys = [p.metrics.get("throughput_infer_per_s") or 0 for p in ser]
                ax.plot(xs, ys, marker="o", linestyle="-" if proto == "grpc" else "--", label=f"{model} ({proto})")
                for p, x, y in zip(ser, xs, ys):
                    ax.annotate(f"c{p.concurrency}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set_xlabel("p99 latency (ms)")
            ax.set_ylabel("throughput (images/s)")
            ax.set_title(f"through Triton, batch {bs}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "throughput_vs_p99.png", "Throughput vs p99 latency (served)",
             "Each line is one model and protocol; points are concurrency levels (c1, c2, ...). Up and to the "
             "left is better; where a line turns right, more concurrency only adds queueing.")
        return
    cells = []
    for r in rows:
        e = inprocess_entry(results, r)
        cells += [(r, c) for c in (e.benchmark.grid if e is not None and e.benchmark else [])]
    if not cells:
        return
    bss = sorted({c.batch_size for _, c in cells})
    fig, axes = plt.subplots(1, len(bss), figsize=(6 * len(bss), 4.5), squeeze=False)
    for ax, bs in zip(axes[0], bss):
        for r in rows:
            ser = sorted((c for rr, c in cells if rr is r and c.batch_size == bs), key=lambda c: c.threads)
            if not ser:
                continue
            ax.plot([c.p99_ms for c in ser], [c.images_per_s for c in ser], marker="o", label=r.key)
            for c in ser:
                ax.annotate(f"t{c.threads}", (c.p99_ms, c.images_per_s), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("throughput (images/s)")
        ax.set_title(f"in process, batch {bs}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "throughput_vs_p99.png", "Throughput vs p99 latency (in process)",
         "No server was measured: points are client-thread counts (t1, t2, ...) sharing one model.")


def _accuracy_vs_throughput(plt, save, rows: Sequence[VariantRow], op) -> None:
    any_served = any(x.server.op_images_per_s for x in rows)
    acc_rows = []
    for r in rows:
        thr = r.server.op_images_per_s
        name = r.key
        if thr is None and r.in_process.op_images_per_s is not None:
            thr = r.in_process.op_images_per_s
            name += " (in process)" if any_served else ""
        a = r.accuracy
        if thr is None or r.kind == "preprocess":
            continue
        if r.kind == "baseline":
            y, kind = 0.0, "delta"
        elif a.accuracy_delta is not None:
            y, kind = a.accuracy_delta * 100, "delta"
        elif a.top1_agreement is not None:
            y, kind = (a.top1_agreement - 1) * 100, "agreement"
        else:
            continue
        acc_rows.append((r, name, thr, y, kind))
    if not acc_rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Variants often share a delta (0.00): stagger labels, sorted by speed,
    # so neighbours do not print on top of each other.
    for i, (r, name, thr, y, _kind) in enumerate(sorted(acc_rows, key=lambda t: t[2])):
        ok = r.gate.passed
        ax.scatter([thr], [y], s=80, marker="o" if ok else "X", color="tab:green" if ok else "tab:red",
                   edgecolor="black", zorder=3)
        ax.annotate(name + ("" if ok else " (gate FAIL)"), (thr, y), textcoords="offset points",
                    xytext=(5, 6 + 11 * (i % 4)), fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    ax.axhline(0, color="grey", lw=0.8)
    # headroom above the highest point for its staggered labels (they would cross the title)
    ys = [y for *_, y, _k in acc_rows] + [0.0]
    span = max(max(ys) - min(ys), 1.0)
    ax.set_ylim(min(ys) - 0.1 * span, max(ys) + 0.35 * span)
    kinds = {k for *_, k in acc_rows}
    ax.set_ylabel("accuracy delta vs FP32 (points)" if kinds == {"delta"} else
                  "accuracy delta, or top-1 agreement - 100 % (points)")
    ax.set_xlabel(f"throughput at the operating point (images/s, batch {op.batch_size}, "
                  f"concurrency {op.concurrency})")
    ax.set_title("Accuracy vs speed (green: passes its gates, red X: fails)")
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_throughput.png", "Accuracy vs throughput",
         "The trade-off in one picture: right is faster, up is closer to (or better than) the FP32 "
         "reference. Only green points may be deployed.")


def _size_memory(plt, save, results: PerfResults, rows: Sequence[VariantRow]) -> None:
    mem_rows = [r for r in rows if r.file_bytes or r.in_process.loaded_model_bytes or r.server.rss_bytes]
    if not mem_rows:
        return
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(mem_rows) + 2), 4.5))
    x = np.arange(len(mem_rows))
    series = [("artifact file", [r.file_bytes for r in mem_rows]),
              ("in-process RSS of the loaded model", [r.in_process.loaded_model_bytes for r in mem_rows]),
              ("in-process peak RSS over baseline", [peak_over_baseline(results, r) for r in mem_rows]),
              ("server model process RSS", [r.server.rss_bytes for r in mem_rows])]
    series = [(n, v) for n, v in series if any(isinstance(y, (int, float)) and y for y in v)]
    w = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series):
        ax.bar(x + i * w - 0.4 + w / 2, [(v or 0) / 1e6 for v in vals], w, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([r.key for r in mem_rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MB")
    ax.set_title("Size and memory per variant")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    save(fig, "size_memory.png", "Size and memory",
         "Artifact size on disk; resident memory the loaded model added in a fresh process; the peak of the "
         "benchmark run over that process's baseline; the server's per-model process RSS (local server).")


def _latency_breakdown(plt, save, rows: Sequence[VariantRow], op) -> None:
    br = [r for r in rows if r.server.op_images_per_s]
    if not br:
        return
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(br) + 2), 4.5))
    x = np.arange(len(br))
    bottom = np.zeros(len(br))
    for key, label in BREAKDOWN:
        vals = np.array([r.server.breakdown_ms.get(key) or 0.0 for r in br])
        ax.bar(x, vals, 0.6, bottom=bottom, label=label)
        bottom += vals
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r.key}\nb{r.server.batch_size} c{r.server.concurrency}" for r in br],
                       fontsize=8, rotation=15, ha="right")
    ax.set_ylabel("ms per request (averages)")
    ax.set_title(f"Where a request's time goes ({op.protocol})")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    save(fig, "latency_breakdown.png", "Latency breakdown (client and server side)",
         "Average per request at the operating point, from perf_analyzer's CSV. Queue = waiting for a free "
         "model instance (or for the dynamic batcher to fill a batch); compute infer = the model itself.")
