"""The CPU stand-ins' profile switch, thread share and reused join buffers, and
the benchmark that measures them (dinov2_triton.bench.standin_overhead).

The stand-ins run here in process with the real triton_python_backend_utils
and fakes for what the C++ stub adds (as in tests/test_serve_local.py); the
test marked ``triton`` runs the benchmark against the real local server.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.bench import closed_loop
from dinov2_triton.bench import standin_overhead as so
from dinov2_triton.serve import model_plan
from dinov2_triton.serve.install import STANDIN_BACKENDS
from tests.fixtures.standin import FakeRequest, load_standin
from tests.fixtures.triton import TINY_IMAGE, tiny_reference

ATOL = 1e-5


def _load(backend: str, model_dir: Path, *, parameters=None, instances=None, drop=()):
    return load_standin(backend, model_dir, parameters=parameters, instances=instances, drop=drop)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY_IMAGE)).astype(np.float32)


# --------------------------------------------------------------------------- stand-ins
def test_profile_is_off_by_default_and_writes_one_line_per_execute(pb_utils, tiny_model_repository, tmp_path):
    model, _ = _load("onnxruntime", tiny_model_repository / "tiny_onnx")
    assert model.profile is None
    model.execute([FakeRequest(pixel_values=_images(1))])

    path = tmp_path / "profile.jsonl"
    model, module = _load("onnxruntime", tiny_model_repository / "tiny_onnx",
                          parameters={"STANDIN_PROFILE_FILE": str(path)})
    model.execute([FakeRequest(pixel_values=_images(2)), FakeRequest(image=_images(1)),
                   FakeRequest(pixel_values=_images(1, seed=1))])
    model.execute([FakeRequest(pixel_values=_images(3))])
    model.finalize()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["requests"], first["batch"], first["runs"]) == (3, 3, 1)   # the bad request is not run
    assert (second["requests"], second["batch"], second["runs"]) == (1, 3, 1)
    for line in (first, second):
        assert line["model"] == "tiny_onnx" and line["run_ns"] > 0 and line["parse_ns"] > 0
        assert line["end_ns"] >= line["start_ns"]
        assert sum(line[f"{p}_ns"] for p in module.common.PHASES) == line["execute_ns"]
        assert line["run_ns"] <= line["execute_ns"]


def test_profile_file_that_cannot_be_opened_fails_the_load(pb_utils, tiny_model_repository, tmp_path):
    with pytest.raises(pb_utils.TritonModelException, match="STANDIN_PROFILE_FILE: cannot open"):
        _load("onnxruntime", tiny_model_repository / "tiny_onnx",
              parameters={"STANDIN_PROFILE_FILE": str(tmp_path / "missing" / "p.jsonl")})


def test_threads_default_to_the_instance_share_of_the_cores(pb_utils, tiny_model_repository):
    # a config without a thread count (the export writes one: the config's own value wins, below)
    unset = ("intra_op_thread_count",)
    model, module = _load("onnxruntime", tiny_model_repository / "tiny_onnx", instances=1, drop=unset)
    cores = module.common.usable_cores()
    assert model.session.get_session_options().intra_op_num_threads == cores
    model, _ = _load("onnxruntime", tiny_model_repository / "tiny_onnx", instances=2 * cores, drop=unset)
    assert model.session.get_session_options().intra_op_num_threads == 1   # never 0 (ORT's "all cores")
    if cores >= 2:
        model, _ = _load("onnxruntime", tiny_model_repository / "tiny_onnx", instances=2, drop=unset)
        assert model.session.get_session_options().intra_op_num_threads == cores // 2
    # the config's own value wins
    model, _ = _load("onnxruntime", tiny_model_repository / "tiny_onnx", instances=2,
                     parameters={"intra_op_thread_count": "3"})
    assert model.session.get_session_options().intra_op_num_threads == 3
    assert module.common.instance_count({"instance_group": [{"count": 2}, {"count": 3}]}) == 5
    assert module.common.instance_count({}) == 1


def test_onnxruntime_threads_do_not_spin_unless_asked(pb_utils, tiny_model_repository):
    key = "session.intra_op.allow_spinning"
    model, _ = _load("onnxruntime", tiny_model_repository / "tiny_onnx")
    assert model.session.get_session_options().get_session_config_entry(key) == "0"
    model, _ = _load("onnxruntime", tiny_model_repository / "tiny_onnx", parameters={key: "1"})
    assert model.session.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(pb_utils.TritonModelException, match="allow_spinning is 'yes', expected 0 or 1"):
        _load("onnxruntime", tiny_model_repository / "tiny_onnx", parameters={key: "yes"})


def test_openvino_threads_only_set_for_several_instances(pb_utils):
    spec = importlib.util.spec_from_file_location("standin_openvino_threads",
                                                  STANDIN_BACKENDS / "openvino" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cores = module.common.usable_cores()
    assert "INFERENCE_NUM_THREADS" not in module.compile_properties({"instance_group": [{"count": 1}]}, "m")
    props = module.compile_properties({"instance_group": [{"count": 2 * cores}]}, "m")
    assert props["INFERENCE_NUM_THREADS"] == 1
    props = module.compile_properties({"instance_group": [{"count": 2}],
                                       "parameters": {"INFERENCE_NUM_THREADS": {"string_value": "5"}}}, "m")
    assert props["INFERENCE_NUM_THREADS"] == 5


@pytest.mark.parametrize("backend,model_name", [("onnxruntime", "tiny_onnx"), ("pytorch", "tiny_torchscript")])
def test_joined_batches_reuse_one_buffer_and_keep_earlier_answers(pb_utils, tiny_model_repository,
                                                                  tiny_classifier, backend, model_name):
    """Several requests are joined into a reused array; answers already built
    from it must not change when the next batch is joined into it."""
    model, _ = _load(backend, tiny_model_repository / model_name)
    seen = []
    real_run = model._run
    model._run = lambda feed: seen.append(feed["pixel_values"]) or real_run(feed)
    a = [_images(1, seed=1), _images(2, seed=2)]
    b = [_images(2, seed=3), _images(1, seed=4)]
    first = model.execute([FakeRequest(pixel_values=x) for x in a])
    second = model.execute([FakeRequest(pixel_values=x) for x in b])
    assert len(seen) == 2 and np.shares_memory(seen[0], seen[1]), "the join buffer is reused"
    for responses, batches in ((first, a), (second, b)):
        for response, x in zip(responses, batches):
            assert response.error is None
            logits, embedding = tiny_reference(tiny_classifier, x)
            np.testing.assert_allclose(response.outputs["logits"], logits, atol=ATOL)
            np.testing.assert_allclose(response.outputs["embedding"], embedding, atol=ATOL)
    # one request alone runs on its own array: no copy
    single = _images(2, seed=5)
    model.execute([FakeRequest(pixel_values=single)])
    assert seen[-1] is single or np.shares_memory(seen[-1], single)


def test_feed_buffers_grow_and_stay_bounded(pb_utils):
    spec = importlib.util.spec_from_file_location("standin_common_t", STANDIN_BACKENDS / "standin_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    buffers = common.FeedBuffers(capacity=4, limit=2)
    x = buffers.take("a", 3, (2,), np.float32)
    assert x.shape == (3, 2) and np.shares_memory(x, buffers.take("a", 4, (2,), np.float32))
    assert buffers.take("a", 6, (2,), np.float32).shape == (6, 2)   # more than the capacity: a larger array
    buffers.take("b", 1, (2,), np.float32)
    buffers.take("c", 1, (2,), np.float32)
    assert len(buffers._arrays) <= 2
    joined = buffers.join("d", [np.ones((1, 2), np.float32), np.zeros((2, 2), np.float32)])
    np.testing.assert_array_equal(joined, [[1, 1], [0, 0], [0, 0]])


# --------------------------------------------------------------------------- the benchmark
def test_window_counts_each_request_by_its_share_of_the_window():
    spans = [(0.0, 2.0, 8), (2.0, 4.0, 8), (4.0, 6.0, 8)]
    assert closed_loop.window_images(spans, 1.0, 5.0) == pytest.approx(4 + 8 + 4)
    assert closed_loop.window_images(spans, 6.0, 9.0) == 0
    assert closed_loop.window_images([(0.0, 0.0, 8)], 0.0, 1.0) == 0   # a zero-length span adds nothing


def test_triton_statistics_and_profile_become_per_request_milliseconds():
    def stats(count, ns, execs):
        return {"execution_count": execs, "inference_stats": {
            "success": {"count": str(count), "ns": str(ns)}, "queue": {"count": str(count), "ns": str(ns // 10)},
            "compute_input": {"count": str(count), "ns": "0"}, "compute_infer": {"count": str(count), "ns": str(ns)},
            "compute_output": {"count": str(count), "ns": "0"}}}
    delta = so.stats_delta(stats(2, 2_000_000, 2), stats(6, 10_000_000, 5))
    assert delta["requests"] == 4 and delta["executions"] == 3
    assert delta["request_ms"] == pytest.approx(2.0) and delta["queue_ms"] == pytest.approx(0.2)
    assert so.stats_delta(stats(2, 5, 1), stats(2, 5, 1))["request_ms"] is None
    records = [{"requests": 2, **{f"{p}_ns": 1_000_000 for p in so.PHASES}, "execute_ns": 4_000_000},
               {"requests": 1, **{f"{p}_ns": 2_000_000 for p in so.PHASES}, "execute_ns": 8_000_000}]
    summary = so.profile_summary(records)
    assert summary["run_ms"] == pytest.approx(1.0) and summary["execute_ms"] == pytest.approx(4.0)
    assert summary["requests_per_execute"] == pytest.approx(1.5)
    assert so.profile_summary([]) is None


def test_overlay_repository_adds_the_profile_and_instances(tiny_model_repository, tmp_path):
    repo = so.overlay_repository(tiny_model_repository, "tiny_onnx", tmp_path / "overlay",
                                 profile_file=tmp_path / "p.jsonl", threads=1, runtime="onnxruntime", instances=2)
    cfg = model_plan.read_model_config(repo / "tiny_onnx" / "config.pbtxt")
    assert cfg.parameters["STANDIN_PROFILE_FILE"].string_value == str(tmp_path / "p.jsonl")
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"
    assert [g.count for g in cfg.instance_group] == [2]
    assert (repo / "tiny_onnx" / "1").resolve() == (tiny_model_repository / "tiny_onnx" / "1").resolve()
    original = model_plan.read_model_config(tiny_model_repository / "tiny_onnx" / "config.pbtxt")
    assert "STANDIN_PROFILE_FILE" not in original.parameters


@pytest.mark.parametrize("argv,message", [
    (["--concurrency", "0"], "--concurrency"),
    (["--threads", "0"], "--threads"),
    (["--backend", "nolabel"], "--backend"),
    (["--model", "nope"], "nope"),
])
def test_bench_bad_flags_exit_2_naming_the_flag(tiny_model_repository, capsys, argv, message):
    args = ["--repository", str(tiny_model_repository), "--model", "tiny_onnx"] + argv
    assert so.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.triton
def test_bench_measures_in_process_and_served_with_the_standin_profile(tiny_model_repository, tmp_path):
    study = so.run_study(tiny_model_repository, "tiny_onnx", batch_size=4, concurrency=(1, 2), seconds=1.5,
                         warmup_s=0.5, rounds=1, work_dir=tmp_path, log=lambda _: None)
    assert study["cpu"]["model"] and len(study["in_process"]) == 1 and len(study["served"]) == 2
    for row in study["summary"]:
        assert row["served_images_per_s"] > 0 and row["in_process_images_per_s"] > 0 and row["ratio"] > 0
        assert row["requests_per_execute"] >= 1 and row["run_ms"] > 0   # the profile came back from the stub
        assert row["compute_infer_ms"] is not None and row["cpu_ms_per_image"] > 0
    text = so.render(study)
    assert "served/in-process" in text and study["cpu"]["model"] in text
