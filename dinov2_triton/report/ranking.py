"""The ranking policy: one row per variant, the operating point, the
recommendation and the slower-than-parent flags.

A row's status is the export manifest's where the manifest says SKIPPED,
FAILED or GATE_FAILED (with its reason), whatever else was measured or
listed about that model; OK rows take the in-process benchmark's status
(a variant that failed to run there is FAILED).

    summarize(results)                  -> [VariantRow]  (in process + served + parity + export, per variant)
    recommend_deployed(results, rows, op) -> Recommendation: what the `dinov2` ensemble serves, when
                                           the export chose it (``--variants auto``), else None
    recommend(rows, op)                 -> Recommendation
    recommend_capacity(results, rows, op) -> Recommendation by capacity at the SLO, or None

With ``--variants auto`` (the default) the one decision is the export's
(dinov2_triton.export.auto.deployment_choice: the fastest gated variant
measured in this run on this host, recorded in the manifest's ensemble entry):
the report recommends exactly what the image endpoint serves, shows it beside
every other gated variant served and in process, and warns when the
served ranking disagrees with it by more than the noise margin.

Recommendation rule: among the deployable variants (the Triton models, not
the eager PyTorch baseline, not the ensemble/preprocessing wrappers) that pass
ALL their gates, the one with the highest throughput at the operating point
(batch size, concurrency, protocol; measured through the server when the
sweep ran, in process otherwise), optionally under a p99 latency budget.

A variant that should be faster than its parent (lower precision, compiled)
but was measured slower at the same point is flagged: shipping it for speed
would be a mistake, whatever its precision suggests.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from dinov2_triton.bench.results import (
    EAGER,
    GateVerdict,
    InProcessVariant,
    OperatingPoint,
    ParityVariant,
    PerfResults,
    Ranked,
    Recommendation,
    Rejected,
    RowAccuracy,
    RowInProcess,
    RowServer,
    SweepPoint,
    VariantRow,
)

#: run-to-run noise measured on 2 shared cores; smaller differences are not "slower"
NOISE_MARGIN = 0.05
#: perf_analyzer's per-request breakdown (CSV column, label), client send to client receive
BREAKDOWN = (("client_send_us", "client send"), ("network_server_send_recv_us", "network + server send/recv"),
             ("server_queue_us", "server queue"), ("server_compute_input_us", "compute input"),
             ("server_compute_infer_us", "compute infer"), ("server_compute_output_us", "compute output"),
             ("client_recv_us", "client recv"))
_KIND_ORDER = {"baseline": 0, "variant": 1, "ensemble": 2, "preprocess": 3}
#: CPU extensions that speed up a precision's arithmetic (what the recommendation names)
EXTENSIONS = {"int8": ("avx512_vnni", "avx_vnni", "amx_int8"), "fp16": ("avx512_fp16", "amx_fp16"),
              "fp32": ("avx512f", "avx2", "fma")}
#: the extensions whose absence the recommendation points out
KEY_EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
#: export manifest statuses that a row keeps, whatever else ran
MANIFEST_STATUSES = ("SKIPPED", "FAILED", "GATE_FAILED")


def _ms(us: Any) -> float | None:
    return us / 1000.0 if isinstance(us, (int, float)) else None


def points(results: PerfResults) -> list[SweepPoint]:
    return list(results.perf_analyzer.points) if results.perf_analyzer else []


def inprocess_entry(results: PerfResults, row: VariantRow) -> InProcessVariant | None:
    """The in-process benchmark entry behind a row (None for served-only rows)."""
    if results.in_process is None or not row.in_process_name:
        return None
    return results.in_process.variants.get(row.in_process_name)


def operating_point(results: PerfResults) -> OperatingPoint:
    """The configured operating point, completed from what was measured:
    the largest batch size and concurrency (client threads in process), the
    first protocol."""
    op = results.operating_point
    pa = results.perf_analyzer.settings if results.perf_analyzer else None
    ip = results.in_process.settings if results.in_process else None
    bss = (pa.batch_sizes if pa else None) or (ip.batch_sizes if ip else None) or [1]
    conc = (pa.concurrency if pa else None) or (ip.threads if ip else None) or [1]
    return OperatingPoint(batch_size=op.batch_size or max(bss), concurrency=op.concurrency or max(conc),
                          protocol=op.protocol or ((pa.protocols if pa else None) or ["grpc"])[0],
                          max_p99_ms=op.max_p99_ms)


def _served_kind(model: str) -> tuple[str, str] | None:
    """(kind, label) of the wrappers the export publishes besides the variants."""
    from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, PREPROCESS_MODEL

    if model == ENSEMBLE_MODEL:
        return "ensemble", f"{model} (ensemble: server-side preprocessing + classifier)"
    if model == PREPROCESS_MODEL:
        return "preprocess", f"{model} (preprocessing only)"
    return None


# ----------------------------------------------------------------------------- rows
def summarize(results: PerfResults) -> list[VariantRow]:
    """One row per variant (keyed by its Triton model name, the eager model as
    'pytorch'), merging in-process, served, parity and export numbers. Does
    not modify ``results``."""
    op = operating_point(results)
    inproc = results.in_process.variants if results.in_process else {}
    manifest_variants = results.export.variants if results.export else {}
    parity = {v.model: v for v in (results.parity.variants if results.parity else [])}
    memory = results.server.memory if results.server else None
    server_mem = memory.peak_per_model_rss_bytes if memory else {}
    model_configs = results.perf_analyzer.model_configs if results.perf_analyzer else {}
    served_models = list(dict.fromkeys([p.model for p in points(results)] + list(parity) + list(model_configs)))
    rows: dict[str, VariantRow] = {}
    parent_of: dict[str, str | None] = {}        # row key -> parent as written (variant name)
    entry_of: dict[str, InProcessVariant] = {}
    export_of: dict[str, Any] = {}

    def row(key: str) -> VariantRow:
        return rows.setdefault(key, VariantRow(key=key, label=key))

    name_to_model: dict[str, str] = {EAGER: EAGER}
    for name, e in inproc.items():
        key = e.model_name or name
        name_to_model[name] = key
        r = row(key)
        r.label, r.in_process_name, r.model_name = e.label or name, name, e.model_name
        r.precision, r.file_bytes, r.platform, r.gate_name = e.precision, e.file_bytes, e.platform, e.gate
        parent_of[key] = e.parent
        if name == EAGER:
            r.kind, r.arithmetic = "baseline", "FP32"
        if e.status != "OK":
            r.status = e.status
            r.reasons.append(e.reason or "")
        entry_of[key] = e
    for name, e in manifest_variants.items():
        key = e.model_name or name
        name_to_model.setdefault(name, key)
        r = row(key)
        r.model_name = e.model_name
        r.precision = e.precision or r.precision
        parent_of[key] = parent_of.get(key) or e.parent or EAGER
        if r.file_bytes is None:
            r.file_bytes = e.size_bytes
        export_of[key] = e
    for m in served_models:
        r = row(m)
        r.served, r.model_name = True, m
        kind = _served_kind(m)
        if kind:
            r.kind, r.label = kind
    for key, r in rows.items():
        e = entry_of.get(key)
        _manifest_status(r, export_of.get(key), e.export if e else None)
        pn = parent_of.get(key)
        r.parent = name_to_model.get(pn, pn) if pn else (None if r.kind != "variant" else EAGER)
        if r.kind == "ensemble":
            ens = (results.export.ensemble if results.export else None) or {}
            par = parity.get(key)
            classifier = ens.get("classifier") or (par.default_variant if par else None)
            r.parent = name_to_model.get(classifier, classifier) if classifier else None
        _fill_numbers(results, r, op, e, export_of.get(key) or (e.export if e else None), parity.get(key),
                      server_mem.get(key))
    _flag_slower(rows, op)
    return sorted(rows.values(), key=lambda r: (_KIND_ORDER.get(r.kind, 9), r.key))


def _manifest_status(r: VariantRow, *verdicts) -> None:
    """The export manifest's SKIPPED / FAILED / GATE_FAILED, with its reason,
    is the row's status (a search or a served-model listing never makes it
    OK); the arithmetic the manifest recorded is the row's. `verdicts`: the
    results' export section's entry, then the in-process entry's copy."""
    verdicts = [v for v in verdicts if v is not None and getattr(v, "status", None)]
    if not verdicts:
        return
    verdict = verdicts[0]
    arith = next((v.arithmetic for v in verdicts if isinstance(getattr(v, "arithmetic", None), dict)), None)
    if arith and arith.get("arithmetic"):
        from dinov2_triton.export.manifest import Arithmetic

        try:
            r.arithmetic = Arithmetic.model_validate(arith).label()
        except ValueError:
            r.arithmetic = str(arith["arithmetic"])
    status = getattr(verdict, "status", None)
    if status not in MANIFEST_STATUSES:
        return
    reason = f"export {status}: {verdict.reason or 'see the export manifest'}"
    r.status = status
    if not any((verdict.reason or reason) in x for x in r.reasons):
        r.reasons.append(reason)


