"""perf/report.py, perf/ranking.py, perf/plots.py and perf/results.py: the
report generated from a results record built here (the shape dinov2_triton.pipeline.bench_stage
writes), the recommendation rule, the PerfResults reader/writer, the golden
report of a stored results.json, and the CLI that re-generates a report."""
from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

from dinov2_triton.bench.results import GateVerdict, PerfResults, read_results, write_results
from dinov2_triton.core.records import RecordError
from dinov2_triton.report import report as rp
from dinov2_triton.report.ranking import summarize

DATA = Path(__file__).parent / "data"

# img/s per (batch, concurrency): int8 is the fastest but fails its gate,
# fp16 passes but is slower than its parent onnx.
SPEED = {"dinov2_onnx": 20.0, "dinov2_onnx_fp16": 15.0, "dinov2_onnx_int8": 30.0, "dinov2": 12.0}
PARITY = {"dinov2_onnx": (1.0, 0.0, True), "dinov2_onnx_fp16": (1.0, 0.0, True),
          "dinov2_onnx_int8": (0.90, -0.05, False), "dinov2": (1.0, 0.0, True)}


def _grid(base: float, bss=(1, 8), threads=(1, 2)):
    return [{"batch_size": b, "threads": t, "requests": 10, "wall_s": 1.0,
             "images_per_s": base * (1 + 0.1 * b) * (1 + 0.05 * t),
             "requests_per_s": base * (1 + 0.1 * b) * (1 + 0.05 * t) / b, "p50_ms": 10.0 * b / t,
             "p90_ms": 11.0 * b, "p95_ms": 12.0 * b, "p99_ms": 13.0 * b} for b in bss for t in threads]


def _ip_variant(name, model_name, precision, parent, base, *, export_pass=True):
    grid = _grid(base)
    best = max(grid, key=lambda c: c["images_per_s"])
    return {"name": name, "label": name, "precision": precision, "platform": "onnxruntime_onnx", "parent": parent,
            "model_name": model_name, "gate": precision, "artifact": f"/x/{name}", "file_bytes": 4_000_000,
            "status": "OK", "reason": None,
            "export": {"status": "OK" if export_pass else "GATE_FAILED", "gate_passed": export_pass,
                       "gate_failures": [] if export_pass else ["batch 8: top-1 agreement 90% < 99%"],
                       "headline": {"top1_agreement": 1.0 if export_pass else 0.9, "accuracy": 0.8,
                                    "accuracy_drop": 0.0 if export_pass else 0.05, "logits_max_abs_diff": 1e-5}},
            "benchmark": {"latency": {str(c["batch_size"]): {k: v for k, v in c.items() if k != "threads"}
                                      for c in grid if c["threads"] == 1}, "grid": grid,
                          "settings": {"batch_sizes": [1, 8], "threads": [1, 2], "seconds": 5.0, "warmup": 10,
                                       "min_requests": 3}},
            "memory": {"baseline_rss_bytes": 500e6, "after_load_rss_bytes": 520e6, "loaded_model_bytes": 20e6,
                       "peak_rss_bytes": 600e6, "peak_over_baseline_bytes": 100e6},
            "efficiency": {"gflops_per_image": 12.25, "fp32_peak_gflops": 270.0,
                           "best": {"batch_size": best["batch_size"], "threads": best["threads"],
                                    "achieved_gflops": 100.0, "fraction_of_fp32_peak": 0.4},
                           "cells": [], "max_images_per_s_at_fp32_peak": 270.0 / 12.25,
                           **({"caveat": "INT8 vs FP32 peak"} if precision == "int8" else {})},
            "bytes_moved": {"input_bytes_per_image": 602112, "output_bytes_per_image": 3112,
                            "weight_bytes_per_batch": 4_000_000,
                            "per_batch_size": {"8": {"weight_bytes_per_image": 5e5,
                                                     "total_bytes_per_image": 605224 + 5e5, "flops_per_byte": 11.1}}}}


