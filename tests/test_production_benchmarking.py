"""perf/inprocess.py (in-process benchmark, memory, efficiency), its CLI
perf/production_benchmarking.py, and perf/run.py (the perf stage end to end:
in process only, and against the real local Triton server serving the tiny
exported repository)."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from dinov2_triton.bench import inprocess as pb
from dinov2_triton.pipeline import production_benchmarking


def _sleepy_runner(ms: float = 2.0):
    calls = {"n": 0, "threads": set()}
    lock = threading.Lock()

    def run(x):
        with lock:
            calls["n"] += 1
            calls["threads"].add(threading.get_ident())
        time.sleep(ms / 1000)
        return np.zeros((len(x), 3), np.float32), np.zeros((len(x), 4), np.float32)
    return run, calls


def test_benchmark_runner_percentiles_and_threads():
    run, calls = _sleepy_runner(2.0)
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    res = pb.benchmark_runner(run, x, batch_sizes=[1, 4], threads=[2], seconds=0.15, warmup=3)
    assert res["settings"]["threads"] == [1, 2]         # one client is always measured: it is the latency
    assert set(res["latency"]) == {"1", "4"}
    for lat in res["latency"].values():
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["p50_ms"] >= 1.9                      # the runner sleeps 2 ms: timing is real
        assert lat["requests"] >= 3 and lat["images_per_s"] > 0
    cells = {(c["batch_size"], c["threads"]): c for c in res["grid"]}
    assert set(cells) == {(1, 1), (1, 2), (4, 1), (4, 2)}
    # two clients sharing a sleeping runner overlap: more requests per second than one
    assert cells[(1, 2)]["requests_per_s"] > 1.3 * cells[(1, 1)]["requests_per_s"]
    assert cells[(4, 2)]["images_per_s"] == pytest.approx(4 * cells[(4, 2)]["requests_per_s"])
    assert len(calls["threads"]) >= 2
    # warm-up calls are not counted in the measured requests
    measured = sum(c["requests"] for c in res["grid"])
    assert calls["n"] == measured + 2 * 3


def test_make_batches_tiles_real_images():
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    batches = pb.make_batches(x, 2, n_batches=4)
    assert len(batches) == 4 and all(b.shape == (2, 2) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches)[:3], x)


def test_runner_errors_propagate():
    def bad(x):
        raise RuntimeError("backend exploded")
    with pytest.raises(RuntimeError, match="backend exploded"):
        pb.measure_load(bad, [np.zeros((1, 3, 8, 8), np.float32)], threads=2, seconds=0.05)


def test_efficiency_and_bytes_moved():
    bench = {"grid": [{"batch_size": 1, "threads": 1, "images_per_s": 10.0},
                      {"batch_size": 8, "threads": 2, "images_per_s": 20.0}]}
    eff = pb.efficiency(bench, 12.25, {"gflops": 980.0, "method": "onnxruntime MatMulInteger"}, "int8")
    assert eff["best"]["achieved_gflops"] == pytest.approx(245.0)
    assert eff["best"]["fraction_of_peak"] == pytest.approx(245.0 / 980.0)   # the INT8 peak, not FP32's
    assert eff["max_images_per_s_at_peak"] == pytest.approx(980.0 / 12.25) and eff["arithmetic"] == "int8"
    assert "caveat" not in eff and "caveat" not in pb.efficiency(bench, 12.25, {"gflops": 270.0}, "fp32")
    over = pb.efficiency(bench, 12.25, {"gflops": 200.0}, "fp32")
    assert over["best"]["fraction_of_peak"] > 1 and "that peak measurement is wrong" in over["caveat"]
    # the arithmetic a variant is measured against: the manifest's record, else its precision
    assert pb.variant_arithmetic("fp16", {"arithmetic": "FP32"}) == "fp32"
    assert pb.variant_arithmetic("int8", None) == "int8"
    assert pb.variant_arithmetic("bf16", None, flags={"avx2"}) == "fp32"           # no BF16 arithmetic
    assert pb.variant_arithmetic("bf16", None, flags={"avx2", "amx_bf16"}) == "bf16"
    moved = pb.bytes_moved(image_size=224, num_classes=10, embed_dim=768, weight_bytes=88_000_000,
                           batch_sizes=[1, 8], gflops_per_image=12.25)
    assert moved["input_bytes_per_image"] == 3 * 224 * 224 * 4
    assert moved["output_bytes_per_image"] == (10 + 768) * 4
    assert moved["per_batch_size"]["8"]["weight_bytes_per_image"] == pytest.approx(11_000_000)


def test_a_peak_per_arithmetic():
    """FP32 with torch, INT8 with ONNX Runtime's integer GEMM, BF16 only on
    a CPU with BF16 arithmetic (flags injected); small sizes: no timed asserts."""
    from dinov2_triton.bench.system_info import PeakUnavailable, arithmetic_peak

    fp32 = arithmetic_peak("fp32", 1, size=64, seconds=0.05)
    assert fp32["gflops"] > 0 and fp32["arithmetic"] == "fp32" and fp32["method"] == "torch.matmul float32 64x64"
    int8 = arithmetic_peak("int8", 1, size=64, seconds=0.05)
    assert int8["gflops"] > 0 and int8["arithmetic"] == "int8" and int8["threads"] == 1
    assert "MatMulInteger uint8 x int8 64x64" in int8["method"] and int8["repeats"] >= 3
    with pytest.raises(PeakUnavailable, match=r"this CPU has no BF16 arithmetic \(no avx512_bf16 / amx_bf16\)"):
        arithmetic_peak("bf16", 1, flags={"avx2", "fma"})
    assert arithmetic_peak("bf16", 1, flags={"amx_bf16"}, size=64, seconds=0.05)["dtype"] == "bfloat16"
    with pytest.raises(PeakUnavailable, match="no FP16 matrix multiply peak"):
        arithmetic_peak("fp16", 1)


def _child_peak(q):
    from dinov2_triton.bench.memory import peak_rss

    q.put(peak_rss())


def test_peak_rss_of_a_spawned_worker_is_its_own():
    # getrusage's ru_maxrss survives fork + exec: a worker would report its
    # parent's peak. peak_rss() must not.
    import multiprocessing as mp

    from dinov2_triton.bench.memory import peak_rss

    big = np.ones(300 * 2**20 // 8)  # ~300 MB touched in the parent
    parent = peak_rss()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(q,))
    p.start()
    child = q.get(timeout=60)
    p.join(30)
    del big
    assert parent > 300 * 2**20 and child < parent - 200 * 2**20


def test_discover_variants(tiny_checkpoint, tiny_repository):
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.registry import variant_names

    specs = {s.name: s for s in pb.discover_variants(tiny_checkpoint, tiny_repository)}
    assert list(specs)[0] == "pytorch" and specs["pytorch"].status == "OK"
    assert specs["onnx"].model_name == "dinov2_onnx" and specs["onnx"].parent == "pytorch"
    assert specs["onnx"].label == "ONNX Runtime FP32" and specs["torchscript"].label == "TorchScript FP32"
    assert specs["onnx"].artifact.endswith("model.onnx") and specs["onnx"].file_bytes > 0
    assert specs["onnx"].export["gate_passed"] is True
    assert specs["torchscript"].status == "OK"
    # the names are the registry's: every registered variant is listed, the
    # ones the export did not build as SKIPPED with the reason
    assert set(specs) == {"pytorch", *variant_names()}
    exported = set(read_export_manifest(tiny_repository).variants)
    for name in set(variant_names()) - exported:
        assert specs[name].status == "SKIPPED" and "not in the export manifest" in specs[name].reason
    trt = [s for s in specs.values() if s.platform == "tensorrt_plan"]
    assert trt and all(s.status == "SKIPPED" and "NVIDIA GPU" in s.reason for s in trt)
    only = pb.discover_variants(tiny_checkpoint, tiny_repository, only=["onnx"])
    assert [s.name for s in only] == ["onnx"]
    with pytest.raises(pb.BenchmarkInputError, match="--variants nope"):
        pb.discover_variants(tiny_checkpoint, tiny_repository, only=["nope"])


@pytest.mark.slow
def test_run_inprocess_benchmark_isolated(tiny_checkpoint, tiny_repository, tiny_dataset):
    res = pb.run_inprocess_benchmark(tiny_checkpoint, repository=tiny_repository, data_path=tiny_dataset,
                                     batch_sizes=[1, 2], threads=[2], seconds=0.2, warmup=2,
                                     variants=["pytorch", "onnx", "trt_fp16"], isolate=True)
    assert res.input_data.synthetic is False and "test split" in res.input_data.source
    assert res.model.pretrained is False and res.flops.gflops > 0
    assert res.matmul_peak.gflops > 0 and len(res.matmul_peak.measurements_gflops) == 2
    assert res.matmul_peaks["fp32"] == res.matmul_peak and res.matmul_peak.arithmetic == "fp32"
    for name in ("pytorch", "onnx"):
        v = res.variants[name]
        assert v.status == "OK", v.reason
        assert v.isolated is True
        assert v.benchmark.latency["1"].p99_ms > 0 and v.benchmark.latency["2"].p50_ms > 0
        assert {(c.batch_size, c.threads) for c in v.benchmark.grid} == {(1, 1), (1, 2), (2, 1), (2, 2)}
        mem = v.memory
        assert 0 < mem.baseline_rss_bytes <= mem.peak_rss_bytes and mem.peak_over_baseline_bytes >= 0
        assert 0 < v.efficiency.best.fraction_of_peak and v.arithmetic == v.efficiency.arithmetic == "fp32"
        assert v.efficiency.peak_gflops == res.matmul_peak.gflops   # the kept (higher) peak
        assert v.bytes_moved.input_bytes_per_image == 3 * 28 * 28 * 4
    assert res.variants["trt_fp16"].status == "SKIPPED"
    assert any("TensorRT" in s.what for s in res.skipped)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert production_benchmarking.main(["--model-path", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: file not found" in capsys.readouterr().err


def test_perf_run_in_process_only(tiny_checkpoint, tiny_repository, tiny_dataset, tmp_path, capsys):
    from dinov2_triton.bench.results import PerfResults, read_results
    from dinov2_triton.pipeline import bench_stage as run

    code = run.main(["--model-path", str(tiny_checkpoint), "--repository", str(tiny_repository),
                     "--data-path", str(tiny_dataset), "--batch-sizes", "1,2", "--threads", "1",
                     "--seconds", "0.1", "--warmup", "1", "--no-isolate", "--out", str(tmp_path), "--run-id", "r1"])
    out = capsys.readouterr().out
    assert code == 0, out
    raw = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert raw["schema_version"] == PerfResults.SCHEMA_VERSION and raw["perf_analyzer"] is None and raw["in_process"]
    res = read_results(tmp_path / "r1" / "results.json")
    assert res.recommendation.variant in ("dinov2_onnx", "dinov2_torchscript")
    assert res.recommendation.source == "in_process"
    assert res.model.pretrained is False and res.model.embed_dim > 0
    assert any("no --url" in s.reason for s in res.skipped)
    assert (tmp_path / "r1" / "report.html").is_file() and "recommended:" in out
    # the same run id twice is refused, not overwritten
    assert run.main(["--model-path", str(tiny_checkpoint), "--repository", str(tiny_repository),
                     "--out", str(tmp_path), "--run-id", "r1", "--no-isolate", "--seconds", "0.1"]) == 2


@pytest.mark.triton
@pytest.mark.slow
def test_perf_run_against_the_real_server(tiny_checkpoint, tiny_repository, tiny_dataset, triton_server_factory,
                                          tmp_path):
    from dinov2_triton.bench.perf_analyzer import MeasurementSettings, find_perf_analyzer
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.pipeline import bench_stage as run

    find_perf_analyzer()
    server = triton_server_factory(tiny_repository, load_models=["dinov2_onnx", "dinov2_preprocess", "dinov2"])
    run_ = run.run_perf(model_path=tiny_checkpoint, repository=tiny_repository, data_path=tiny_dataset,
                        url=server.url_grpc, metrics_url=server.url_metrics, models="dinov2_onnx,dinov2",
                        concurrency=[1], batch_sizes=[2], keep_going=True, in_process=False,
                        settings=MeasurementSettings(window_ms=1000, fixed_requests=30),
                        api_key=server.api_key, out=tmp_path, run_id="srv")
    results = run_.results
    assert run_.exit_code == 0, results.errors
    points = {p.model: p for p in results.perf_analyzer.points}
    assert set(points) == {"dinov2_onnx", "dinov2"}
    assert "--shape=pixel_values:3,28,28" in points["dinov2_onnx"].command
    assert "--shape=image:1" in points["dinov2"].command      # the ensemble gets encoded test images
    assert all(p.metrics["throughput_infer_per_s"] > 0 for p in points.values())
    mem = results.server.memory
    assert mem.peak_process_tree["pid"] == server.pid
    assert mem.peak_per_model_rss_bytes.get("dinov2_onnx", 0) > 0
    par = {v.model: v for v in results.parity.variants}
    assert par["dinov2_onnx"].passed and par["dinov2"].passed
    rec = run_.report.recommendation
    assert rec.variant == "dinov2_onnx" and rec.source == "server"
    assert read_results(run_.report.json).recommendation == rec
    assert (tmp_path / "srv" / "latency_breakdown.png").is_file()
    assert list((tmp_path / "srv" / "perf_analyzer" / "csv").glob("dinov2_onnx_grpc_b2_c1.csv"))
    assert not list((tmp_path / "srv").rglob("input_data"))   # the large input JSONs are not kept
