"""dinov2-triton pipeline: recipe files (validation, layers), stage skipping and
--force on the real data stage, and one end-to-end run of every stage on tiny
settings against the real local Triton server."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dinov2_triton.pipeline import recipes
from dinov2_triton.pipeline.recipes import Recipe, RecipeError, resolve
from dinov2_triton.pipeline.runner import main, run_pipeline

# A tiny Fashion-MNIST run: 2x2 patches of 14 px, a 2-block ViT of width 48.
TINY_DATA = ["data.per_class=4", "data.test_per_class=2"]
TINY = TINY_DATA + [
    "train.img_size=28", "train.backbone_overrides={depth: 2, embed_dim: 48, num_heads: 3}", "train.epochs=1",
    "train.batch_size=16", "train.num_workers=0",
    "export.variants=[onnx]", "export.bench_seconds=0", "export.eval_size=16", "export.calib_size=16",
]


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", recipes.shipped_recipes())
def test_every_shipped_recipe_validates(name, tmp_path):
    images = tmp_path if name == "images" else None
    r = resolve(name, images=images)
    assert r.recipe.ordered_stages()
    for _, run in r.runs:
        assert isinstance(run, Recipe)


def test_the_shipped_recipes_are_what_the_scripts_were():
    assert {"demo", "images", "bench-224", "cpu-sweep", "capacity"} <= set(recipes.shipped_recipes())
    demo = resolve("demo").recipe
    assert demo == Recipe(description=demo.description), "the record's defaults are the demo recipe"
    assert (demo.train.img_size, demo.data.per_class, demo.train.epochs) == (56, 300, 5)
    bench = resolve("bench-224").recipe
    assert (bench.train.img_size, bench.train.mode, bench.train.cache_features) == (224, "linear", True)
    assert bench.workdir == "runs/bench-224" and bench.export.allow_failed_gates
    sweep = resolve("cpu-sweep")
    assert [n for n, _ in sweep.runs] == ["56px", "224px"]
    assert [r.train.img_size for _, r in sweep.runs] == [56, 224]
    assert all(r.export.variants == ["auto"] and r.bench.thread_study for _, r in sweep.runs)
    cap = resolve("capacity").recipe
    assert cap.ordered_stages() == ["serve", "capacity"] and cap.omp_num_threads == 1


def test_train_section_covers_the_finetune_config():
    """Every FinetuneConfig field is a train key (or set by the pipeline itself)."""
    from dataclasses import fields

    from dinov2_triton.train.finetune_config import FinetuneConfig

    train_keys = set(recipes.TrainSection.model_fields) - {"augment"} | {"no_augment"}
    config_keys = {f.name for f in fields(FinetuneConfig)} - set(recipes.PIPELINE_TRAIN_FIELDS)
    assert train_keys == config_keys


@pytest.mark.parametrize("text,field,msg", [
    ("base: demo\ntrain:\n  epoch: 5\n", "train.epoch", "unknown field"),
    ("base: demo\ntrain:\n  epochs: five\n", "train.epochs", "valid integer"),
    ("train:\n  img_size: 50\n", "train.img_size", "multiple of the patch size 14"),
    ("export:\n  variants: [onnx, tensorflow]\n", "export.variants", "unknown variant"),
    ("bench:\n  protocols: [grpc, smtp]\n", "bench.protocols[1]", "'grpc' or 'http'"),
    ("stages: [data, bench]\n", "stages", "need(s) the local server"),
])
def test_a_bad_recipe_file_names_the_file_and_the_key(tmp_path, text, field, msg):
    path = _write(tmp_path / "mine.yaml", text)
    with pytest.raises(RecipeError) as err:
        resolve(str(path))
    assert str(err.value).startswith(f"{path}: field '{field}'"), err.value
    assert msg in str(err.value)


def test_errors_name_the_layer_that_set_the_value(tmp_path):
    _write(tmp_path / "base.yaml", "base: demo\ntrain:\n  epochs: 2\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\ndata:\n  per_class: -1\n")
    with pytest.raises(RecipeError, match=rf"^{child}: field 'data.per_class': Input should be greater"):
        resolve(str(child))
    assert resolve(str(child), sets=["data.per_class=3"]).recipe.train.epochs == 2
    loop = _write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(RecipeError, match="base chain loops"):
        resolve(str(loop))
    with pytest.raises(RecipeError, match="field 'sweep'.*'b'"):
        resolve("demo", sets=["sweep=[{name: b}, {name: b}]"])
    with pytest.raises(RecipeError, match=r"sweep\[0\] 'x'.*field 'train.epochs'"):
        resolve("demo", sets=["sweep=[{name: x, overlay: {train: {epochs: [1]}}}]"])
    with pytest.raises(RecipeError, match="no such recipe; shipped: .*demo"):
        resolve("demoo")
    with pytest.raises(RecipeError, match="not valid YAML"):
        resolve(str(_write(tmp_path / "bad.yaml", "train: [\n")))


def test_config_and_set_overlay_the_recipe_in_order(tmp_path):
    cfg = _write(tmp_path / "over.yaml", {"train": {"epochs": 3, "lr": 0.01}, "bench": {"concurrency": [2]}})
    r = resolve("bench-224", config=cfg, sets=["train.epochs=1", "export.variants=[onnx, onnx_int8]"])
    t = r.recipe.train
    assert (t.epochs, t.lr, t.img_size, t.mode) == (1, 0.01, 224, "linear")   # --set > --config > recipe
    assert r.recipe.bench.concurrency == [2] and r.recipe.export.variants == ["onnx", "onnx_int8"]
    assert [layer.source for layer in r.layers][-3:] == [str(cfg), "--set train.epochs=1",
                                                         "--set export.variants=[onnx, onnx_int8]"]
    with pytest.raises(RecipeError, match=rf"^{cfg}: field 'train.lr': Input should be a valid number"):
        resolve("demo", config=_write(cfg, {"train": {"lr": "fast"}}))
    with pytest.raises(RecipeError, match="'base': not allowed in a --config"):
        resolve("demo", config=_write(cfg, {"base": "demo"}))
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        resolve("demo", sets=["train.epochs"])
    # --set and the overlay of a sweep: --set wins over every run's overlay
    sweep = resolve("cpu-sweep", sets=["train.epochs=1"])
    assert [run.train.epochs for _, run in sweep.runs] == [1, 1]
    # --images: the images recipe, the folder absolute
    img = resolve(None, images=tmp_path)
    assert img.name == "images" and img.recipe.data.images == str(tmp_path.resolve())
    with pytest.raises(RecipeError, match="images.yaml: field 'data': source image-folder needs data.images"):
        resolve("images")


def test_the_resolved_recipe_is_a_recipe_file(tmp_path, capsys):
    assert main(["--recipe", "bench-224", "--set", "train.epochs=2", "--print-recipe"]) == 0
    text = capsys.readouterr().out
    assert "--set train.epochs=2" in text          # the layers, as comments
    path = _write(tmp_path / "resolved.yaml", text)
    assert resolve(str(path)).recipe == resolve("bench-224", sets=["train.epochs=2"]).recipe


def test_train_settings_follow_the_weights():
    from dinov2_triton.pipeline.recipes import train_settings

    t = resolve("demo").recipe.train
    random = train_settings(t, weights="random", pretrained=False)
    assert (random["lr"], random["layer_decay"], random["no_augment"], random["lp_epochs"]) == (1e-3, 1.0, True, 0)
    pre = train_settings(t, weights="/w.pth", pretrained=True)
    assert (pre["lr"], pre["layer_decay"], pre["no_augment"], pre["lp_epochs"]) == (1e-4, 0.75, False, 1)
    linear = train_settings(t.model_copy(update={"mode": "linear"}), weights="/w.pth", pretrained=True)
    assert linear["lp_epochs"] == 0
    with pytest.raises(RecipeError, match="^train: --lp-epochs"):
        train_settings(t.model_copy(update={"mode": "linear", "lp_epochs": 2}), weights="random", pretrained=False)
    explicit = train_settings(t.model_copy(update={"lr": 0.5}), weights="random", pretrained=False)
    assert explicit["lr"] == 0.5


def test_bad_input_exits_2_with_the_key(tmp_path, capsys):
    assert main(["--set", "train.epochs=x", "--workdir", str(tmp_path)]) == 2
    assert "--set train.epochs=x: field 'train.epochs'" in capsys.readouterr().err
    assert main(["--force", "trian", "--workdir", str(tmp_path)]) == 2
    assert "unknown stage(s) ['trian']" in capsys.readouterr().err
    assert main(["--images", str(tmp_path / "nowhere"), "--workdir", str(tmp_path)]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().out
    # the capacity recipe needs an exported repository in the workdir
    assert main(["--recipe", "capacity", "--workdir", str(tmp_path / "empty")]) == 2
    assert "export_manifest.json, which the export stage writes" in capsys.readouterr().out


# --------------------------------------------------------------------------- skipping
def _run(workdir: Path, *sets: str, force: str = "", recipe: str | None = None):
    from dinov2_triton.pipeline.runner import parse_force

    out = run_pipeline(resolve(recipe, sets=list(sets)), workdir, force=parse_force(force), say=lambda m: None)
    return out.exit_code, {r.stage: r.status for r in out.results}


def test_a_stage_skips_when_its_inputs_are_unchanged_and_force_redoes_it(tmp_path):
    """The real data stage (Fashion-MNIST, 4 images per class): skipped by its
    stamp, redone by --force, by a changed setting, or a changed output."""
    data_only = [*TINY_DATA, "stages=[data]"]
    assert _run(tmp_path, *data_only) == (0, {"data": "ran"})
    assert (tmp_path / "recipe.yaml").is_file() and (tmp_path / "logs" / "pipeline_times.txt").is_file()
    assert _run(tmp_path, *data_only) == (0, {"data": "skipped"})
    assert _run(tmp_path, *data_only, force="data") == (0, {"data": "ran"})
    assert _run(tmp_path, *data_only, force="all") == (0, {"data": "ran"})
    assert _run(tmp_path, *data_only) == (0, {"data": "skipped"})
    assert _run(tmp_path, *data_only, "data.seed=1") == (0, {"data": "ran"})
    (tmp_path / "data" / "summary.json").write_text("{}")
    assert _run(tmp_path, *data_only, "data.seed=1") == (0, {"data": "ran"})
    assert _run(tmp_path, *data_only, "data.seed=1") == (0, {"data": "skipped"})


# --------------------------------------------------------------------------- end to end
@pytest.mark.triton
@pytest.mark.slow
def test_the_pipeline_runs_every_stage_to_the_report_and_stops_the_server(tmp_path, capfd):
    import psutil

    from dinov2_triton.bench.results import read_results

    work = tmp_path / "work"
    # every stage at its smallest: the tune stage's own claims are tests/test_search.py's, the overload
    # check's tests/test_overload.py's; here they run once, short, in the pipeline
    cfg = _write(tmp_path / "tiny.yaml", {
        "tune": {"instances": [2], "threads": [1], "budget_min": 0.3, "point_budget_s": 8.0, "ab_budget_s": 8.0,
                 "rate_window_ms": 500, "alternatives": 0},
        "classify": {"protocols": ["grpc", "http"]},
        "bench": {"in_process": False, "concurrency": [1], "batch_sizes": [1], "fixed_requests": 20,
                  "parity_max_images": 8, "overload": {"seconds": 1.0, "max_requests": 200}}})
    argv = ["--config", str(cfg), "--workdir", str(work)] + [a for s in TINY for a in ("--set", s)]
    assert main(argv) == 0
    out = capfd.readouterr().out
    assert "NO PRETRAINED DINOv2 WEIGHTS AVAILABLE" in out
    assert "accuracy" in out and "over grpc" in out and "over http" in out
    assert "stage times" in out
    times = (work / "logs" / "pipeline_times.txt").read_text()
    for stage in ("data", "train", "export", "serve", "tune", "classify", "bench"):
        assert f"\n{stage} " in "\n" + times and "failed" not in times, times
    reports = [p for p in (work / "reports").iterdir() if (p / "results.json").is_file()]
    assert len(reports) == 1 and (reports[0] / "report.md").is_file()
    res = read_results(reports[0] / "results.json")
    assert res.perf_analyzer and res.perf_analyzer.points and not res.errors
    assert res.parity and res.parity.n_images == 8
    assert {v.model: (v.passed, v.error) for v in res.parity.variants}["dinov2_onnx"] == (True, None)
    # the tune stage runs after the bench on what the ensemble calls; its choice and the overload check of
    # the deployment as tuned land in the bench's results
    assert res.serving is not None and res.serving.model == "dinov2_onnx"
    assert res.overload is not None and {t.model for t in res.overload.targets} == {"dinov2", "dinov2_onnx"}
    assert "## Overload" in (reports[0] / "report.md").read_text()
    assert yaml.safe_load((work / "recipe.yaml").read_text())["train"]["epochs"] == 1
    assert not (work / "logs" / "triton.pid").exists()
    log_head = (work / "logs" / "triton.log").read_text().splitlines()[0]
    assert "starting tritonserver" in log_head

    # unchanged inputs: data, train and export are skipped; the server is stopped again
    outcome = run_pipeline(resolve(None, sets=[*TINY, "stages=[data, train, export, serve]"]), work,
                           say=lambda m: None)
    assert outcome.exit_code == 0
    assert [r.status for r in outcome.results] == ["skipped", "skipped", "skipped", "ran"]
    pids = outcome.contexts[0].server_pids
    assert len(pids) == 1 and not psutil.pid_exists(pids[0])

    # an interrupted train stage (its checkpoint_last.pth and started stamp, no finished stamp) resumes
    (work / "models" / "model_final.pth").unlink()
    (work / "state" / "train.done.json").unlink()
    train_only = [*TINY, "stages=[train]"]
    resumed = run_pipeline(resolve(None, sets=train_only), work, say=lambda m: None)
    assert [(r.status, r.note) for r in resumed.results] == [("ran", "resumed and finished")]
    assert (work / "models" / "model_final.pth").is_file()
    assert _run(work, *train_only) == (0, {"train": "skipped"})
    # --force train: starts over
    forced = run_pipeline(resolve(None, sets=train_only), work, force=frozenset({"train"}), say=lambda m: None)
    assert [(r.status, r.note) for r in forced.results] == [("ran", "trained")]


def test_weights_auto_finds_the_official_checkpoint_or_falls_back_to_random(tmp_path, monkeypatch):
    from dinov2_triton.pipeline.stages import Layout, PipelineInputError, resolve_weights

    monkeypatch.chdir(tmp_path)
    layout = Layout(tmp_path / "work")
    assert resolve_weights("auto", "vits14", layout) == ("random", False)
    ckpt = layout.root / "weights" / "dinov2_vits14_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stand-in")
    assert resolve_weights("auto", "vits14", layout) == (str(ckpt), True)
    assert resolve_weights("auto", "vitb14", layout) == ("random", False)
    assert resolve_weights("random", "vits14", layout) == ("random", False)
    assert resolve_weights("timm/vit_small_patch14_dinov2.lvd142m", "vits14", layout)[1] is True
    with pytest.raises(PipelineInputError, match="train.weights missing.pth: file not found"):
        resolve_weights("missing.pth", "vits14", layout)


def test_only_unstable_sweep_points_are_a_warning_in_bench():
    """bench.allow_unstable: a perf_analyzer point that did not stabilise (its
    failure kind 'unstable', the error line bench_stage writes for it) is told
    apart from the other errors, which fail a strict bench stage."""
    from types import SimpleNamespace as NS

    from dinov2_triton.pipeline.stages import unstable_points

    results = NS(perf_analyzer=NS(failures=[NS(reason="dinov2_onnx b1 c1 failed (unstable): ...", kind="unstable"),
                                            NS(reason="dinov2_onnx b8 c4: server crashed", kind="error"),
                                            NS(reason="older record without a kind")]))
    assert unstable_points(results) == {"perf_analyzer: dinov2_onnx b1 c1 failed (unstable): ..."}
    assert unstable_points(NS(perf_analyzer=None)) == set()


def test_weights_auto_and_the_banner_follow_the_arch_family(tmp_path, monkeypatch):
    """DINOv3 checkpoints are released as <arch>_pretrain_<data>-<hash>.pth: `auto` finds
    one by that pattern (not dinov2_<arch>_pretrain.pth), refuses to guess between
    two, and the random-init banner names the family and the file to put there."""
    from dinov2_triton.pipeline.stages import Layout, PipelineInputError, random_weights_banner, resolve_weights

    monkeypatch.chdir(tmp_path)
    layout = Layout(tmp_path / "work")
    weights = layout.root / "weights"
    weights.mkdir(parents=True)
    (weights / "dinov2_dinov3_vits16_pretrain.pth").write_bytes(b"not the DINOv3 name")
    (weights / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth").write_bytes(b"another arch")
    assert resolve_weights("auto", "dinov3_vits16", layout) == ("random", False)
    official = weights / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    official.write_bytes(b"stand-in")
    assert resolve_weights("auto", "dinov3_vits16", layout) == (str(official), True)
    assert resolve_weights("auto", "vits14", layout) == ("random", False)
    (weights / "dinov3_vits16_pretrain_sat493m-eadcf0ff.pth").write_bytes(b"a second one")
    with pytest.raises(PipelineInputError, match="2 files match .*set train.weights"):
        resolve_weights("auto", "dinov3_vits16", layout)

    v3, v2 = random_weights_banner("dinov3_vits16"), random_weights_banner("vits14")
    assert "NO PRETRAINED DINOv3 WEIGHTS AVAILABLE for dinov3_vits16" in v3 and "DINOv2" not in v3
    assert "dinov3_vits16_pretrain_*.pth" in v3
    assert "NO PRETRAINED DINOv2 WEIGHTS AVAILABLE for vits14" in v2 and "dinov2_vits14_pretrain.pth" in v2
    assert len({len(line) for line in v3.splitlines()}) == 1   # a box


def test_the_backbones_recipe_compares_two_families_at_one_size():
    sweep = resolve("backbones")
    assert [n for n, _ in sweep.runs] == ["vits14", "dinov3_vits16"]
    assert [r.train.arch for _, r in sweep.runs] == ["vits14", "dinov3_vits16"]
    assert {r.train.img_size for _, r in sweep.runs} == {112}
    assert all(r.export.variants == ["auto"] and "bench" in r.ordered_stages() and r.bench.parity
               for _, r in sweep.runs)
