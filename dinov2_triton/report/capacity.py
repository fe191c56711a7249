"""The report's capacity and search sections (document blocks for dinov2_triton.report.report).

    capacity_blocks(results)       -> capacity at the SLO per model and measurement
    search_blocks(results, rows)   -> the search's cost, the top 3 configurations per
                                      variant with their accuracy gates, every point,
                                      the same-run comparison with the exported default
    serving_blocks(results)        -> the pipeline's tune stage: the configuration served
                                      and the queue policy's A/B in it (same run)

Each is empty when its section did not run, so a report without them reads
as before.
"""
from __future__ import annotations

from typing import Any, Sequence

from dinov2_triton.bench.capacity import repeatability
from dinov2_triton.bench.results import PerfResults, VariantRow
from dinov2_triton.report.ranking import describe_config


def _num(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


HOW_TO_READ = [
    "**Capacity at the SLO** is the highest offered rate (requests/s, Poisson arrivals, open loop: clients do not "
    "wait for each other) at which p99 stayed under the SLO, at most 0.1 % of requests failed or were shed, "
    "the server kept up and the load generator kept up. Size a deployment with it: replicas = peak traffic / "
    "capacity, plus headroom.",
    "The search ramps the rate up until a rate fails, then bisects between the highest passing and the lowest "
    "failing rate; **failing above** is that lowest failing rate, so the true capacity lies between the two.",
    "**Knee**: the last rate whose p99 is within 2x the p99 at the lightest load measured; past it queueing, not "
    "compute, is most of the latency. Running at the knee leaves room for bursts; running at capacity does not.",
    "perf_analyzer 2.50 stops at the first failed or shed request: such a rate has no latency numbers and does "
    "not pass.",
    "A rate whose p99 came out near the SLO is **measured again** and judged on the mean p99 of both (the "
    "table's \"(again)\"): near the line one burst on shared cores decides a single measurement.",
    "**Repeated measurements**: the server's compute time per request at the lightest rate is the same load in "
    "every measurement, so when it differs the machine's speed changed between them (another process or a "
    "noisy neighbour), and the capacities differ for that reason too.",
]


def capacity_blocks(results: PerfResults) -> list[tuple]:
    run = results.capacity
    if run is None:
        return []
    st = run.settings
    b: list[tuple] = [("h2", f"Capacity at p99 <= {st.slo_p99_ms:g} ms (open loop)")]
    arrivals = ("Poisson arrivals from a seeded schedule with the exact mean rate (--request-intervals)"
                if st.distribution == "poisson" else f"{st.distribution} arrivals")
    b.append(("p", f"perf_analyzer open loop, {arrivals}, batch {st.batch_size} per "
                   f"request, {st.protocol}; windows of at least {st.window_ms} ms (longer at low rates), "
                   f"bisection to {st.precision:.0%}, {st.budget_s:g} s budget per measurement; "
                   + (f"a rate with p99 within a factor {1 + st.recheck_margin:g} of the SLO is measured again and "
                      f"judged on the mean p99 of both; " if st.recheck_margin else "each rate measured once; ")
                   + f"inputs: "
                   f"{(run.input_data or {}).get('source', '?')}."))
    head = ["model", "measurement", "capacity img/s", "p99 at capacity ms", "failing above req/s", "knee req/s",
            "rates measured (again)", "minutes", "stop"]
    body = [[c.model, c.repeat, _num(c.capacity_img_s), _num(c.p99_at_capacity_ms), _num(c.failed_rps),
             _num(c.knee_rps), f"{len(c.points)} ({sum(p.rechecked for p in c.points)})",
             _num(c.wall_s / 60, ".1f"), c.stop] for c in run.results]
    b.append(("table", head, body))
    spread = [f"`{model}`: {line}" for model, line in repeatability(run)]
    if spread:
        b.append(("p", "Repeated measurements in this run:"))
        b.append(("ul", spread))
    if run.failures:
        b.append(("ul", [f"FAILED: {f}" for f in run.failures]))
    b.append(("h3", "How to read capacity at an SLO"))
    b.append(("ul", HOW_TO_READ))
    return b


def _gate_cells(r: VariantRow | None) -> list[str]:
    if r is None:
        return ["-", "-"]
    g = "PASS" if r.gate.passed else ("FAIL" if r.gate.passed is False else "-")
    agree = r.accuracy.top1_agreement
    return [g, "-" if agree is None else f"{agree:.2%}"]


def search_blocks(results: PerfResults, rows: Sequence[VariantRow]) -> list[tuple]:
    s = results.search
    if s is None:
        return []
    st = s.settings
    by_model = {r.key: r for r in rows}
    b: list[tuple] = [("h2", f"Configuration search (capacity at p99 <= {st.capacity.slo_p99_ms:g} ms)")]
    cons = [f"min throughput {st.min_throughput:g} img/s" if st.min_throughput is not None else None,
            f"max memory {st.max_memory_mb:g} MB" if st.max_memory_mb is not None else None]
    b.append(("p", f"Strategy {st.strategy}; {len(s.points)} configurations measured in "
                   f"{s.wall_s / 60:.1f} min (budget {st.budget_s / 60:.1f} min; {s.stopped}); constraints: "
                   + (", ".join(c for c in cons if c) or "the SLO only") + ". Each candidate was loaded into the "
                   "running server with a config override (no re-export) and checked against what the server "
                   "then reported."))
    b.append(("ul", [f"`{m}`: " + "; ".join(f"{k} {v}" for k, v in space.items()) for m, space in st.space.items()]))
    if s.excluded:
        b.append(("p", "Kept out of the search (they never compete, however fast):"))
        b.append(("ul", [f"`{x.variant}`: {x.reason}" for x in s.excluded]))
    head = ["variant (model)", "rank", "configuration", "capacity img/s", "p99 ms", "peak MB", "gate",
            "top-1 agree"]
    body = []
    for model in dict.fromkeys(p.model for p in s.points):
        mine = sorted((p for p in s.points if p.model == model and p.feasible and p.capacity),
                      key=lambda p: -(p.capacity.capacity_img_s or 0))
        for rank, p in enumerate(mine[:3], 1):
            body.append([f"{p.variant} ({model})", rank, describe_config(p.config)
                         + (" (exported default)" if p.is_default else ""), _num(p.capacity.capacity_img_s),
                         _num(p.capacity.p99_at_capacity_ms), _num(p.peak_memory_mb, ".0f"),
                         *_gate_cells(by_model.get(model))])
    b.append(("h3", "Top 3 configurations per variant"))
    b.append(("table", head, body))
    c = s.comparison
    if c is not None:
        b.append(("h3", "Winner against the exported default, same run"))
        b.append(("p", f"Both measured again after the search, one after the other "
                       f"({(c.default.wall_s + c.winner.wall_s) / 60:.1f} min more)."))
        b.append(("table", ["configuration", "capacity img/s", "p99 ms", "rates measured"],
                  [["exported default", _num(c.default.capacity_img_s), _num(c.default.p99_at_capacity_ms),
                    len(c.default.points)],
                   ["winner", _num(c.winner.capacity_img_s), _num(c.winner.p99_at_capacity_ms),
                    len(c.winner.points)]]))
        if c.ratio:
            open_ = c.lower_bounds()
            note = (f" The {' and the '.join(label for label, _ in open_)}'s bisection ran out of its budget "
                    f"before it closed, so that capacity is a lower bound ({'; '.join(x.reason for _, x in open_)})."
                    if open_ else "")
            b.append(("p", f"Ratio winner / default: **{c.ratio:.2f}x** (`{c.model}`).{note}"))
    if s.applied is not None:
        b.append(("p", f"Applied: `{s.applied.path}` now holds `{s.applied.key}` (parameters carry the run id "
                       "and these numbers)."))
    b.append(("h3", "Every measured configuration"))
    b.append(("table", ["#", "configuration", "capacity img/s", "p99 ms", "peak MB", "rates", "seconds",
                        "feasible", "why not"],
              [[p.index, p.key, _num(p.capacity.capacity_img_s if p.capacity else None),
                _num(p.capacity.p99_at_capacity_ms if p.capacity else None), _num(p.peak_memory_mb, ".0f"),
                len(p.capacity.points) if p.capacity else 0,
                _num((p.load_s or 0) + (p.capacity.wall_s if p.capacity else 0), ".0f"),
                "yes" if p.feasible else "no", "; ".join(p.violations + ([p.error] if p.error else [])) or "-"]
               for p in s.points]))
    if results.capacity is None:
        b.append(("h3", "How to read capacity at an SLO"))
        b.append(("ul", HOW_TO_READ))
    return b


def serving_blocks(results: PerfResults) -> list[tuple]:
    """The tune stage's choice: the configuration served, with and without the queue policy."""
    c = results.serving
    if c is None:
        return []
    b: list[tuple] = [("h2", f"Serving configuration of `{c.model}`, load shedding on (p99 <= {c.slo_p99_ms:g} ms)")]
    how = ("the search's instances x threads step" if c.space == "joint" else "the whole configuration search")
    if c.chosen is None:
        b.append(("p", f"The `dinov2` ensemble calls `{c.model}` (variant {c.variant or '-'}). {how.capitalize()} "
                       f"on this host, with the exported queue policy in every candidate, found no configuration "
                       f"that met the SLO ({c.search_s / 60:.1f} min): the exported configuration serves, and the "
                       f"queue policy was not measured against its absence."))
    else:
        b.append(("p", f"The `dinov2` ensemble calls `{c.model}` (variant {c.variant or '-'}). Chosen by {how} on "
                       f"this host with the exported queue policy in every candidate (search winner "
                       f"`{c.search_winner or '-'}`; {c.search_s / 60:.1f} min), then the capacity at the SLO of the "
                       f"chosen configuration without the policy and with it, one after the other "
                       f"({c.ab_s / 60:.1f} min; {c.wall_s / 60:.1f} min in all). The policy costs capacity when "
                       f"the capacity with it is below (1 - tolerance) x the capacity without it: the tolerance "
                       f"covers the bisection's resolution and the spread of two measurements on shared cores."))
    if c.ab:
        head = ["configuration", "with policy img/s", "p99 ms", "without policy img/s", "p99 ms", "with / without",
                "tolerance", "policy costs capacity"]
        body = [[a.key, _num(a.with_policy.capacity_img_s), _num(a.with_policy.p99_at_capacity_ms),
                 _num(a.without_policy.capacity_img_s), _num(a.without_policy.p99_at_capacity_ms),
                 _num(a.ratio, ".2f"), f"{a.tolerance:.0%}",
                 "-" if a.costs is None else ("yes" if a.costs else "no")] for a in c.ab]
        b.append(("table", head, body))
        b.append(("ul", [f"`{a.key}`: {a.verdict}" for a in c.ab]))
    served = "matches" if c.served_matches else "DIFFERS from"
    items = [f"Served: `{c.chosen or 'the exported configuration'}`; after reloading `{c.applied_path or '-'}` "
             f"the server's configuration {served} the file ({c.served})."]
    if c.ensemble_steps_shed:
        items.append("Queue policy on each model the ensemble calls: "
                     + ", ".join(f"`{m}` {'yes' if on else 'NO'}" for m, on in c.ensemble_steps_shed.items()) + ".")
    items += c.notes
    items.append(f"The search's own report: `{c.search_run}`.")
    b.append(("ul", items))
    return b
