"""The capacity and tune stages: the configuration search, applied, and the
capacity at a p99 SLO of what is served.

``capacity`` (the ``capacity`` recipe; what scripts/capacity.sh did):

1. dinov2_triton.tune.search over capacity.search.variants within its budget,
   the winner measured again against the exported default in the same run,
   then applied (the winner becomes <repository>/<model>/config.pbtxt);
2. the server is stopped and started again from the repository, and what it
   serves is compared with the applied configuration (a difference fails);
3. dinov2_triton.pipeline.bench_stage.run_perf with capacity: open-loop
   (Poisson) capacity at p99 <= slo_p99_ms of capacity.models as served now,
   ``repeats`` measurements each.

Everything lands in <workdir>/reports/capacity-<UTC time>/{search,capacity}/.

``tune`` (in the demo recipe, after bench, before classify): the serving
configuration of the model the ``dinov2`` ensemble calls (after the bench,
the fastest gated variant it served), measured on this host with load
shedding on (:func:`run_tune`):

1. the same search (dinov2_triton.tune.search), by default only its joint
   instances x threads step (``tune.space: full``: the capacity recipe's
   whole space), within ``tune.budget_min``, the queue policy the export
   wrote kept in every candidate; the winner applied (config.pbtxt written
   atomically, loaded);
2. the queue policy's A/B in the winner (dinov2_triton.tune.policy): its
   capacity at the SLO without the policy, then with it (config.pbtxt
   reloaded, what the server reports checked against the file), one after
   the other. Where the policy costs capacity beyond the noise
   (``tune.ab_tolerance``), the next configuration of the search is applied
   and measured the same way (at most ``tune.alternatives`` more);
3. config.pbtxt reloaded once more and compared with what the server
   reports (a difference fails the stage), and every model the ensemble
   calls checked to be served with a queue policy.

4. the overload check (``bench.overload``, dinov2_triton.qa.overload) of the
   deployment as it now serves, when the bench stage ran before it.

The choice and its A/B (dinov2_triton.bench.capacity_records.ServingChoice)
go into the search's results.json and report, and with the overload check
into the bench stage's results and report (``serving``, ``overload``),
written again. Everything lands in <workdir>/reports/tune-<UTC time>/.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinov2_triton.pipeline.stages import (
    Context,
    PipelineInputError,
    StageError,
    StageResult,
    measurement_settings,
    start_local_server,
    stop_local_server,
)

if TYPE_CHECKING:
    from dinov2_triton.serve.local_server import ServerHandle


def run_capacity(ctx: Context) -> str:
    """The configuration search (then apply, restart, compare what is served),
    and the capacity at the SLO of what is served (the former scripts/capacity.sh)."""
    from dinov2_triton.bench.system_info import machine_info
    from dinov2_triton.pipeline.bench_stage import PerfInputError, print_run, run_perf
    from dinov2_triton.tune.session import SearchInputError

    cap, lay = ctx.recipe.capacity, ctx.layout
    m = machine_info()
    ctx.say(f"capacity: CPU {m['cpu_model']}, {m['logical_cores']} cores, flags: "
            f"{', '.join(m['cpu_flags']) or 'none of avx2/avx512/vnni/amx'}; load "
            f"{', '.join(f'{x:.2f}' for x in m['load_average'] or [])}")
    run_dir = lay.reports / f"capacity-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    ctx.say(f"capacity: repository {lay.repository}, SLO p99 <= {cap.slo_p99_ms:g} ms, run {run_dir}")
    notes = []
    if cap.search.enabled:
        notes.append(_search(ctx, run_dir))
    handle = ctx.server
    assert handle is not None
    t0 = time.monotonic()
    ctx.say(f"capacity: {', '.join(cap.models)}, {cap.repeats} measurement(s) each")
    capacity = {"slo_p99_ms": cap.slo_p99_ms, "budget_s": cap.budget_s, "window_ms": cap.rate_window_ms,
                "precision": cap.precision, "start_rate": cap.start_rate, "max_rate": cap.max_rate,
                "recheck_margin": cap.recheck_margin}
    try:
        run = run_perf(model_path=None, repository=lay.repository, data_path=lay.data, url=handle.url_grpc,
                       models=list(cap.models), protocols=["grpc"], concurrency=list(cap.concurrency),
                       batch_sizes=list(cap.batch_sizes), settings=measurement_settings(cap.window_ms),
                       keep_going=True, in_process=False, parity=False, api_key=handle.api_key,
                       server_pid=handle.pid, capacity={k: v for k, v in capacity.items() if v is not None},
                       capacity_repeats=cap.repeats, out=run_dir, run_id="capacity",
                       cli_settings={"pipeline_recipe": ctx.recipe.model_dump(mode="json")}, progress=ctx.say)
    except (PerfInputError, SearchInputError, ValueError) as exc:
        raise PipelineInputError(f"capacity: {exc}") from None
    code = print_run(run)
    ctx.say(f"capacity: capacity part {time.monotonic() - t0:.0f} s")
    if code != 0:
        raise StageError(f"capacity: the report lists errors: {run.report.md}")
    notes.append(f"report {run.report.md}")
    return "; ".join(notes)


def _search(ctx: Context, run_dir: Path) -> str:
    from dinov2_triton.report.report import summary_table
    from dinov2_triton.tune.search import run_search
    from dinov2_triton.tune.session import SearchInputError

    s, cap, lay, handle = ctx.recipe.capacity.search, ctx.recipe.capacity, ctx.layout, ctx.server
    assert handle is not None
    t0 = time.monotonic()
    ctx.say(f"capacity: search over {', '.join(s.variants)} within {s.budget_min:g} min")
    try:
        outcome = run_search(
            url=handle.url_grpc, repository=lay.repository, data_path=lay.data, variants=list(s.variants),
            slo_p99_ms=cap.slo_p99_ms, min_throughput=s.min_throughput, max_memory_mb=s.max_memory_mb,
            strategy=s.strategy, budget_s=s.budget_min * 60, instances=list(s.instances), threads=list(s.threads),
            delays_us=list(s.queue_delays_us), preferred=[list(p) for p in s.preferred],
            max_batch_sizes=list(s.max_batch_sizes), queue_policies=list(s.queue_policies),
            capacity={"budget_s": s.point_budget_s, "precision": s.rate_precision, "start_rate": s.start_rate},
            out=run_dir, run_id="search", apply=s.apply, api_key=handle.api_key, server_pid=handle.pid,
            cli_settings={"pipeline_recipe": ctx.recipe.model_dump(mode="json")}, progress=ctx.say)
    except (SearchInputError, ValueError) as exc:
        raise PipelineInputError(f"capacity search: {exc}") from None
    ctx.say(summary_table(outcome.report.rows, outcome.report.recommendation))
    for e in outcome.results.errors:
        ctx.say(f"error: {e}")
    ctx.say(f"capacity: search part (with the same-run comparison) {time.monotonic() - t0:.0f} s; "
            f"report {outcome.report.md}")
    if outcome.exit_code != 0:
        raise StageError(f"capacity search: exit {outcome.exit_code}: see {outcome.report.md}",
                         code=outcome.exit_code if outcome.exit_code == 130 else 1)
    if not s.apply:
        return f"search {outcome.report.md}"
    applied = outcome.results.search.applied if outcome.results.search else None
    if applied is None:
        raise StageError(f"capacity search applied nothing (no feasible winner): see {outcome.report.md}")
    ctx.say(f"capacity: restart the server from {lay.repository} and compare what it serves with the applied config")
    stop_local_server(ctx)
    start_local_server(ctx)
    diff, line = served_matches_applied(ctx.server, applied)
    ctx.say(f"capacity: {line}")
    if diff:
        raise StageError(f"capacity: after the restart {applied.model} differs from the applied config: "
                         + "; ".join(diff))
    return f"applied {applied.key} to {applied.model}"


def served_matches_applied(handle: "ServerHandle", applied, *, when: str = "after the restart"
                           ) -> tuple[list[str], str]:
    """(differences, one line): what the server serves (restarted, or reloaded) vs the config the search applied."""
    from dinov2_triton.export.triton_config import parse_config
    from dinov2_triton.serve.triton_access import connect
    from dinov2_triton.tune.session import served_mismatch
    from dinov2_triton.tune.space import knobs_of

    cfg = parse_config(Path(applied.path).read_text())
    with connect(handle.url_grpc, "grpc", api_key=handle.api_key) as conn:
        served = conn.model_config(applied.model)
    diff = served_mismatch(served, knobs_of(cfg), cfg)
    run = (served.get("parameters") or {}).get("search_run_id", {}).get("string_value")
    return diff, (f"{when} {applied.model} serves {applied.key} (search_run_id {run}): "
                  + ("matches the applied config" if not diff else "DIFFERS: " + "; ".join(diff)))


# --------------------------------------------------------------------------- tune
def run_tune(ctx: Context) -> str | StageResult:
    """The tune stage (see the module docstring): search, apply, the queue
    policy's A/B, the served config checked against the file."""
    from dinov2_triton.bench.capacity_records import ServingChoice

    t, lay, handle = ctx.recipe.tune, ctx.layout, ctx.server
    assert handle is not None, "the serve stage starts the server first"
    t0 = time.monotonic()
    model, variant, excluded = ensemble_target(ctx)
    if excluded:       # e.g. published with allow_failed_gates: the search measures only gated variants
        msg = f"tune: not run: the dinov2 ensemble calls {model} ({variant}), which may not compete: {excluded}"
        ctx.say(f"WARNING: {msg}")
        ctx.warnings.append(msg)
        return StageResult("tune", "warning", 0.0, f"not run: {variant}: {excluded}")
    run_dir = lay.reports / f"tune-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    ctx.say(f"tune: {model} (the model the dinov2 ensemble calls, variant {variant}), SLO p99 <= "
            f"{t.slo_p99_ms:g} ms, {'instances x threads' if t.space == 'joint' else 'the whole search space'} "
            f"within {t.budget_min:g} min, queue policy kept; run {run_dir}")
    outcome = _tune_search(ctx, run_dir, variant)
    search = outcome.results.search
    search_s = time.monotonic() - t0
    choice = ServingChoice(model=model, variant=variant, slo_p99_ms=t.slo_p99_ms, space=t.space,
                           search_run=str(outcome.run_dir), search_winner=search.winner if search else None,
                           search_s=round(search_s, 1))
    if search is None or search.applied is None:
        msg = (f"tune: the search applied no configuration (no feasible point: {'; '.join(outcome.results.errors)}"
               f"); {model} keeps its exported configuration")
        ctx.say(f"WARNING: {msg}")
        ctx.warnings.append(msg)
        choice.notes.append(msg)
        _finish(ctx, outcome, choice, t0)
        return StageResult("tune", "warning", 0.0, f"no configuration applied; report {outcome.report.md}")
    t1 = time.monotonic()
    _choose(ctx, outcome, choice)
    choice.ab_s = round(time.monotonic() - t1, 1)
    _finish(ctx, outcome, choice, t0)
    ab = choice.ab[-1] if choice.ab else None
    note = (f"{choice.chosen}; queue policy A/B {ab.verdict if ab else 'not measured'}; "
            f"{choice.wall_s / 60:.1f} min; report {outcome.report.md}")
    return note + _into_bench_report(ctx)


