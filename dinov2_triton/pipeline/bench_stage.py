"""The perf stage: measure every variant and write one report.

    dinov2-triton bench --url localhost:8001 --http-url localhost:8000 \\
        --repository ./model_repository --model-path ./models/model_final.pth --data-path ./data \\
        --models all --protocols grpc,http --concurrency 1,2,4 --batch-sizes 1,8 --window-ms 10000 \\
        --out reports

Steps (each can be turned off):
1. in-process benchmark of the eager model and every exported variant
   (dinov2_triton.bench.inprocess; each variant in a fresh process);
2. perf_analyzer sweep against the server (dinov2_triton.bench.perf_analyzer): every served
   variant, the ensemble and the preprocessing model, real test-split inputs,
   the server's own shapes and max_batch_size, client and server-side
   breakdown; the server's memory is sampled meanwhile; with --deploy-fastest
   the classifiers first, then the dinov2 ensemble pointed at the fastest
   gated one served (:func:`follow_fastest`), then the ensemble;
   with --capacity, then every served model's capacity at --slo-p99-ms under
   open-loop Poisson load (dinov2_triton.bench.capacity), --capacity-repeats times;
3. live-endpoint parity of every served classifier with the eager FP32
   reference, gated per precision (dinov2_triton.qa.parity.run_parity);
   with --overload (a loopback server only), then the overload check
   (dinov2_triton.qa.overload): a bounded burst above the measured capacity
   against the ensemble and its classifier: shed? p99 <= the served queue
   timeout + one batch? the same logits afterwards?
4. the report: reports/<run-id>/{report.md, report.html, results.json,
   perf_analyzer/csv/*.csv, *.png} (dinov2_triton.report.report).

Without --url only steps 1 and 4 run. A remote server works the same way:
give its addresses (--url, --http-url, --metrics-url) and, when its
repository index needs an API key or is not reachable, the model names
(--models a,b). Memory of a remote server comes from its metrics endpoint
only (no process to look at).

results.json is one dinov2_triton.bench.results.PerfResults record (schema_version 5;
written by dinov2_triton.bench.results.write_results, read by dinov2_triton.bench.results.read_results):
run_id, created, finished, git_revision, machine, versions, settings (the
flags), model (the checkpoint, ``pretrained`` included), flops, matmul_peak,
operating_point, in_process (dinov2_triton.bench.inprocess), perf_analyzer (the sweep),
server (addresses, metadata, memory), parity (dinov2_triton.qa.parity.run_parity),
export (the manifest's verdicts), capacity (with --capacity: dinov2_triton.bench.capacity,
capacity at --slo-p99-ms under open-loop Poisson load), overload (with --overload:
dinov2_triton.qa.overload), skipped, errors, and the rows and
recommendation dinov2_triton.report.report derives (dinov2_triton.report.ranking).

Exit codes: 0 done; 1 the report was written but something failed (a sweep
point, parity, a variant's benchmark); 2 bad input (flags, files).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from dinov2_triton.bench.results import PerfResults
    from dinov2_triton.report.report import Report

from dinov2_triton.bench.targets import (
    LOCAL_HOSTS,
    candidate_models,
    checkpoint_model_info,
    default_metrics_url,
    export_summary,
    host_port,
    manifest_model_info,
    server_metadata,
)
from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, PREPROCESS_MODEL

log = logging.getLogger("dinov2_triton.pipeline.bench_stage")


class PerfInputError(ValueError):
    """Bad flags or files (CLI exit 2)."""


def parse_ints(text: str | Sequence[int], flag: str) -> list[int]:
    from dinov2_triton.bench.inprocess import parse_int_list

    try:
        return parse_int_list(text, flag)
    except ValueError as exc:
        raise PerfInputError(str(exc)) from None


def parse_names(text: str | Sequence[str] | None) -> list[str] | None:
    if text is None or text == "all" or text == ["all"]:
        return None
    items = [text] if isinstance(text, str) else list(text)
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def _ready_models(url: str, protocol: str, candidates: Sequence[str] | None, api_key: str | None) -> list[str]:
    """READY models among ``candidates`` (or, without candidates, of the
    repository index, which needs the API key on the local server)."""
    from dinov2_triton.serve.triton_access import TritonError, connect

    try:
        with connect(url, protocol, api_key=api_key, timeout_s=30.0) as conn:
            return conn.ready_models(candidates)
    except TritonError as exc:
        raise PerfInputError(f"cannot list the ready models over {protocol} at {url}: {exc}; or pass the "
                             f"model names (--models a,b) or --repository") from None


def run_perf(*, model_path: str | os.PathLike | None, repository: str | os.PathLike | None = None,
             data_path: str | os.PathLike | None = None, url: str | None = None, http_url: str | None = None,
             metrics_url: str | None = None, models: Sequence[str] | str | None = None,
             protocols: Sequence[str] | None = None, concurrency: Sequence[int] = (1, 2, 4),
             batch_sizes: Sequence[int] = (1, 8), settings: Any = None, keep_going: bool = False,
             n_samples: int = 32, threads: Sequence[int] = (1, 2, 4), seconds: float = 5.0, warmup: int = 10,
             variants: Sequence[str] | None = None, torch_threads: int | None = None, isolate: bool = True,
             in_process: bool = True, parity: bool = True, parity_max_images: int | None = None,
             gates: Sequence[str] | None = None, api_key: str | None = None,
             server_pid: int | None = None, operating_point: Mapping[str, Any] | None = None,
             out: str | os.PathLike = "reports", run_id: str | None = None,
             cli_settings: Mapping[str, Any] | None = None, capacity: Mapping[str, Any] | None = None,
             capacity_repeats: int = 1, overload: Mapping[str, Any] | None = None,
             deploy_fastest: bool = False, progress: Callable[[str], None] | None = None) -> "PerfRun":
    """Run the perf stage and write the report (reports/<run-id>/...).
    ``capacity``: dinov2_triton.bench.capacity.capacity_settings fields (``slo_p99_ms`` at
    least): also measure every served model's capacity at that p99 under
    open-loop load, ``capacity_repeats`` times. ``overload``:
    dinov2_triton.bench.overload_records.OverloadSettings fields: last, the overload check
    (dinov2_triton.qa.overload; a strict one's problems are errors). ``deploy_fastest``
    (``repository`` the served one): the classifiers are swept first, the `dinov2`
    ensemble is pointed at the fastest of them that passed its gate
    (:func:`follow_fastest`), then the ensemble is swept. Raises PerfInputError
    for bad input (flags, files)."""
    from dinov2_triton.bench.inprocess import BenchmarkInputError, run_inprocess_benchmark
    from dinov2_triton.bench.input_data import load_samples
    from dinov2_triton.bench.memory import MemorySampler, find_listening_pid
    from dinov2_triton.bench.perf_analyzer import (
        MeasurementSettings,
        PerfAnalyzerError,
        perf_analyzer_version,
        run_sweep,
    )
    from dinov2_triton.bench.results import RESULTS_FILE, PerfResults
    from dinov2_triton.bench.system_info import machine_info, versions
    from dinov2_triton.core.artifact_io import git_revision, new_run_id, utc_now
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.report.report import generate_report

    say = progress or (lambda m: log.info(m))
    model_path = Path(model_path) if model_path else None
    if model_path is not None and not model_path.is_file():
        raise PerfInputError(f"--model-path {model_path}: file not found")
    if data_path is not None and not Path(data_path).is_dir():
        raise PerfInputError(f"--data-path {data_path}: not a folder (run dinov2-triton data first)")
    if repository is not None and not Path(repository).is_dir():
        if url is None:
            raise PerfInputError(f"--repository {repository}: not a folder (run dinov2-triton export first)")
        repository = None  # a remote server: the repository is not needed
    if deploy_fastest and (repository is None or url is None):
        raise PerfInputError("--deploy-fastest needs --url and --repository (the folder that server reads)")
    if in_process and model_path is None:
        raise PerfInputError("--model-path is needed for the in-process benchmark (or pass --no-in-process)")
    if url is None and not in_process:
        raise PerfInputError("nothing to do: no --url (server) and --no-in-process")
    protocols = list(protocols or (["grpc", "http"] if http_url else ["grpc"]))
    for p in protocols:
        if p not in ("grpc", "http"):
            raise PerfInputError(f"--protocols {p!r}: choose grpc and/or http")
    if "http" in protocols and not http_url and url:
        raise PerfInputError("--protocols includes http: give the server's HTTP address with --http-url host:8000")
    settings = settings or MeasurementSettings()
    overload_settings = parse_overload_settings(overload) if overload is not None else None
    if overload_settings is not None and not (http_url if overload_settings.protocol == "http" else url):
        raise PerfInputError(f"--overload over {overload_settings.protocol} needs the server's "
                             f"{'--http-url' if overload_settings.protocol == 'http' else '--url'}")

    run_id = run_id or new_run_id()
    out_dir = Path(out) / run_id
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PerfInputError(f"--out {out_dir}: already exists and is not empty (choose another --run-id)")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema_version": PerfResults.SCHEMA_VERSION, "run_id": run_id, "created": utc_now(),
        "git_revision": git_revision(), "machine": machine_info(),
        "versions": versions({"perf_analyzer": perf_analyzer_version() or "not found"} if url else None),
        "settings": dict(cli_settings or {}), "operating_point": dict(operating_point or {}),
        "skipped": [], "errors": []}
    try:  # the one reader of export_manifest.json (names the file and the field)
        manifest = read_export_manifest(repository, missing_ok=True) if repository else None
    except ValueError as exc:
        raise PerfInputError(str(exc)) from None
    results["export"] = export_summary(manifest)
    if manifest is None and repository:
        results["skipped"].append({"what": "export manifest",
                                   "reason": f"{Path(repository) / 'export_manifest.json'} not found"})
    if model_path is not None:
        try:
            results["model"] = checkpoint_model_info(model_path)
        except (RecordError, OSError) as exc:
            raise PerfInputError(f"--model-path: {exc}") from None
    elif manifest is not None:
        results["model"] = manifest_model_info(manifest)

    # 1. in process
    if in_process:
        say("== in-process benchmark")
        try:
            ip = run_inprocess_benchmark(model_path, repository=repository, data_path=data_path,
                                         batch_sizes=batch_sizes, threads=threads, seconds=seconds,
                                         warmup=warmup, variants=variants, n_samples=n_samples,
                                         torch_threads=torch_threads, isolate=isolate, progress=say)
        except BenchmarkInputError as exc:
            raise PerfInputError(str(exc)) from None
        results["in_process"] = ip
        results["model"] = ip.model   # the checkpoint's facts plus what loading it told (embed_dim, metrics)
        results["flops"], results["matmul_peak"] = ip.flops, ip.matmul_peak
        results["skipped"] += ip.skipped
        for name, e in ip.variants.items():
            if e.status == "FAILED":
                results["errors"].append(f"in-process {name}: {e.reason}")
    else:
        results["skipped"].append({"what": "in-process benchmark", "reason": "--no-in-process"})

    # 2. server sweep
    if url:
        urls = {"grpc": url, "http": http_url}
        cfg_proto = protocols[0]
        metrics_url = metrics_url or default_metrics_url(url)
        results["server"] = {"url": url, "http_url": http_url, "metrics_url": metrics_url,
                             "metadata": server_metadata(urls[cfg_proto], cfg_proto, api_key)}
        wanted = parse_names(models)
        try:
            if wanted is None:
                cands = candidate_models(repository, manifest)
                wanted = _ready_models(urls[cfg_proto], cfg_proto, cands, api_key)
                if not wanted:
                    raise PerfInputError(f"no ready models found on {cfg_proto}://{urls[cfg_proto]}"
                                         + (f" among {cands}" if cands else "") + "; pass --models a,b")
        except PerfAnalyzerError as exc:
            raise PerfInputError(str(exc)) from None
        from dinov2_triton.train.preprocessing_source import resolve_preprocessing

        try:  # one order (dinov2_triton.train.preprocessing_source); checkpoint vs repository disagreeing is an error
            pre, _ = resolve_preprocessing(model_path=model_path, repository=repository)
        except ValueError as exc:
            raise PerfInputError(str(exc)) from None
        samples = load_samples(data_path, pre, n=max(n_samples, max(batch_sizes)))
        host, port = host_port(url)
        pid = server_pid or (find_listening_pid(port) if host in LOCAL_HOSTS and port else None)
        say(f"== perf_analyzer sweep: {', '.join(wanted)} ({', '.join(protocols)}; batch {batch_sizes}; "
            f"concurrency {concurrency}; {settings.window_ms} ms windows)")
        # deploy_fastest: the variants first, then the ensemble pointed at the fastest of them, then the
        # ensemble and the preprocessing model (measured calling what they will serve)
        wrappers = [m for m in wanted if m in (ENSEMBLE_MODEL, PREPROCESS_MODEL)] if deploy_fastest else []
        groups = [[m for m in wanted if m not in wrappers], wrappers] if wrappers else [wanted]
        tmp = Path(tempfile.mkdtemp(prefix="perf-input-data-"))
        sampler = MemorySampler(pid=pid, metrics_url=metrics_url, models=wanted)
        try:
            with sampler:
                for i, group in enumerate(groups):
                    if i == 1:
                        results["deployment"] = follow_fastest(results, repository, url, api_key, say)
                        if results["deployment"].get("export") is not None:
                            results["export"] = results["deployment"].pop("export")
                    sweep = run_sweep(
                        urls={p: urls[p] for p in protocols}, models=group, protocols=protocols,
                        concurrency=concurrency, batch_sizes=batch_sizes, settings=settings, samples=samples,
                        out_dir=out_dir / "perf_analyzer", metrics_url=metrics_url, keep_going=keep_going,
                        api_key=api_key, input_dir=tmp, progress=say)
                    results["perf_analyzer"] = merge_sweeps(results.get("perf_analyzer"), sweep)
        except PerfAnalyzerError as exc:
            # the sweep so far (None: it never started)
            results["perf_analyzer"] = merge_sweeps(results.get("perf_analyzer"), exc.partial)
            results["errors"].append(f"perf_analyzer sweep stopped (pass --keep-going to continue past "
                                     f"failures): {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results["server"]["memory"] = sampler.result()
        if pid is None:
            results["skipped"].append({"what": "server process memory",
                                       "reason": "server process not visible from here (remote server?): "
                                                 "only the metrics endpoint's numbers are reported"})
        pa = results["perf_analyzer"] or {}
        results["skipped"] += pa.get("skipped", [])
        for f in pa.get("failures", []):
            if keep_going:
                results["errors"].append(f"perf_analyzer: {f['reason']}")

        # 2b. capacity at the SLO, open loop (dinov2_triton.bench.capacity)
        if capacity:
            results["capacity"] = _capacity_run(url, wanted, samples, capacity, capacity_repeats, out_dir,
                                                api_key, results["perf_analyzer"], say)
            results["errors"] += list(results["capacity"].failures)

        # 3. parity
        if not parity:
            results["skipped"].append({"what": "live parity", "reason": "--no-parity"})
        elif data_path is None or model_path is None:
            results["skipped"].append({"what": "live parity",
                                       "reason": "needs --data-path (labelled test images) and --model-path "
                                                 "(the FP32 reference)"})
        else:
            try:
                from dinov2_triton.qa.parity import ParityInputError, run_parity
            except ImportError as exc:
                results["skipped"].append({"what": "live parity",
                                           "reason": f"dinov2_triton.qa.parity unavailable: {exc}"})
            else:
                say("== live parity through Triton")
                try:
                    results["parity"] = run_parity(
                        url, "grpc", data_path=data_path, model_path=model_path,
                        models=[m for m in wanted if m != PREPROCESS_MODEL], gates=gates,
                        api_key=api_key, max_images=parity_max_images, repository=repository)
                    for v in results["parity"].get("variants", []):
                        if v.get("error"):
                            results["errors"].append(f"parity {v['model']}: {v['error']}")
                except ParityInputError as exc:
                    results["errors"].append(f"parity: {exc}")

        # 3b. overload, last: its burst leaves nothing behind that the other steps would measure
        if overload_settings is not None:
            from dinov2_triton.qa.overload import run_overload_check, strict_errors

            say("== overload check (a bounded burst above capacity)")
            check = run_overload_check(urls[overload_settings.protocol], samples, overload_settings,
                                       sweep=results["perf_analyzer"], api_key=api_key, say=say)
            say(check.summary)
            results["overload"] = check
            results["errors"] += strict_errors(check)
    else:
        results["skipped"].append({"what": "perf_analyzer sweep and live parity",
                                   "reason": "no --url: in-process numbers only"})

    results["finished"] = utc_now()
    record = PerfResults.from_dict(results, source=out_dir / RESULTS_FILE)
    return PerfRun(report=generate_report(record, out_dir), exit_code=1 if record.errors else 0)


def merge_sweeps(first: Mapping[str, Any] | None, second: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Two perf_analyzer sweeps of one run (same settings, other models) as one."""
    if not first or not second:
        return dict(second or first) if (second or first) else None
    out = dict(first)
    out["model_configs"] = {**first.get("model_configs", {}), **second.get("model_configs", {})}
    for key in ("points", "failures", "skipped"):
        out[key] = [*first.get(key, []), *second.get(key, [])]
    return out


def follow_fastest(results: dict[str, Any], repository, url: str, api_key: str | None,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Point the served `dinov2` ensemble at the variant the report will
    recommend: dinov2_triton.report.ranking.recommend over this run's results so far
    (the fastest variant served through Triton at the operating point among
    those that passed their gates; the one function that decides both), as
    a new ensemble version (dinov2_triton.export.serving_models.repoint_ensemble), then
    reloaded on the server. Returns what was decided (results' ``deployment``),
    with ``export``: the manifest's verdicts again when the ensemble moved.
    Nothing moves when nothing was measured or no variant may be chosen."""
    from dinov2_triton.bench.results import PerfResults
    from dinov2_triton.core.artifact_io import utc_now
    from dinov2_triton.export.auto import CHOSEN_SERVED
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.repository import RepositoryError
    from dinov2_triton.export.serving_models import RepointError, repoint_ensemble
    from dinov2_triton.report.ranking import operating_point, recommend, summarize
    from dinov2_triton.serve.rollout import RolloutError, reload_model
    from dinov2_triton.serve.triton_access import TritonError, connect

    record = PerfResults.from_dict({**results, "finished": utc_now()}, source="the bench run so far")
    ens = (record.export.ensemble or {}) if record.export is not None else {}
    before = ens.get("classifier")
    rec = recommend(summarize(record), operating_point(record), machine=record.machine)
    out: dict[str, Any] = {"ensemble": ENSEMBLE_MODEL, "before": before, "after": before, "reason": rec.reason}
    if not rec.variant or rec.source != "server":
        out["reason"] = (f"{ENSEMBLE_MODEL} keeps {before}: no variant was measured through Triton and passed its "
                         f"gate ({rec.reason})")
        say(f"WARNING: {out['reason']}")
        return out
    why = f"fastest gated variant served in the bench run: {rec.reason}"
    ranking = [{"model_name": r.variant, "images_per_s": round(r.images_per_s, 2), "source": "served"}
               for r in rec.ranking]
    try:
        repoint_ensemble(repository, rec.variant, why=why, ranking=ranking, choice=CHOSEN_SERVED)
        if rec.variant != before:
            with connect(url, "grpc", api_key=api_key, timeout_s=300.0) as conn:
                reload_model(conn, ENSEMBLE_MODEL, repository=repository)
    except (RepointError, RepositoryError, RolloutError, TritonError, OSError) as exc:
        out["reason"] = f"{ENSEMBLE_MODEL} keeps {before}: pointing it at {rec.variant} failed: {exc}"
        results["errors"].append(f"deployment: {out['reason']}")
        say(f"ERROR: {out['reason']}")
        return out
    out.update(after=rec.variant, reason=why,
               export=export_summary(read_export_manifest(repository)))
    say(f"== deployment: {ENSEMBLE_MODEL} calls {rec.variant}"
        + (f" (was {before})" if rec.variant != before else " (unchanged)") + f": {rec.reason}")
    return out


def _capacity_run(url: str, models: Sequence[str], samples, capacity: Mapping[str, Any], repeats: int,
                  out_dir: Path, api_key: str | None, sweep: Mapping[str, Any] | None, say):
    """Capacity at the SLO of every served model but the preprocessing model
    (the ensemble included); each starts at half its closed-loop throughput
    of the sweep at the same batch size, when the sweep measured one."""
    from dinov2_triton.bench.capacity import capacity_settings, run_capacity

    try:
        st = capacity_settings(**capacity)
    except ValueError as exc:
        raise PerfInputError(str(exc)) from None
    starts: dict[str, float] = {}
    for p in (sweep or {}).get("points", []):
        thr = (p.get("metrics") or {}).get("throughput_infer_per_s")
        if p.get("batch_size") == st.batch_size and thr:
            starts[p["model"]] = max(starts.get(p["model"], 0.0), 0.5 * thr / st.batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="perf-capacity-input-"))
    try:
        return run_capacity(url=url, models=[m for m in models if m != PREPROCESS_MODEL], samples=samples,
                            settings=st, out_dir=out_dir / "capacity", api_key=api_key, repeats=repeats,
                            start_rates={m: max(r, st.start_rate) for m, r in starts.items()}, input_dir=tmp,
                            progress=say)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_overload_settings(overload: Mapping[str, Any]):
    from pydantic import ValidationError

    from dinov2_triton.bench.overload_records import OverloadSettings
    from dinov2_triton.core.records import format_validation_error

    try:
        return OverloadSettings(**dict(overload))
    except ValidationError as exc:
        raise PerfInputError(format_validation_error(exc, "overload settings")) from None


@dataclass(frozen=True)
class PerfRun:
    """What run_perf did: the report it wrote (with the results record) and the CLI's exit code."""
    report: "Report"
    exit_code: int

    @property
    def results(self) -> "PerfResults":
        return self.report.results


def print_run(run: PerfRun, *, in_process_json: str | os.PathLike | None = None) -> int:
    """The CLI's ending: the summary table, the errors, where the report is;
    optionally the in-process section as its own JSON file. Returns the exit code."""
    from dinov2_triton.report.report import summary_table

    if in_process_json and run.results.in_process is not None:
        from dinov2_triton.core.artifact_io import atomic_write_json

        atomic_write_json(in_process_json, run.results.in_process)
    print(summary_table(run.report.rows, run.report.recommendation))
    for e in run.results.errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"report: {run.report.md}\n        {run.report.html}\n        {run.report.json}")
    return run.exit_code


# ----------------------------------------------------------------------------- CLI
PROG = "dinov2-triton bench"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Perf stage: in-process benchmark, perf_analyzer sweep against a Triton server, live "
                    "parity, and one report (reports/<run-id>/report.md, report.html, results.json).",
        epilog="Remote server: --url host:8001 --http-url host:8000 --metrics-url host:8002/metrics "
               "--models dinov2_onnx,dinov2 (the repository index of a server may need --api-key; the "
               "server's memory then comes from its metrics endpoint only).\n"
               "Exit codes: 0 done, 1 report written but something failed, 2 bad input.")
    req = p.add_argument_group("Required (in-process benchmark and parity)")
    req.add_argument("--model-path", default=None, help="fine-tuned checkpoint (model_final.pth): the FP32 reference")
    srv = p.add_argument_group("Server (omit --url for in-process numbers only)")
    srv.add_argument("--url", default=None, help="gRPC address host:port of a running Triton (e.g. localhost:8001)")
    srv.add_argument("--http-url", default=None, help="HTTP address host:port (e.g. localhost:8000)")
    srv.add_argument("--metrics-url", default=None, help="metrics endpoint (default: <url host>:8002/metrics)")
    srv.add_argument("--models", default="all",
                     help="all (every ready model of --repository / the server) or comma-separated names")
    srv.add_argument("--protocols", default=None,
                     help="grpc,http (default: grpc, plus http when --http-url is given)")
    srv.add_argument("--api-key", default=None, help="API key for restricted server APIs (or $TRITON_API_KEY)")
    srv.add_argument("--api-key-file", default=None, help="file holding the API key (serve writes one)")
    srv.add_argument("--server-pid", type=int, default=None,
                     help="pid of a local tritonserver for its memory (default: found from the port)")
    pa = p.add_argument_group("perf_analyzer sweep")
    pa.add_argument("--concurrency", default="1,2,4", help="comma-separated (default: %(default)s)")
    pa.add_argument("--batch-sizes", default="1,8",
                    help="comma-separated; never above a model's max_batch_size (default: %(default)s)")
    pa.add_argument("--window-ms", type=int, default=10000, help="measurement window (default: %(default)s)")
    pa.add_argument("--stability-pct", type=float, default=20.0, help="stability threshold (default: %(default)s)")
    pa.add_argument("--max-trials", type=int, default=10, help="windows before giving up (default: %(default)s)")
    pa.add_argument("--measurement-mode", choices=("time_windows", "count_windows"), default="time_windows")
    pa.add_argument("--fixed-requests", type=int, default=None,
                    help="smoke mode: N requests in one pass per point, no stability check (not a measurement)")
    pa.add_argument("--point-timeout", type=float, default=None, help="seconds per point (default: derived)")
    pa.add_argument("--no-collect-metrics", action="store_true", help="skip perf_analyzer's server metrics columns")
    pa.add_argument("--keep-going", action="store_true", help="record a failing point and continue")
    pa.add_argument("--samples", type=int, default=32, help="test images used as inputs (default: %(default)s)")
    ip = p.add_argument_group("In-process benchmark")
    ip.add_argument("--repository", default="./model_repository",
                    help="model repository with export_manifest.json (default: %(default)s)")
    ip.add_argument("--data-path", default=None, help="data folder: test-split images as inputs and for parity")
    ip.add_argument("--threads", default="1,2,4", help="client threads sharing one model (default: %(default)s)")
    ip.add_argument("--seconds", type=float, default=5.0, help="seconds per cell (default: %(default)s)")
    ip.add_argument("--warmup", type=int, default=10, help="warm-up calls per batch size (default: %(default)s)")
    ip.add_argument("--variants", default="all", help="all or comma-separated (pytorch = eager)")
    ip.add_argument("--torch-threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ip.add_argument("--no-isolate", action="store_true", help="benchmark all variants in this process")
    ip.add_argument("--no-in-process", action="store_true", help="skip the in-process benchmark")
    ip.add_argument("--in-process-json", default=None, help="also write the in-process part to this file")
    dep = p.add_argument_group("Deployment")
    dep.add_argument("--deploy-fastest", action="store_true",
                     help="measure the classifiers first, point the dinov2 ensemble at the fastest one served that "
                          "passed its gate (a new ensemble version in --repository, the folder the server reads, "
                          "reloaded), then measure the ensemble (what the pipeline does after an auto export)")
    par = p.add_argument_group("Parity")
    par.add_argument("--no-parity", action="store_true", help="skip the live-endpoint parity")
    par.add_argument("--parity-max-images", type=int, default=None, help="limit the test images for parity")
    par.add_argument("--gates", action="append", default=None,
                     help="gate override KEY.FIELD=VALUE, e.g. int8.max_accuracy_drop=0.02 (repeatable)")
    cap = p.add_argument_group("Capacity at a p99 SLO, open loop (dinov2_triton.bench.capacity)")
    cap.add_argument("--capacity", action="store_true",
                     help="also measure every served model's capacity at --slo-p99-ms (Poisson arrivals)")
    cap.add_argument("--slo-p99-ms", type=float, default=None, help="the p99 latency SLO (needed with --capacity)")
    cap.add_argument("--capacity-repeats", type=int, default=1, help="measurements per model (default: %(default)s)")
    cap.add_argument("--capacity-budget-s", type=float, default=180.0, help="per measurement (default: %(default)s)")
    cap.add_argument("--rate-window-ms", type=int, default=3000, help="window per rate (default: %(default)s)")
    cap.add_argument("--rate-precision", type=float, default=0.05, help="bisection stop (default: %(default)s)")
    cap.add_argument("--start-rate", type=float, default=10.0, help="requests/s (default: half the sweep's)")
    cap.add_argument("--max-rate", type=float, default=5000.0, help="requests/s (default: %(default)s)")
    cap.add_argument("--recheck-margin", type=float, default=0.5,
                     help="a rate whose p99 is within a factor 1+M of the SLO is measured again and judged on "
                          "the mean p99 of both; 0: once (default: %(default)s)")
    ov = p.add_argument_group("Overload check, loopback server only (dinov2_triton.qa.overload)")
    ov.add_argument("--overload", action="store_true",
                    help="last, a bounded open-loop burst above the measured capacity against the dinov2 ensemble "
                         "and its classifier: shed? p99 <= queue timeout + one batch? same logits after?")
    ov.add_argument("--overload-factor", type=float, default=3.0, help="x capacity (default: %(default)s)")
    ov.add_argument("--overload-seconds", type=float, default=5.0, help="burst duration (default: %(default)s)")
    ov.add_argument("--overload-max-requests", type=int, default=2000, help="at most (default: %(default)s)")
    ov.add_argument("--overload-protocol", choices=("grpc", "http"), default="grpc", help="default: %(default)s")
    ov.add_argument("--overload-strict", action="store_true",
                    help="a FAIL, or a served config without a queue policy, is an error (exit 1)")
    opx = p.add_argument_group("Operating point (for the recommendation)")
    opx.add_argument("--op-batch-size", type=int, default=None, help="default: the largest batch size")
    opx.add_argument("--op-concurrency", type=int, default=None, help="default: the largest concurrency")
    opx.add_argument("--op-protocol", choices=("grpc", "http"), default=None, help="default: the first protocol")
    opx.add_argument("--max-p99-ms", type=float, default=None, help="latency budget at the operating point")
    out = p.add_argument_group("Output")
    out.add_argument("--out", default="reports", help="reports folder (default: %(default)s)")
    out.add_argument("--run-id", default=None, help="report sub-folder name (default: UTC time + random)")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="no progress lines (default: one line per measurement with an ETA, on stderr)")
    out.add_argument("-v", "--verbose", action="store_true", help="also the library's INFO log lines")
    return p


def _capacity_flags(args) -> dict[str, Any] | None:
    if not args.capacity:
        return None
    if args.slo_p99_ms is None or not args.url:
        raise PerfInputError("--capacity needs --slo-p99-ms and a server (--url)")
    return {"slo_p99_ms": args.slo_p99_ms, "budget_s": args.capacity_budget_s, "window_ms": args.rate_window_ms,
            "precision": args.rate_precision, "start_rate": args.start_rate, "max_rate": args.max_rate,
            "recheck_margin": args.recheck_margin}


def _overload_flags(args) -> dict[str, Any] | None:
    if not args.overload:
        return None
    return {"factor": args.overload_factor, "seconds": args.overload_seconds,
            "max_requests": args.overload_max_requests, "protocol": args.overload_protocol,
            "strict": args.overload_strict}


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from dinov2_triton.bench.perf_analyzer import MeasurementSettings

    try:
        settings = MeasurementSettings(window_ms=args.window_ms, stability_pct=args.stability_pct,
                                       max_trials=args.max_trials, measurement_mode=args.measurement_mode,
                                       collect_metrics=not args.no_collect_metrics, timeout_s=args.point_timeout,
                                       fixed_requests=args.fixed_requests)
        api_key = None
        if args.url:
            from dinov2_triton.serve.triton_access import read_api_key

            api_key = read_api_key(args.api_key, args.api_key_file)
        cli = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
        res = run_perf(
            model_path=args.model_path, repository=args.repository, data_path=args.data_path, url=args.url,
            http_url=args.http_url, metrics_url=args.metrics_url, models=args.models,
            protocols=[x for x in args.protocols.split(",") if x] if args.protocols else None,
            concurrency=parse_ints(args.concurrency, "--concurrency"),
            batch_sizes=parse_ints(args.batch_sizes, "--batch-sizes"),
            settings=settings, keep_going=args.keep_going, n_samples=args.samples,
            threads=parse_ints(args.threads, "--threads"), seconds=args.seconds, warmup=args.warmup,
            variants=parse_names(args.variants), torch_threads=args.torch_threads, isolate=not args.no_isolate,
            in_process=not args.no_in_process, parity=not args.no_parity, capacity_repeats=args.capacity_repeats,
            capacity=_capacity_flags(args), overload=_overload_flags(args), deploy_fastest=args.deploy_fastest,
            parity_max_images=args.parity_max_images, gates=args.gates, api_key=api_key,
            server_pid=args.server_pid,
            operating_point={"batch_size": args.op_batch_size, "concurrency": args.op_concurrency,
                             "protocol": args.op_protocol, "max_p99_ms": args.max_p99_ms},
            out=args.out, run_id=args.run_id, cli_settings=cli,
            progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    except (PerfInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return print_run(res, in_process_json=args.in_process_json)


if __name__ == "__main__":
    sys.exit(main())
