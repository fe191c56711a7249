"""``dinov2-triton tune``: the serving configuration with the most capacity
at a p99 SLO, among the variants that pass their accuracy gates, measured
through the running server.

    dinov2-triton tune --url localhost:8001 --api-key-file logs/triton.api_key \\
        --repository model_repository --data-path data --slo-p99-ms 100 --budget-min 10 [--apply]

* Who competes: the export manifest's variants that are published with
  status OK and a passed gate and are READY on the server. A variant that
  failed its gate is listed as excluded and never measured: it cannot win,
  however fast it is.
* What varies (dinov2_triton.tune.space): instance count, intra-op threads per
  instance, max_queue_delay_microseconds, preferred batch sizes and
  max_batch_size (within what the graph allows), each candidate built from
  the repository's own config.pbtxt and loaded into the running server with
  a config override through the key-protected repository API (no re-export;
  dinov2_triton.tune.session checks that the server applied it).
* Objective: capacity at the SLO (dinov2_triton.bench.capacity). Constraints:
  ``--min-throughput`` (img/s at the SLO), ``--max-memory-mb`` (peak RSS of
  the model's instances; local server only).
* Strategy: the full grid when it has at most ``--grid-limit`` points
  (``--strategy auto``), else coordinate ascent from the exported default,
  within ``--budget-min`` shared among the variants.
* Every point is kept in the run folder (``search/points/<n>.json``);
  Ctrl-C restores the served configs and stops; ``--resume <run folder>``
  measures only what is missing.
* The winner and the exported default configuration are measured again,
  one after the other, in the same run (``comparison.ratio``).
* ``--apply`` writes the winner into ``<repository>/<model>/config.pbtxt``
  atomically (validated by export's checker; the run id and the numbers in
  its ``parameters``) and loads it, so a restarted server, ``dinov2-triton
  serve container`` and the Kubernetes manifests serve what was measured.

The run folder also gets results.json (dinov2_triton.bench.results.PerfResults with the
``search`` section) and report.md/report.html (dinov2_triton.report.report). Exit codes:
0 done, 1 no feasible winner or a failure, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dinov2_triton.tune.session import POINTS_DIR, SETTINGS_FILE, BudgetSpent, SearchInputError, Session, Target

log = logging.getLogger("dinov2_triton.tune.search")
#: grids up to this many points are measured whole (--strategy auto)
GRID_LIMIT = 12
#: the same-run comparison's budget per configuration, in search-point budgets
CONFIRM_BUDGET_FACTOR = 3
STRATEGIES = ("auto", "grid", "coordinate")


@dataclass(frozen=True)
class SearchOutcome:
    run_dir: Path
    results: Any          # dinov2_triton.bench.results.PerfResults
    report: Any           # dinov2_triton.report.report.Report
    exit_code: int


def _read_points(run_dir: Path) -> list:
    from pydantic import ValidationError

    from dinov2_triton.bench.capacity_records import SearchPoint
    from dinov2_triton.core.artifact_io import read_json
    from dinov2_triton.core.records import format_validation_error

    out = []
    for path in sorted((run_dir / POINTS_DIR).glob("*.json")):
        try:
            out.append(SearchPoint.model_validate(read_json(path, what="search point")))
        except ValidationError as exc:
            raise SearchInputError(format_validation_error(exc, str(path))) from None
        except (OSError, ValueError) as exc:
            raise SearchInputError(str(exc)) from None
    return out


def _read_settings(run_dir: Path):
    from pydantic import ValidationError

    from dinov2_triton.bench.capacity_records import SearchSettings
    from dinov2_triton.core.artifact_io import read_json
    from dinov2_triton.core.records import format_validation_error

    path = run_dir / SETTINGS_FILE
    try:
        return SearchSettings.model_validate(read_json(path, what="search settings (dinov2-triton tune writes it)"))
    except ValidationError as exc:
        raise SearchInputError(format_validation_error(exc, str(path))) from None
    except (OSError, ValueError) as exc:
        raise SearchInputError(f"--resume: {exc}") from None


def _planned(settings) -> int:
    """Points the strategy will measure: the grid, or coordinate ascent's first pass."""
    from dinov2_triton.tune.space import first_pass_size, size

    if settings.strategy == "grid":
        return sum(size(s) for s in settings.space.values())
    return sum(first_pass_size(s) for s in settings.space.values())