def _into_bench_report(ctx: Context) -> str:
    """The tune stage's choice, and the overload check of the deployment as it
    serves now, into this run's bench results and report (written again);
    nothing when the bench stage did not run in this invocation."""
    from dinov2_triton.bench.input_data import load_samples
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.pipeline.bench_stage import parse_overload_settings
    from dinov2_triton.pipeline.stages import overload_settings
    from dinov2_triton.report.report import generate_report

    if ctx.bench_results is None:
        return ""
    lay, handle = ctx.layout, ctx.server
    assert handle is not None
    try:
        record = read_results(ctx.bench_results)
    except RecordError as exc:
        raise StageError(f"tune: {exc}") from None
    update: dict[str, Any] = {"serving": ctx.serving}
    settings = overload_settings(ctx)
    note = ""
    if settings is not None:
        from dinov2_triton.qa.overload import run_overload_check, strict_errors

        st = parse_overload_settings(settings)
        url = handle.url_http if st.protocol == "http" else handle.url_grpc
        samples = load_samples(lay.data, read_export_manifest(lay.repository).preprocessing, n=32)
        ctx.say("== overload check of the deployment as tuned (a bounded burst above capacity)")
        check = run_overload_check(url, samples, st, api_key=handle.api_key, say=ctx.say,
                                   sweep=record.perf_analyzer.model_dump(mode="json") if record.perf_analyzer
                                   else None)
        ctx.say(check.summary)
        update.update(overload=check, errors=[*record.errors, *strict_errors(check)])
        note = f"; overload {'PASS' if check.passed else 'FAIL' if check.passed is False else 'not judged'}"
        if check.problems:
            ctx.warnings.append(f"overload check: {'; '.join(check.problems)}")
    report = generate_report(record.model_copy(update=update), ctx.bench_results.parent)
    if update.get("errors") and len(update["errors"]) > len(record.errors):
        raise StageError(f"tune: the overload check failed (bench.overload.strict): {report.md}")
    return f"{note}; bench report {report.md} updated"


