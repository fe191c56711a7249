"""dinov2_triton.client.classifier / dinov2_triton.client.inputs / the dinov2_triton.client.cli CLI: parsing and
input handling without a server, then the REAL local Triton server (one per
module) serving the tiny exported repository."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.client import classifier as pcl
from dinov2_triton.client import cli as pc
from dinov2_triton.client import inputs as pin
from dinov2_triton.serve import triton_access as ta
from tests.fixtures.models import CLASSES


# --------------------------------------------------------------------------- no server
def test_parse_classification_strings():
    entries = np.array([[b"3.5:2:fox", b"-1.25:0:cat"], [b"0.5:1", b"0.25:7"]], dtype=object)
    rows = pcl.parse_classification(entries, labels=CLASSES)
    assert rows[0] == [("fox", 2, 3.5), ("cat", 0, -1.25)]
    assert rows[1] == [("dog", 1, 0.5), ("7", 7, 0.25)]  # no label file: local labels, else index
    assert pcl.parse_classification(np.array([b"1:0:a:b"], dtype=object))[0] == [("a:b", 0, 1.0)]
    with pytest.raises(ValueError, match="score:index"):
        pcl.parse_classification(np.array([[b"nonsense"]], dtype=object))


def test_topk_from_logits():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 3.0, 1.0]], np.float32)
    top = pcl.topk_from_logits(logits, 5, CLASSES)
    assert [t[1] for t in top[0]] == [1, 0, 2] and len(top[1]) == 3
    assert top[1][0][:2] == ("cat", 0)  # ties keep class order


def test_find_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/x.PNG", "a/b/y.jpg", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    explicit = tmp_path / "a" / "notes.txt"
    files, problems = pin.find_images([tmp_path / "a", explicit, tmp_path / "missing", tmp_path / "empty"])
    assert files == [tmp_path / "a/b/y.jpg", tmp_path / "a/x.PNG", explicit]
    assert [Path(path).name for path, _ in problems] == ["missing", "empty"]
    assert problems[0][1] == "no such file or folder" and "no image files" in problems[1][1]


def test_load_preprocessing_sources(tmp_path, tiny_checkpoint):
    from dinov2_triton.core.preprocessing import PreprocessConfig

    cfg = PreprocessConfig(image_size=28, resize_size=32)
    assert pin.load_preprocessing(model_path=tiny_checkpoint) == cfg
    f = tmp_path / "preprocessing.json"
    f.write_text(json.dumps(cfg.to_dict()))
    assert pin.load_preprocessing(preprocessing=f) == cfg
    repo = tmp_path / "repo"
    (repo / "dinov2_preprocess" / "1").mkdir(parents=True)
    (repo / "export_manifest.json").write_text(json.dumps({"preprocessing": cfg.to_dict()}))
    assert pin.load_preprocessing(repository=repo) == cfg  # falls back to the manifest
    (repo / "dinov2_preprocess" / "1" / "preprocessing.json").write_text(
        json.dumps(PreprocessConfig(image_size=14, resize_size=16).to_dict()))
    assert pin.load_preprocessing(repository=repo).image_size == 14  # the model folder wins
    with pytest.raises(ValueError, match="--model-path"):
        pin.load_preprocessing()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"image_size": 30}))
    with pytest.raises(ValueError, match=r"bad\.json.*multiple of"):
        pin.load_preprocessing(preprocessing=bad)
    (tmp_path / "empty_repo").mkdir()
    with pytest.raises(ValueError, match="neither"):
        pin.load_preprocessing(repository=tmp_path / "empty_repo")


def _free_port() -> int:
    from dinov2_triton.serve.local_server import find_free_ports

    return find_free_ports(1)[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_not_reachable(protocol, tmp_path, capsys):
    url = f"127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(ta.ServerUnreachable) as info:
        pcl.TritonClassifier(url, protocol, timeout_s=5)
    msg = str(info.value)
    assert msg.startswith(f"cannot reach Triton at {url} (is the server running? dinov2-triton serve start)")
    assert "\n" not in msg
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    assert pc.main(["--url", url, "--protocol", protocol, str(img)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {msg}"]  # one line, no traceback


# --------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def server(triton_server_factory, tiny_repository):
    return triton_server_factory(tiny_repository)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tiny_dataset):
    """Eager FP32 outputs of the checkpoint on the test split (jpg and png files)."""
    import torch

    from dinov2_triton.core.preprocessing import preprocess_source
    from dinov2_triton.data.datasets import read_manifest
    from dinov2_triton.train.model import load_classifier

    model, record = load_classifier(tiny_checkpoint)
    cfg = record.preprocessing
    files = [r.file(tiny_dataset) for r in read_manifest(tiny_dataset, "test")]
    assert {f.suffix for f in files} == {".png", ".jpg"}
    x = np.stack([preprocess_source(f, cfg) for f in files])
    with torch.inference_mode():
        logits, emb = model.forward_with_embedding(torch.from_numpy(x))
    return {"files": files, "pixels": x, "logits": logits.numpy(), "embedding": emb.numpy(), "cfg": cfg}


def _url(server, protocol):
    return server.url_grpc if protocol == "grpc" else server.url_http


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_classifies_jpeg_and_png_like_eager(server, reference, protocol):
    with pcl.TritonClassifier(_url(server, protocol), protocol, "dinov2") as clf:
        assert clf.kind == "bytes" and clf.max_batch_size == 8
        preds = clf.classify_paths(reference["files"], top_k=2, embeddings=True)
        logits, emb = clf.infer_images([f.read_bytes() for f in reference["files"]])
    assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]
    eager_top = pcl.topk_from_logits(reference["logits"], 2, CLASSES)
    for pred, want in zip(preds, eager_top):
        # the classification extension: labels from labels.txt, scores = logits
        assert [t[:2] for t in pred.top] == [t[:2] for t in want]
        assert [t[2] for t in pred.top] == pytest.approx([t[2] for t in want], abs=1e-4)
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4)
    np.testing.assert_allclose(emb, reference["embedding"], atol=1e-4)
    np.testing.assert_allclose(np.stack([p.embedding for p in preds]), emb, atol=1e-6)


@pytest.mark.triton
def test_batch_bigger_than_max_batch_size_is_split(server, reference):
    blobs = [f.read_bytes() for f in reference["files"]] * 2  # 24 images, max_batch_size 8
    sizes = []
    with pcl.TritonClassifier(server.url_grpc, "grpc", "dinov2", concurrency=3) as clf:
        real = clf.connection.infer_many

        def spy(model, jobs, concurrency):
            sizes.extend(inputs[0].shape()[0] for inputs, _ in jobs)
            assert concurrency == 3
            return real(model, jobs, concurrency)

        clf.connection.infer_many = spy
        logits, _ = clf.infer_images(blobs)
        # without splitting the server refuses the request outright
        raw = clf.connection.bytes_input("image", blobs)
        with pytest.raises(ta.RequestError, match="model 'dinov2': .*batch"):
            clf.connection.infer("dinov2", [raw])
    assert sizes == [8, 8, 8]
    np.testing.assert_allclose(logits, np.concatenate([reference["logits"]] * 2), atol=1e-4)
    with pcl.TritonClassifier(server.url_http, "http", "dinov2", batch_size=5, concurrency=2) as clf:
        assert clf.batch_size == 5
        preds = clf.classify_paths(reference["files"], top_k=1)  # 12 = 5 + 5 + 2
    assert [p.top[0][1] for p in preds] == list(reference["logits"].argmax(1))


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["client", "server"])
def test_variant_with_preprocessing(server, reference, tiny_repository, mode):
    pre = pin.load_preprocessing(repository=tiny_repository) if mode == "client" else None
    with pcl.TritonClassifier(server.url_http, "http", "dinov2_onnx", preprocessing=pre,
                             variant_preprocess=mode) as clf:
        assert clf.kind == "pixels"
        logits, emb = clf.infer_images([f.read_bytes() for f in reference["files"]])
        if mode == "client":
            lp, ep = clf.infer_pixels(reference["pixels"])
            np.testing.assert_allclose(lp, reference["logits"], atol=1e-4)
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4)
    np.testing.assert_allclose(emb, reference["embedding"], atol=1e-4)


@pytest.mark.triton
def test_unknown_model_lists_ready_models(server):
    with pytest.raises(ta.ModelNotReady) as info:
        pcl.TritonClassifier(server.url_grpc, "grpc", "dinov2_nope")
    msg = str(info.value)
    assert "model 'dinov2_nope' is not ready" in msg and "\n" not in msg
    # without the key the (restricted) repository index cannot list them: the message says so
    assert "ready models: none (not listed: the repository index needs the server's API key" in msg
    # with the API key the repository index lists every ready model, over either protocol
    for protocol in ("http", "grpc"):
        with pytest.raises(ta.ModelNotReady) as info:
            pcl.TritonClassifier(_url(server, protocol), protocol, "dinov2_nope", api_key=server.api_key)
        assert ("ready models: dinov2, dinov2_onnx, dinov2_preprocess, dinov2_torchscript "
                "(repository index)") in str(info.value)
    with pytest.raises(ValueError, match="client-side preprocessing needs the stored record"):
        pcl.TritonClassifier(server.url_grpc, "grpc", "dinov2_onnx")


@pytest.mark.triton
@pytest.mark.parametrize("model,mode", [("dinov2", "client"), ("dinov2_onnx", "client"),
                                        ("dinov2_onnx", "server")])
def test_garbage_image_fails_alone(server, reference, tiny_repository, model, mode):
    good = [(str(f), f.read_bytes()) for f in reference["files"][:5]]
    items = good[:2] + [("garbage.jpg", b"\xff\xd8 definitely not a jpeg")] + good[2:]
    pre = pin.load_preprocessing(repository=tiny_repository)
    with pcl.TritonClassifier(server.url_grpc, "grpc", model, preprocessing=pre,
                             variant_preprocess=mode) as clf:
        preds = clf.classify_bytes(items, top_k=1)
    assert [p.ok for p in preds] == [True, True, False, True, True, True]
    assert "garbage.jpg" == preds[2].path and "not a decodable image" in preds[2].error
    if model == "dinov2" or mode == "server":  # the server's message, naming the model
        server_model = "dinov2" if model == "dinov2" else "dinov2_preprocess"
        assert preds[2].error.startswith(f"model '{server_model}':")
    want = reference["logits"][:5].argmax(1)
    assert [p.top[0][1] for p in preds if p.ok] == list(want)


@pytest.mark.triton
def test_cli(server, reference, tiny_dataset, tmp_path, capsys):
    folder = tiny_dataset / "images" / "test"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "emb" / "e.npy"
    rc = pc.main(["--url", server.url_http, "--protocol", "http", "--top-k", "3", "--embeddings",
                  str(out), str(folder), str(bad), str(tmp_path / "missing.jpg")])
    cap = capsys.readouterr()
    assert rc == 1
    errors = cap.err.strip().splitlines()
    assert errors[0] == f"error: {tmp_path / 'missing.jpg'}: no such file or folder"
    assert errors[1].startswith(f"error: {bad}: model 'dinov2': ") and "Traceback" not in cap.err
    lines = cap.out.strip().splitlines()
    assert len(lines) == len(reference["files"])
    first = pcl.topk_from_logits(reference["logits"][:1], 3, CLASSES)[0]
    assert lines[0].startswith(f"{reference['files'][0]}: {first[0][0]} (")
    emb = np.load(out)
    assert emb.shape == reference["embedding"].shape
    np.testing.assert_allclose(emb, reference["embedding"], atol=1e-4)
    assert out.with_name("e.files.txt").read_text().split() == [str(f) for f in reference["files"]]

    rc = pc.main(["--url", server.url_grpc, "--model", "dinov2_torchscript", "--model-path",
                  str(Path(server.repository).parent.parent / "missing.pth"), str(folder)])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
    rc = pc.main(["--url", server.url_grpc, "--json", "--top-k", "1", str(reference["files"][0])])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["top"][0]["label"] in CLASSES
    # the API key file: an unknown model's error then lists every ready model
    rc = pc.main(["--url", server.url_grpc, "--model", "dinov2_nope", "--api-key-file",
                  str(server.api_key_file), str(reference["files"][0])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "dinov2_torchscript (repository index)" in err[0]
    rc = pc.main(["--url", server.url_grpc, "--api-key-file", str(tmp_path / "nokey"), str(folder)])
    assert rc == 2 and f"API key file {tmp_path / 'nokey'}: cannot read" in capsys.readouterr().err


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_accuracy_of_a_prepared_split(server, reference, tiny_dataset, protocol, capsys):
    """--data-path/--split: classifies the split through the ensemble and
    prints the accuracy against the manifest labels (same as eager's)."""
    from dinov2_triton.data.datasets import read_manifest

    labels = np.array([r.label for r in read_manifest(tiny_dataset, "test")])
    correct = int((reference["logits"].argmax(1) == labels).sum())
    rc = pc.main(["--url", _url(server, protocol), "--protocol", protocol, "--data-path", str(tiny_dataset),
                  "--split", "test", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1, out
    assert f"({correct}/{len(labels)})" in out[0] and "on the test split" in out[0]
    with pytest.raises(SystemExit) as exc:   # paths and --data-path together: a usage error
        pc.main(["--url", _url(server, protocol), "--protocol", protocol, "--data-path", str(tiny_dataset), "x.png"])
    assert exc.value.code == 2
