"""perf/perf_analyzer.py and perf/input_data.py: CSV parsing (samples
captured from real runs), input-data JSON, failure classification, and the
runner against the REAL local Triton server (tiny model, short windows)."""
from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.bench import input_data as pin
from dinov2_triton.bench import perf_analyzer as pa

DATA = Path(__file__).parent / "data"


def _have_perf_analyzer() -> bool:
    try:
        pa.find_perf_analyzer()
        return True
    except pa.PerfAnalyzerError:
        return False


@pytest.fixture
def perf_analyzer_installed():
    # perf_analyzer is installed by scripts/setup_env.sh; a missing one is a broken environment, not a reason to skip.
    if not _have_perf_analyzer():
        pytest.fail("perf_analyzer binary not found: run scripts/setup_env.sh (tritonclient==2.50.0 ships it)")


needs_pa = pytest.mark.usefixtures("perf_analyzer_installed")


# ----------------------------------------------------------------------------- CSV
def test_parse_verbose_csv_with_metrics_columns():
    # captured from perf_analyzer 2.50 (gRPC, --verbose-csv --collect-metrics) against tritonserver 2.51 on CPU
    rows = pa.parse_csv(DATA / "perf_analyzer_verbose_metrics.csv")
    assert len(rows) == 1
    r = rows[0]
    assert r["concurrency"] == 1
    assert r["throughput_infer_per_s"] == pytest.approx(2543.48)
    assert (r["client_send_us"], r["network_server_send_recv_us"], r["server_queue_us"]) == (2, 141, 47)
    assert (r["server_compute_input_us"], r["server_compute_infer_us"], r["server_compute_output_us"]) == (8, 138, 48)
    assert (r["p50_latency_us"], r["p90_latency_us"], r["p95_latency_us"], r["p99_latency_us"]) == (351, 452, 492, 1544)
    assert r["avg_latency_us"] == 387 and r["response_wait_us"] == 377
    assert r["server_total_us"] == 47 + 8 + 138 + 48
    # the GPU metric columns are empty on a CPU host: None, not 0
    assert r["avg_gpu_utilization"] is None and r["max_gpu_memory_bytes"] is None
    assert r["raw"]["Inferences/Second"] == "2543.48"


def test_parse_plain_csv_without_verbose_columns():
    # captured from an HTTP run without --verbose-csv (the file has no trailing newline)
    rows = pa.parse_csv(DATA / "perf_analyzer_plain.csv")
    assert rows[0]["concurrency"] == 2 and rows[0]["throughput_infer_per_s"] == pytest.approx(9687.06)
    assert rows[0]["p99_latency_us"] == 3732
    assert "avg_latency_us" not in rows[0]


def test_parse_csv_stops_at_blank_line_and_rejects_other_csvs(tmp_path):
    text = (DATA / "perf_analyzer_verbose_metrics.csv").read_text().strip() + "\n\nServer Metrics\nfoo,bar\n"
    (tmp_path / "a.csv").write_text(text)
    assert len(pa.parse_csv(tmp_path / "a.csv")) == 1
    (tmp_path / "b.csv").write_text("a,b\n1,2\n")
    with pytest.raises(pa.PerfAnalyzerError, match="not a perf_analyzer CSV"):
        pa.parse_csv(tmp_path / "b.csv")
    with pytest.raises(pa.PerfAnalyzerError, match="cannot read"):
        pa.parse_csv(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------- inputs
TENSOR_CFG = {"name": "m", "max_batch_size": 4,
              "input": [{"name": "pixel_values", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}],
              "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [4]},
                         {"name": "embedding", "data_type": "TYPE_FP32", "dims": [6]}]}
BYTES_CFG = {"name": "ens", "max_batch_size": 4,
             "input": [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}],
             "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [4]}]}


