"""The perf stage: measure every variant and write one report.

    python -m perf.run --url localhost:8001 --http-url localhost:8000 \\
        --repository ./model_repository --model_path ./models/model_final.pth --data_path ./data \\
        --models all --protocols grpc,http --concurrency 1,2,4 --batch-sizes 1,8 --window-ms 10000 \\
        --out perf/reports

Steps (each can be turned off):
1. in-process benchmark of the eager model and every exported variant
   (perf.production_benchmarking; each variant in a fresh process);
2. perf_analyzer sweep against the server (perf.perf_analyzer): every served
   variant, the ensemble and the preprocessing model, real test-split inputs,
   the server's own shapes and max_batch_size, client and server-side
   breakdown; the server's memory is sampled meanwhile;
3. live-endpoint parity of every served classifier with the eager FP32
   reference, gated per precision (perf.parity.run_parity);
4. the report: perf/reports/<run-id>/{report.md, report.html, results.json,
   perf_analyzer/csv/*.csv, *.png} (perf.report).

Without --url only steps 1 and 4 run. A remote server works the same way:
give its addresses (--url, --http-url, --metrics-url) and, when its
repository index needs an API key or is not reachable, the model names
(--models a,b). Memory of a remote server comes from its metrics endpoint
only (no process to look at).

results.json (schema_version 1), top level:
  run_id, created, finished, git_revision, machine, versions, settings,
  model {checkpoint, arch, img_size, num_classes, weights_source, pretrained},
  flops, matmul_peak, operating_point {batch_size, concurrency, protocol, max_p99_ms},
  in_process {settings, model, flops, matmul_peak, input_data, variants{name: {..., benchmark
      {latency{bs: percentiles}, grid[{batch_size, threads, images_per_s, p50_ms..p99_ms}]},
      memory, efficiency, bytes_moved}}, skipped},
  perf_analyzer {settings, input_data, model_configs, points[{model, protocol, batch_size,
      concurrency, metrics{throughput_infer_per_s, *_us, ...}, csv, command}], failures, skipped},
  server {url, http_url, metrics_url, metadata, memory}, parity (perf.parity.run_parity's dict),
  export (the manifest's verdicts), skipped[{what, reason}], errors[str],
  rows[...] and recommendation{variant, reason, ...} (derived by perf.report).

Exit codes: 0 done; 1 the report was written but something failed (a sweep
point, parity, a variant's benchmark); 2 bad input (flags, files).
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger("perf.run")

SCHEMA_VERSION = 1
LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]")


class PerfInputError(ValueError):
    """Bad flags or files (CLI exit 2)."""


def _ints(text: str | Sequence[int], flag: str) -> list[int]:
    if isinstance(text, (list, tuple)):
        vals = [int(v) for v in text]
    else:
        try:
            vals = [int(x) for x in str(text).split(",") if x.strip()]
        except ValueError:
            raise PerfInputError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not vals or any(v < 1 for v in vals):
        raise PerfInputError(f"{flag} {text!r}: every value must be >= 1")
    return sorted(dict.fromkeys(vals))


def _names(text: str | Sequence[str] | None) -> list[str] | None:
    if text is None or text == "all" or text == ["all"]:
        return None
    items = [text] if isinstance(text, str) else list(text)
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def _host_port(url: str) -> tuple[str, int | None]:
    u = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = u.rpartition(":")
    try:
        return (host or u), int(port)
    except ValueError:
        return u, None


def default_metrics_url(url: str) -> str:
    host, _ = _host_port(url)
    return f"{host}:8002/metrics"


def run_id_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def candidate_models(repository: str | os.PathLike | None, manifest: Mapping[str, Any] | None) -> list[str] | None:
    """Model names the repository offers: its config.pbtxt folders, plus the
    manifest's published variants, preprocess and ensemble models."""
    names: list[str] = []
    if manifest:
        for e in (manifest.get("variants") or {}).values():
            if e.get("published") and e.get("model_name"):
                names.append(e["model_name"])
        for key in ("preprocess", "ensemble"):
            e = manifest.get(key) or {}
            if e.get("status") == "OK" and e.get("model_name"):
                names.append(e["model_name"])
    if repository and Path(repository).is_dir():
        names += sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))
    return list(dict.fromkeys(names)) or None