def ensemble_target(ctx: Context) -> tuple[str, str, str | None]:
    """(model, variant, why it may not compete or None) the served ``dinov2``
    ensemble calls, by what the server reports."""
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, PREPROCESS_MODEL
    from dinov2_triton.serve.triton_access import TritonError, connect
    from dinov2_triton.tune.session import competitors

    handle = ctx.server
    assert handle is not None
    try:
        with connect(handle.url_grpc, "grpc", api_key=handle.api_key) as conn:
            steps = [s["model_name"] for s in
                     (conn.model_config(ENSEMBLE_MODEL).get("ensemble_scheduling") or {}).get("step", [])]
    except TritonError as exc:
        raise StageError(f"tune: {exc}") from None
    called = [m for m in steps if m != PREPROCESS_MODEL]
    if len(called) != 1:
        raise StageError(f"tune: the {ENSEMBLE_MODEL} ensemble calls {steps}: expected {PREPROCESS_MODEL} and "
                         "one classifier")
    try:
        manifest = read_export_manifest(ctx.layout.repository)
    except (OSError, RecordError, ValueError) as exc:
        raise PipelineInputError(f"tune: {exc}") from None
    variant = next((n for n, e in manifest.variants.items() if e.model_name == called[0]), None)
    if variant is None:
        raise PipelineInputError(f"tune: {called[0]} (called by {ENSEMBLE_MODEL}) is not a variant of "
                                 f"{ctx.layout.manifest}")
    _, excluded = competitors(manifest, [variant], called)
    return called[0], variant, excluded[0].reason if excluded else None


