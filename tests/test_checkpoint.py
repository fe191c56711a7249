"""The checkpoint record (train/checkpoint.py), the data summary record
(train/data_folder.py) and the one preprocessing-resolution rule
(dinov2_triton.train.preprocessing_source.resolve_preprocessing), on tiny models and temp files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dinov2_triton.core.preprocessing import PreprocessConfig
from dinov2_triton.core.records import RecordError
from dinov2_triton.train.checkpoint import CheckpointRecord, make_checkpoint_record, read_checkpoint, save_checkpoint
from dinov2_triton.train.model import load_classifier
from dinov2_triton.train.preprocessing_source import PreprocessingError, resolve_preprocessing
from tests.fixtures.models import CLASSES, TINY, TINY_IMG, tiny_model

PRE = PreprocessConfig(image_size=TINY_IMG, resize_size=TINY_IMG + 4)


def format_v1_dict(model, **changes) -> dict:
    """What train/checkpoint.py make_record wrote before typed records
    (format_version 1), for the migration tests."""
    d = {"format_version": 1, "arch": "vits14", "img_size": TINY_IMG, "num_classes": 3, "head": "cls_mean",
         "class_names": list(CLASSES), "preprocessing": PRE.to_dict(),
         "weights_source": "random init (NOT pretrained: accuracy will be far below a DINOv2 fine-tune)",
         "backbone_overrides": dict(TINY), "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
         "metrics": {"test": {"accuracy": 0.5}}, "config": {"img_size": TINY_IMG, "mode": "full"},
         "versions": {"torch": str(torch.__version__)}, "git_revision": "abc123", "mode": "full", "lora": None}
    d.update(changes)
    return d


# --------------------------------------------------------------------------- checkpoint
def test_checkpoint_roundtrip_holds_image_size_once(tmp_path):
    model = tiny_model()
    rec = make_checkpoint_record(model, arch="vits14", class_names=CLASSES, preprocessing=PRE,
                                 weights_source="file x.pth", pretrained=True, backbone_overrides=TINY,
                                 metrics={"test": {"accuracy": 0.75}}, epochs_trained=3)
    path = save_checkpoint(rec, tmp_path / "model_final.pth")
    raw = torch.load(path, weights_only=True)            # plain types + tensors only
    assert raw["schema_version"] == 3 and "img_size" not in raw and "num_classes" not in raw
    assert (raw["family"], raw["position_encoding"]) == ("dinov2", "learned")
    assert raw["preprocessing"] == PRE.to_dict()
    back = read_checkpoint(path)
    assert isinstance(back, CheckpointRecord) and back.preprocessing == PRE
    assert (back.image_size, back.num_classes, back.pretrained, back.epochs_trained) == (TINY_IMG, 3, True, 3)
    assert back.training is None and back.metrics["test"]["accuracy"] == 0.75
    loaded, record = load_classifier(path)
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_format_v1_checkpoints_still_load(tmp_path):
    model = tiny_model()
    plain = tmp_path / "model_final.pth"
    torch.save(format_v1_dict(model), plain)
    rec = read_checkpoint(plain)
    assert rec.image_size == TINY_IMG and rec.num_classes == 3 and rec.pretrained is False
    load_classifier(plain)                                # rebuilds strictly from the migrated record
    training = tmp_path / "checkpoint_last.pth"
    torch.save(format_v1_dict(model, kind="training_state", optimizer={"state": {}, "param_groups": []},
                              scaler={}, scheduler={"lr": 1e-3}, rng={"torch": torch.get_rng_state()},
                              train_state={"epoch": 1, "step": 3, "batch_in_epoch": 0}, epoch=1, step=3),
               training)
    rec = read_checkpoint(training)
    assert rec.training is not None and rec.training.train_state["step"] == 3
    pretrained = tmp_path / "pretrained.pth"
    torch.save(format_v1_dict(model, weights_source="file /w/dinov2_vits14_pretrain.pth (official layout)"),
               pretrained)
    assert read_checkpoint(pretrained).pretrained is True


@pytest.mark.parametrize("changes,message", [
    ({"img_size": 42}, r"field 'schema_version': missing \(img_size 42 and preprocessing.image_size 28 disagree"),
    ({"num_classes": 4}, r"num_classes 4 but 3 class_names"),
    ({"format_version": 7}, r"field 'schema_version'.*not a checkpoint of dinov2-triton train"),
    ({"head": "cls_max"}, r"field 'head': Input should be 'cls_mean', 'cls' or 'mean'"),
    ({"class_names": "cat"}, r"field 'class_names': Input should be a valid list"),
    ({"img_size": 30, "preprocessing": dict(PRE.to_dict(), image_size=30, resize_size=34)},
     r"field 'preprocessing':.*image_size=30: must be a positive multiple"),
    ({"config": {"img_size": 56}},
     r"field 'config': Value error, img_size 56 differs from preprocessing.image_size 28"),
    ({"surprise": 1}, r"field 'surprise': unknown field"),
])
def test_bad_checkpoints_name_file_and_field(tmp_path, changes, message):
    path = tmp_path / "bad.pth"
    torch.save(format_v1_dict(tiny_model(), **changes), path)
    with pytest.raises(RecordError, match=message) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_unknown_schema_version_missing_file_and_pickled_objects(tmp_path):
    rec = make_checkpoint_record(tiny_model(), arch="vits14", class_names=CLASSES, preprocessing=PRE,
                                 weights_source="random init", pretrained=False, backbone_overrides=TINY)
    data = rec.to_dict()
    data["schema_version"] = 4
    torch.save(data, tmp_path / "new.pth")
    with pytest.raises(RecordError, match=r"new.pth: field 'schema_version': 4 is newer than this code"):
        read_checkpoint(tmp_path / "new.pth")
    with pytest.raises(RecordError, match=r"missing.pth: checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pth")
    data["schema_version"] = 3
    data["versions"] = {"torch": torch.__version__}      # a TorchVersion object, not a str
    torch.save(data, tmp_path / "object.pth")
    with pytest.raises(RecordError, match=r"object.pth: refused .*not a plain weights file: .*TorchVersion"):
        read_checkpoint(tmp_path / "object.pth")


# --------------------------------------------------------------------------- data summary
def test_data_summary_reader(tiny_dataset, tmp_path):
    from dinov2_triton.data.folder import DataSummary, read_summary

    s = read_summary(tiny_dataset)
    assert isinstance(s, DataSummary) and s.schema_version == 2 and s.classes == CLASSES
    assert s.split_sizes == {k: sum(v.values()) for k, v in s.counts.items()}
    data = shutil.copytree(tiny_dataset, tmp_path / "data", symlinks=True)
    raw = json.loads((data / "summary.json").read_text())
    old = {k: v for k, v in raw.items() if k != "schema_version"} | {"format_version": 1}
    (data / "summary.json").write_text(json.dumps(old))
    assert read_summary(data).counts == s.counts                      # format 1 still reads
    bad = dict(raw, num_images=raw["num_images"] + 1)
    (data / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(RecordError, match=r"summary.json: field '\(record\)': .*num_images"):
        read_summary(data)
    (data / "summary.json").write_text(json.dumps(dict(raw, seed="zero")))
    with pytest.raises(RecordError, match=r"summary.json: field 'seed'"):
        read_summary(data)
    (data / "summary.json").unlink()
    with pytest.raises(RecordError, match=r"summary.json: not found; run `dinov2-triton data"):
        read_summary(data)


# --------------------------------------------------------------------------- preprocessing
def _repo_with_record(tmp_path, cfg: PreprocessConfig, name="repo"):
    repo = tmp_path / name
    (repo / "dinov2_preprocess" / "3").mkdir(parents=True)
    (repo / "dinov2_preprocess" / "3" / "preprocessing.json").write_text(json.dumps(cfg.to_dict()))
    (repo / "dinov2_preprocess" / "1").mkdir()        # an older version with another record: not used
    (repo / "dinov2_preprocess" / "1" / "preprocessing.json").write_text(
        json.dumps(PreprocessConfig(image_size=14, resize_size=16).to_dict()))
    return repo


def test_resolve_preprocessing_order_and_mismatch(tmp_path, tiny_checkpoint):
    ckpt_cfg = read_checkpoint(tiny_checkpoint).preprocessing
    assert resolve_preprocessing(model_path=tiny_checkpoint) == (ckpt_cfg, str(tiny_checkpoint))
    same = _repo_with_record(tmp_path, ckpt_cfg)
    cfg, source = resolve_preprocessing(model_path=tiny_checkpoint, repository=same)
    assert cfg == ckpt_cfg and "dinov2_preprocess/3/preprocessing.json" in source
    assert resolve_preprocessing(repository=same)[0] == ckpt_cfg
    other_cfg = PreprocessConfig(image_size=TINY_IMG, resize_size=TINY_IMG + 10)
    other = _repo_with_record(tmp_path, other_cfg, "other")
    with pytest.raises(PreprocessingError) as info:
        resolve_preprocessing(model_path=tiny_checkpoint, repository=other)
    msg = str(info.value)
    assert str(other / "dinov2_preprocess" / "3" / "preprocessing.json") in msg and str(tiny_checkpoint) in msg
    assert "resize_size 38 vs 32" in msg
    # an explicit file is used as given (the user chose it), nothing else is read
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(other_cfg.to_dict()))
    assert resolve_preprocessing(preprocessing=f, model_path=tiny_checkpoint, repository=same)[0] == other_cfg
    # a repository with no record at all: the checkpoint's is the only one (and the source says so)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg, source = resolve_preprocessing(model_path=tiny_checkpoint, repository=empty)
    assert cfg == ckpt_cfg and "holds no record" in source
    with pytest.raises(PreprocessingError, match="neither"):
        resolve_preprocessing(repository=empty)
    with pytest.raises(PreprocessingError, match="--model-path"):
        resolve_preprocessing()