def export_summary(manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not manifest:
        return None
    keep = ("model_name", "platform", "precision", "parent", "gate", "status", "reason", "published", "version",
            "size_bytes", "headline", "gate_passed", "gate_failures", "slower_than_parent", "speed")
    return {"run_id": manifest.get("run_id"), "created": manifest.get("created"),
            "weights_source": manifest.get("weights_source"), "img_size": manifest.get("img_size"),
            "eval_set": manifest.get("eval_set"), "reference": manifest.get("reference"),
            "versions": manifest.get("versions"),
            "variants": {n: {k: e.get(k) for k in keep if k in e} for n, e in (manifest.get("variants") or {}).items()},
            "preprocess": manifest.get("preprocess"), "ensemble": manifest.get("ensemble")}


def _model_info(model_path: Path) -> dict[str, Any]:
    from train.model import read_checkpoint

    rec = read_checkpoint(model_path)
    ws = str(rec.get("weights_source") or "unknown")
    return {"checkpoint": str(model_path), "arch": rec.get("arch"), "img_size": rec.get("img_size"),
            "num_classes": rec.get("num_classes"), "class_names": rec.get("class_names"),
            "weights_source": ws, "pretrained": not ws.lower().startswith("random"),
            "preprocessing": rec.get("preprocessing")}


def _server_metadata(url: str, protocol: str, headers: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as g

            md = g.InferenceServerClient(url=url).get_server_metadata(headers=dict(headers or {}), as_json=True)
        else:
            import tritonclient.http as h

            md = h.InferenceServerClient(url=url).get_server_metadata(headers=dict(headers or {}))
        return {"name": md.get("name"), "version": md.get("version"), "extensions": md.get("extensions")}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def run_perf(*, model_path: str | os.PathLike | None, repository: str | os.PathLike | None = None,
             data_path: str | os.PathLike | None = None, url: str | None = None, http_url: str | None = None,
             metrics_url: str | None = None, models: Sequence[str] | str | None = None,
             protocols: Sequence[str] | None = None, concurrency: Sequence[int] = (1, 2, 4),
             batch_sizes: Sequence[int] = (1, 8), settings: Any = None, keep_going: bool = False,
             n_samples: int = 32, threads: Sequence[int] = (1, 2, 4), seconds: float = 5.0, warmup: int = 10,
             variants: Sequence[str] | None = None, torch_threads: int | None = None, isolate: bool = True,
             in_process: bool = True, parity: bool = True, parity_max_images: int | None = None,
             gates: Sequence[str] | None = None, headers: Mapping[str, str] | None = None,
             server_pid: int | None = None, operating_point: Mapping[str, Any] | None = None,
             out: str | os.PathLike = "perf/reports", run_id: str | None = None,
             cli_settings: Mapping[str, Any] | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the perf stage and write the report; returns generate_report()'s
    paths plus "results" and "exit_code". Raises PerfInputError for bad input."""
    from perf.memory import MemorySampler, find_listening_pid
    from perf.perf_analyzer import (MeasurementSettings, PerfAnalyzerError, list_ready_models, load_samples,
                                    perf_analyzer_version, run_sweep)
    from perf.production_benchmarking import BenchmarkInputError, read_export_manifest, run_production_benchmark
    from perf.report import generate_report
    from perf.system_info import machine_info, versions
    from train.checkpoint import git_revision

    say = progress or (lambda m: log.info(m))
    model_path = Path(model_path) if model_path else None
    if model_path is not None and not model_path.is_file():
        raise PerfInputError(f"--model_path {model_path}: file not found")
    if data_path is not None and not Path(data_path).is_dir():
        raise PerfInputError(f"--data_path {data_path}: not a folder (python -m train.load_data first)")
    if repository is not None and not Path(repository).is_dir():
        if url is None:
            raise PerfInputError(f"--repository {repository}: not a folder (python -m export first)")
        repository = None  # a remote server: the repository is not needed
    if in_process and model_path is None:
        raise PerfInputError("--model_path is needed for the in-process benchmark (or pass --no-in-process)")
    if url is None and not in_process:
        raise PerfInputError("nothing to do: no --url (server) and --no-in-process")
    protocols = list(protocols or (["grpc", "http"] if http_url else ["grpc"]))
    for p in protocols:
        if p not in ("grpc", "http"):
            raise PerfInputError(f"--protocols {p!r}: choose grpc and/or http")
    if "http" in protocols and not http_url and url:
        raise PerfInputError("--protocols includes http: give the server's HTTP address with --http-url host:8000")
    settings = settings or MeasurementSettings()

    run_id = run_id or run_id_now()
    out_dir = Path(out) / run_id
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PerfInputError(f"--out {out_dir}: already exists and is not empty (choose another --run-id)")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(), "machine": machine_info(),
        "versions": versions({"perf_analyzer": perf_analyzer_version() or "not found"} if url else None),
        "settings": dict(cli_settings or {}), "operating_point": dict(operating_point or {}),
        "skipped": [], "errors": []}
    manifest = read_export_manifest(repository) if repository else None
    results["export"] = export_summary(manifest)
    if manifest is None and repository:
        results["skipped"].append({"what": "export manifest",
                                   "reason": f"{Path(repository) / 'export_manifest.json'} not found"})
    if model_path is not None:
        results["model"] = _model_info(model_path)
    elif manifest:
        ws = str(manifest.get("weights_source") or "unknown")
        results["model"] = {"checkpoint": (manifest.get("source_checkpoint") or {}).get("path"),
                            "arch": manifest.get("arch"), "img_size": manifest.get("img_size"),
                            "num_classes": manifest.get("num_classes"), "weights_source": ws,
                            "pretrained": not ws.lower().startswith("random"),
                            "preprocessing": manifest.get("preprocessing")}

    # 1. in process
    if in_process:
        say("== in-process benchmark")
        try:
            ip = run_production_benchmark(model_path, repository=repository, data_path=data_path,
                                          batch_sizes=batch_sizes, threads=threads, seconds=seconds,
                                          warmup=warmup, variants=variants, n_samples=n_samples,
                                          torch_threads=torch_threads, isolate=isolate, progress=say)
        except BenchmarkInputError as exc:
            raise PerfInputError(str(exc)) from None
        results["in_process"] = ip
        results["model"] = {**results.get("model", {}), **ip["model"]}
        results["flops"], results["matmul_peak"] = ip["flops"], ip["matmul_peak"]
        results["skipped"] += ip["skipped"]
        for name, e in ip["variants"].items():
            if e.get("status") == "FAILED":
                results["errors"].append(f"in-process {name}: {e.get('reason')}")
    else:
        results["skipped"].append({"what": "in-process benchmark", "reason": "--no-in-process"})

    # 2. server sweep
    if url:
        urls = {"grpc": url, "http": http_url}
        cfg_proto = protocols[0]
        metrics_url = metrics_url or default_metrics_url(url)
        results["server"] = {"url": url, "http_url": http_url, "metrics_url": metrics_url,
                             "metadata": _server_metadata(urls[cfg_proto], cfg_proto, headers)}
        wanted = _names(models)
        try:
            if wanted is None:
                cands = candidate_models(repository, manifest)
                wanted = list_ready_models(urls[cfg_proto], cfg_proto, cands, headers=headers)
                if not wanted:
                    raise PerfInputError(f"no ready models found on {cfg_proto}://{urls[cfg_proto]}"
                                         + (f" among {cands}" if cands else "") + "; pass --models a,b")
        except PerfAnalyzerError as exc:
            raise PerfInputError(str(exc)) from None
        pre = (results.get("model") or {}).get("preprocessing")
        if pre is None:
            raise PerfInputError("the preprocessing record is unknown: pass --model_path or --repository "
                                 "(export_manifest.json)")
        samples = load_samples(data_path, pre, n=max(n_samples, max(batch_sizes)))
        host, port = _host_port(url)
        pid = server_pid or (find_listening_pid(port) if host in LOCAL_HOSTS and port else None)
        say(f"== perf_analyzer sweep: {', '.join(wanted)} ({', '.join(protocols)}; batch {batch_sizes}; "
            f"concurrency {concurrency}; {settings.window_ms} ms windows)")
        tmp = Path(tempfile.mkdtemp(prefix="perf-input-data-"))
        sampler = MemorySampler(pid=pid, metrics_url=metrics_url, models=wanted)
        try:
            with sampler:
                results["perf_analyzer"] = run_sweep(
                    urls={p: urls[p] for p in protocols}, models=wanted, protocols=protocols,
                    concurrency=concurrency, batch_sizes=batch_sizes, settings=settings, samples=samples,
                    out_dir=out_dir / "perf_analyzer", metrics_url=metrics_url, keep_going=keep_going,
                    headers=headers, input_dir=tmp, progress=say)
        except PerfAnalyzerError as exc:
            results["perf_analyzer"] = exc.partial or {"points": [], "failures": [], "skipped": []}
            results["errors"].append(f"perf_analyzer sweep stopped (pass --keep-going to continue past "
                                     f"failures): {exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results["server"]["memory"] = sampler.result()
        if pid is None:
            results["skipped"].append({"what": "server process memory",
                                       "reason": "server process not visible from here (remote server?): "
                                                 "only the metrics endpoint's numbers are reported"})
        pa = results["perf_analyzer"]
        results["skipped"] += pa.get("skipped", [])
        for f in pa.get("failures", []):
            if keep_going:
                results["errors"].append(f"perf_analyzer: {f['reason']}")

        # 3. parity
        if not parity:
            results["skipped"].append({"what": "live parity", "reason": "--no-parity"})
        elif data_path is None or model_path is None:
            results["skipped"].append({"what": "live parity",
                                       "reason": "needs --data_path (labelled test images) and --model_path "
                                                 "(the FP32 reference)"})
        else:
            try:
                from perf.parity import ParityInputError, run_parity
            except ImportError as exc:
                results["skipped"].append({"what": "live parity", "reason": f"perf.parity unavailable: {exc}"})
            else:
                say("== live parity through Triton")
                try:
                    results["parity"] = run_parity(
                        url, "grpc", data_path=data_path, model_path=model_path,
                        models=[m for m in wanted if m not in ("dinov2_preprocess",)], gates=gates,
                        headers=headers, max_images=parity_max_images, repository=repository)
                    for v in results["parity"].get("variants", []):
                        if v.get("error"):
                            results["errors"].append(f"parity {v['model']}: {v['error']}")
                except ParityInputError as exc:
                    results["errors"].append(f"parity: {exc}")
    else:
        results["skipped"].append({"what": "perf_analyzer sweep and live parity",
                                   "reason": "no --url: in-process numbers only"})

    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    paths = generate_report(results, out_dir)
    paths["results"] = results
    paths["exit_code"] = 1 if results["errors"] else 0
    return paths


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perf.run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Perf stage: in-process benchmark, perf_analyzer sweep against a Triton server, live "
                    "parity, and one report (perf/reports/<run-id>/report.md, report.html, results.json).",
        epilog="Remote server: --url host:8001 --http-url host:8000 --metrics-url host:8002/metrics "
               "--models dinov2_onnx,dinov2 (the repository index of a server may need --api-key; the "
               "server's memory then comes from its metrics endpoint only).\n"
               "Exit codes: 0 done, 1 report written but something failed, 2 bad input.")
    req = p.add_argument_group("Required (in-process benchmark and parity)")
    req.add_argument("--model_path", default=None, help="fine-tuned checkpoint (model_final.pth): the FP32 reference")
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
    ip.add_argument("--data_path", default=None, help="data folder: test-split images as inputs and for parity")
    ip.add_argument("--threads", default="1,2,4", help="client threads sharing one model (default: %(default)s)")
    ip.add_argument("--seconds", type=float, default=5.0, help="seconds per cell (default: %(default)s)")
    ip.add_argument("--warmup", type=int, default=10, help="warm-up calls per batch size (default: %(default)s)")
    ip.add_argument("--variants", default="all", help="all or comma-separated (pytorch = eager)")
    ip.add_argument("--torch-threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ip.add_argument("--no-isolate", action="store_true", help="benchmark all variants in this process")
    ip.add_argument("--no-in-process", action="store_true", help="skip the in-process benchmark")
    ip.add_argument("--in-process-json", default=None, help="also write the in-process part to this file")
    par = p.add_argument_group("Parity")
    par.add_argument("--no-parity", action="store_true", help="skip the live-endpoint parity")
    par.add_argument("--parity-max-images", type=int, default=None, help="limit the test images for parity")
    par.add_argument("--gates", action="append", default=None,
                     help="gate override KEY.FIELD=VALUE, e.g. int8.max_accuracy_drop=0.02 (repeatable)")
    opx = p.add_argument_group("Operating point (for the recommendation)")
    opx.add_argument("--op-batch-size", type=int, default=None, help="default: the largest batch size")
    opx.add_argument("--op-concurrency", type=int, default=None, help="default: the largest concurrency")
    opx.add_argument("--op-protocol", choices=("grpc", "http"), default=None, help="default: the first protocol")
    opx.add_argument("--max-p99-ms", type=float, default=None, help="latency budget at the operating point")
    out = p.add_argument_group("Output")
    out.add_argument("--out", default="perf/reports", help="reports folder (default: %(default)s)")
    out.add_argument("--run-id", default=None, help="report sub-folder name (default: UTC time + random)")
    out.add_argument("-v", "--verbose", action="store_true", help="progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from perf.perf_analyzer import MeasurementSettings
    from perf.report import summary_table

    try:
        settings = MeasurementSettings(window_ms=args.window_ms, stability_pct=args.stability_pct,
                                       max_trials=args.max_trials, measurement_mode=args.measurement_mode,
                                       collect_metrics=not args.no_collect_metrics, timeout_s=args.point_timeout,
                                       fixed_requests=args.fixed_requests)
        headers = {}
        if args.url:
            from perf.client import read_api_key

            headers = read_api_key(args.api_key, args.api_key_file)
        cli = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
        res = run_perf(
            model_path=args.model_path, repository=args.repository, data_path=args.data_path, url=args.url,
            http_url=args.http_url, metrics_url=args.metrics_url, models=args.models,
            protocols=[x for x in args.protocols.split(",") if x] if args.protocols else None,
            concurrency=_ints(args.concurrency, "--concurrency"), batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
            settings=settings, keep_going=args.keep_going, n_samples=args.samples,
            threads=_ints(args.threads, "--threads"), seconds=args.seconds, warmup=args.warmup,
            variants=_names(args.variants), torch_threads=args.torch_threads, isolate=not args.no_isolate,
            in_process=not args.no_in_process, parity=not args.no_parity,
            parity_max_images=args.parity_max_images, gates=args.gates, headers=headers,
            server_pid=args.server_pid,
            operating_point={"batch_size": args.op_batch_size, "concurrency": args.op_concurrency,
                             "protocol": args.op_protocol, "max_p99_ms": args.max_p99_ms},
            out=args.out, run_id=args.run_id, cli_settings=cli,
            progress=(lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None)
    except (PerfInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.in_process_json and res["results"].get("in_process"):
        from perf.report import write_json

        write_json(res["results"]["in_process"], Path(args.in_process_json))
    print(summary_table(res["rows"], res["recommendation"]))
    for e in res["results"]["errors"]:
        print(f"error: {e}", file=sys.stderr)
    print(f"report: {res['md']}\n        {res['html']}\n        {res['json']}")
    return res["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
