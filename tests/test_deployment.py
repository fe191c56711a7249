"""The `dinov2` ensemble follows the bench's served ranking: it is pointed at
the fastest variant served through Triton that passed its gate, the same
variant the report recommends (dinov2_triton.pipeline.bench_stage.follow_fastest,
dinov2_triton.export.serving_models.repoint_ensemble); a variant that failed its gate
is never chosen."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dinov2_triton.export.auto import CHOSEN_FASTEST, CHOSEN_SERVED
from dinov2_triton.export.manifest import read_export_manifest, write_export_manifest
from dinov2_triton.export.serving_models import RepointError, repoint_ensemble
from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, parse_config


def _copy(tiny_repository: Path, tmp_path: Path, *, gate_failed: str | None = None) -> Path:
    """A copy of the tiny repository as an `auto` export left it; ``gate_failed``: that
    variant published although it failed its gate (export --allow-failed-gates)."""
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repository, repo)
    m = read_export_manifest(repo)
    m.ensemble.classifier_choice = CHOSEN_FASTEST
    if gate_failed:
        e = m.variants[gate_failed]
        e.status, e.gate_passed, e.gate_failures = "GATE_FAILED", False, ["top-1 agreement 0.50 < 0.99"]
        e.reason = "gate failed: top-1 agreement 0.50 < 0.99"
    write_export_manifest(m, repo)
    return repo


def _steps(repo: Path) -> list[str]:
    cfg = parse_config((repo / ENSEMBLE_MODEL / "config.pbtxt").read_text())
    return [s.model_name for s in cfg.ensemble_scheduling.step]


def test_repoint_publishes_a_new_ensemble_version_and_records_why(tiny_repository, tmp_path):
    repo = _copy(tiny_repository, tmp_path)
    assert _steps(repo) == ["dinov2_preprocess", "dinov2_onnx"]
    labels = (repo / ENSEMBLE_MODEL / "labels.txt").read_bytes()
    ranking = [{"model_name": "dinov2_torchscript", "images_per_s": 50.0, "source": "served"},
               {"model_name": "dinov2_onnx", "images_per_s": 40.0, "source": "served"}]
    entry = repoint_ensemble(repo, "dinov2_torchscript", why="fastest served", ranking=ranking,
                             choice=CHOSEN_SERVED)
    assert _steps(repo) == ["dinov2_preprocess", "dinov2_torchscript"]
    assert entry.version == 2 and (repo / ENSEMBLE_MODEL / "2").is_dir()
    assert (repo / ENSEMBLE_MODEL / "labels.txt").read_bytes() == labels
    m = read_export_manifest(repo)
    assert m.ensemble == entry
    assert (m.ensemble.classifier, m.ensemble.classifier_choice, m.ensemble.classifier_reason,
            m.ensemble.classifier_ranking) == ("dinov2_torchscript", CHOSEN_SERVED, "fastest served", ranking)
    # the same classifier again: no new version, the reason is updated
    again = repoint_ensemble(repo, "dinov2_torchscript", why="still the fastest", ranking=ranking,
                             choice=CHOSEN_SERVED)
    assert again.version == 2 and read_export_manifest(repo).ensemble.classifier_reason == "still the fastest"


@pytest.mark.parametrize("model, message", [
    ("dinov2_onnx", r"dinov2_onnx: may not be deployed \(status GATE_FAILED"),
    ("dinov2_trt_fp16", r"dinov2_trt_fp16: not a variant of .*export_manifest.json"),
])
def test_a_variant_that_failed_its_gate_is_never_pointed_at(tiny_repository, tmp_path, model, message):
    repo = _copy(tiny_repository, tmp_path, gate_failed="onnx")
    before = {p: p.read_bytes() for p in (repo / "export_manifest.json", repo / ENSEMBLE_MODEL / "config.pbtxt")}
    with pytest.raises(RepointError, match=message):
        repoint_ensemble(repo, model, why="-", ranking=[], choice=CHOSEN_SERVED)
    assert {p: p.read_bytes() for p in before} == before       # nothing written
    assert sorted(p.name for p in (repo / ENSEMBLE_MODEL).iterdir()) == ["1", "config.pbtxt", "labels.txt"]


@pytest.mark.triton
@pytest.mark.slow
def test_the_bench_points_the_ensemble_at_what_the_report_recommends(tiny_checkpoint, tiny_repository,
                                                                     tiny_dataset, triton_server_factory, tmp_path):
    """The ensemble calls dinov2_onnx, which (here) failed its gate: the bench measures
    both classifiers served, moves the ensemble to the gated one before measuring
    the ensemble, and the report recommends what the server now serves."""
    from dinov2_triton.bench.perf_analyzer import MeasurementSettings, find_perf_analyzer
    from dinov2_triton.pipeline.bench_stage import run_perf
    from dinov2_triton.serve.triton_access import connect

    find_perf_analyzer()
    repo = _copy(tiny_repository, tmp_path, gate_failed="onnx")
    server = triton_server_factory(repo)
    run = run_perf(model_path=tiny_checkpoint, repository=repo, data_path=tiny_dataset, url=server.url_grpc,
                   metrics_url=server.url_metrics, concurrency=[1], batch_sizes=[2], keep_going=True,
                   in_process=False, parity=False, deploy_fastest=True,
                   settings=MeasurementSettings(window_ms=1000, fixed_requests=20),
                   api_key=server.api_key, out=tmp_path / "reports", run_id="follow")
    res = run.results
    assert run.exit_code == 0, res.errors
    dep = res.deployment
    assert (dep.before, dep.after) == ("dinov2_onnx", "dinov2_torchscript"), dep
    rec = run.report.recommendation
    assert rec.variant == dep.after
    assert any(r.variant == "dinov2_onnx" and r.reason.startswith("gate FAILED") for r in rec.rejected), rec.rejected
    # what is served, on disk and in the manifest: the recommendation
    with connect(server.url_grpc, "grpc", api_key=server.api_key) as conn:
        served = [s["model_name"] for s in conn.model_config(ENSEMBLE_MODEL)["ensemble_scheduling"]["step"]]
    assert served == _steps(repo) == ["dinov2_preprocess", "dinov2_torchscript"]
    m = read_export_manifest(repo)
    assert (m.ensemble.classifier, m.ensemble.classifier_choice) == ("dinov2_torchscript", CHOSEN_SERVED)
    assert res.export.ensemble["classifier"] == "dinov2_torchscript"
    # the classifiers were measured before the move, the ensemble after it
    order = [p.model for p in res.perf_analyzer.points]
    assert order.index(ENSEMBLE_MODEL) > max(order.index("dinov2_onnx"), order.index("dinov2_torchscript"))
    assert not rec.warnings or all("chose otherwise" not in w for w in rec.warnings)


def test_the_bench_moving_the_ensemble_does_not_make_the_export_stale(tiny_repository, tmp_path):
    """The export stage's stamp covers the manifest; the bench's move rewrites it, and
    is recorded as the export's output, so an unchanged export is skipped next time."""
    from types import SimpleNamespace

    from dinov2_triton.core.stage_stamp import Stamp
    from dinov2_triton.pipeline.stages import keep_export_current

    repo = _copy(tiny_repository, tmp_path)
    stamp = Stamp(tmp_path / "state", "export", inputs=[repo / "dinov2_onnx"], params=["export={}"],
                  outputs=[repo / "export_manifest.json"])
    stamp.finish()
    assert stamp.check()[0]
    repoint_ensemble(repo, "dinov2_torchscript", why="fastest served", ranking=[], choice=CHOSEN_SERVED)
    assert stamp.check() == (False, f"output {repo / 'export_manifest.json'} changed since it was written")
    moved = SimpleNamespace(deployment=object())
    assert keep_export_current(SimpleNamespace(export_stamp=None), moved) is False     # export not up to date
    assert keep_export_current(SimpleNamespace(export_stamp=stamp), SimpleNamespace(deployment=None)) is False
    assert keep_export_current(SimpleNamespace(export_stamp=stamp), moved) is True
    assert stamp.check()[0]
