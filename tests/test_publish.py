"""dinov2_triton/report/published.py and `dinov2-triton report publish`: measured results
as data (benchmarks/<date>-<cpu>.md + .json), its one writer and one reader, the
README block it rewrites, and the `report` command's subcommands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinov2_triton.bench.results import PerfResults, read_results
from dinov2_triton.core.records import RecordError
from dinov2_triton.report import cli
from dinov2_triton.report.published import (
    README_BEGIN,
    README_END,
    Publication,
    cpu_slug,
    newest_publication,
    publication_from_results,
    read_publication,
    readme_block,
    render_publication,
    write_publication,
)
from dinov2_triton.report.report import derive

DATA = Path(__file__).parent / "data"
SERVER = DATA / "perf_results_v1_server.json"
XEON = "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"


def _results_file(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of the stored server results with some top-level or machine/model fields changed."""
    data = json.loads(SERVER.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_publish_writes_md_and_json_named_by_date_and_cpu(tmp_path, capsys):
    assert cli.main(["publish", str(SERVER), "--out", str(tmp_path / "benchmarks")]) == 0
    md, js = tmp_path / "benchmarks" / "2026-11-27-test.md", tmp_path / "benchmarks" / "2026-11-27-test.json"
    assert f"published: {md}" in capsys.readouterr().out
    pub = read_publication(js)
    assert pub.schema_version == Publication.SCHEMA_VERSION and pub.date == "2026-11-27"
    # the .md is rendered from the record alone: the two cannot disagree
    assert md.read_text() == render_publication(pub)
    assert read_publication(md) == pub          # given the .md, the reader opens the .json beside it


def test_published_numbers_are_the_results_own(tmp_path):
    """Every published number comes from the results file: the derived rows and the raw
    perf_analyzer point at the operating point, the live parity, the CPU flags."""
    results = read_results(SERVER)
    final = derive(results)
    pub = publication_from_results([(results, str(SERVER))])
    (run,) = pub.runs
    op = final.operating_point
    assert (run.batch_size, run.concurrency, run.protocol) == (op.batch_size, op.concurrency, op.protocol)
    assert run.image_size == results.model.img_size and run.arch == results.model.arch
    rows = {r.key: r for r in final.rows}
    assert [v.key for v in run.variants] == [r.key for r in final.rows if r.kind != "preprocess"]
    for v in run.variants:
        r = rows[v.key]
        assert v.served_images_per_s == r.server.op_images_per_s
        assert v.in_process_images_per_s == r.in_process.op_images_per_s
        assert v.top1_agreement == r.accuracy.top1_agreement and v.gate_passed == r.gate.passed
        assert v.recommended == (v.key == final.recommendation.variant)
    onnx = next(v for v in run.variants if v.key == "dinov2_onnx")
    point = next(p for p in results.perf_analyzer.points if p.model == "dinov2_onnx" and p.protocol == op.protocol
                 and p.batch_size == op.batch_size and p.concurrency == op.concurrency)
    assert onnx.served_images_per_s == point.metrics["throughput_infer_per_s"]
    assert onnx.served_p99_ms == point.metrics["p99_latency_us"] / 1000
    parity = next(p for p in results.parity.variants if p.model == "dinov2_onnx_int8")
    int8 = next(v for v in run.variants if v.key == "dinov2_onnx_int8")
    assert int8.top1_agreement == parity.parity["top1_agreement"] and int8.gate_passed is False
    assert pub.cpu.model == results.machine.cpu_model and pub.cpu.flags == results.machine.cpu_flags
    assert pub.cpu.extensions == {"AVX2": True, "AVX-512": False, "VNNI": False, "BF16": False, "AMX": False}
    assert pub.versions == results.versions
    table = render_publication(pub)
    assert f"| {onnx.served_images_per_s:.1f} |" in table and "| FAIL |" in table
    # the TensorRT row says why it has no numbers, without the parenthesised detail the .json keeps
    trt = next(v for v in run.variants if v.key == "dinov2_trt_fp16")
    assert trt.reason == "not in the export manifest: TensorRT needs an NVIDIA GPU and TensorRT"
    assert "| SKIPPED: not in the export manifest: TensorRT needs an NVIDIA GPU and TensorRT |" in table
    trt.reason = "export SKIPPED: not built: needs an NVIDIA GPU and TensorRT (tensorrt not importable: No module)"
    assert "| SKIPPED: not built: needs an NVIDIA GPU and TensorRT |" in render_publication(pub)


@pytest.mark.parametrize("model, slug", [
    (XEON, "intel-xeon-platinum-8481c"),
    ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13"),
    ("Intel(R) Core(TM) i7-1185G7 @ 3.00GHz", "intel-core-i7-1185g7"),
    ("Neoverse-V2", "neoverse-v2"),
    ("(R)", "unknown-cpu"),
])
def test_cpu_slug(model, slug):
    assert cpu_slug(model) == slug


def test_extensions_read_from_the_flags(tmp_path):
    flags = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    path = _results_file(tmp_path, "r.json", machine__cpu_flags=flags, machine__cpu_model=XEON)
    pub = publication_from_results([(read_results(path), str(path))])
    assert all(pub.cpu.extensions.values()) and pub.stem == "2026-11-27-intel-xeon-platinum-8481c"
    assert "(AVX2 yes, AVX-512 yes, VNNI yes, BF16 yes, AMX yes)" in render_publication(pub)
    unknown = _results_file(tmp_path, "u.json", machine__cpu_flags=[])
    pub = publication_from_results([(read_results(unknown), str(unknown))])
    assert set(pub.cpu.extensions.values()) == {None} and "extensions not read" in render_publication(pub)


def test_two_runs_of_one_machine_in_one_file(tmp_path):
    model = json.loads(SERVER.read_text())["model"]
    small = _results_file(tmp_path, "56.json", model={**model, "img_size": 56}, run_id="run-56",
                          created="2026-11-28T09:00:00+00:00")
    assert cli.main(["publish", str(SERVER), str(small), "--out", str(tmp_path / "b")]) == 0
    pub = read_publication(tmp_path / "b" / "2026-11-28-test.json")      # the newest run's date
    assert [(r.image_size, r.run_id) for r in pub.runs] == [(56, "run-56"), (224, "test-run")]
    text = (tmp_path / "b" / "2026-11-28-test.md").read_text()
    assert text.index("## DINOv2 vits14, 56 px") < text.index("## DINOv2 vits14, 224 px")   # family and arch
    assert pub.kind == "runs" and "## Backbones" not in text        # one arch: no backbone table


def test_results_of_two_machines_are_refused(tmp_path, capsys):
    other = _results_file(tmp_path, "other.json", machine__cpu_model="Other CPU")
    assert cli.main(["publish", str(SERVER), str(other), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{other}: field 'machine.cpu_model': 'Other CPU' differs from {SERVER}" in err
    assert not (tmp_path / "b").exists()


def test_a_file_holding_other_runs_is_kept_unless_forced(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["publish", str(SERVER), "--out", str(out)]) == 0
    first = (out / "2026-11-27-test.json").read_text()
    assert cli.main(["publish", str(SERVER), "--out", str(out)]) == 0       # the same runs again: rewritten
    assert (out / "2026-11-27-test.json").read_text() == first              # ... to the same bytes
    other = _results_file(tmp_path, "again.json", run_id="second-run")
    assert cli.main(["publish", str(other), "--out", str(out)]) == 2
    assert "already holds other runs (test-run)" in capsys.readouterr().err
    assert read_publication(out / "2026-11-27-test.json").runs[0].run_id == "test-run"
    assert cli.main(["publish", str(other), "--out", str(out), "--force"]) == 0
    assert read_publication(out / "2026-11-27-test.json").runs[0].run_id == "second-run"


def test_bad_inputs_fail_with_one_line_naming_the_file(tmp_path, capsys):
    assert cli.main(["publish", str(tmp_path / "nope.json"), "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'nope.json'}: no such perf results.json" in capsys.readouterr().err
    bad_date = _results_file(tmp_path, "d.json", created="yesterday")
    assert cli.main(["publish", str(bad_date), "--out", str(tmp_path / "b")]) == 2
    assert f"{bad_date}: field 'created': expected an ISO date-time, got 'yesterday'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["publish", str(SERVER), "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'}: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=4), "field 'schema_version': 4 is newer than this code reads (3)"),
    (lambda d: d["cpu"].pop("model"), "field 'cpu.model': missing (required)"),
    (lambda d: d["runs"][0]["variants"][0].update(served_images_per_s="fast"),
     "field 'runs[0].variants[0].served_images_per_s': Input should be a valid number"),
    (lambda d: d.update(surprise=1), "field 'surprise': unknown field"),
])
def test_the_reader_names_file_and_field(tmp_path, edit, message):
    write_publication(tmp_path, publication_from_results([(read_results(SERVER), str(SERVER))]))
    path = tmp_path / "2026-11-27-test.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError) as exc:
        read_publication(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_newest_publication_goes_by_the_date_in_the_name(tmp_path):
    assert newest_publication(tmp_path) is None
    for name in ("2026-11-27-b.json", "2026-12-01-a.json", "2026-11-30-z.json", "notes.json"):
        (tmp_path / name).write_text("{}")
    assert newest_publication(tmp_path).name == "2026-12-01-a.json"


def test_readme_block_is_rewritten_between_its_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# tool\n\nintro\n\n{README_BEGIN}\nold table\n{README_END}\n\nmore text\n")
    out = tmp_path / "benchmarks"
    assert cli.main(["publish", str(SERVER), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    pub = read_publication(out / "2026-11-27-test.json")
    assert text == ("# tool\n\nintro\n\n" + readme_block(pub, "benchmarks/2026-11-27-test.md") + "\n\nmore text\n")
    assert "old table" not in text and "[benchmarks/2026-11-27-test.md](benchmarks/2026-11-27-test.md)" in text
    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("# nothing to replace\n")
    capsys.readouterr()
    assert cli.main(["publish", str(SERVER), "--out", str(out), "--readme", str(no_markers)]) == 2
    assert f"--readme {no_markers}: needs exactly one line" in capsys.readouterr().err


def test_report_subcommands(tmp_path, capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("render", "compare", "publish"))
    assert cli.main([]) == 2
    assert cli.main(["draw"]) == 2 and "unknown command 'draw'" in capsys.readouterr().err
    assert cli.main(["render", "--results", str(SERVER), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert cli.main(["compare", str(SERVER)]) == 0
    assert "### 224 px" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["publish", "--help"])
    assert "dinov2-triton report publish" in capsys.readouterr().out


def test_publication_refuses_an_empty_list_and_a_run_without_variants(tmp_path):
    with pytest.raises(ValueError, match="no results file given"):
        publication_from_results([])
    data = json.loads(SERVER.read_text())
    for key in ("in_process", "perf_analyzer", "parity"):
        data.pop(key)
    empty = PerfResults.from_dict(data, source="empty.json")
    with pytest.raises(RecordError, match="empty.json: no variant was measured"):
        publication_from_results([(empty, "empty.json")])


def test_capacity_at_the_slo_gets_its_column(tmp_path):
    def capacity(model, repeat, img_s):
        return {"model": model, "repeat": repeat, "capacity_rps": img_s, "capacity_img_s": img_s,
                "p99_at_capacity_ms": 80.0, "failed_rps": img_s * 1.05, "knee_rps": img_s / 2,
                "stop": "converged", "reason": "bisection closed", "wall_s": 60.0}
    path = _results_file(tmp_path, "cap.json", schema_version=3, capacity={
        "settings": {"slo_p99_ms": 100.0},
        "results": [capacity("dinov2_onnx", 1, 209.0), capacity("dinov2_onnx", 2, 230.5)]})
    pub = publication_from_results([(read_results(path), str(path))])
    (run,) = pub.runs
    assert run.slo_p99_ms == 100.0
    assert next(v for v in run.variants if v.key == "dinov2_onnx").capacity_img_s == [209.0, 230.5]
    text = render_publication(pub)
    assert "capacity img/s at p99 <= 100 ms" in text and "| 209.0 / 230.5 |" in text
    no_capacity = render_publication(publication_from_results([(read_results(SERVER), str(SERVER))]))
    assert "capacity img/s" not in no_capacity


def test_variants_the_export_was_not_asked_for_are_left_out_and_failures_are_listed(tmp_path):
    """With an export section, a variant missing from it and not measured is noise (not asked for);
    one the export SKIPPED stays with its reason; every failed perf_analyzer point is named."""
    data = json.loads(SERVER.read_text())
    data["export"] = {"variants": {
        name: {"model_name": f"dinov2_{name}", "precision": prec, "status": status, "gate_passed": status == "OK"}
        for name, prec, status in (("onnx", "fp32", "OK"), ("onnx_fp16", "fp16", "OK"), ("onnx_int8", "int8", "OK"),
                                   ("trt_fp16", "fp16", "SKIPPED"))}}
    ip = data["in_process"]["variants"]
    ip["openvino"] = {**ip["trt_fp16"], "name": "openvino", "label": "OpenVINO", "precision": "fp32",
                      "platform": "openvino", "model_name": "dinov2_openvino",
                      "reason": "not in the export manifest: export it with: dinov2-triton export --variants openvino"}
    data["perf_analyzer"]["failures"] = [{"model": "dinov2_onnx", "reason": "perf_analyzer on model 'dinov2_onnx' "
                                          "over grpc (batch 8, concurrency 2) failed (unstable): Failed to obtain ..."}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    (run,) = publication_from_results([(read_results(path), str(path))]).runs
    keys = [v.key for v in run.variants]
    assert "dinov2_openvino" not in keys and "dinov2_trt_fp16" in keys and "dinov2_onnx" in keys
    assert run.not_measured == ["perf_analyzer on model 'dinov2_onnx' over grpc (batch 8, concurrency 2) "
                                "failed (unstable)"]
    pub = publication_from_results([(read_results(path), str(path))])
    assert "- perf_analyzer on model 'dinov2_onnx' over grpc (batch 8, concurrency 2) failed (unstable)" in \
        render_publication(pub)
    assert "1 measurement(s) failed; the file lists them." in readme_block(pub, "b.md")
    # without an export section nothing is dropped: the stored run keeps its TensorRT row
    (plain,) = publication_from_results([(read_results(SERVER), str(SERVER))]).runs
    assert "dinov2_trt_fp16" in [v.key for v in plain.variants]
    assert plain.not_measured == ["perf_analyzer on model 'dinov2_preprocess' ... failed (unstable)"]


def _sweep(tmp_path: Path) -> Path:
    """A sweep's work folder as `dinov2-triton pipeline --recipe backbones` leaves it: one run
    folder per backbone, each with its reports/<run>/results.json (the vits14 one twice: an
    older bench run and a newer one), made from the stored server results."""
    model = json.loads(SERVER.read_text())["model"]
    sweep = tmp_path / "sweep"
    for name, arch, run_id, created, acc in (
            ("vits14", "vits14", "old-v2", "2026-11-28T08:00:00+00:00", 0.50),
            ("vits14", "vits14", "run-v2", "2026-11-28T09:00:00+00:00", 0.61),
            ("dinov3_vits16", "dinov3_vits16", "run-v3", "2026-11-28T09:30:00+00:00", 0.58)):
        folder = sweep / name / "reports" / run_id
        folder.mkdir(parents=True)
        metrics = {"test": {"n": 300, "accuracy": acc, "f1_macro": acc - 0.01}}
        (folder / "results.json").write_text(_results_file(
            tmp_path, f"{run_id}.json", run_id=run_id, created=created,
            model={**model, "arch": arch, "img_size": 112, "checkpoint_metrics": metrics},
            flops={"flops": 3_000_000_000, "gflops": 3.0, "image_size": 112, "method": "test"},
            machine__load_average=[1.5, 1.0, 0.5]).read_text())
    (sweep / "recipe.yaml").write_text("# not a run folder\n")
    (sweep / "reports").mkdir()
    (sweep / "reports" / "sweep-table.md").write_text("the runner's side-by-side table\n")
    return sweep


def test_a_sweep_folder_publishes_one_backbone_comparison(tmp_path, capsys):
    """Given the sweep's folder, publish takes each run's newest results.json; runs of two archs
    make a backbone comparison: its own file name, a backbone table (family, arch, size,
    parameters, training's test accuracy and F1, the recommended variant's gate and
    throughput) above each run's variant table, and a README block of that table."""
    from dinov2_triton.train.archs import parameter_count

    sweep = _sweep(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# tool\n\n{README_BEGIN}\nold\n{README_END}\n")
    assert cli.main(["publish", str(sweep), "--out", str(tmp_path / "b"), "--readme", str(readme)]) == 0
    js = tmp_path / "b" / "2026-11-28-test-backbones.json"
    pub = read_publication(js)
    assert pub.kind == "backbones" and pub.stem == js.stem
    assert [(r.run_id, r.arch, r.family, r.image_size) for r in pub.runs] == [
        ("run-v2", "vits14", "DINOv2", 112), ("run-v3", "dinov3_vits16", "DINOv3", 112)]
    v2, v3 = pub.runs
    assert (v2.test_accuracy, v2.test_f1_macro, v3.test_accuracy) == (0.61, 0.60, 0.58)
    assert v2.backbone_params == parameter_count("vits14", 112) != v3.backbone_params == \
        parameter_count("dinov3_vits16", 112)
    assert v2.gflops_per_image == 3.0 and v2.load_average_1min == 1.5
    md = (tmp_path / "b" / "2026-11-28-test-backbones.md").read_text()
    assert md == render_publication(pub)
    rec = next(v for v in v3.variants if v.recommended)
    eager = next(v for v in v3.variants if v.key == "pytorch")
    onnx = next(v for v in v3.variants if v.key == "dinov2_onnx")
    row = next(line for line in md.splitlines() if line.startswith("| `dinov3_vits16` |"))
    assert (f"| `dinov3_vits16` | DINOv3 | 112 | {v3.backbone_params / 1e6:.2f} | 3.00 | random init | 58.0% | "
            f"57.0% | `{rec.key}` ({rec.precision}) | pass | {rec.served_images_per_s:.1f} | "
            f"{rec.in_process_images_per_s:.1f} | {onnx.served_images_per_s:.1f} | "
            f"{eager.in_process_images_per_s:.1f} |") == row
    assert "(perf_analyzer through Triton, batch 8, concurrency 2 over grpc)" in md
    assert md.index("## Backbones") < md.index("## DINOv2 vits14, 112 px") < md.index("## DINOv3 dinov3_vits16, 112 px")
    assert "Randomly initialised: DINOv2 vits14, DINOv3 dinov3_vits16" in md
    assert "the accuracy is not a DINOv3 fine-tune's" not in md            # the weights say "random init" already
    text = readme.read_text()
    assert readme_block(pub, "b/2026-11-28-test-backbones.md") in text and "| `vits14` | DINOv2 | 112 |" in text
    assert "| variant | precision |" not in text          # the README shows the backbone table; the file has the rest
    # the same runs named as files publish the same record
    files = [str(sweep / "vits14" / "reports" / "run-v2" / "results.json"),
             str(sweep / "dinov3_vits16" / "reports" / "run-v3" / "results.json")]
    assert publication_from_results([(read_results(f), f) for f in files]).runs == pub.runs


def test_a_folder_without_results_is_named(tmp_path, capsys):
    (tmp_path / "work" / "reports").mkdir(parents=True)
    assert cli.main(["publish", str(tmp_path / "work"), "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path / 'work'}: no reports/<run>/results.json in it or in its run folders" in capsys.readouterr().err


def test_a_schema_1_file_reads_and_renders_as_it_was(tmp_path):
    """Schema 1 did not record the backbone: read as schema 3 with those fields None, it
    renders as before (no family in the heading), so files already published stay valid."""
    pub = publication_from_results([(read_results(SERVER), str(SERVER))])
    md, js = write_publication(tmp_path, pub)
    data = json.loads(js.read_text())
    data["schema_version"] = 1
    data.pop("kind")
    for run in data["runs"]:
        for key in ("family", "backbone_params", "gflops_per_image", "test_accuracy", "test_f1_macro", "serving",
                    "overload"):
            run.pop(key)
    js.write_text(json.dumps(data))
    old = read_publication(js)
    assert old.schema_version == 3 and old.kind == "runs" and old.runs[0].family is None
    assert "## vits14, 224 px" in render_publication(old)
    assert render_publication(old).replace("## vits14,", "## DINOv2 vits14,") == md.read_text()


def test_of_one_date_the_newest_publication_is_the_last_measured(tmp_path):
    """The README cites the newest file: by date, and between files of one date (a run and a
    backbone comparison) the one whose newest run was measured last, as its record says."""
    pub = publication_from_results([(read_results(SERVER), str(SERVER))])
    write_publication(tmp_path, pub)
    later = publication_from_results([(read_results(f), f) for f in
                                      [str(p) for p in sorted(_sweep(tmp_path).glob("*/reports/run-*/results.json"))]])
    later_day = later.model_copy(update={"date": "2026-11-27"})
    write_publication(tmp_path, later_day)
    assert sorted(p.name for p in tmp_path.glob("2026-*.json")) == ["2026-11-27-test-backbones.json",
                                                                     "2026-11-27-test.json"]
    assert newest_publication(tmp_path).name == "2026-11-27-test-backbones.json"


@pytest.mark.parametrize("arch", ["vits14_reg4", "dinov3_vits16"])
def test_published_parameters_are_those_of_the_built_backbone(arch):
    """archs.parameter_count (meta device, no weights) counts what build_model builds."""
    from dinov2_triton.train.archs import parameter_count
    from dinov2_triton.train.model import build_model

    tiny = {"depth": 1, "embed_dim": 64, "num_heads": 2}
    model = build_model(arch, num_classes=3, img_size=32 if arch.startswith("dinov3") else 28,
                        backbone_overrides=tiny).model
    want = sum(p.numel() for p in model.backbone.parameters())
    assert parameter_count(arch, 32 if arch.startswith("dinov3") else 28, **tiny) == want


def test_the_bench_report_names_the_family_with_the_arch(tmp_path):
    model = json.loads(SERVER.read_text())["model"]
    path = _results_file(tmp_path, "v3.json", model={**model, "arch": "dinov3_vits16", "img_size": 112})
    assert cli.main(["render", "--results", str(path), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "(DINOv3 dinov3_vits16, 112 px, 10 classes)" in text and "DINOv2" not in text


def test_the_tune_ab_and_the_overload_check_are_published(tmp_path):
    """A run with the tune stage's A/B and the overload check: both tables in the file, from the record."""
    from dinov2_triton.bench.capacity_records import ServingChoice
    from dinov2_triton.bench.overload_records import OverloadCheck

    cap = {"model": "dinov2_onnx", "capacity_rps": 41.5, "capacity_img_s": 41.5, "p99_at_capacity_ms": 90.0,
           "failed_rps": 46.0, "knee_rps": None, "stop": "converged", "reason": "bisected", "wall_s": 30.0}
    config = {"instances": 2, "threads": 1, "max_queue_delay_us": 2000, "preferred_batch_sizes": [],
              "max_batch_size": 8}
    serving = ServingChoice.model_validate({
        "model": "dinov2_onnx", "slo_p99_ms": 100.0, "search_run": "reports/tune-x",
        "ab": [{"key": "k", "config": config, "with_policy": cap, "without_policy": {**cap, "capacity_img_s": 40.0},
                "ratio": 1.04, "tolerance": 0.2, "costs": False, "verdict": "the policy costs no capacity"}]})
    claim = {"passed": True, "detail": "accepted p99 2100 ms <= 2000 ms queue timeout + 300 ms one batch"}
    overload = OverloadCheck.model_validate({
        "settings": {}, "url": "localhost:1", "targets": [
            {"model": "dinov2", "kind": "ensemble", "offered": 600, "accepted": 200, "shed": 400, "failed": 0,
             "achieved_rps": 120.0, "p99_ms": 2100.0, "bound_ms": 2300.0, "sheds": claim, "p99_bounded": claim,
             "same_logits": {"passed": False, "detail": "max |diff| 1e-3"}},
            {"model": "dinov2_onnx", "kind": "classifier", "skipped": "not asked for"}]})
    res = read_results(SERVER)
    try:
        res = res.model_copy(update={"serving": serving, "overload": overload})
    except Exception as exc:   # pragma: no cover - the record must take both sections
        pytest.fail(f"PerfResults does not take serving/overload: {exc}")
    pub = publication_from_results([(res, "x.json")])
    run = pub.runs[0]
    assert [(a.model, a.ratio, a.with_policy_img_s) for a in run.serving] == [("dinov2_onnx", 1.04, 41.5)]
    assert "2 instance(s), 1 intra-op threads" in run.serving[0].configuration
    assert [(t.model, t.shed, t.sheds, t.same_logits) for t in run.overload] == [("dinov2", 400, True, False)]
    md = render_publication(pub)
    assert "| `dinov2_onnx` | 2 instance(s)" in md and "| 41.5 | 40.0 | 1.04 | the policy costs no capacity |" in md
    assert "| `dinov2` | 600 (120.0) | 200 | 400 | 0 | 2100 | 2300 | PASS | PASS | FAIL |" in md
    md_path, js = write_publication(tmp_path, pub)
    assert read_publication(js).runs[0].overload == run.overload


def test_a_served_ranking_that_disagrees_with_the_deployed_choice_is_published(tmp_path):
    """The report's warning that another gated variant served faster than the one the ensemble calls
    travels into the published file."""
    res = read_results(SERVER)
    export = (res.export.model_dump() if res.export else {}) | {"ensemble": {
        "status": "OK", "classifier": "dinov2_onnx_fp16", "classifier_choice": "fastest gated (auto)",
        "classifier_reason": "auto: the fastest gated variant measured in this run, onnx_fp16",
        "classifier_ranking": [{"variant": "onnx_fp16", "model_name": "dinov2_onnx_fp16", "images_per_s": 50.0}]}}
    res = res.model_copy(update={"export": type(res).model_fields["export"].annotation.__args__[0]
                                 .model_validate(export)})
    run = publication_from_results([(res, "x.json")]).runs[0]
    md = render_publication(publication_from_results([(res, "x.json")]))
    # the stored run served dinov2_onnx at 28.8 img/s, the deployed dinov2_onnx_fp16 at 21.6
    assert run.recommendation == "dinov2_onnx_fp16"
    assert run.recommendation_warnings == [w for w in run.recommendation_warnings
                                           if w.startswith("served through Triton, dinov2_onnx measured 28.8")]
    assert len(run.recommendation_warnings) == 1 and f"**Warning**: {run.recommendation_warnings[0]}" in md