def _inproc_cell(e: InProcessVariant, bs: int, threads: int):
    for c in e.benchmark.grid if e.benchmark else []:
        if c.batch_size == bs and c.threads == threads:
            return c
    return None


def _server_point(results: PerfResults, model: str, op: OperatingPoint) -> SweepPoint | None:
    """The sweep point at the operating point; when the op batch exceeds this
    model's max_batch_size, its largest measured batch at that concurrency.
    None when the op point was due but failed (e.g. did not stabilise): a
    point at another batch size is not comparable with the other rows."""
    mine = [p for p in points(results) if p.model == model and p.protocol == op.protocol
            and p.concurrency == op.concurrency]
    exact = [p for p in mine if p.batch_size == op.batch_size]
    if exact:
        return exact[0]
    configs = results.perf_analyzer.model_configs if results.perf_analyzer else {}
    max_bs = (configs.get(model) or {}).get("max_batch_size")
    if not isinstance(max_bs, int) or max_bs <= 0 or op.batch_size <= max_bs:
        return None
    return max(mine, key=lambda p: p.batch_size) if mine else None


def _fill_numbers(results: PerfResults, r: VariantRow, op: OperatingPoint, e: InProcessVariant | None,
                  export, par: ParityVariant | None, server_rss: float | None) -> None:
    if e is not None:
        bench = e.benchmark
        lat1 = bench.latency.get("1") if bench else None
        cell = _inproc_cell(e, op.batch_size, op.concurrency)
        eff = e.efficiency
        r.in_process = RowInProcess(
            b1_p50_ms=lat1.p50_ms if lat1 else None, b1_p99_ms=lat1.p99_ms if lat1 else None,
            op_images_per_s=cell.images_per_s if cell else None, op_p99_ms=cell.p99_ms if cell else None,
            best_images_per_s=(max(c.images_per_s or 0 for c in bench.grid) if bench and bench.grid else None),
            peak_rss_bytes=e.memory.peak_rss_bytes if e.memory else None,
            loaded_model_bytes=e.memory.loaded_model_bytes if e.memory else None,
            efficiency=eff.best.fraction_of_peak if eff else None,
            efficiency_peak=eff.arithmetic.upper() if eff else None,
            efficiency_caveat=eff.caveat if eff else None)
    if r.served:
        p = _server_point(results, r.key, op)
        m = p.metrics if p else {}
        r.server = RowServer(
            batch_size=p.batch_size if p else None, concurrency=p.concurrency if p else None,
            protocol=p.protocol if p else None, op_images_per_s=m.get("throughput_infer_per_s"),
            op_p50_ms=_ms(m.get("p50_latency_us")), op_p99_ms=_ms(m.get("p99_latency_us")),
            breakdown_ms={k: _ms(m.get(k)) for k, _ in BREAKDOWN},
            best_images_per_s=max((q.metrics.get("throughput_infer_per_s") or 0 for q in points(results)
                                   if q.model == r.key), default=None),
            rss_bytes=server_rss)
    # gates: the live parity when it ran, else the export's in-process verification
    if r.kind == "baseline":
        r.gate = GateVerdict(passed=True, name=r.gate_name,
                             source="reference (eager FP32 is what every variant is compared with)")
    elif par is not None:
        pm = par.parity or {}
        failures = list(par.failures) or ([par.error] if par.error else [])
        r.gate = GateVerdict(passed=bool(par.passed), failures=failures, source="live parity through Triton",
                             name=par.gate.get("name"))
        r.accuracy = RowAccuracy(
            top1_agreement=pm.get("top1_agreement"), flipped=pm.get("flipped"), n=pm.get("n"),
            accuracy=(pm.get("candidate_metrics") or {}).get("accuracy"),
            accuracy_delta=(pm.get("deltas") or {}).get("accuracy"),
            logit_max_abs_diff=(pm.get("logits") or {}).get("max_abs_diff"),
            embedding_cosine_mean=(pm.get("embedding") or {}).get("cosine_mean"))
    elif export is not None and export.gate_passed is not None:
        h = export.headline
        drop = h.get("accuracy_drop")
        r.gate = GateVerdict(passed=bool(export.gate_passed), failures=list(export.gate_failures),
                             source="export verification (in process)", name=r.gate_name)
        r.accuracy = RowAccuracy(
            top1_agreement=h.get("top1_agreement"), accuracy=h.get("accuracy"),
            accuracy_delta=-drop if isinstance(drop, (int, float)) else None,
            logit_max_abs_diff=h.get("logits_max_abs_diff"), embedding_cosine_min=h.get("embedding_cosine_min"))
    else:
        r.gate = GateVerdict(name=r.gate_name)


