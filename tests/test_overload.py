"""The bench stage's overload check (dinov2_triton.qa.overload): the served queue
policy, capacity and batch time read from a run's sweep, the three claims, the
``overload`` section of results.json and the report's "Overload" section, the
recipe keys; then the REAL local Triton server: a repository whose configs
come from the export's generator (dinov2_triton.export.triton_config) with a
queue policy sheds a short burst and answers the same logits afterwards, one
without a policy is reported as such. The classifier is a Python-backend
model that sleeps a fixed time per batch, so "3x capacity" means what it
says on a shared 2-core machine; the ensemble's preprocessing model is the
exported one. No latency is asserted (the numbers are printed)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dinov2_triton.bench.overload_records import OverloadCheck, OverloadSettings, OverloadTarget, ServedPolicy
from dinov2_triton.qa import overload as ov

SLOW_MS = 50           # the classifier's time per batch (of up to MAX_BATCH images)
MAX_BATCH = 4
INSTANCES = 2          # the default deployment's classifier: 2 instances x 1 thread
IMAGE = 28             # the tiny checkpoint's image size (the exported preprocessing model's output)
CLASSES, EMBED = 4, 6


# --------------------------------------------------------------------------- no server
def _config(timeout_us=None, size=None, action=None):
    cfg = {"name": "m", "max_batch_size": 8, "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
           "dynamic_batching": {"max_queue_delay_microseconds": 2000}}
    policy = {k: v for k, v in (("default_timeout_microseconds", timeout_us), ("max_queue_size", size),
                                ("timeout_action", action)) if v is not None}
    if policy:
        cfg["dynamic_batching"]["default_queue_policy"] = policy
    return cfg


def test_served_policy_is_read_from_the_normalised_config():
    p = ov.served_policy(_config(2_000_000, 1024))
    assert (p.has_policy, p.timeout_ms, p.max_queue_size, p.instances, p.max_batch_size) == (True, 2000.0, 1024, 2, 8)
    none = ov.served_policy(_config())
    assert (none.has_policy, none.timeout_ms, none.max_queue_size) == (False, None, None)
    assert ov.served_policy(_config(0, 64)).timeout_ms is None          # a size only: sheds, bounds no latency
    assert ov.served_policy(_config(0, 64)).has_policy
    delay = ov.served_policy(_config(2_000_000, action="DELAY"))       # a timed-out request is kept, not shed
    assert (delay.has_policy, delay.timeout_ms) == (False, None)


def test_ensemble_steps_and_the_classifier_it_calls():
    cfg = {"ensemble_scheduling": {"step": [
        {"model_name": "dinov2_preprocess", "output_map": {"pixel_values": "preprocessed_pixel_values"}},
        {"model_name": "dinov2_onnx_int8", "output_map": {"logits": "logits", "embedding": "embedding"}}]}}
    assert ov.ensemble_steps(cfg) == ["dinov2_preprocess", "dinov2_onnx_int8"]
    assert ov.logits_step(cfg) == "dinov2_onnx_int8"
    assert ov.ensemble_steps(_config()) == [] and ov.logits_step(_config()) is None


def _point(model, batch, conc, thr, compute_us=(100, 60_000, 400), status="OK"):
    keys = ("server_compute_input_us", "server_compute_infer_us", "server_compute_output_us")
    return {"model": model, "protocol": "grpc", "batch_size": batch, "concurrency": conc, "status": status,
            "metrics": {"throughput_infer_per_s": thr, **dict(zip(keys, compute_us))}}


def test_the_capacity_comes_from_the_runs_sweep():
    sweep = {"points": [_point("dinov2_onnx", 1, 1, 60.0), _point("dinov2_onnx", 8, 1, 111.6),
                        _point("dinov2_onnx", 8, 4, 129.4, (80, 61_000, 320)),
                        _point("dinov2_onnx", 8, 8, 500.0, status="FAILED"), _point("other", 8, 4, 900.0)]}
    cap, where = ov.sweep_capacity(sweep, "dinov2_onnx")
    assert cap == 129.4 and "batch 8, concurrency 4" in where
    assert ov.sweep_capacity(None, "m") is None and ov.sweep_capacity({"points": []}, "m") is None


def test_the_servers_batch_time_during_the_burst():
    before = {"pre": {8: (10, 30_000_000)}, "clf": {4: (5, 250_000_000), 1: (2, 60_000_000)}}
    after = {"pre": {8: (14, 42_000_000), 2: (1, 1_000_000)}, "clf": {4: (9, 470_000_000), 1: (3, 90_000_000)}}
    ms, where = ov.burst_batches(before, after)
    assert ms == pytest.approx(3.0 + 55.0)           # 4 batches of 8 in 12 ms, 4 batches of 4 in 220 ms
    assert where.endswith("pre batch 8: 3.0 ms (mean of 4), clf batch 4: 55.0 ms (mean of 4)")
    assert ov.burst_batches(before, before) is None  # nothing ran


def _target(*, policy=True, shed=40, failed=0, p99=2050.0, batch=62.0, versions=("1", "1")):
    pols = [ServedPolicy(model="dinov2_preprocess", timeout_ms=2000.0 if policy else None, has_policy=policy,
                         max_batch_size=8),
            ServedPolicy(model="dinov2_onnx", timeout_ms=2000.0 if policy else None, has_policy=policy,
                         max_batch_size=8)]
    return OverloadTarget(model="dinov2", kind="ensemble", policies=pols, capacity_rps=100.0, rate_rps=300.0,
                          achieved_rps=250.0,
                          offered=100, accepted=100 - shed - failed, shed=shed, failed=failed, p99_ms=p99,
                          queue_timeout_ms=4000.0 if policy else None, batch_ms=batch, versions=list(versions),
                          messages={"in ensemble 'dinov2', Request timeout expired": shed} if shed else {})


def test_the_three_claims():
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = ov.judge(_target(), logits, logits.copy())
    assert (t.sheds.passed, t.p99_bounded.passed, t.same_logits.passed, t.passed) == (True, True, True, True)
    assert t.bound_ms == 4062.0
    assert t.p99_bounded.detail == ("accepted p99 2050.0 ms <= 4000 ms queue timeout + 62.0 ms one batch (a full "
                                    "batch alone before the burst) = 4062.0 ms (margin 2012.0 ms)")
    # a batch that ran slower under the burst (Triton's own compute time) is the batch in the bound
    slow = ov.judge(_target(p99=4100.0).model_copy(update={"burst_batch_ms": 120.0}), logits, logits.copy())
    assert slow.bound_ms == 4120.0 and slow.p99_bounded.passed is True
    assert "+ 120.0 ms one batch (Triton's compute of a batch during the burst)" in slow.p99_bounded.detail
    quick = ov.judge(_target(p99=4100.0).model_copy(update={"burst_batch_ms": 30.0}), logits, logits.copy())
    assert quick.bound_ms == 4062.0 and quick.p99_bounded.passed is False
    assert "shed 40 of 100 (gRPC UNAVAILABLE / HTTP 503" in t.sheds.detail
    assert t.same_logits.detail.startswith("identical (6 values, tolerance 0")

    late = ov.judge(_target(p99=4100.0), logits, logits)
    assert (late.p99_bounded.passed, late.passed) == (False, False) and "4100.0 ms > 4000 ms" in late.p99_bounded.detail
    other = logits.copy()
    other[1, 2] += 1e-6
    changed = ov.judge(_target(), logits, other)
    assert changed.same_logits.passed is False and changed.logits_max_abs_diff > 0 and changed.passed is False
    assert ov.judge(_target(shed=0), logits, logits).sheds.passed is False      # not overloaded: FAIL
    assert ov.judge(_target(failed=3), logits, logits).sheds.passed is False    # shed, but others failed
    assert ov.judge(_target(versions=("1", "2")), logits, other).same_logits.passed is None   # another model

    bare = ov.judge(_target(policy=False, shed=0), logits, logits)
    assert (bare.sheds.passed, bare.p99_bounded.passed, bare.same_logits.passed, bare.passed) == (None, None,
                                                                                                  True, None)
    assert bare.sheds.detail.startswith("no queue policy in the served config of dinov2_preprocess, dinov2_onnx")
    check = OverloadCheck(settings=OverloadSettings(), url="127.0.0.1:1", targets=[bare, late])
    found = ov.problems(check)
    assert found[0].startswith("dinov2: no queue policy") and found[1].startswith("dinov2: p99 <= timeout + one "
                                                                                  "batch FAIL: accepted p99 4100")
    assert ov.strict_errors(check) == []
    strict = check.model_copy(update={"settings": OverloadSettings(strict=True), "problems": found})
    assert ov.strict_errors(strict) == [f"overload check: {p}" for p in found]


def test_a_server_off_loopback_gets_no_burst():
    check = ov.run_overload_check("10.1.2.3:8001", samples=None)
    assert check.targets == [] and check.passed is None and "not on loopback" in check.summary


def test_the_record_and_the_report_section(tmp_path):
    from dinov2_triton.bench.results import PerfResults, read_results, write_results
    from dinov2_triton.report.overload import overload_blocks
    from dinov2_triton.report.report import render_markdown

    data = json.loads((Path(__file__).parent / "data" / "perf_results_v1_server.json").read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert read_results(old).overload is None                   # an older schema reads: no check ran then
    logits = np.zeros((1, 3), np.float32)
    targets = [ov.judge(_target(), logits, logits), ov.judge(_target(policy=False, shed=0), logits, logits),
               OverloadTarget(model="dinov2_onnx", kind="classifier", skipped="its input has dims [3, 8, 8]")]
    check = OverloadCheck(settings=OverloadSettings(), url="127.0.0.1:8001", load_average=[0.5, 0.4, 0.3],
                          targets=targets)
    check.summary = ov.summary(check)
    res = read_results(old).model_copy(update={"overload": check})
    write_results(tmp_path / "new.json", res)
    back = read_results(tmp_path / "new.json")
    assert back.schema_version == PerfResults.SCHEMA_VERSION and back.overload == check
    raw = json.loads((tmp_path / "new.json").read_text())
    raw["overload"]["targets"][0]["sheds"]["passed"] = "maybe"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(Exception, match=r"bad.json: field 'overload.targets\[0\].sheds.passed'"):
        read_results(tmp_path / "bad.json")

    md = render_markdown(overload_blocks(back))
    assert md.startswith("## Overload\n")
    assert "| `dinov2` | 100 (300.0 / 250.0) | 60 | 40 | 0 | - | 2050 | 4000 + 62.0 | PASS | PASS | PASS |" in md
    assert "| `dinov2` | 100 (300.0 / 250.0) | 100 | 0 | 0 | - | 2050 | no timeout | n/a | n/a | PASS |" in md
    assert ("**PASS**: accepted p99 2050.0 ms <= 4000 ms queue timeout + 62.0 ms one batch (a full batch alone "
            "before the burst) = 4062.0 ms") in md
    assert "`dinov2_onnx` not measured: its input has dims [3, 8, 8]" in md
    assert "the run does not fail for it" in md
    assert overload_blocks(read_results(old)) == []


def test_the_demo_recipe_runs_the_check_and_a_key_turns_it_off():
    from dinov2_triton.pipeline.recipes import RecipeError, resolve

    o = resolve("demo").recipe.bench.overload
    assert (o.enabled, o.factor, o.seconds, o.max_requests, o.protocol, o.strict) == (True, 3.0, 5.0, 2000, "grpc",
                                                                                       False)
    assert resolve("demo", sets=["bench.overload.enabled=false"]).recipe.bench.overload.enabled is False
    with pytest.raises(RecipeError, match="bench.overload.factor"):
        resolve("demo", sets=["bench.overload.factor=0.5"])


def test_the_bench_cli_takes_the_check_only_when_asked():
    from dinov2_triton.pipeline import bench_stage as bs

    args = bs.build_parser().parse_args(["--overload", "--overload-seconds", "2", "--overload-strict"])
    assert bs._overload_flags(args) == {"factor": 3.0, "seconds": 2.0, "max_requests": 2000, "protocol": "grpc",
                                        "strict": True}
    assert bs._overload_flags(bs.build_parser().parse_args([])) is None
    with pytest.raises(bs.PerfInputError, match="overload settings: field 'factor'"):
        bs.parse_overload_settings({"factor": 1.0})


# --------------------------------------------------------------------------- real server
def _write_repository(root: Path, exported: Path, *, queue_timeout_ms: float) -> Path:
    """``dinov2`` -> ``dinov2_preprocess`` (the exported model's files) -> ``slow_classifier`` (sleeps
    SLOW_MS per batch, INSTANCES instances: capacity INSTANCES x MAX_BATCH / SLOW_MS), every config
    from the export's generator with ``queue_timeout_ms`` (0: no queue policy, as export writes it)."""
    from dinov2_triton.export.triton_config import (
        PREPROCESS_MODEL,
        classifier_config,
        ensemble_config,
        preprocess_config,
        to_text,
        validate_config,
    )
    from tests.fixtures.slow_model import MODEL_PY
    from tests.fixtures.triton import write_model

    shutil.copytree(exported / PREPROCESS_MODEL, root / PREPROCESS_MODEL)
    (root / PREPROCESS_MODEL / "config.pbtxt").write_text(validate_config(preprocess_config(
        image_size=IMAGE, max_batch_size=8, queue_timeout_ms=queue_timeout_ms)))
    variant = SimpleNamespace(model_name="slow_classifier", platform="", filename="model.py", precision="fp32",
                              config_parameters={})
    cfg = classifier_config(variant, image_size=IMAGE, num_classes=CLASSES, embed_dim=EMBED, instances=INSTANCES,
                            max_batch_size=MAX_BATCH, preferred_batch_sizes=(MAX_BATCH,), max_queue_delay_us=1000,
                            queue_timeout_ms=queue_timeout_ms, parameters={"delay_ms": SLOW_MS})
    cfg.backend = "python"
    cfg.ClearField("default_model_filename")
    (write_model(root, "slow_classifier", to_text(cfg)) / "model.py").write_text(MODEL_PY)
    write_model(root, "dinov2", validate_config(ensemble_config(
        "slow_classifier", num_classes=CLASSES, embed_dim=EMBED, image_size=IMAGE, max_batch_size=MAX_BATCH)))
    return root