def _tune_search(ctx: Context, run_dir: Path, variant: str):
    from dinov2_triton.tune.search import run_search
    from dinov2_triton.tune.session import SearchInputError

    t, lay, handle = ctx.recipe.tune, ctx.layout, ctx.server
    assert handle is not None
    if t.space == "full":       # the capacity recipe's space and strategy, within the tune stage's budget
        s = ctx.recipe.capacity.search
        space: dict[str, Any] = dict(instances=list(s.instances), threads=list(s.threads),
                                     delays_us=list(s.queue_delays_us), preferred=[list(p) for p in s.preferred],
                                     max_batch_sizes=list(s.max_batch_sizes), strategy=s.strategy)
    else:                       # the search's joint step: instances x threads, nothing else
        space = dict(instances=list(t.instances), threads=list(t.threads), delays_us=[], preferred=[],
                     max_batch_sizes=[], strategy="coordinate")
    try:
        outcome = run_search(
            url=handle.url_grpc, repository=lay.repository, data_path=lay.data, variants=[variant],
            slo_p99_ms=t.slo_p99_ms, budget_s=t.budget_min * 60, queue_policies=[], **space,
            capacity={"window_ms": t.rate_window_ms, "budget_s": t.point_budget_s, "precision": t.rate_precision,
                      "start_rate": t.start_rate},
            out=run_dir, run_id="search", apply=True, confirm=False, api_key=handle.api_key,
            server_pid=handle.pid, cli_settings={"pipeline_recipe": ctx.recipe.model_dump(mode="json")},
            progress=ctx.say)
    except (SearchInputError, ValueError) as exc:
        raise PipelineInputError(f"tune: {exc}") from None
    if outcome.exit_code == 130:
        raise KeyboardInterrupt
    return outcome