def _server_pid(url: str, given: int | None) -> int | None:
    from dinov2_triton.bench.memory import find_listening_pid
    from dinov2_triton.bench.targets import LOCAL_HOSTS, host_port

    if given:
        return given
    host, port = host_port(url)
    return find_listening_pid(port) if host in LOCAL_HOSTS and port else None


def run_search(*, url: str, repository: str | Path, data_path: str | Path | None = None,
               variants: Sequence[str] | None = None, slo_p99_ms: float | None = None,
               min_throughput: float | None = None, max_memory_mb: float | None = None,
               strategy: str = "auto", budget_s: float = 600.0, instances: Sequence[int] = (1, 2),
               threads: Sequence[int] = (1, 2), delays_us: Sequence[int] = (0, 2000, 8000),
               preferred: Sequence[Sequence[int]] = (), max_batch_sizes: Sequence[int] = (),
               queue_policies: Sequence[bool] = (), capacity: Mapping[str, Any] | None = None,
               grid_limit: int = GRID_LIMIT,
               out: str | Path = "reports", run_id: str | None = None, resume: str | Path | None = None,
               apply: bool = False, confirm: bool = True, api_key: str | None = None,
               server_pid: int | None = None, n_samples: int = 32, cli_settings: Mapping[str, Any] | None = None,
               progress: Callable[[str], None] | None = None) -> SearchOutcome:
    """Search, confirm, optionally apply, and write results.json + the report."""
    from dinov2_triton.bench.capacity import CapacityError, capacity_settings, prepare_inputs
    from dinov2_triton.bench.capacity_records import SearchRun, SearchSettings
    from dinov2_triton.bench.input_data import load_samples
    from dinov2_triton.core.artifact_io import atomic_write_json, new_run_id
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.triton_config import ConfigError
    from dinov2_triton.serve.triton_access import TritonError, connect
    from dinov2_triton.tune.session import competitors, load_base, version_dir
    from dinov2_triton.tune.space import SpaceError, batch_limit, build_space, size

    say = progress or (lambda m: log.info(m))
    repository = Path(repository)
    if strategy not in STRATEGIES:
        raise SearchInputError(f"--strategy {strategy!r}: choose one of {STRATEGIES}")
    try:
        manifest = read_export_manifest(repository)
    except (OSError, RecordError, ValueError) as exc:
        raise SearchInputError(f"--repository: {exc} (the search needs the export's gate verdicts)") from None
    try:
        with connect(url, "grpc", api_key=api_key, timeout_s=30.0) as conn:
            conn.check_live()
            ready = conn.ready_models([e.model_name for e in manifest.variants.values() if e.model_name])
    except TritonError as exc:
        raise SearchInputError(str(exc)) from None

    if resume:
        run_dir = Path(resume)
        settings = _read_settings(run_dir)
        settings = settings.model_copy(update={"budget_s": float(budget_s)})
        previous = _read_points(run_dir)
        wanted = None
    else:
        if slo_p99_ms is None:
            raise SearchInputError("--slo-p99-ms is required (the latency the capacity is measured at)")
        run_dir = Path(out) / (run_id or new_run_id())
        if run_dir.exists() and any(run_dir.iterdir()):
            raise SearchInputError(f"--out {run_dir}: already exists and is not empty (--resume it, or another "
                                   f"--run-id)")
        settings, previous, wanted = None, [], list(variants) if variants else None
    keep, excluded = competitors(manifest, wanted, ready)
    if settings is not None:      # resumed: the stored search's variants (its exclusions are listed again)
        keep = [(n, e) for n, e in keep if e.model_name in settings.space]
    if not keep:
        raise SearchInputError("no variant may compete: " + "; ".join(f"{x.variant}: {x.reason}" for x in excluded))
    targets: list[Target] = []
    spaces: dict[str, dict[str, list[Any]]] = {}
    for name, entry in keep:
        base, path = load_base(repository, entry.model_name)
        if settings is not None:
            space = settings.space[entry.model_name]
        else:
            try:
                limit = batch_limit(base, version_dir(repository / entry.model_name, entry.version))
                space = build_space(base, limit=limit, instances=instances, threads=threads, delays_us=delays_us,
                                    preferred=preferred, max_batch_sizes=max_batch_sizes,
                                    queue_policies=queue_policies)
            except SpaceError as exc:
                raise SearchInputError(str(exc)) from None
        spaces[entry.model_name] = space
        targets.append(Target(variant=name, model=entry.model_name, base=base, config_path=path, space=space))
        for p in previous:          # resumed: new points start near the best one measured before
            targets[-1].remember(p)
    if settings is None:
        try:
            cap = capacity_settings(slo_p99_ms=slo_p99_ms, **dict(capacity or {}))
        except ValueError as exc:
            raise SearchInputError(str(exc)) from None
        total = sum(size(s) for s in spaces.values())
        chosen = strategy if strategy != "auto" else ("grid" if total <= grid_limit else "coordinate")
        settings = SearchSettings(strategy=chosen, space=spaces, min_throughput=min_throughput,
                                  max_memory_mb=max_memory_mb, budget_s=float(budget_s),
                                  repository=str(repository), url=url, capacity=cap)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / SETTINGS_FILE, settings.model_dump(mode="json"))
    pid = _server_pid(url, server_pid)
    if settings.max_memory_mb is not None and pid is None:
        raise SearchInputError("--max-memory-mb needs the server's process (a local server on this host, or "
                               "--server-pid)")
    samples = load_samples(data_path, manifest.preprocessing, n=n_samples)
    for t in targets:
        try:
            t.input_data, t.shapes, _ = prepare_inputs(url, settings.capacity.protocol, t.model, samples,
                                                       run_dir / "search" / "input_data",
                                                       batch_size=settings.capacity.batch_size, api_key=api_key)
        except CapacityError as exc:
            raise SearchInputError(str(exc)) from None

    session = Session(url=url, api_key=api_key, settings=settings, run_dir=run_dir, server_pid=pid,
                      planned=_planned(settings), points=previous, progress=say)
    say(f"== search: {', '.join(t.variant for t in targets)}; {settings.strategy}, ~{session.planned} points, "
        f"budget {settings.budget_s / 60:.1f} min ({session.spent_before / 60:.1f} spent before); capacity at "
        f"p99 <= {settings.capacity.slo_p99_ms:g} ms; excluded: "
        + ("; ".join(f"{x.variant} ({x.reason})" for x in excluded) or "none"))
    stopped, errors, applied, comparison = "done", [], None, None
    search_s = None       # the search alone (the comparison and --apply come after)
    try:
        stopped = _search(session, targets)
        search_s = session.elapsed()
        winner = _winner(session)
        if winner is not None and confirm:
            try:
                comparison = _confirm(session, _target(targets, winner.model), winner)
            except (CapacityError, TritonError) as exc:
                errors.append(f"same-run comparison of {winner.key}: {exc}")
        if winner is not None and apply:
            try:
                applied = _apply(session, _target(targets, winner.model), winner, run_dir.name, comparison)
            except (ConfigError, SpaceError, OSError, TritonError) as exc:
                errors.append(f"--apply {winner.key}: {exc} (the repository was not changed)"
                              if not isinstance(exc, TritonError) else f"--apply: written, but loading it: {exc}")
    except KeyboardInterrupt:
        stopped = "interrupted"
        say(f"interrupted: {len(session.points)} points kept in {run_dir / POINTS_DIR}; continue with "
            f"dinov2-triton tune --resume {run_dir} (and the same --url/--repository)")
    finally:
        for t in targets:
            if applied is None or t.model != applied.model:
                session.restore(t)
    winner = _winner(session)
    if winner is None:
        errors.append(f"no configuration met the SLO and the constraints ({len(session.points)} measured)")
    errors += [f"search point {p.key}: {p.error}" for p in session.points.values() if p.error]
    run = SearchRun(settings=settings, points=sorted(session.points.values(), key=lambda p: p.index),
                    excluded=excluded, winner=winner.key if winner else None, comparison=comparison,
                    applied=applied, stopped=stopped, wall_s=round(search_s or session.elapsed(), 1),
                    input_data=samples.describe())
    record, report = _write(run_dir, run, manifest, url, api_key, errors, cli_settings)
    code = 130 if stopped == "interrupted" else (1 if errors else 0)
    return SearchOutcome(run_dir=run_dir, results=record, report=report, exit_code=code)