def _point(model, proto, bs, conc, thr):
    return {"model": model, "protocol": proto, "batch_size": bs, "concurrency": conc, "status": "OK",
            "csv": f"{model}.csv", "command": "perf_analyzer ...",
            "metrics": {"concurrency": conc, "throughput_infer_per_s": thr, "client_send_us": 50,
                        "network_server_send_recv_us": 300, "server_queue_us": 400 * conc,
                        "server_compute_input_us": 30, "server_compute_infer_us": 40000 * bs / 8,
                        "server_compute_output_us": 20, "client_recv_us": 5, "p50_latency_us": 45000 * conc,
                        "p90_latency_us": 50000 * conc, "p95_latency_us": 52000 * conc, "p99_latency_us": 60000 * conc}}


def make_results(*, server=True, parity=True, pretrained=False) -> dict:
    ip = {"pytorch": _ip_variant("pytorch", None, "fp32", None, 14.0),
          "onnx": _ip_variant("onnx", "dinov2_onnx", "fp32", "pytorch", 16.0),
          "onnx_fp16": _ip_variant("onnx_fp16", "dinov2_onnx_fp16", "fp16", "onnx", 12.0),
          "onnx_int8": _ip_variant("onnx_int8", "dinov2_onnx_int8", "int8", "onnx", 25.0, export_pass=False),
          "trt_fp16": {"name": "trt_fp16", "label": "TensorRT FP16", "precision": "fp16", "platform": "tensorrt_plan",
                       "parent": "onnx", "model_name": "dinov2_trt_fp16", "gate": "fp16", "artifact": None,
                       "file_bytes": None, "status": "SKIPPED",
                       "reason": "not in the export manifest: TensorRT needs an NVIDIA GPU and TensorRT"}}
    ip["pytorch"]["platform"] = "pytorch_eager"
    ip["pytorch"]["export"] = {}
    model = {"checkpoint": "models/model_final.pth", "arch": "vits14", "img_size": 224, "num_classes": 10,
             "weights_source": "file dinov2_vits14_pretrain.pth" if pretrained else "random init (test)",
             "pretrained": pretrained}
    res = {
        "schema_version": 1, "run_id": "test-run", "created": "2026-11-27T00:00:00+00:00", "git_revision": "abc",
        "machine": {"cpu_model": "Test CPU", "usable_cores": 2, "logical_cores": 2, "memory_total_bytes": 24 * 2**30,
                    "gpus": [], "cpu_flags": ["avx2"], "os": "Linux", "python": "3.11"},
        "versions": {"torch": "2.14.1"}, "settings": {"window_ms": 10000},
        "model": model,
        "in_process": {"settings": {"batch_sizes": [1, 8], "threads": [1, 2], "seconds": 5.0, "warmup": 10,
                                    "torch_threads": 2, "isolated_processes": True, "n_samples": 32,
                                    "repository": "model_repository", "data_path": "data"},
                       "model": dict(model, embed_dim=384),
                       "flops": {"flops": 12_250_000_000, "gflops": 12.25, "image_size": 224, "method": "counter"},
                       "matmul_peak": {"gflops": 270.0, "gflops_median": 260.0, "threads": 2, "size": 2048,
                                       "dtype": "float32", "repeats": 10},
                       "input_data": {"source": "test split", "n": 32, "synthetic": False}, "variants": ip,
                       "skipped": []},
        "skipped": [{"what": "in-process TensorRT FP16", "reason": "needs an NVIDIA GPU and TensorRT"}],
        "errors": [],
    }
    if server:
        pts = [_point(m, proto, bs, c, thr * (1 + 0.2 * bs / 8) * (1 + 0.1 * c))
               for m, thr in SPEED.items() for proto in ("grpc", "http") for bs in (1, 8) for c in (1, 2)]
        res["perf_analyzer"] = {"settings": {"window_ms": 10000, "stability_pct": 20.0, "max_trials": 10,
                                             "measurement_mode": "time_windows", "protocols": ["grpc", "http"],
                                             "batch_sizes": [1, 8], "concurrency": [1, 2]},
                                "input_data": {"source": "test split", "n": 32, "synthetic": False}, "points": pts,
                                "failures": [{"model": "dinov2_preprocess", "reason": "perf_analyzer on model "
                                              "'dinov2_preprocess' ... failed (unstable)"}],
                                "skipped": [], "model_configs": {}}
        res["server"] = {"url": "localhost:8001", "metadata": {"version": "2.51.0"},
                         "memory": {"peak_process_tree": {"pid": 1, "processes": 5, "total_rss_bytes": 2e9,
                                                          "server_rss_bytes": 1e8},
                                    "peak_per_model_rss_bytes": {m: 3e8 for m in SPEED},
                                    "peak_host_used_bytes": 5e9, "peak_gpu_used_bytes": {}, "errors": []}}
    if parity:
        res["parity"] = {"url": "localhost:8001", "protocol": "grpc", "n_images": 100, "split": "test",
                         "reference": {"kind": "eager", "metrics": {"accuracy": 0.8}},
                         "variants": [{"model": m, "precision": "int8" if "int8" in m else "fp32",
                                       "gate": {"name": "int8" if "int8" in m else "fp32"}, "passed": ok,
                                       "failures": [] if ok else ["top-1 agreement 90.0000% < 99.00%"],
                                       "error": None,
                                       "parity": {"n": 100, "top1_agreement": agree,
                                                  "flipped": round((1 - agree) * 100), "deltas": {"accuracy": d},
                                                  "candidate_metrics": {"accuracy": 0.8 + d},
                                                  "logits": {"max_abs_diff": 1e-4},
                                                  "embedding": {"cosine_mean": 0.9999}}}
                                      for m, (agree, d, ok) in PARITY.items()]}
    return res