def test_input_data_json_holds_the_real_samples(tmp_path):
    s = pin.synthetic_samples((3, 8, 8), n=5)
    f = pin.write_input_data(tmp_path / "t.json", TENSOR_CFG, s)
    data = json.loads(f.read_text())["data"]
    assert len(data) == 5
    back = np.frombuffer(base64.b64decode(data[3]["pixel_values"]["b64"]), dtype="<f4").reshape(3, 8, 8)
    np.testing.assert_array_equal(back, s.pixel_values[3])
    # BYTES: Triton's serialized element (uint32 LE length + the file), as perf_analyzer sends b64 as is
    f = pin.write_input_data(tmp_path / "b.json", BYTES_CFG, s)
    raw = base64.b64decode(json.loads(f.read_text())["data"][2]["image"]["b64"])
    assert struct.unpack("<I", raw[:4])[0] == len(s.encoded[2]) and raw[4:] == s.encoded[2]
    assert raw[4:8] == b"\x89PNG"
    assert pin.shape_args(TENSOR_CFG) == ["--shape=pixel_values:3,8,8"]
    assert pin.shape_args(BYTES_CFG) == ["--shape=image:1"]
    moved = pin.bytes_per_item(TENSOR_CFG)
    assert moved == {"input_bytes": 3 * 8 * 8 * 4, "output_bytes": (4 + 6) * 4}


def test_input_data_refuses_samples_of_another_shape(tmp_path):
    s = pin.synthetic_samples((3, 14, 14), n=2)
    with pytest.raises(ValueError, match=r"model m: input pixel_values expects dims \[3, 8, 8\]"):
        pin.write_input_data(tmp_path / "t.json", TENSOR_CFG, s)


def test_load_samples_reads_the_test_split(tiny_dataset):
    from dinov2_triton.core.preprocessing import PreprocessConfig

    s = pin.load_samples(tiny_dataset, PreprocessConfig(image_size=28, resize_size=32), n=5)
    assert s.pixel_values.shape == (5, 3, 28, 28) and not s.synthetic
    assert all(n.startswith("images/test/") for n in s.names)
    assert s.encoded[0] == (tiny_dataset / s.names[0]).read_bytes()
    assert "test split" in s.source


# ----------------------------------------------------------------------------- failures
@pytest.mark.parametrize("output, kind, text", [
    ("Request concurrency: 1\nFailed to obtain stable measurement within 3 measurement windows for concurrency 1. "
     "Please try to increase the --measurement-interval.\nFailed to obtain stable measurement.\n", "unstable",
     "Failed to obtain stable measurement within 3"),
    ("Failed to maintain requested inference load. Worker thread(s) failed to generate concurrent requests.\n"
     "Thread [0] had error: [request id: <id_unknown>] inference request batch-size must be <= 4 for 'm'\n",
     "request_error", "batch-size must be <= 4"),
    ("error: failed to get model metadata: failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused\n", "unreachable", "Connection refused"),
    ("error: failed to get model metadata: Request for unknown model: 'nosuch' is not found\n", "model_not_found",
     "nosuch"),
    ("perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open shared object file\n",
     "not_installed", "libb64-0d"),
])
def test_classify_failure(output, kind, text):
    got_kind, message = pa.classify_failure(output, 99)
    assert got_kind == kind
    assert text in message