def _choose(ctx: Context, outcome, choice) -> None:
    """The queue policy's A/B in the applied winner; where the policy costs
    capacity, the next configuration of the search, applied and measured the same way."""
    from dinov2_triton.bench.capacity import CapacityError, capacity_settings, prepare_inputs
    from dinov2_triton.bench.input_data import load_samples
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.triton_config import ConfigError
    from dinov2_triton.serve.triton_access import TritonError
    from dinov2_triton.tune.policy import PolicyError, choose_configuration, measure_policy_ab, reload_from_repository
    from dinov2_triton.tune.search import write_config
    from dinov2_triton.tune.session import load_base
    from dinov2_triton.tune.space import SpaceError, knobs_of, score

    t, lay, handle = ctx.recipe.tune, ctx.layout, ctx.server
    assert handle is not None
    search = outcome.results.search
    model = choice.model
    ranked = sorted((p for p in search.points if p.model == model and score(p) > float("-inf")),
                    key=lambda p: (-score(p), p.index))
    settings = capacity_settings(slo_p99_ms=t.slo_p99_ms, window_ms=t.rate_window_ms, budget_s=t.ab_budget_s,
                                 precision=t.rate_precision, start_rate=t.start_rate)
    try:
        samples = load_samples(lay.data, read_export_manifest(lay.repository).preprocessing, n=32)
        input_data, shapes, _ = prepare_inputs(handle.url_grpc, "grpc", model, samples,
                                               outcome.run_dir / "policy_ab" / "input_data", batch_size=1,
                                               api_key=handle.api_key)
    except (CapacityError, OSError, ValueError) as exc:
        raise StageError(f"tune: inputs for {model}: {exc}") from None

    if not knobs_of(load_base(lay.repository, model)[0]).queue_policy:
        note = (f"{model} has no queue policy (exported with --queue-timeout-ms 0): no load shedding, nothing to "
                "measure with and without it")
        choice.notes.append(note)
        ctx.warnings.append(f"tune: {note}")
        ctx.say(f"WARNING: tune: {note}")
        choice.chosen, choice.config = ranked[0].key, ranked[0].config
        return

    def measure(point, i: int):
        try:
            if i > 0:       # the next configuration: written into config.pbtxt and served from there
                base, path = load_base(lay.repository, model)
                write_config(base, path, point.config, {
                    "search_capacity_img_per_s": f"{point.capacity.capacity_img_s:.1f}",
                    "tune_choice": "the next configuration of the search: the queue policy cost capacity in "
                                   + ", ".join(a.key for a in choice.ab)})
                reload_from_repository(handle.url_grpc, handle.api_key, model, lay.repository)
                ctx.say(f"tune: applied the next configuration {point.key}")
            ab = measure_policy_ab(url=handle.url_grpc, api_key=handle.api_key, repository=lay.repository,
                                   model=model, settings=settings, input_data=input_data, shapes=shapes,
                                   out_dir=outcome.run_dir / "policy_ab" / f"{i + 1}",
                                   search_rps=point.capacity.capacity_rps, tolerance=t.ab_tolerance,
                                   progress=ctx.say)
        except (PolicyError, CapacityError, TritonError, ConfigError, SpaceError, OSError) as exc:
            raise StageError(f"tune: queue policy A/B of {point.key}: {exc}") from None
        choice.ab.append(ab)
        return ab

    chosen, _, notes, free = choose_configuration(ranked, measure, alternatives=t.alternatives,
                                                  say=lambda m: ctx.say(f"tune: {m}"))
    choice.notes += notes
    if not free:
        if choice.ab[-1].key != chosen.key:      # the first (the search's winner) serves again
            try:
                base, path = load_base(lay.repository, model)
                write_config(base, path, chosen.config, {"tune_choice": "the search's winner: the queue policy "
                                                         "cost capacity in every configuration measured"})
                reload_from_repository(handle.url_grpc, handle.api_key, model, lay.repository)
            except (PolicyError, ConfigError, SpaceError, OSError) as exc:
                raise StageError(f"tune: applying {chosen.key} again: {exc}") from None
        ctx.warnings.append(f"tune: {notes[-1]}")
        ctx.say(f"WARNING: tune: {notes[-1]}")
    elif chosen.key != search.winner:
        ctx.say(f"tune: {chosen.key} serves instead of the search's winner {search.winner} (the queue policy cost "
                "capacity there)")
    choice.chosen, choice.config = chosen.key, chosen.config


