"""The capacity stage: the configuration search, then the capacity at a p99 SLO
of what is served (what scripts/capacity.sh did; the ``capacity`` recipe).

1. dinov2_triton.tune.search over capacity.search.variants within its budget,
   the winner measured again against the exported default in the same run,
   then applied (the winner becomes <repository>/<model>/config.pbtxt);
2. the server is stopped and started again from the repository, and what it
   serves is compared with the applied configuration (a difference fails);
3. dinov2_triton.pipeline.bench_stage.run_perf with capacity: open-loop
   (Poisson) capacity at p99 <= slo_p99_ms of capacity.models as served now,
   ``repeats`` measurements each.

Everything lands in <workdir>/reports/capacity-<UTC time>/{search,capacity}/.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from dinov2_triton.pipeline.stages import (
    Context,
    PipelineInputError,
    StageError,
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


def served_matches_applied(handle: "ServerHandle", applied) -> tuple[list[str], str]:
    """(differences, one line): what the restarted server serves vs the config the search applied."""
    from dinov2_triton.export.triton_config import parse_config
    from dinov2_triton.serve.triton_access import connect
    from dinov2_triton.tune.session import served_mismatch
    from dinov2_triton.tune.space import knobs_of

    cfg = parse_config(Path(applied.path).read_text())
    with connect(handle.url_grpc, "grpc", api_key=handle.api_key) as conn:
        served = conn.model_config(applied.model)
    diff = served_mismatch(served, knobs_of(cfg), cfg)
    run = (served.get("parameters") or {}).get("search_run_id", {}).get("string_value")
    return diff, (f"after the restart {applied.model} serves {applied.key} (search_run_id {run}): "
                  + ("matches the applied config" if not diff else "DIFFERS: " + "; ".join(diff)))