def _report(res: dict, out):
    return rp.generate_report(PerfResults.from_dict(res, source="make_results()"), out)


def test_report_files_and_recommendation(tmp_path):
    out = _report(make_results(), tmp_path)
    rec = out.recommendation
    # int8 is the fastest through the server but fails its gate: never recommended
    assert rec.variant == "dinov2_onnx" and rec.source == "server"
    assert any(r.variant == "dinov2_onnx_int8" and "gate FAILED" in r.reason for r in rec.rejected)
    assert [r.variant for r in rec.ranking] == ["dinov2_onnx", "dinov2_onnx_fp16"]
    rows = {r.key: r for r in out.rows}
    assert rows["dinov2_onnx_int8"].gate.source == "live parity through Triton"
    slower = rows["dinov2_onnx_fp16"].slower_than_parent
    assert slower and "dinov2_onnx" in slower[0]
    assert not rows["dinov2_onnx"].slower_than_parent
    assert rows["dinov2"].kind == "ensemble" and rows["pytorch"].kind == "baseline"
    assert rows["dinov2_trt_fp16"].status == "SKIPPED"

    md = out.md.read_text()
    assert "Deploy `dinov2_onnx`" in md
    assert "NOT pretrained weights: accuracy numbers are not representative" in md
    assert "SLOWER than its parent dinov2_onnx" in md
    assert "TensorRT needs an NVIDIA GPU" in md
    assert "Server queue" in md and "Test CPU" in md
    for plot in ("throughput_vs_p99.png", "accuracy_vs_throughput.png", "size_memory.png", "latency_breakdown.png"):
        assert (tmp_path / plot).stat().st_size > 1000
        assert f"]({plot})" in md
    page = out.html.read_text()
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)=["'](https?:|//|[^"'#d])""", page), "external asset in report.html"
    assert "NOT pretrained weights" in page and "<table>" in page
    stored = json.loads(out.json.read_text())  # strict JSON
    assert stored["recommendation"]["variant"] == "dinov2_onnx" and len(stored["rows"]) == len(out.rows)
    assert read_results(out.json).recommendation == rec


def test_pretrained_weights_have_no_banner(tmp_path):
    md = _report(make_results(pretrained=True), tmp_path).md.read_text()
    assert "NOT pretrained" not in md and "UNKNOWN whether" not in md


def test_unknown_pretrained_is_said(tmp_path):
    res = make_results()
    res["model"]["pretrained"] = None   # model info from an export manifest that does not record it
    md = _report(res, tmp_path).md.read_text()
    assert "UNKNOWN whether the weights were pretrained" in md and "NOT pretrained" not in md


def test_a_skipped_variant_is_listed_once(tmp_path):
    res = make_results()
    reason = res["in_process"]["variants"]["trt_fp16"]["reason"]
    # what dinov2_triton.pipeline.bench_stage records too
    res["skipped"] = [{"what": "in-process TensorRT FP16", "reason": reason}]
    md = _report(res, tmp_path).md.read_text()
    section = md.split("## Skipped or failed")[1].split("\n## ")[0]
    assert section.count(reason) == 1 and "dinov2_trt_fp16 (SKIPPED)" in section


def test_gate_failing_variants_are_never_recommended(tmp_path):
    res = make_results()
    for v in res["parity"]["variants"]:
        if v["model"] != "dinov2_onnx_int8":
            v["passed"], v["failures"] = False, ["logit cosine 0.9 < 0.999"]
    out = _report(res, tmp_path)
    assert out.recommendation.variant is None
    assert "No variant recommended" in out.md.read_text()


def test_latency_budget_and_operating_point(tmp_path):
    res = make_results()
    res["operating_point"] = {"batch_size": 1, "concurrency": 1, "protocol": "http", "max_p99_ms": 1.0}
    rec = _report(res, tmp_path).recommendation
    assert rec.variant is None and rec.operating_point.protocol == "http"
    assert rec.rejected and all("over the budget" in r.reason or "gate FAILED" in r.reason or "SKIPPED" in r.reason
                                for r in rec.rejected)


def test_in_process_only_uses_the_export_verdicts(tmp_path):
    out = _report(make_results(server=False, parity=False), tmp_path)
    rec = out.recommendation
    # in process: int8 (25 img/s base) is fastest but its export gate failed; onnx beats fp16
    assert rec.source == "in_process" and rec.variant == "dinov2_onnx"
    rows = {r.key: r for r in out.rows}
    assert rows["dinov2_onnx_int8"].gate == GateVerdict(passed=False, failures=["batch 8: top-1 agreement 90% < 99%"],
                                                        source="export verification (in process)", name="int8")
    assert not (tmp_path / "latency_breakdown.png").exists()
    assert (tmp_path / "throughput_vs_p99.png").exists()


def test_cli_regenerates_from_results_json(tmp_path, capsys):
    first = _report(make_results(), tmp_path / "a")
    code = rp.main(["--results", str(first.json), "--out", str(tmp_path / "b"), "--batch-size", "1",
                    "--concurrency", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "recommended: dinov2_onnx" in text and str(tmp_path / "b" / "report.md") in text
    again = read_results(tmp_path / "b" / "results.json")
    assert again.operating_point.batch_size == 1 and again.recommendation.variant == "dinov2_onnx"
    assert again.recommendation.operating_point.concurrency == 1
    assert (tmp_path / "b" / "report.html").is_file()


def test_golden_report_of_a_stored_results_json(tmp_path):
    """tests/data/perf_results_v1_server.json was written by the dinov2_triton.report.report of
    commit 81348c4 (before the record existed) from make_results(), and
    perf_report_v1_server.md is the report.md rendered from it. Reading the
    old file and rendering it again must give the same page, number for
    number. (A deliberate change of the report's text: regenerate the .md
    with generate_report(read_results(that file), ...). Changed since: the
    efficiency column names the peak it divides by (the old file measured
    the FP32 one only), the arithmetic column, and a GATE_FAILED export
    verdict is the row's status.)"""
    out = rp.generate_report(read_results(DATA / "perf_results_v1_server.json"), tmp_path)
    want = (DATA / "perf_report_v1_server.md").read_text()
    got = out.md.read_text()
    assert got == want, "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "golden", "now",
                                                       lineterm="", n=1))


def test_real_in_process_results_json_still_reads(tmp_path):
    """perf_results_v1_inprocess.json: a real `python -m dinov2_triton.pipeline.bench_stage` (in process
    only, tiny model, no server) of commit 81348c4, the old TensorRT
    placeholder entry included."""
    res = read_results(DATA / "perf_results_v1_inprocess.json")
    # schema 1 on disk, read as the current schema (2 and 3 added optional fields; 4 renamed the
    # efficiency's FP32-only fields: a version-3 efficiency was against the FP32 peak; 5 added overload)
    assert res.schema_version == PerfResults.SCHEMA_VERSION == 7 and res.model.pretrained is False
    assert res.in_process.variants["onnx"].benchmark.grid[0].images_per_s > 0
    eff = res.in_process.variants["onnx"].efficiency
    assert eff.arithmetic == "fp32" and eff.peak_gflops == res.in_process.matmul_peak.gflops
    assert 0 < eff.best.fraction_of_peak and list(res.in_process.matmul_peaks) == ["fp32"]
    out = rp.generate_report(res, tmp_path)
    assert out.recommendation.variant == res.recommendation.variant == "dinov2_onnx"
    assert [r.key for r in out.rows] == [r.key for r in res.rows]


def test_results_round_trip_and_strict_json(tmp_path):
    res = PerfResults.from_dict(make_results())
    res.in_process.variants["onnx"].benchmark.grid[0].p99_ms = float("nan")
    path = write_results(tmp_path / "results.json", res)
    assert '"p99_ms": "nan"' in path.read_text()   # strict JSON has no NaN
    back = read_results(path)
    p99 = back.in_process.variants["onnx"].benchmark.grid[0].p99_ms
    assert p99 != p99   # NaN again
    assert back.model_dump(exclude={"in_process"}) == res.model_dump(exclude={"in_process"})
    with pytest.raises(TypeError, match="expected PerfResults"):
        write_results(tmp_path / "x.json", make_results())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("machine"), "field 'machine': missing (required)"),
    (lambda d: d["in_process"]["variants"]["onnx"]["benchmark"]["grid"][0].update(images_per_s="fast"),
     "field 'in_process.variants.onnx.benchmark.grid[0].images_per_s': Input should be a valid number"),
    (lambda d: d["model"].update(pretrained="maybe"), "field 'model.pretrained'"),
    (lambda d: d.update(schema_version=99), "field 'schema_version': 99 is newer than this code reads (7)"),
    (lambda d: d.pop("schema_version"), "field 'schema_version': missing"),
    (lambda d: d.update(surprise=1), "field 'surprise': unknown field"),
])
def test_bad_results_fail_with_one_line_naming_file_and_field(tmp_path, edit, message):
    data = make_results()
    edit(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError) as exc:
        read_results(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_cli_bad_results_file(tmp_path, capsys):
    assert rp.main(["--results", str(tmp_path / "nope.json")]) == 2
    assert f"{tmp_path / 'nope.json'}: no such perf results.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert rp.main(["--results", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON (line 1" in capsys.readouterr().err
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    assert rp.main(["--results", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "x.json: field 'schema_version': missing" in err and "dinov2-triton bench" in err


def test_summarize_does_not_modify_its_input():
    res = PerfResults.from_dict(make_results())
    before = res.model_dump()
    summarize(res)
    assert res.model_dump() == before


def test_export_summary_of_a_real_manifest_with_skipped_variants_validates():
    """The manifest of a real pipeline run (TensorRT variants SKIPPED: no
    headline, no speed) becomes the results' export section without a type
    error (this failed at the end of a 20-minute perf run once)."""
    from dinov2_triton.bench.results import ExportSummary
    from dinov2_triton.bench.targets import export_summary
    from dinov2_triton.export.manifest import read_export_manifest

    manifest = read_export_manifest(Path(__file__).parent / "data" / "export_manifest_pipeline.json")
    assert manifest.variants["trt_fp16"].status == "SKIPPED" and manifest.variants["trt_fp16"].headline is None
    section = ExportSummary.model_validate(export_summary(manifest))
    assert section.variants["trt_fp16"].status == "SKIPPED" and section.variants["trt_fp16"].headline == {}
    assert section.variants["onnx_int8"].headline["top1_agreement"] > 0.9


def test_a_version_2_capacity_run_reads_as_measured_once(tmp_path):
    """Schema 3 added the recheck of marginal verdicts; a version-2 file measured every rate once."""
    data = make_results()
    data["schema_version"] = 2
    data["capacity"] = {"settings": {"slo_p99_ms": 100.0}, "results": []}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    res = read_results(path)
    assert res.schema_version == 7 and res.capacity.settings.recheck_margin == 0.0
    data["schema_version"] = 3
    path.write_text(json.dumps(data))
    assert read_results(path).capacity.settings.recheck_margin == 0.5


# ----------------------------------------------------------------------------- the roofline per arithmetic
def test_each_variant_is_divided_by_the_peak_of_its_own_arithmetic(tmp_path):
    """INT8 against the INT8 (integer GEMM) peak, FP32 against FP32; the
    report names the peak; a value above 100 % gets a neutral note that the
    peak measurement is wrong, never a banner blaming the machine."""
    from dinov2_triton.bench.inprocess import efficiency

    res = make_results(server=False, parity=False)
    fp32 = {"gflops": 270.0, "gflops_median": 260.0, "threads": 2, "size": 2048, "dtype": "float32", "repeats": 9,
            "arithmetic": "fp32", "method": "torch.matmul float32 2048x2048"}
    int8 = {"gflops": 1000.0, "gflops_median": 950.0, "threads": 2, "size": 2048, "dtype": "uint8 x int8 -> int32",
            "repeats": 9, "arithmetic": "int8", "method": "onnxruntime MatMulInteger uint8 x int8 2048x2048"}
    ip = res["in_process"]
    ip["matmul_peaks"] = {"fp32": fp32, "int8": int8}
    ip["peaks_not_measured"] = {"bf16": "this CPU has no BF16 arithmetic (no avx512_bf16 / amx_bf16)"}
    for v in ip["variants"].values():
        if v["status"] == "OK":
            peak = int8 if v["precision"] == "int8" else fp32
            v["arithmetic"] = peak["arithmetic"]
            v["efficiency"] = efficiency(v["benchmark"], 12.25, peak, peak["arithmetic"])
    # an FP32 variant faster than the FP32 peak: the peak measurement is what is wrong
    ip["variants"]["onnx"]["efficiency"] = efficiency({"grid": [{"batch_size": 8, "threads": 2,
                                                                 "images_per_s": 30.0}]}, 12.25, fp32, "fp32")
    res["in_process"]["variants"]["onnx_int8"]["export"].update(
        arithmetic={"arithmetic": "INT8", "unit": "VNNI", "instructions": ["avx512_vnni"],
                    "shares": {"INT8": 0.8, "FP32": 0.2}, "source": "engine: test"})
    out = _report(res, tmp_path)
    rows = {r.key: r for r in out.rows}
    int8_row = rows["dinov2_onnx_int8"]
    best = max(c["images_per_s"] for c in ip["variants"]["onnx_int8"]["benchmark"]["grid"])
    assert int8_row.in_process.efficiency == pytest.approx(best * 12.25 / 1000.0)
    assert int8_row.in_process.efficiency_peak == "INT8" and rows["dinov2_onnx"].in_process.efficiency_peak == "FP32"
    assert int8_row.arithmetic == "INT8 on VNNI (INT8 80%, FP32 20%)"
    assert rows["dinov2_onnx"].in_process.efficiency == pytest.approx(30.0 * 12.25 / 270.0)   # > 100 %
    md = out.md.read_text()
    assert "busier" not in md and "ABOVE the FP32" not in md and "WARNING: dinov2_onnx" not in md
    assert "that peak measurement is wrong, lower than what this engine's kernels reached" in md
    assert "- INT8: 1000.0 GOP/s (onnxruntime MatMulInteger uint8 x int8 2048x2048, 2 threads)" in md
    assert "- FP32: 270.0 GFLOP/s (torch.matmul float32 2048x2048, 2 threads)" in md
    assert "- BF16: not measured (this CPU has no BF16 arithmetic (no avx512_bf16 / amx_bf16))" in md
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "| INT8 on VNNI (INT8 80%, FP32 20%) |" in summary and f"{best * 12.25 / 10:.1f}% INT8 |" in summary
    assert read_results(out.json).in_process.matmul_peaks["int8"].gflops == 1000.0


def test_efficiency_record_names_its_peak():
    from dinov2_triton.bench.inprocess import efficiency

    bench = {"grid": [{"batch_size": 8, "threads": 2, "images_per_s": 20.0}]}
    peak = {"gflops": 490.0, "method": "onnxruntime MatMulInteger"}
    eff = efficiency(bench, 12.25, peak, "int8", shares={"INT8": 0.75, "FP32": 0.25})
    assert eff["arithmetic"] == "int8" and eff["best"]["fraction_of_peak"] == pytest.approx(0.5)
    assert eff["peak_method"] == "onnxruntime MatMulInteger" and eff["max_images_per_s_at_peak"] == 40.0
    assert "mixed precision: INT8 75% of the matrix multiply layers, FP32 25%; divided by the INT8 peak" in eff[
        "caveat"]
    none = efficiency(bench, 12.25, None, "bf16", unavailable="this CPU has no BF16 arithmetic")
    assert none["best"]["fraction_of_peak"] is None
    assert none["caveat"] == "no BF16 peak measured on this host: this CPU has no BF16 arithmetic"
    assert "caveat" not in efficiency(bench, 12.25, {"gflops": 490.0}, "fp32")


# ----------------------------------------------------------------------------- statuses from the manifest
def test_search_report_keeps_the_manifest_statuses(tmp_path, capsys):
    """`dinov2-triton tune --variants onnx_int8` on a repository whose export
    manifest SKIPPED the TensorRT variants: its results, report and printed
    table say SKIPPED with the manifest's reason, never OK."""
    from dinov2_triton.bench.capacity_records import (
        Capacity,
        CapacitySettings,
        SearchPoint,
        SearchRun,
        SearchSettings,
        ServingConfig,
    )
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.tune import search as ps

    manifest = read_export_manifest(DATA / "export_manifest_pipeline.json")
    skipped = {n: e.reason for n, e in manifest.variants.items() if e.status == "SKIPPED"}
    assert set(skipped) == {"trt_fp16", "trt_int8"}
    cfg = ServingConfig(instances=2, threads=1, max_queue_delay_us=0, max_batch_size=8)
    cap = Capacity(model="dinov2_onnx_int8", capacity_rps=40.0, capacity_img_s=40.0, p99_at_capacity_ms=80.0,
                   failed_rps=44.0, knee_rps=30.0, stop="converged", reason="converged", wall_s=60.0)
    run = SearchRun(settings=SearchSettings(strategy="grid", space={"dinov2_onnx_int8": {"instances": [1, 2]}},
                                            budget_s=600.0, repository="model_repository", url="127.0.0.1:1",
                                            capacity=CapacitySettings(slo_p99_ms=100.0)),
                    points=[SearchPoint(index=0, key="dinov2_onnx_int8 i2", model="dinov2_onnx_int8",
                                        variant="onnx_int8", config=cfg, capacity=cap, feasible=True,
                                        measured="2026-12-01T00:00:00+00:00")],
                    winner="dinov2_onnx_int8 i2")
    record, report = ps._write(tmp_path, run, manifest, "127.0.0.1:1", None, [], {"variants": "onnx_int8"})
    rows = {r.key: r for r in report.rows}
    for name, reason in skipped.items():
        row = rows[f"dinov2_{name}"]
        assert row.status == "SKIPPED" and row.reasons == [f"export SKIPPED: {reason}"], row
    assert rows["dinov2_onnx_int8"].status == "OK" and report.recommendation.variant == "dinov2_onnx_int8"
    md = report.md.read_text()
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "| `dinov2_trt_fp16` | fp16 | - | SKIPPED |" in summary
    assert "| `dinov2_trt_int8` | int8 | - | SKIPPED |" in summary
    assert f"dinov2_trt_fp16 (SKIPPED): export SKIPPED: {skipped['trt_fp16']}" in md
    table = rp.summary_table(report.rows, report.recommendation)
    assert [line.split()[1] for line in table.splitlines() if line.startswith("dinov2_trt_")] == ["SKIPPED"] * 2
    assert {r.key: r.status for r in read_results(report.json).rows}["dinov2_trt_int8"] == "SKIPPED"


@pytest.mark.parametrize("status, reason", [("FAILED", "build failed: RuntimeError: boom"),
                                            ("GATE_FAILED", "failed its accuracy gate, not published: top-1 90%")])
def test_bench_report_keeps_failed_and_gate_failed_from_the_manifest(tmp_path, status, reason):
    """The export said FAILED / GATE_FAILED: the bench report's row says it too,
    with the reason, even where its in-process and served numbers exist."""
    res = make_results()
    res["export"] = {"variants": {"onnx_fp16": {"model_name": "dinov2_onnx_fp16", "precision": "fp16",
                                                "status": status, "reason": reason, "published": True}}}
    out = _report(res, tmp_path)
    row = {r.key: r for r in out.rows}["dinov2_onnx_fp16"]
    assert row.status == status and f"export {status}: {reason}" in row.reasons
    assert any(x.variant == "dinov2_onnx_fp16" for x in out.recommendation.rejected)
    assert f"dinov2_onnx_fp16 ({status}): export {status}: {reason}" in out.md.read_text()


def _auto_export(classifier: str, ranking: list[tuple[str, float]]) -> dict:
    """The export summary of an `--variants auto` run whose ensemble calls ``classifier``."""
    return {"ensemble": {"status": "OK", "model_name": "dinov2", "classifier": classifier,
                         "classifier_reason": f"auto: the fastest gated variant measured in this run, {classifier}",
                         "classifier_choice": "fastest gated (auto)",
                         "classifier_ranking": [{"variant": m.removeprefix("dinov2_"), "model_name": m,
                                                 "images_per_s": t, "batch_size": 8} for m, t in ranking]}}


def test_with_auto_the_report_recommends_what_the_ensemble_serves(tmp_path):
    res = make_results()
    # the export chose onnx_fp16 (fastest in ITS in-process benchmark); served, onnx measured faster
    res["export"] = _auto_export("dinov2_onnx_fp16", [("dinov2_onnx_fp16", 40.0), ("dinov2_onnx", 35.0)])
    out = _report(res, tmp_path)
    rec = out.recommendation
    assert rec.source == "export" and rec.variant == "dinov2_onnx_fp16"
    assert [r.variant for r in rec.ranking] == ["dinov2_onnx_fp16", "dinov2_onnx"]
    assert "the dinov2 ensemble (the image endpoint) calls it" in rec.reason
    assert any("served through Triton, dinov2_onnx measured" in w and "beyond the 5% noise margin" in w
               for w in rec.warnings), rec.warnings
    # the gate-failed INT8 is listed as not chosen, never recommended
    assert any(r.variant == "dinov2_onnx_int8" and "gate FAILED" in r.reason for r in rec.rejected)
    md = out.md.read_text()
    assert "Deploy `dinov2_onnx_fp16`" in md and "Chosen by the export (`--variants auto`)" in md
    assert "`dinov2_onnx_fp16` (recommended)" in md and "`dinov2_onnx`" in md

    # the same choice served fastest too: no warning
    res["export"] = _auto_export("dinov2_onnx", [("dinov2_onnx", 40.0), ("dinov2_onnx_fp16", 35.0)])
    rec = _report(res, tmp_path / "b").recommendation
    assert rec.variant == "dinov2_onnx" and not [w for w in rec.warnings if "served through Triton" in w]


def test_named_variants_keep_the_reports_own_ranking(tmp_path):
    res = make_results()
    res["export"] = {"ensemble": {"status": "OK", "classifier": "dinov2_onnx_fp16",
                                  "classifier_choice": "registry preference"}}
    rec = _report(res, tmp_path).recommendation
    assert rec.source == "server" and rec.variant == "dinov2_onnx"


def test_a_failed_operating_point_is_not_replaced_by_another_batch_size(tmp_path):
    """The op point (batch 8) of dinov2_onnx did not stabilise: its batch-1 point at the same
    concurrency is not comparable with the other rows' batch 8, so the row has no served number
    and the variant is not ranked on one; a model whose max_batch_size is below the op batch
    still shows its largest batch."""
    res = make_results()
    pa = res["perf_analyzer"]
    pa["points"] = [p for p in pa["points"] if not (p["model"] == "dinov2_onnx" and p["protocol"] == "grpc"
                                                   and p["batch_size"] == 8 and p["concurrency"] == 2)]
    pa["failures"].append({"model": "dinov2_onnx", "reason": "perf_analyzer on model 'dinov2_onnx' over grpc "
                                                          "(batch 8, concurrency 2) failed (unstable)"})
    pa["model_configs"] = {"dinov2_onnx": {"max_batch_size": 8}, "dinov2_onnx_fp16": {"max_batch_size": 4}}
    pa["points"] = [p for p in pa["points"] if not (p["model"] == "dinov2_onnx_fp16" and p["batch_size"] == 8)]
    out = _report(res, tmp_path)
    rows = {r.key: r for r in out.rows}
    assert rows["dinov2_onnx"].server.op_images_per_s is None
    assert rows["dinov2_onnx_fp16"].server.batch_size == 1 and rows["dinov2_onnx_fp16"].server.op_images_per_s
    rec = out.recommendation
    assert rec.variant != "dinov2_onnx"
    assert any(r.variant == "dinov2_onnx" and "not measured at the operating point" in r.reason for r in rec.rejected)