def test_environment_puts_cudart_on_the_library_path():
    env = pa.perf_analyzer_env({"LD_LIBRARY_PATH": "/x"})
    dirs = pa._cuda_runtime_lib_dirs()
    if not dirs:
        pytest.fail("nvidia-cuda-runtime-cu12 not installed: run scripts/setup_env.sh")
    parts = env["LD_LIBRARY_PATH"].split(":")
    assert parts[-1] == "/x" and any(Path(p, "libcudart.so.12").exists() for p in parts)
    # idempotent: calling it on its own result adds nothing
    assert pa.perf_analyzer_env(env)["LD_LIBRARY_PATH"] == env["LD_LIBRARY_PATH"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="--window-ms"):
        pa.MeasurementSettings(window_ms=10)
    with pytest.raises(ValueError, match="--stability-pct"):
        pa.MeasurementSettings(stability_pct=0)
    s = pa.MeasurementSettings(window_ms=2000, max_trials=4)
    assert s.point_timeout() == pytest.approx(2 * 7 + 60)
    cmd = pa.build_command("pa", model="m", url="h:1", protocol="grpc", batch_size=4, concurrency=2, settings=s,
                           input_data="d.json", shapes=["--shape=x:1"], csv_path="o.csv", metrics_url=None)
    assert cmd[:9] == ["pa", "-m", "m", "-u", "h:1", "-i", "grpc", "-b", "4"]
    for flag in ("--concurrency-range=2:2", "--measurement-mode=time_windows", "--input-data=d.json",
                 "--shape=x:1", "--verbose-csv"):
        assert flag in cmd
    assert cmd[cmd.index("-p") + 1] == "2000" and cmd[cmd.index("-r") + 1] == "4"


@needs_pa
def test_unreachable_server_is_a_clear_error(tmp_path):
    from dinov2_triton.serve.local_server import find_free_ports

    port = find_free_ports(1)[0]
    with pytest.raises(pa.PerfAnalyzerError) as info:
        pa.run_point(model="tiny_onnx", url=f"127.0.0.1:{port}", protocol="grpc", batch_size=1, concurrency=1,
                     settings=pa.MeasurementSettings(window_ms=500, max_trials=3), input_data=None, shapes=[],
                     out_dir=tmp_path)
    err = info.value
    assert err.kind == "unreachable"
    msg = str(err)
    for part in ("'tiny_onnx'", "grpc", "batch 1", "concurrency 1", "Connection refused"):
        assert part in msg
    # the sweep stops at the first failure unless keep_going, and keeps what it has
    s = pin.synthetic_samples((3, 8, 8), n=2)
    with pytest.raises(pa.PerfAnalyzerError) as info:
        pa.run_sweep(urls={"grpc": f"127.0.0.1:{port}"}, models=["a", "b"], samples=s, out_dir=tmp_path,
                     settings=pa.MeasurementSettings(window_ms=500, max_trials=3, collect_metrics=False))
    assert info.value.partial["failures"][0]["model"] == "a"
    res = pa.run_sweep(urls={"grpc": f"127.0.0.1:{port}"}, models=["a", "b"], samples=s, out_dir=tmp_path,
                       keep_going=True, settings=pa.MeasurementSettings(window_ms=500, max_trials=3,
                                                                        collect_metrics=False))
    assert [f["model"] for f in res["failures"]] == ["a", "b"] and res["points"] == []


# ----------------------------------------------------------------------------- the real server
# Short windows, a loose stability threshold and enough trials for a busy 2-core
# machine. Even so a shared machine can make a 1 s window unstable, so the
# plumbing test uses a fixed request count (one pass, no stability check) and
# the windowed test accepts exactly two outcomes: a parsed row, or perf_analyzer's
# own "unstable" verdict.
QUICK = dict(window_ms=1000, stability_pct=100, max_trials=10)
FIXED = dict(window_ms=1000, fixed_requests=100)