def _flag_slower(rows: Mapping[str, VariantRow], op: OperatingPoint) -> None:
    """Flag a variant measured slower than its parent (same source, same point)."""
    for r in rows.values():
        r.slower_than_parent = []
        parent = rows.get(r.parent or "")
        if parent is None or r.kind != "variant":
            continue
        for src, label in (("server", "through the server"), ("in_process", "in process")):
            mine = getattr(r, src).op_images_per_s
            theirs = getattr(parent, src).op_images_per_s
            if mine and theirs and mine < theirs * (1 - NOISE_MARGIN):
                r.slower_than_parent.append(
                    f"{r.key} is {1 - mine / theirs:.0%} SLOWER than its parent {parent.key} {label} "
                    f"({mine:.1f} vs {theirs:.1f} img/s at batch {op.batch_size}, "
                    f"{'concurrency' if src == 'server' else 'threads'} {op.concurrency})")


# ----------------------------------------------------------------------------- the recommendation
def host_description(machine) -> str | None:
    """The CPU and the extensions that decide which engine wins, e.g.
    "AMD EPYC (avx2, fma, avx512f, avx512_vnni, avx512_bf16; no amx_int8), 2 cores"."""
    if machine is None:
        return None
    flags = list(machine.cpu_flags or [])
    missing = [f for f in KEY_EXTENSIONS if f not in flags]
    cores = machine.usable_cores or machine.logical_cores
    return (f"{machine.cpu_model} ({', '.join(flags) or 'none of the vector extensions looked for'}"
            f"{'; no ' + ', '.join(missing) if missing else ''}), {cores} cores")