def _target(targets: Sequence[Target], model: str) -> Target:
    return next(t for t in targets if t.model == model)


def _search(session: Session, targets: Sequence[Target]) -> str:
    """Every target in turn, each with an equal share of the time left."""
    from dinov2_triton.tune.space import coordinate_ascent, grid

    stopped = "done"
    for i, t in enumerate(targets):
        share = session.budget_left() / (len(targets) - i)
        session.deadline = session.clock() + share
        try:
            if session.settings.strategy == "grid":
                for knobs in grid(t.space):
                    session.evaluate(t, knobs)
            else:
                coordinate_ascent(t.space, lambda knobs, t=t: session.evaluate(t, knobs))
        except BudgetSpent:
            stopped = "budget"
            session.say(f"{t.variant}: its share of the budget ({share / 60:.1f} min) is spent")
    session.deadline = float("inf")
    return stopped


def _winner(session: Session):
    from dinov2_triton.tune.space import score

    feasible = [p for p in session.points.values() if score(p) > float("-inf")]
    return max(feasible, key=lambda p: (score(p), -p.index)) if feasible else None


def _confirm(session: Session, target: Target, winner):
    """The exported default and the winner, measured again one after the other."""
    from dinov2_triton.bench.capacity import RateProbe, find_capacity
    from dinov2_triton.bench.capacity_records import SearchComparison
    from dinov2_triton.tune.session import WARM_GROWTH
    from dinov2_triton.tune.space import config_key, knobs_of, with_knobs

    # two configurations only, and their ratio is the search's headline: each gets
    # CONFIRM_BUDGET_FACTOR x a search point's budget so its bisection can close
    cs = session.settings.capacity
    cs = cs.model_copy(update={"budget_s": cs.budget_s * CONFIRM_BUDGET_FACTOR})
    caps = {}
    for label, knobs in (("default", knobs_of(target.base)), ("winner", winner.config)):
        if label == "winner" and knobs == knobs_of(target.base):
            caps["winner"] = caps["default"]
            break
        session.say(f"== same-run comparison: {label} configuration of {target.model}")
        session.load(target.model, with_knobs(target.base, knobs))
        prior = session.points.get(config_key(target.model, knobs))
        start = prior.capacity.capacity_rps if prior is not None and prior.capacity else None
        probe = RateProbe(model=target.model, url=session.url, settings=cs, input_data=target.input_data,
                          shapes=target.shapes, api_key=session.api_key,
                          out_dir=session.run_dir / "search" / "perf_analyzer" / f"confirm-{label}")
        caps[label] = find_capacity(probe, cs, model=target.model, repeat=2, start_rate=start,
                                    growth=WARM_GROWTH if start else None, progress=session.say)
    d, w = caps["default"].capacity_img_s, caps["winner"].capacity_img_s
    ratio = round(w / d, 3) if d and w else None
    cmp = SearchComparison(model=target.model, default=caps["default"], winner=caps["winner"], ratio=ratio)
    open_ = [label for label, _ in cmp.lower_bounds()]
    session.say(f"  => winner {w or 0:.1f} img/s vs exported default {d or 0:.1f} img/s"
                + (f": {ratio:.2f}x" if ratio else "")
                + (f" (the {' and '.join(open_)}'s bisection ran out of budget: a lower bound)" if open_ else ""))
    return cmp