@needs_pa
@pytest.mark.triton
def test_sweep_against_the_real_server(triton_server, tmp_path):
    s = pin.synthetic_samples((3, 8, 8), n=8)
    lines: list[str] = []
    res = pa.run_sweep(urls={"grpc": triton_server.url_grpc, "http": triton_server.url_http},
                       models=["tiny_onnx", "not_a_model"], protocols=["grpc", "http"], concurrency=[2],
                       batch_sizes=[2, 8], samples=s, out_dir=tmp_path, metrics_url=triton_server.url_metrics,
                       keep_going=True, settings=pa.MeasurementSettings(**FIXED), api_key=triton_server.api_key,
                       progress=lines.append)
    # one progress line per measured point, numbered against the plan (batch 8
    # is above max_batch_size: 2 points remain), with an ETA after the first
    point_lines = [x for x in lines if x.startswith("[perf ")]
    assert [x.split("]")[0] for x in point_lines] == ["[perf 1/2", "[perf 2/2"], lines
    assert "tiny_onnx grpc batch 2 concurrency 2: " in point_lines[0] and "infer/s, p99" in point_lines[0]
    assert "ETA" in point_lines[0]
    # batch 8 > max_batch_size 4: skipped with the reason, never sent
    assert any(x["what"] == "tiny_onnx batch 8" and "max_batch_size 4" in x["reason"] for x in res["skipped"])
    assert [(p["protocol"], p["batch_size"], p["concurrency"]) for p in res["points"]] == [("grpc", 2, 2),
                                                                                          ("http", 2, 2)]
    for p in res["points"]:
        m = p["metrics"]
        assert m["throughput_infer_per_s"] > 0 and 0 < m["p50_latency_us"] <= m["p99_latency_us"]
        assert m["server_compute_infer_us"] > 0 and m["server_queue_us"] is not None
        assert Path(p["csv"]).is_file() and "--shape=pixel_values:3,8,8" in p["command"]
        assert "--input-data=" in p["command"] and "--request-count=100" in p["command"]
        # perf_analyzer runs without the key (it calls no restricted API; its -H
        # reaches HTTP only) and its command line is logged: the key is never in it
        assert triton_server.api_key not in p["command"]
        assert triton_server.api_key not in Path(p["log"]).read_text()
    assert res["model_configs"]["tiny_onnx"]["max_batch_size"] == 4
    assert res["model_configs"]["tiny_onnx"]["input"][0]["dims"] == [3, 8, 8]
    assert res["settings"]["metrics_collected"] is True
    assert [f["model"] for f in res["failures"]] == ["not_a_model"]
    assert res["failures"][0]["kind"] == "model_not_found"


@needs_pa
@pytest.mark.triton
def test_request_error_names_the_point(triton_server, tmp_path):
    s = pin.synthetic_samples((3, 8, 8), n=8)
    cfg = pa.fetch_model_config(triton_server.url_grpc, "grpc", "tiny_onnx")
    data = pin.write_input_data(tmp_path / "in.json", cfg, s)
    with pytest.raises(pa.PerfAnalyzerError) as info:
        # batch 8 against max_batch_size 4: the server rejects every request
        pa.run_point(model="tiny_onnx", url=triton_server.url_grpc, protocol="grpc", batch_size=8, concurrency=1,
                     settings=pa.MeasurementSettings(**QUICK), input_data=data, shapes=pin.shape_args(cfg),
                     out_dir=tmp_path)
    err = info.value
    assert err.kind == "request_error" and (err.model, err.protocol, err.batch_size, err.concurrency) == (
        "tiny_onnx", "grpc", 8, 1)
    assert "batch 8, concurrency 1" in str(err) and "must be <= 4" in str(err)


@needs_pa
@pytest.mark.triton
def test_windowed_point_is_measured_or_reported_unstable(triton_server, tmp_path):
    s = pin.synthetic_samples((3, 8, 8), n=4)
    cfg = pa.fetch_model_config(triton_server.url_grpc, "grpc", "tiny_torchscript")
    data = pin.write_input_data(tmp_path / "in.json", cfg, s)
    try:
        point = pa.run_point(model="tiny_torchscript", url=triton_server.url_grpc, protocol="grpc", batch_size=1,
                             concurrency=1, settings=pa.MeasurementSettings(**QUICK), input_data=data,
                             shapes=pin.shape_args(cfg), out_dir=tmp_path)
    except pa.PerfAnalyzerError as exc:
        assert exc.kind == "unstable", str(exc)
        assert "Failed to obtain stable measurement" in str(exc) and "--window-ms" in str(exc)
        return
    assert "--request-count" not in point["command"] and "-p 1000" in " ".join(point["command"].split())
    assert point["metrics"]["throughput_infer_per_s"] > 0