def why_winner(best: VariantRow, thr: float, considered: Sequence[tuple[float, VariantRow]],
               rows: Sequence[VariantRow], machine=None) -> str:
    """Why ``best`` won, in numbers: its margin over the next gated variant,
    its ratio to eager FP32 (in process), and the CPU extension its precision uses."""
    parts = []
    if len(considered) > 1:
        t2, r2 = considered[1]
        parts.append(f"{thr / t2:.2f}x the next gated variant, {r2.key} ({t2:.1f} img/s)")
    else:
        parts.append("the only gated variant measured there")
    eager = next((r for r in rows if r.kind == "baseline"), None)
    e = eager.in_process.op_images_per_s if eager else None
    if e:
        parts.append(f"{thr / e:.2f}x eager PyTorch FP32 in process ({e:.1f} img/s)")
    if machine is not None:
        wanted = EXTENSIONS.get(best.precision, ())
        have = [f for f in wanted if f in (machine.cpu_flags or [])]
        if have:
            parts.append(f"{best.precision.upper()} arithmetic on this CPU's {', '.join(have)}")
        elif wanted:
            parts.append(f"this CPU has none of {', '.join(wanted)} for {best.precision.upper()}")
    return "; ".join(parts)


def recommend(rows: Sequence[VariantRow], op: OperatingPoint, machine=None) -> Recommendation:
    """The fastest deployable variant that passes all its gates at ``op``,
    every gated variant measured on this host ranked; ``machine``
    (dinov2_triton.bench.results.Machine) names the CPU and its extensions in the reason."""
    variants = [r for r in rows if r.kind == "variant" and r.model_name]
    source = "server" if any(r.server.op_images_per_s for r in variants) else "in_process"
    considered: list[tuple[float, VariantRow]] = []
    rejected: list[Rejected] = []
    for r in variants:
        measured = getattr(r, source)
        thr, p99 = measured.op_images_per_s, measured.op_p99_ms
        why = _gate_reason(r)
        if why is None and not thr:
            why = f"not measured at the operating point ({source})"
        elif why is None and op.max_p99_ms and p99 is not None and p99 > op.max_p99_ms:
            why = f"p99 {p99:.1f} ms over the budget {op.max_p99_ms} ms"
        if why:
            rejected.append(Rejected(variant=r.key, reason=why))
        else:
            considered.append((thr, r))
    considered.sort(key=lambda t: -t[0])
    ranking = [Ranked(variant=r.key, images_per_s=t) for t, r in considered]
    if not considered:
        return Recommendation(source=source, operating_point=op, rejected=rejected, ranking=ranking,
                              reason="no deployable variant passes all its gates at the operating point")
    thr, best = considered[0]
    where = (f"through Triton (perf_analyzer, {op.protocol}, batch {op.batch_size}, concurrency {op.concurrency})"
             if source == "server" else
             f"in process (batch {op.batch_size}, {op.concurrency} client threads)")
    return Recommendation(
        source=source, operating_point=op, rejected=rejected, ranking=ranking, variant=best.key,
        label=best.label, images_per_s=thr, p99_ms=getattr(best, source).op_p99_ms,
        gate_source=best.gate.source, warnings=list(best.slower_than_parent),
        reason=f"highest throughput ({thr:.1f} img/s) {where} among the variants that pass all their gates "
               f"({best.gate.source})" + (f" on {host_description(machine)}" if machine is not None else "")
               + f": {why_winner(best, thr, considered, rows, machine)}")