def write_config(base, config_path: Path, knobs, parameters: Mapping[str, str]):
    """``knobs`` on ``base`` (a ModelConfig) with ``parameters`` added, checked
    by export's checker, then written to ``config_path`` atomically (nothing is
    written when the check fails); returns (the config, the path)."""
    from dinov2_triton.core.artifact_io import atomic_write_text
    from dinov2_triton.tune.session import check_config
    from dinov2_triton.tune.space import with_knobs

    cfg = with_knobs(base, knobs)
    for key, value in parameters.items():
        cfg.parameters[key].string_value = value
    text = check_config(cfg, base)         # raises before anything is written
    return cfg, atomic_write_text(config_path, text)


def _apply(session: Session, target: Target, winner, run_id: str, comparison):
    """Write the winner as the model's served config (atomically) and load it."""
    from dinov2_triton.bench.capacity_records import SearchApplied

    cap = comparison.winner if comparison is not None else winner.capacity
    numbers = {"search_run_id": run_id, "search_slo_p99_ms": f"{session.settings.capacity.slo_p99_ms:g}",
               "search_capacity_img_per_s": f"{cap.capacity_img_s:.1f}",
               "search_p99_ms": f"{cap.p99_at_capacity_ms:.1f}" if cap.p99_at_capacity_ms else "",
               "search_points": str(len(session.points))}
    if comparison is not None and comparison.ratio:
        numbers["search_default_capacity_img_per_s"] = f"{comparison.default.capacity_img_s:.1f}"
        numbers["search_ratio_vs_default"] = f"{comparison.ratio:.2f}"
    if winner.config.queue_policy is False:
        numbers["search_queue_policy"] = "removed"
        session.say(f"WARNING: the winner serves {target.model} without the exported default_queue_policy: no "
                    "server-side load shedding, requests queue without bound under overload")
    cfg, path = write_config(target.base, target.config_path, winner.config, numbers)
    session.say(f"applied: {path} now serves {winner.key} (run {run_id})")
    session.load(target.model, cfg)
    return SearchApplied(path=str(path), model=target.model, key=winner.key)