@pytest.fixture(scope="module")
def samples():
    from dinov2_triton.bench.input_data import synthetic_samples

    return synthetic_samples((3, IMAGE, IMAGE), n=8, encoded_size=IMAGE + 4)


@pytest.fixture(scope="module")
def shedding_server(triton_server_factory, tiny_repository, tmp_path_factory):
    root = _write_repository(tmp_path_factory.mktemp("shedding_repo"), tiny_repository, queue_timeout_ms=300)
    return triton_server_factory(root)


def _show(check: OverloadCheck) -> None:
    print(f"\n{check.summary} (load average {check.load_average})")
    for t in check.targets:
        print(f"  {t.model}: offered {t.offered} at {t.rate_rps} req/s (reached {t.achieved_rps}), accepted "
              f"{t.accepted}, shed {t.shed}, failed {t.failed}, p50 {t.p50_ms} ms, p99 {t.p99_ms} ms, bound "
              f"{t.bound_ms} ms (batch {t.batch_ms} ms: {t.batch_source}; {t.burst_batch_source}); {t.messages}")


@pytest.mark.triton
def test_a_deployment_with_a_queue_policy_sheds_and_answers_the_same_logits(shedding_server, samples):
    settings = OverloadSettings(factor=3.0, seconds=1.5, max_requests=400)
    check = ov.run_overload_check(shedding_server.url_grpc, samples, settings, api_key=shedding_server.api_key,
                                  probe_seconds=0.5)
    _show(check)
    assert [(t.model, t.kind, t.skipped) for t in check.targets] == [("dinov2", "ensemble", None),
                                                                     ("slow_classifier", "classifier", None)]
    for t in check.targets:
        # the timeouts the server reports for the path's configs, not what this test wrote
        assert [(p.model, p.timeout_ms, p.has_policy) for p in t.policies] == (
            [("dinov2_preprocess", 300.0, True), ("slow_classifier", 300.0, True)] if t.kind == "ensemble"
            else [("slow_classifier", 300.0, True)])
        assert t.queue_timeout_ms == (600.0 if t.kind == "ensemble" else 300.0)
        assert t.offered <= 400 and t.offered == t.accepted + t.shed + t.failed
        assert t.shed > 0 and t.failed == 0, t.messages
        assert all("Request timeout expired" in m for m in t.messages), t.messages
        assert t.sheds.passed is True
        assert t.same_logits.passed is True and t.logits_max_abs_diff == 0.0
        # the verdict follows the numbers (their values are the machine's: not asserted)
        assert t.bound_ms == pytest.approx(t.queue_timeout_ms + max(t.batch_ms, t.burst_batch_ms), abs=0.01)
        assert t.p99_bounded.passed is (t.p99_ms <= t.bound_ms)
        assert t.batch_source.startswith("the slowest of 10 sequential batch-")
        assert t.burst_batch_source.startswith("Triton's compute of the burst's largest batches: ")
    assert check.passed is all(t.passed for t in check.targets)