def recommend_deployed(results: PerfResults, rows: Sequence[VariantRow], op: OperatingPoint,
                       machine=None) -> Recommendation | None:
    """The variant the `dinov2` ensemble calls, when it was chosen by
    measurement (dinov2_triton.export.auto.deployment_choice in process, then the
    bench's served ranking: :func:`recommend`, recorded in the manifest's
    ensemble entry); None when the variants were named (then the report ranks
    them itself: :func:`recommend`)."""
    from dinov2_triton.export.auto import CHOSEN_FASTEST, MEASURED_CHOICES

    ens = (results.export.ensemble or {}) if results.export is not None else {}
    if ens.get("classifier_choice") not in MEASURED_CHOICES or not ens.get("classifier"):
        return None
    by_key = {r.key: r for r in rows if r.kind == "variant"}
    best = by_key.get(ens["classifier"])
    chosen_from = [x for x in ens.get("classifier_ranking") or [] if x.get("images_per_s")]
    ranking = [Ranked(variant=x.get("model_name") or x["variant"], images_per_s=x["images_per_s"])
               for x in chosen_from]
    rejected = [Rejected(variant=r.key, reason=why) for r in rows if r.kind == "variant"
                for why in [_gate_reason(r)] if why]
    if best is None:
        return Recommendation(source="export", operating_point=op, rejected=rejected, ranking=ranking,
                              variant=ens["classifier"], reason=ens.get("classifier_reason") or CHOSEN_FASTEST,
                              warnings=[f"{ens['classifier']} is what the dinov2 ensemble calls, but this run did "
                                        "not measure it"])
    served, inproc = best.server.op_images_per_s, best.in_process.op_images_per_s
    measured = [f"{served:.1f} img/s served through Triton (perf_analyzer, {op.protocol}, batch {op.batch_size}, "
                f"concurrency {op.concurrency})" if served else None,
                f"{inproc:.1f} img/s in process (batch {op.batch_size})" if inproc else None]
    warnings = list(best.slower_than_parent)
    others = [(r.server.op_images_per_s, r) for r in rows if r.kind == "variant" and r.key != best.key
              and _gate_reason(r) is None and r.server.op_images_per_s]
    if served and others:
        thr, rival = max(others, key=lambda t: t[0])
        if thr > served * (1 + NOISE_MARGIN):
            warnings.append(f"served through Triton, {rival.key} measured {thr:.1f} img/s, {thr / served:.2f}x the "
                            f"deployed {best.key} ({served:.1f} img/s), beyond the {NOISE_MARGIN:.0%} noise margin; "
                            f"{ens.get('classifier_choice')} chose otherwise (rerun on an idle host, or deploy it "
                            "with dinov2-triton export --default-variant)")
    host = f" on {host_description(machine)}" if machine is not None else ""
    return Recommendation(
        source="export", operating_point=op, rejected=rejected, ranking=ranking, variant=best.key,
        label=best.label, images_per_s=served or inproc, p99_ms=best.server.op_p99_ms or best.in_process.op_p99_ms,
        gate_source=best.gate.source, top1_agreement=best.accuracy.top1_agreement, warnings=warnings,
        reason=f"the dinov2 ensemble (the image endpoint) calls it: {ens.get('classifier_reason')}{host}; "
               f"in this run's measurements: {'; '.join(m for m in measured if m) or 'not measured here'}")