def _write(run_dir: Path, run, manifest, url: str, api_key: str | None, errors: list[str],
           cli_settings: Mapping[str, Any] | None):
    from dinov2_triton.bench.results import RESULTS_FILE, PerfResults
    from dinov2_triton.bench.system_info import machine_info, versions
    from dinov2_triton.bench.targets import export_summary, manifest_model_info, server_metadata
    from dinov2_triton.core.artifact_io import git_revision, utc_now
    from dinov2_triton.report.report import generate_report

    data = {"schema_version": PerfResults.SCHEMA_VERSION, "run_id": run_dir.name, "created": utc_now(),
            "finished": utc_now(), "git_revision": git_revision(), "machine": machine_info(),
            "versions": versions(), "settings": dict(cli_settings or {}),
            "model": manifest_model_info(manifest), "export": export_summary(manifest),
            "server": {"url": url, "metadata": server_metadata(url, "grpc", api_key)},
            "search": run.model_dump(), "errors": errors}
    record = PerfResults.from_dict(data, source=run_dir / RESULTS_FILE)
    report = generate_report(record, run_dir)
    return report.results, report


# ----------------------------------------------------------------------------- CLI
def _ints(text: str | None, flag: str) -> list[int]:
    if text is None or text.strip() == "":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SearchInputError(f"{flag} {text!r}: comma-separated integers") from None


def _switches(text: str | None, flag: str) -> list[bool]:
    words = {"on": True, "off": False}
    parts = [p.strip().lower() for p in (text or "").split(",") if p.strip()]
    if any(p not in words for p in parts):
        raise SearchInputError(f"{flag} {text!r}: use on and/or off, comma-separated")
    return [words[p] for p in parts]


def _preferred(text: str | None) -> list[list[int]]:
    """'none;4,8' -> [[], [4, 8]]"""
    if not text:
        return []
    return [[] if part.strip().lower() == "none" else _ints(part, "--preferred") for part in text.split(";")]