def _finish(ctx: Context, outcome, choice, t0: float) -> None:
    """Reload config.pbtxt and compare what the server reports with it (a
    difference fails), check that the ensemble's steps shed, and store the
    choice in the search's results and report, and for the bench stage."""
    from dinov2_triton.bench.capacity_records import SearchApplied
    from dinov2_triton.bench.results import RESULTS_FILE, read_results
    from dinov2_triton.export.triton_config import ENSEMBLE_MODEL
    from dinov2_triton.report.report import generate_report
    from dinov2_triton.serve.triton_access import TritonError
    from dinov2_triton.tune.policy import PolicyError, reload_from_repository, steps_shed

    lay, handle, model = ctx.layout, ctx.server, choice.model
    assert handle is not None
    path = lay.repository / model / "config.pbtxt"
    try:
        reload_from_repository(handle.url_grpc, handle.api_key, model, lay.repository)
        diff, line = served_matches_applied(handle, SearchApplied(path=str(path), model=model,
                                                                  key=choice.chosen or "exported"),
                                            when=f"after reloading {path.name}")
        choice.ensemble_steps_shed = steps_shed(handle.url_grpc, handle.api_key, ENSEMBLE_MODEL)
    except (PolicyError, TritonError) as exc:
        raise StageError(f"tune: reloading {path}: {exc}") from None
    choice.applied_path, choice.served_matches, choice.served = str(path), not diff, line
    ctx.say(f"tune: {line}")
    unshed = [m for m, on in choice.ensemble_steps_shed.items() if not on]
    if unshed:
        msg = (f"tune: {', '.join(unshed)} (called by {ENSEMBLE_MODEL}) is served without a queue policy: image "
               "requests are not shed there (exported with --queue-timeout-ms 0?)")
        ctx.warnings.append(msg)
        choice.notes.append(msg)
        ctx.say(f"WARNING: {msg}")
    choice.wall_s = round(time.monotonic() - t0, 1)
    record = read_results(outcome.run_dir / RESULTS_FILE).model_copy(update={"serving": choice})
    generate_report(record, outcome.run_dir)
    ctx.serving = choice
    ctx.say(f"tune: {choice.wall_s:.0f} s in all (search {choice.search_s:.0f} s, queue policy A/B "
            f"{choice.ab_s:.0f} s); report {outcome.report.md}")
    if diff:
        raise StageError(f"tune: {model} as served differs from {path}: " + "; ".join(diff))