@pytest.mark.triton
def test_the_timeout_is_the_served_one_and_http_503_counts_as_shed(shedding_server, samples):
    """A config loaded through the repository API with another timeout (the file still says 300 ms) is
    the one the check reports; over HTTP the refusals are 503s, counted as shed."""
    from dinov2_triton.export.triton_config import parse_config
    from dinov2_triton.serve.rollout import reload_model

    settings = OverloadSettings(factor=3.0, seconds=1.0, max_requests=250, protocol="http")
    with shedding_server.connect("http") as admin:
        config = admin.model_config("slow_classifier")
        config["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] = 450_000
        admin.load_model("slow_classifier", config=config)
        try:
            conn = ov.PerThreadConnection(shedding_server.url_http, "http", api_key=None, timeout_s=60)
            try:
                t = ov.check_target(conn, "slow_classifier", "classifier", samples, settings, probe_seconds=0.5)
            finally:
                conn.close()
        finally:
            reload_model(admin, "slow_classifier", repository=shedding_server.repository)
    print(f"\nHTTP: offered {t.offered}, accepted {t.accepted}, shed {t.shed}, failed {t.failed}, p99 {t.p99_ms} ms, "
          f"bound {t.bound_ms} ms; {t.messages}")
    written = parse_config((Path(shedding_server.repository) / "slow_classifier" / "config.pbtxt").read_text())
    assert written.dynamic_batching.default_queue_policy.default_timeout_microseconds == 300_000
    assert [p.timeout_ms for p in t.policies] == [450.0] and t.queue_timeout_ms == 450.0
    assert t.protocol == "http" and t.shed > 0 and t.failed == 0, t.messages
    assert t.sheds.passed is True and t.same_logits.passed is True


@pytest.mark.triton
def test_a_deployment_without_a_queue_policy_is_reported_as_such(triton_server_factory, tiny_repository, samples,
                                                                  tmp_path):
    server = triton_server_factory(_write_repository(tmp_path / "repo", tiny_repository, queue_timeout_ms=0))
    settings = OverloadSettings(factor=2.0, seconds=0.6, max_requests=60)
    check = ov.run_overload_check(server.url_grpc, samples, settings, probe_seconds=0.4)
    _show(check)
    assert [t.model for t in check.targets] == ["dinov2", "slow_classifier"]
    for t in check.targets:
        assert not any(p.has_policy for p in t.policies) and t.queue_timeout_ms is None
        assert t.shed == 0 and t.failed == 0 and t.accepted == t.offered > 0     # queued, every one answered
        assert t.sheds.passed is None and t.sheds.detail.startswith("no queue policy in the served config of")
        assert t.p99_bounded.passed is None and "no queue timeout" in t.p99_bounded.detail
        assert t.same_logits.passed is True and t.passed is None
    assert check.passed is None and "no queue policy (nothing shed)" in check.summary
    assert ov.strict_errors(check) == []
    strict = ov.run_overload_check(server.url_grpc, samples, settings.model_copy(update={"max_requests": 20,
                                                                                         "strict": True}),
                                   probe_seconds=0.2)
    assert [e.split(": no queue policy")[0] for e in ov.strict_errors(strict)] == [
        "overload check: dinov2", "overload check: slow_classifier"]


@pytest.mark.triton
def test_the_bench_stage_runs_the_check_last_and_reports_it(shedding_server, tmp_path):
    """run_perf(overload=...): after the sweep (whose points give the capacity), the check's section in
    results.json and the report's "Overload" section; a non-strict check adds no error."""
    from dinov2_triton.bench.perf_analyzer import MeasurementSettings
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.pipeline.bench_stage import run_perf

    run = run_perf(model_path=None, repository=shedding_server.repository, url=shedding_server.url_grpc,
                   models="dinov2,slow_classifier", in_process=False, parity=False, concurrency=[2],
                   batch_sizes=[MAX_BATCH], api_key=shedding_server.api_key,
                   settings=MeasurementSettings(window_ms=1000, fixed_requests=20, collect_metrics=False),
                   overload={"seconds": 1.0, "max_requests": 200}, out=tmp_path, run_id="ov")
    res = read_results(tmp_path / "ov" / "results.json")
    assert run.exit_code == (1 if res.errors else 0)
    check = res.overload
    print(f"\n{check.summary}")
    assert [t.model for t in check.targets] == ["dinov2", "slow_classifier"] and check.settings.max_requests == 200
    for t in check.targets:
        assert t.capacity_source.startswith(f"perf_analyzer sweep, best point: batch {MAX_BATCH}, concurrency 2")
        assert t.offered <= 200 and t.same_logits.passed is True
    assert not [e for e in res.errors if e.startswith("overload check")]
    md = (tmp_path / "ov" / "report.md").read_text()
    assert "## Overload" in md and "| `slow_classifier` |" in md and "same logits after the burst" in md