PROG = "dinov2-triton tune"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search the serving configuration with the most capacity at a p99 SLO among the variants "
                    "that pass their accuracy gates, through the running Triton server.",
        epilog="Exit codes: 0 done, 1 no feasible winner or a failure, 2 bad input, 130 interrupted (--resume).")
    srv = p.add_argument_group("Server and repository")
    srv.add_argument("--url", default="localhost:8001", help="gRPC address of the server (default: %(default)s)")
    srv.add_argument("--repository", default="./model_repository", help="with export_manifest.json")
    srv.add_argument("--api-key", default=None, help="the repository API key (or $TRITON_API_KEY)")
    srv.add_argument("--api-key-file", default=None, help="file holding it (serve writes logs/triton.api_key)")
    srv.add_argument("--server-pid", type=int, default=None, help="for memory (default: found from the port)")
    srv.add_argument("--data-path", default=None, help="data folder: test-split images as inputs")
    obj = p.add_argument_group("Objective and constraints")
    obj.add_argument("--slo-p99-ms", type=float, default=None, help="p99 latency the capacity is measured at")
    obj.add_argument("--min-throughput", type=float, default=None, help="img/s at the SLO a config must reach")
    obj.add_argument("--max-memory-mb", type=float, default=None, help="peak RSS of the model's instances")
    sp = p.add_argument_group("Space (each list adds to the exported default's value)")
    sp.add_argument("--variants", default=None, help="comma-separated variant names (default: all that pass)")
    sp.add_argument("--instances", default="1,2", help="instance counts (default: %(default)s)")
    sp.add_argument("--threads", default="1,2", help="intra-op threads per instance (default: %(default)s)")
    sp.add_argument("--queue-delays-us", default="0,2000,8000", help="max_queue_delay_microseconds")
    sp.add_argument("--preferred", default="", help="preferred batch size sets, e.g. 'none;4,8'")
    sp.add_argument("--max-batch-sizes", default="", help="max_batch_size values (within the graph's limit)")
    sp.add_argument("--queue-policies", default="",
                    help="'on,off' also tries each config WITHOUT the exported default_queue_policy: "
                         "lower p99 on Triton 2.51, but no server-side load shedding (default: kept)")
    st = p.add_argument_group("Strategy and budget")
    st.add_argument("--strategy", choices=STRATEGIES, default="auto", help="auto: grid up to --grid-limit points")
    st.add_argument("--grid-limit", type=int, default=GRID_LIMIT, help="(default: %(default)s)")
    st.add_argument("--budget-min", type=float, default=10.0, help="whole search (default: %(default)s)")
    st.add_argument("--resume", default=None, help="a run folder of an interrupted search: measure what is missing")
    st.add_argument("--no-confirm", action="store_true", help="skip re-measuring the winner against the default")
    st.add_argument("--apply", action="store_true", help="write the winner into the repository and load it")
    cap = p.add_argument_group("Capacity measurement (dinov2_triton.bench.capacity)")
    cap.add_argument("--rate-window-ms", type=int, default=3000, help="perf_analyzer window (default: %(default)s)")
    cap.add_argument("--capacity-budget-s", type=float, default=120.0, help="per configuration (default: %(default)s)")
    cap.add_argument("--rate-precision", type=float, default=0.05, help="bisection stop (default: %(default)s)")
    cap.add_argument("--start-rate", type=float, default=10.0, help="first rate, requests/s (default: %(default)s)")
    cap.add_argument("--max-rate", type=float, default=5000.0, help="requests/s (default: %(default)s)")
    cap.add_argument("--recheck-margin", type=float, default=0.5,
                     help="in the same-run comparison, a rate whose p99 is within a factor 1+M of the SLO is "
                          "measured again (search points are measured once) (default: %(default)s)")
    cap.add_argument("--samples", type=int, default=32, help="test images used as inputs (default: %(default)s)")
    out = p.add_argument_group("Output")
    out.add_argument("--out", default="reports", help="reports folder (default: %(default)s)")
    out.add_argument("--run-id", default=None, help="run folder name (default: UTC time + random)")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from dinov2_triton.serve.triton_access import read_api_key

    try:
        space_flags = ("--instances", "--threads", "--queue-delays-us", "--preferred", "--max-batch-sizes",
                       "--queue-policies",
                       "--slo-p99-ms", "--variants", "--strategy")
        given = [f for f in space_flags if any(a == f or a.startswith(f + "=") for a in argv)]
        if args.resume and given:
            raise SearchInputError(f"--resume continues the stored search: drop {', '.join(given)}")
        api_key = read_api_key(args.api_key, args.api_key_file)
        outcome = run_search(
            url=args.url, repository=args.repository, data_path=args.data_path,
            variants=[v for v in (args.variants or "").split(",") if v] or None, slo_p99_ms=args.slo_p99_ms,
            min_throughput=args.min_throughput, max_memory_mb=args.max_memory_mb, strategy=args.strategy,
            budget_s=args.budget_min * 60, instances=_ints(args.instances, "--instances"),
            threads=_ints(args.threads, "--threads"), delays_us=_ints(args.queue_delays_us, "--queue-delays-us"),
            preferred=_preferred(args.preferred), max_batch_sizes=_ints(args.max_batch_sizes, "--max-batch-sizes"),
            queue_policies=_switches(args.queue_policies, "--queue-policies"),
            capacity={"window_ms": args.rate_window_ms, "budget_s": args.capacity_budget_s,
                      "precision": args.rate_precision, "start_rate": args.start_rate, "max_rate": args.max_rate,
                      "recheck_margin": args.recheck_margin},
            grid_limit=args.grid_limit, out=args.out, run_id=args.run_id, resume=args.resume, apply=args.apply,
            confirm=not args.no_confirm, api_key=api_key, server_pid=args.server_pid, n_samples=args.samples,
            cli_settings={k: v for k, v in vars(args).items() if k != "api_key"},
            progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    except (SearchInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from dinov2_triton.report.report import summary_table

    print(summary_table(outcome.report.rows, outcome.report.recommendation))
    for e in outcome.results.errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"report: {outcome.report.md}\n        {outcome.report.html}\n        {outcome.report.json}")
    return outcome.exit_code