# ----------------------------------------------------------------------------- capacity at the SLO
def _gate_reason(r: VariantRow | None) -> str | None:
    """Why a row may not be recommended (None: it may)."""
    if r is None:
        return "not a variant of the export manifest"
    if r.status == "GATE_FAILED":
        return "gate FAILED: " + ("; ".join(r.gate.failures) or "; ".join(x for x in r.reasons if x))
    if r.status != "OK":
        return f"{r.status}: {'; '.join(x for x in r.reasons if x)}"
    if r.gate.passed is None:
        return "no gate verdict (no parity and no export verification)"
    if not r.gate.passed:
        return "gate FAILED: " + "; ".join(r.gate.failures)
    return None


def describe_config(c) -> str:
    """A dinov2_triton.bench.capacity_records.ServingConfig in words."""
    pbs = ",".join(str(b) for b in c.preferred_batch_sizes if b <= c.max_batch_size) or "none"
    thr = f", {c.threads} intra-op threads" if c.threads is not None else ""
    queue = (", queue policy REMOVED (no server-side load shedding: under overload requests queue without bound)"
             if c.queue_policy is False else "")
    return (f"{c.instances} instance(s){thr}, max_queue_delay {c.max_queue_delay_us} us, preferred batch "
            f"sizes {pbs}, max_batch_size {c.max_batch_size}{queue}")


