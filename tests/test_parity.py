"""dinov2_triton.qa.parity: gate logic and reporting on known numbers (no server), then the
real local Triton server with honest variants and a deliberately corrupted one."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dinov2_triton.export.gates import GATES, GateError, parse_gate_overrides, resolve_gate
from dinov2_triton.qa import parity
from dinov2_triton.train.metrics import parity_metrics


# --------------------------------------------------------------------------- pure
@pytest.mark.parametrize("name,expected", [
    ("dinov2_onnx", "fp32"), ("dinov2_torchscript", "fp32"), ("dinov2_onnx_fp16", "fp16"),
    ("dinov2_trt_int8", "int8"), ("dinov2_fp8", "fp8"), ("dinov2_int8_onnx", "fp32"),
])
def test_precision_from_name(name, expected):
    assert parity.precision_from_name(name) == expected


def test_config_precision_wins_over_name():
    cfg = {"name": "dinov2_onnx", "parameters": {"precision": {"string_value": "int8"}}}
    assert parity.model_precision(cfg) == ("int8", "config parameter 'precision'")
    assert parity.model_precision({"name": "dinov2_trt_fp16"}) == ("fp16", "model name")
    # an unknown value falls back to the name instead of picking an arbitrary gate
    cfg = {"name": "dinov2_onnx_fp16", "parameters": {"precision": {"string_value": "weird"}}}
    assert parity.model_precision(cfg) == ("fp16", "model name")


def test_ensemble_default_variant():
    steps = {"step": [{"model_name": "dinov2_preprocess", "output_map": {"pixel_values": "px"}},
                      {"model_name": "dinov2_onnx_fp16", "output_map": {"logits": "logits"}}]}
    assert parity.ensemble_variant({"ensemble_scheduling": steps}) == "dinov2_onnx_fp16"
    named = {"ensemble_scheduling": steps,
             "parameters": {"classifier_model": {"string_value": "dinov2_torchscript"}}}
    assert parity.ensemble_variant(named) == "dinov2_torchscript"


def test_gate_overrides_by_precision_then_model():
    ov = parse_gate_overrides(["int8.max_accuracy_drop=0.05", "dinov2_x_int8.min_top1_agreement=0.5",
                                      "fp16.min_embedding_cosine=none"])
    assert ov == {"int8": {"max_accuracy_drop": 0.05}, "dinov2_x_int8": {"min_top1_agreement": 0.5},
                  "fp16": {"min_embedding_cosine": None}}
    g = resolve_gate("dinov2_x_int8", ov, precision="int8")
    assert (g.max_accuracy_drop, g.min_top1_agreement) == (0.05, 0.5)
    g = resolve_gate("dinov2_y_int8", ov, precision="int8")
    assert g.min_top1_agreement == GATES["int8"].min_top1_agreement
    assert resolve_gate("m", ov, precision="fp16").min_embedding_cosine is None
    assert GATES["fp16"].min_embedding_cosine is not None, "overrides must not mutate dinov2_triton.export.gates.GATES"


@pytest.mark.parametrize("bad", ["fp16.min_top1=0.9", "fp16min_top1_agreement=0.9",
                                 "fp16.min_top1_agreement=high"])
def test_bad_gate_overrides_are_input_errors(bad):
    with pytest.raises(GateError, match="--gates"):
        parse_gate_overrides([bad])


def _known_logits(n=200, classes=3, flips=(), seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, classes)).astype(np.float32)
    ref[np.arange(n), rng.integers(0, classes, n)] += 5.0  # clear winners
    cand = ref + rng.normal(scale=1e-4, size=ref.shape).astype(np.float32)
    for i in flips:  # swap the top class with another one
        top = int(ref[i].argmax())
        other = (top + 1) % classes
        cand[i, top], cand[i, other] = ref[i, other], ref[i, top]
    return ref, cand


def test_gate_logic_and_flipped_names_on_known_inputs():
    ref, cand = _known_logits(flips=(3, 17, 150))
    emb = np.random.default_rng(1).normal(size=(200, 8))
    labels = ref.argmax(1)  # the reference is 100 % right, so flips cost accuracy
    names = [f"images/test/img_{i:03d}.png" for i in range(200)]
    par = parity_metrics(ref, cand, ref_embedding=emb, cand_embedding=emb, labels=labels, names=names)
    assert par["flipped"] == 3 and par["top1_agreement"] == pytest.approx(0.985)
    assert [e["name"] for e in par["flipped_examples"]] == [names[3], names[17], names[150]]
    assert par["deltas"]["accuracy"] == pytest.approx(-0.015)

    ok, fails = parity.judge(par, resolve_gate("dinov2_onnx_fp16", precision="fp16"))
    assert not ok and any("top-1 agreement" in f and "3 of 200" in f for f in fails)
    ok, fails = parity.judge(par, resolve_gate("dinov2_onnx_int8", precision="int8"))
    assert not ok and len(fails) == 2  # 98.5 % < 99 % agreement and 1.5 > 1 point drop
    loose = {"int8": {"max_accuracy_drop": 0.02, "min_top1_agreement": 0.98}}
    assert parity.judge(par, resolve_gate("dinov2_onnx_int8", loose, precision="int8")) == (True, [])
    per_model = {**loose, "dinov2_onnx_int8": {"max_accuracy_drop": 0.01}}
    ok, fails = parity.judge(par, resolve_gate("dinov2_onnx_int8", per_model, precision="int8"))
    assert not ok and fails == ["accuracy drop 1.50 points > 1.00"]

    clean = parity_metrics(ref, ref.copy(), ref_embedding=emb, cand_embedding=emb.copy(), labels=labels)
    assert parity.judge(clean, resolve_gate("dinov2_onnx", precision="fp32")) == (True, [])
    broken = parity_metrics(ref, np.full_like(ref, np.nan), labels=labels)
    assert not parity.judge(broken, resolve_gate("dinov2_onnx", precision="fp32"))[0]


def _fake_result(passed: bool):
    ref, cand = _known_logits(n=20, flips=(2,))
    par = parity_metrics(ref, cand, labels=ref.argmax(1), names=[f"f{i}.png" for i in range(20)])
    for e in par["flipped_examples"]:
        e.update(reference_label="cat", candidate_label="dog", true_label="cat")
    par["logits"]["max_rel_diff"] = float("inf")  # must survive JSON
    gate = resolve_gate("dinov2_onnx_int8", precision="int8")
    ok, fails = parity.judge(par, gate)
    return {"url": "x:1", "protocol": "grpc", "split": "test", "n_images": 20,
            "reference": {"kind": "eager", "model": None, "metrics": {"accuracy": 1.0}},
            "variants": [{"model": "dinov2_onnx_int8", "input": "pixel_values (client-side preprocessing)",
                          "precision": "int8", "parity": par, "failures": fails, "passed": ok},
                         {"model": "dinov2_broken", "input": "encoded image bytes", "precision": "fp32",
                          "parity": None, "failures": ["could not run: boom"], "passed": False}],
            "passed": passed}


def test_report_and_json(tmp_path):
    from rich.console import Console

    result = _fake_result(False)
    console = Console(record=True, width=200)
    parity.print_report(result, console)
    text = console.export_text()
    assert "dinov2_onnx_int8" in text and "FAIL" in text and "f2.png (cat -> dog)" in text
    assert "could not run: boom" in text
    out = parity.write_json(result, tmp_path / "p" / "parity.json")
    back = json.loads(out.read_text())  # strict JSON: no NaN/Infinity tokens
    assert back["variants"][0]["parity"]["logits"]["max_rel_diff"] == "inf"


def test_large_splits_are_memory_mapped(tmp_path, monkeypatch):
    from dinov2_triton.core.preprocessing import PreprocessConfig
    from tests.fixtures.images import jpeg_bytes, png_bytes

    pre = PreprocessConfig(image_size=14, resize_size=16)
    blobs, names = [png_bytes(seed=1), jpeg_bytes(seed=2)], ["a.png", "b.jpg"]
    in_ram = parity.preprocess_all(blobs, names, pre, tmp_path)
    monkeypatch.setattr(parity, "IN_MEMORY_LIMIT", 0)
    mapped = parity.preprocess_all(blobs, names, pre, tmp_path)
    assert isinstance(mapped, np.memmap) and not isinstance(in_ram, np.memmap)
    np.testing.assert_array_equal(mapped, in_ram)
    with pytest.raises(ValueError, match="bad.png"):
        parity.preprocess_all([b"junk"], ["bad.png"], pre, tmp_path)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert parity.main(["--data-path", str(tmp_path / "nope"), "--model-path", "x.pth",
                        "--url", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert parity.main(["--data-path", str(tmp_path), "--gates", "fp16.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


# --------------------------------------------------------------------------- real server


def add_corrupted_variant(repo, source="dinov2_onnx", name="dinov2_onnx_int8", precision="int8"):
    """Serve a copy of `source` whose classification head is negated (every
    prediction becomes the least likely class) as `name`, labelled `precision`."""
    import onnx
    from google.protobuf import text_format
    from onnx import numpy_helper

    from dinov2_triton.serve.model_plan import read_model_config

    shutil.copytree(repo / source, repo / name)
    path = repo / name / "1" / "model.onnx"
    model = onnx.load(str(path))
    n_classes = len((repo / source / "labels.txt").read_text().split())
    heads = [t for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and n_classes in t.dims]
    assert len(heads) == 1, [(t.name, list(t.dims)) for t in heads]
    heads[0].CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(heads[0]), heads[0].name))
    onnx.save(model, str(path))
    cfg = read_model_config(repo / name / "config.pbtxt")
    cfg.name = name
    cfg.parameters["precision"].string_value = precision
    (repo / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    return repo


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_repository, triton_server_factory):
    repo = tmp_path_factory.mktemp("parity_repo") / "model_repository"
    shutil.copytree(tiny_repository, repo)
    add_corrupted_variant(repo)
    return triton_server_factory(repo)


@pytest.mark.triton
def test_corrupted_variant_fails_its_gate_honest_ones_pass(served, tiny_dataset, tiny_checkpoint):
    result = parity.run_parity(served.url_grpc, "grpc", data_path=tiny_dataset, model_path=tiny_checkpoint,
                               api_key=served.api_key)
    by_model = {v["model"]: v for v in result["variants"]}
    assert sorted(by_model) == ["dinov2", "dinov2_onnx", "dinov2_onnx_int8", "dinov2_torchscript"]
    assert result["n_images"] == 12 and result["passed"] is False
    ens = by_model["dinov2"]
    assert ens["input"].startswith("encoded image bytes") and ens["default_variant"] == "dinov2_onnx"
    for name in ("dinov2", "dinov2_onnx", "dinov2_torchscript"):
        v = by_model[name]
        assert v["passed"], (name, v["failures"])
        assert v["precision"] == "fp32" and v["parity"]["top1_agreement"] == 1.0
        assert v["parity"]["logits"]["max_abs_diff"] < 1e-3
        assert v["parity"]["embedding"]["cosine_mean"] > 0.9999
    bad = by_model["dinov2_onnx_int8"]
    assert bad["precision"] == "int8" and bad["precision_source"] == "config parameter 'precision'"
    assert bad["gate"]["name"] == "int8" and not bad["passed"]
    assert bad["parity"]["flipped"] == 12 and any("top-1 agreement" in f for f in bad["failures"])
    first = bad["parity"]["flipped_examples"][0]
    assert first["name"].startswith("images/test/") and first["candidate_label"] in ("cat", "dog", "fox")
    assert bad["parity"]["embedding"]["cosine_mean"] > 0.9999  # only the head was corrupted
    assert bad["parity"]["deltas"]["accuracy"] is not None


@pytest.mark.triton
def test_cli_exit_codes(served, tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    common = ["--url", served.url_http, "--protocol", "http", "--data-path", str(tiny_dataset),
              "--model-path", str(tiny_checkpoint), "--quiet"]
    out = tmp_path / "parity.json"
    assert parity.main(common + ["--models", "dinov2_onnx_int8,dinov2", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "dinov2_onnx_int8" in text and "FAIL" in text and "flipped: images/test/" in text
    saved = json.loads(out.read_text())
    assert [v["passed"] for v in saved["variants"]] == [False, True]
    # the gate can be overridden per model; a served FP32 model can be the reference
    loose = ["--gates", "dinov2_onnx_int8.min_top1_agreement=none", "int8.max_accuracy_drop=1"]
    assert parity.main(common + ["--models", "dinov2_onnx_int8,dinov2", "--reference",
                                 "dinov2_torchscript", "--max-images", "5"] + loose) == 0
    assert "all gates pass" in capsys.readouterr().out
    assert parity.main(common + ["--models", "dinov2_onnx,dinov2_nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model(s) ['dinov2_nope'] not ready") and "needs the server's API key" in err
    # with the key (the repository index is restricted) the error lists the ready models
    keyed = ["--api-key-file", str(served.api_key_file)]
    assert parity.main(common + ["--models", "dinov2_onnx,dinov2_nope"] + keyed) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model(s) ['dinov2_nope'] not ready") and "ready models: dinov2, " in err