def recommend_capacity(results: PerfResults, rows: Sequence[VariantRow], op: OperatingPoint
                       ) -> Recommendation | None:
    """The recommendation by capacity at the SLO: the search's winner (with its
    configuration), else the gated variant with the highest capacity of a
    capacity run (mean over its measurements, served configuration); None
    when neither ran. A variant whose gates do not pass is never recommended."""
    by_key = {r.key: r for r in rows if r.kind == "variant"}
    search, run = results.search, results.capacity
    if search is not None:
        slo = search.settings.capacity.slo_p99_ms
        rejected = [Rejected(variant=x.variant, reason=x.reason) for x in search.excluded]
        win = next((p for p in search.points if p.key == search.winner), None)
        why = _gate_reason(by_key.get(win.model)) if win is not None else None
        if win is None or why:
            if win is not None:
                rejected.append(Rejected(variant=win.model, reason=why))
            return Recommendation(source="search", operating_point=op, rejected=rejected, slo_p99_ms=slo,
                                  reason="no configuration of a variant that passes its gates met the SLO and "
                                         "the constraints")
        cap = search.comparison.winner if search.comparison is not None else win.capacity
        r = by_key[win.model]
        agree = r.accuracy.top1_agreement
        where = ("re-measured after the search, same run" if search.comparison is not None else "the search")
        ratio = (f"; {search.comparison.ratio:.2f}x the exported default configuration's "
                 f"{search.comparison.default.capacity_img_s:.1f} img/s"
                 if search.comparison is not None and search.comparison.ratio else "")
        return Recommendation(
            source="search", operating_point=op, rejected=rejected, variant=r.key, label=r.label,
            configuration=win.config, capacity_img_s=cap.capacity_img_s, images_per_s=cap.capacity_img_s,
            p99_ms=cap.p99_at_capacity_ms, slo_p99_ms=slo, top1_agreement=agree, gate_source=r.gate.source,
            reason=f"deploy variant {r.key} with configuration {describe_config(win.config)}: capacity "
                   f"{cap.capacity_img_s:.1f} img/s at p99 <= {slo:g} ms ({where}{ratio}), top-1 agreement "
                   + (f"{agree:.2%}" if agree is not None else "not measured") + f" ({r.gate.source})")
    if run is None or not run.results:
        return None
    slo = run.settings.slo_p99_ms
    means: dict[str, list[float]] = {}
    for c in run.results:
        means.setdefault(c.model, []).append(c.capacity_img_s or 0.0)
    rejected, considered = [], []
    for model, caps in means.items():
        if model not in by_key:
            continue    # the ensemble and the preprocessing model are measured, not deployed alone
        why = _gate_reason(by_key[model]) or (None if min(caps) > 0 else f"no rate met p99 <= {slo:g} ms")
        if why:
            rejected.append(Rejected(variant=model, reason=why))
        else:
            considered.append((sum(caps) / len(caps), by_key[model]))
    considered.sort(key=lambda t: -t[0])
    if not considered:
        return Recommendation(source="capacity", operating_point=op, rejected=rejected, slo_p99_ms=slo,
                              reason=f"no variant that passes its gates met p99 <= {slo:g} ms")
    best_cap, r = considered[0]
    agree = r.accuracy.top1_agreement
    nxt = (f", {best_cap / considered[1][0]:.2f}x the next gated variant {considered[1][1].key}"
           if len(considered) > 1 and considered[1][0] else "")
    return Recommendation(
        source="capacity", operating_point=op, rejected=rejected, variant=r.key, label=r.label,
        ranking=[Ranked(variant=x.key, images_per_s=c) for c, x in considered], capacity_img_s=best_cap,
        images_per_s=best_cap, slo_p99_ms=slo, top1_agreement=agree, gate_source=r.gate.source,
        warnings=list(r.slower_than_parent),
        reason=f"deploy variant {r.key} with its served configuration: capacity {best_cap:.1f} img/s at p99 <= "
               f"{slo:g} ms (mean of {len(means[r.key])} measurement(s){nxt}), top-1 agreement "
               + (f"{agree:.2%}" if agree is not None else "not measured") + f" ({r.gate.source})")


def choose_recommendation(results: PerfResults, rows: Sequence[VariantRow], op: OperatingPoint) -> Recommendation:
    """What the report recommends: what the `dinov2` ensemble serves when the
    export chose it (a capacity or search recommendation of that same variant
    takes its place, with its configuration; one of another variant becomes a
    warning); else the capacity recommendation, else the fastest at ``op``."""
    deployed = recommend_deployed(results, rows, op, machine=results.machine)
    capacity = recommend_capacity(results, rows, op)
    if deployed is None:
        return capacity or recommend(rows, op, machine=results.machine)
    if capacity is None or not capacity.variant:
        return deployed
    if capacity.variant == deployed.variant:
        return capacity.model_copy(update={"warnings": [*capacity.warnings, *deployed.warnings],
                                           "reason": f"{capacity.reason}; {deployed.reason}"})
    return deployed.model_copy(update={"warnings": [*deployed.warnings, (
        f"by capacity at the SLO ({capacity.source}), {capacity.variant} ranked first: {capacity.reason}")]})
