"""Fine-tuning stage (train/finetune.py and helpers) on tiny random DINOv2s
and a tiny generated data folder (3 classes, 24 train images, 28 px)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dinov2_triton.core.records import RecordError
from dinov2_triton.train.checkpoint import read_checkpoint
from dinov2_triton.train.engine import NonFiniteError
from dinov2_triton.train.finetune_config import ConfigError, FinetuneConfig, load_config_file, resolve_config
from dinov2_triton.train.model import load_classifier
from dinov2_triton.train.trainer import finetune
from tests.fixtures.models import TINY, TINY_IMG, tiny_model

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}
OUTPUTS = {"model_final.pth", "model_best.pth", "checkpoint_last.pth", "metrics.json", "config.yaml",
           "train.log", "training_curves.png", "confusion_matrix.png"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data folder written by dinov2_triton.data.load from a generated ImageFolder:
    12 noisy single-colour images per class -> 8 train, 2 val, 2 test."""
    from PIL import Image

    from dinov2_triton.data.load import prepare_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    for name, colour in COLORS.items():
        for i in range(12):
            arr = np.clip(np.array(colour) + rng.normal(0, 40, (20, 24, 3)), 0, 255).astype("uint8")
            path = root / "src" / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    prepare_dataset(root / "data", image_folder=root / "src", seed=0, progress=False, log=None)
    return root / "data"


def tiny_cfg(data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(data_path=str(data), output_path=str(out), weights="random", img_size=TINY_IMG,
                backbone_overrides=dict(TINY), epochs=2, batch_size=8, num_workers=0, progress=False,
                warmup_epochs=0.5, lr=1e-3)
    base.update(kw)
    return FinetuneConfig(**base)


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model_final.pth", weights_only=True)["state_dict"]


class _Stop(Exception):
    pass


def stop_at(step: int):
    def callback(state, model):
        if state.step == step:
            raise _Stop(f"stopped at step {step}")
    return callback


# --------------------------------------------------------------------------- resume
# (1, 0) in the unit tier; accumulation and worker processes (10-20 s each on 2 cores) in the whole suite
@pytest.mark.parametrize("accum_steps,num_workers", [(1, 0), pytest.param(2, 0, marks=pytest.mark.slow),
                                                     pytest.param(1, 2, marks=pytest.mark.slow)])
def test_resume_is_exact(tiny_data, tmp_path, accum_steps, num_workers):
    """N steps + interruption + resume gives bit-identical weights to 2N steps
    uninterrupted (mid-epoch checkpoint, augmentation on, AdamW, warm-up).
    With worker processes too: augmentation is seeded per (seed, epoch, index)."""
    steps_per_epoch = 3 if accum_steps == 1 else 2      # 24 images / batch 8 = 3 batches
    reference = tmp_path / "reference"
    finetune(tiny_cfg(tiny_data, reference, accum_steps=accum_steps, num_workers=num_workers))

    out = tmp_path / "interrupted"
    cfg = tiny_cfg(tiny_data, out, accum_steps=accum_steps, save_every_steps=1, num_workers=num_workers)
    stop = steps_per_epoch + 1                          # in the middle of epoch 2
    with pytest.raises(_Stop):
        finetune(cfg, step_callback=stop_at(stop))
    torch.load(out / "checkpoint_last.pth", weights_only=True)          # weights_only must work
    pos = read_checkpoint(out / "checkpoint_last.pth").training.train_state
    assert pos["step"] == stop and pos["epoch"] == 1
    assert pos["batch_in_epoch"] == accum_steps
    assert not (out / "model_final.pth").exists()

    metrics = finetune(cfg)                             # resume (the default)
    ref, got = final_state(reference), final_state(out)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    ref_hist = json.loads((reference / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in metrics["history"]] == [h["train_loss"] for h in ref_hist]
    assert "resuming from" in (out / "train.log").read_text()


def test_resume_keeps_the_checkpoints_pos_embed_resampling(tiny_data, tmp_path):
    """A run resumed from a checkpoint made with another resampling (an old
    checkpoint_last.pth) records that resampling, not the arch's current one."""
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, save_every_steps=1)
    with pytest.raises(_Stop):
        finetune(cfg, step_callback=stop_at(2))
    path = out / "checkpoint_last.pth"
    raw = torch.load(path, weights_only=True)
    assert raw["pos_embed_resampling"] != "timm_bicubic_antialias"
    raw["pos_embed_resampling"] = "timm_bicubic_antialias"
    torch.save(raw, path)
    finetune(cfg)
    assert read_checkpoint(out / "model_final.pth").pos_embed_resampling == "timm_bicubic_antialias"


def test_resume_refuses_other_model_and_no_resume_starts_over(tiny_data, tmp_path):
    out = tmp_path / "run"
    finetune(tiny_cfg(tiny_data, out, epochs=1))
    with pytest.raises(ConfigError, match="mode: checkpoint 'full' vs now 'lastn'.*--no-resume"):
        finetune(tiny_cfg(tiny_data, out, epochs=1, mode="lastn", unfreeze_blocks=1))
    metrics = finetune(tiny_cfg(tiny_data, out, epochs=1, mode="lastn", unfreeze_blocks=1, resume=False))
    assert metrics["mode"] == "lastn" and len(metrics["history"]) == 1


def test_resume_refuses_malicious_checkpoint(tiny_data, tmp_path):
    marker = tmp_path / "pwned"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"state_dict": RunsShell()}, out / "checkpoint_last.pth")
    with pytest.raises(RecordError, match="checkpoint_last.pth.*--no-resume"):
        finetune(tiny_cfg(tiny_data, out, epochs=1))
    assert not marker.exists()


# --------------------------------------------------------------------------- NaN
def _poison_head(at_step: int):
    def callback(state, model):
        if state.step == at_step:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))
    return callback


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        finetune(tiny_cfg(tiny_data, out, epochs=3), step_callback=_poison_head(4))
    msg = str(info.value)
    assert "non-finite loss (nan) at epoch 2, step 5" in msg
    assert "lower --lr" in msg and "checkpoint_last.pth" in msg
    ckpt = read_checkpoint(out / "checkpoint_last.pth")
    assert ckpt.training.train_state["epoch"] == 1 and ckpt.training.train_state["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values() if v.is_floating_point())
    assert not (out / "model_final.pth").exists()


def test_non_finite_weights_are_never_saved(tiny_data, tmp_path):
    """Weights poisoned by the last step of an epoch: the end-of-epoch save refuses."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="weights became non-finite.*not writing"):
        finetune(tiny_cfg(tiny_data, out, epochs=2), step_callback=_poison_head(3))
    assert not (out / "checkpoint_last.pth").exists()


# --------------------------------------------------------------------------- modes
def test_linear_probe_with_cached_features(tiny_data, tmp_path):
    out = tmp_path / "run"
    metrics = finetune(tiny_cfg(tiny_data, out, mode="linear", cache_features=True, epochs=5, lr=5e-2))
    assert "feature_cache_s" in metrics["timing"]
    start = tiny_model(num_classes=3, seed=0).state_dict()    # finetune seeds with --seed 0 as well
    got = final_state(out)
    assert all(torch.equal(start[k], got[k]) for k in start if k.startswith("backbone.")), "backbone moved"
    assert not torch.equal(start["head.weight"], got["head.weight"])
    # colour classes are separable from frozen random features
    assert metrics["val"]["accuracy"] > 0.5


def test_lora_merges_into_a_plain_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    finetune(tiny_cfg(tiny_data, out, mode="lora", lora_rank=2, lora_alpha=4, lr=1e-2))
    model, record = load_classifier(out / "model_final.pth")   # strict, plain keys
    assert record.mode == "lora" and record.lora["lora_rank"] == 2
    assert not [k for k in record.state_dict if "lora" in k or "base_layer" in k]
    start = tiny_model(num_classes=3, seed=0).state_dict()
    sd = record.state_dict
    assert not torch.equal(start["backbone.blocks.0.attn.qkv.weight"], sd["backbone.blocks.0.attn.qkv.weight"])
    assert torch.equal(start["backbone.blocks.0.mlp.fc1.weight"], sd["backbone.blocks.0.mlp.fc1.weight"])


def test_lora_merge_preserves_outputs():
    from dinov2_triton.train.peft_modes import setup_mode

    setup = setup_mode(tiny_model(), "lora", lora_rank=2, lora_alpha=4)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(".attn.qkv.lora_A" in n for n in trainable) and any(".attn.proj.lora_B" in n for n in trainable)
    assert not any("patch_embed" in n for n in trainable)
    with torch.no_grad():
        for n, p in setup.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    merged = setup.export_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), setup.model.eval()(x), rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(tiny_model().state_dict())


def test_lastn_and_linear_freeze_the_right_parameters():
    from dinov2_triton.train.peft_modes import setup_mode

    setup = setup_mode(tiny_model(), "lastn", unfreeze_blocks=1)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.blocks.1.") for n in trainable)
    assert not any(n.startswith(("backbone.blocks.0.", "backbone.patch_embed", "backbone.pos_embed"))
                   for n in trainable)
    assert {"backbone.norm.weight", "head.weight"} <= trainable
    setup.set_phase(linear_probe=True)
    assert {n for n, p in setup.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="--unfreeze-blocks 5"):
        setup_mode(tiny_model(), "lastn", unfreeze_blocks=5)


def test_lp_warm_start_then_full(tiny_data, tmp_path):
    out = tmp_path / "run"
    metrics = finetune(tiny_cfg(tiny_data, out, epochs=1, lp_epochs=1))
    assert [h["phase"] for h in metrics["history"]] == ["linear-probe warm-up", "full"]


# --------------------------------------------------------------------------- optimiser
def test_layer_decay_groups_and_schedule():
    from dinov2_triton.train.optim import Schedule, build_optimizer

    model = tiny_model()
    opt = build_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_layer = {g["layer_id"]: g["lr_scale"] for g in opt.param_groups}
    assert by_layer == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}           # 2 blocks: embed, b0, b1, norm+head
    for g in opt.param_groups:                                      # no decay on biases/norms/tokens
        assert g["weight_decay"] == 0.0 or all(p.ndim > 1 for p in g["params"])
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.cls_token) in no_decay

    s = Schedule(lr=1.0, min_lr=0.0, total_steps=14, warmup_steps=4, lp_steps=4, lp_lr=0.1)
    assert s.in_linear_probe(3) and not s.in_linear_probe(4)
    assert s.value(0) == pytest.approx(0.1)
    assert [s.value(4 + i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s.value(8) == pytest.approx(1.0) and s.value(14) == pytest.approx(0.0)
    s.apply(opt, 6)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.75 * 0.125, 0.75 * 0.25, 0.375, 0.75])


# --------------------------------------------------------------------------- config
def test_config_layers_defaults_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nbatch-size: 4\nmode: lora\nrun: {ignored: true}\n")
    cfg = resolve_config({"epochs": 1}, str(f))
    assert (cfg.epochs, cfg.batch_size, cfg.mode, cfg.img_size) == (1, 4, "lora", 224)
    f.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="c.yaml: unknown key 'epoch'"):
        load_config_file(f)
    f.write_text("epochs: three\n")
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        resolve_config({}, str(f))
    with pytest.raises(ConfigError, match="--img-size 100: must be a positive multiple of .*14"):
        resolve_config({"img_size": 100})
    with pytest.raises(ConfigError, match="--cache-features needs --mode linear"):
        resolve_config({"cache_features": True})


def test_fp16_refused_on_cpu(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA GPU.*bf16"):
        finetune(tiny_cfg(tiny_data, tmp_path / "run", amp="fp16", device="cpu"))


def test_bf16_autocast_runs_on_cpu(tiny_data, tmp_path):
    metrics = finetune(tiny_cfg(tiny_data, tmp_path / "run", amp="bf16", device="cpu", epochs=1,
                                max_train_batches=1))
    assert metrics["history"][0]["train_samples"] == 8


# --------------------------------------------------------------------------- CLI
def _cli(*args: str, timeout: int = 180, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dinov2_triton.train.finetune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_smoke_run_writes_all_outputs(tiny_data, tmp_path):
    out = tmp_path / "models"
    r = _cli("--data-path", str(tiny_data), "--output-path", str(out), "--weights", "random",
             "--img-size", str(TINY_IMG), "--backbone-overrides", json.dumps(TINY), "--epochs", "2",
             "--batch-size", "8", "--num-workers", "0", "--max-train-batches", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_roc_macro", "per_class",
                "confusion_matrix"):
        assert key in metrics["test"], key
    assert metrics["test"]["n"] == 6 and len(metrics["history"]) == 2
    assert metrics["history"][0]["train_samples"] == 16                  # --max-train-batches 2
    assert "NOT pretrained" in metrics["weights_source"]
    assert "NOT pretrained" in r.stderr and "NOT pretrained" in (out / "train.log").read_text()
    model, record = load_classifier(out / "model_final.pth")
    assert "NOT pretrained" in record.weights_source and record.pretrained is False
    assert record.schema_version == 3 and record.epochs_trained == 2
    assert record.image_size == TINY_IMG and record.class_names == ["cat", "dog", "fox"]
    assert record.metrics["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert read_checkpoint(out / "checkpoint_last.pth").weights_source == metrics["weights_source"]
    assert read_checkpoint(out / "model_best.pth").best_epoch in (1, 2)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["run"]["git_revision"] and "torch" in config["run"]["versions"]
    # the saved config.yaml is itself a valid --config file
    assert resolve_config({}, str(out / "config.yaml")).max_train_batches == 2
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_offline_hub_weights_fail_fast_with_exit_2(tiny_data, tmp_path):
    # An endpoint that refuses connections stands in for "offline" even on a connected CI host.
    r = _cli("--data-path", str(tiny_data), "--output-path", str(tmp_path / "m"), "--weights", "hub",
             "--img-size", str(TINY_IMG), "--backbone-overrides", json.dumps(TINY),
             env_extra={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hf")},
             timeout=60)
    assert r.returncode == 2, r.stderr
    assert "error: --weights hub: could not download pretrained DINOv2 weights" in r.stderr
    assert "--weights random" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_flags_exit_2(tiny_data, tmp_path):
    r = _cli("--data-path", str(tmp_path / "missing"), "--output-path", str(tmp_path / "m"), "--weights", "random")
    assert r.returncode == 2 and "labels.txt: not found" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--data-path", str(tiny_data), "--output-path", str(tmp_path / "m"), "--img-size", "100")
    assert r.returncode == 2 and "--img-size 100" in r.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tiny_data, tmp_path):
    """torchrun with 2 gloo processes x batch 4 equals 1 process x batch 8
    (same samples per step, gradients averaged); only rank 0 writes."""
    common = ["--data-path", str(tiny_data), "--weights", "random", "--img-size", str(TINY_IMG),
              "--backbone-overrides", json.dumps(TINY), "--epochs", "2", "--num-workers", "0",
              "--no-progress", "--lr", "1e-3", "--warmup-epochs", "0.5"]
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Own session: on a timeout the whole group (torchrun + workers) is killed, no orphans.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", "-m", "dinov2_triton.train.finetune", *common,
                             "--output-path", str(ddp_out), "--batch-size", "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun with 2 CPU processes did not finish in 150 s")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in ddp_out.iterdir()} == OUTPUTS
    log = (ddp_out / "train.log").read_text()
    assert log.count("NOT pretrained: accuracy says nothing") == 1      # rank 1 neither logs nor writes
    assert r.stderr.count("NOT pretrained: accuracy says nothing") == 1
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["history"][0]["train_samples"] == 24

    single_out = tmp_path / "single"
    finetune(tiny_cfg(tiny_data, single_out, batch_size=8))
    ref, got = final_state(single_out), final_state(ddp_out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"DDP differs in {k}")
    single = json.loads((single_out / "metrics.json").read_text())
    assert metrics["test"]["n"] == single["test"]["n"] == 6


def test_arch_names_match_the_model_factory():
    from dinov2_triton.train.finetune_config import ARCH_NAMES
    from dinov2_triton.train.model import ARCHS

    assert ARCH_NAMES == tuple(ARCHS)


def test_phase_change_frees_the_previous_ddp_wrapper(tmp_path, monkeypatch):
    """Linear-probe warm start -> full: the DDP wrapper built for the head-only
    phase is destroyed before the next one is built (its reducer would keep
    hooks and gradient buckets on the shared parameters)."""
    import gc
    import weakref

    import torch.distributed as tdist

    from dinov2_triton.train.distributed import DistInfo
    from dinov2_triton.train.trainer import Trainer

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        trainer = Trainer.__new__(Trainer)          # only the wrapping state, no data or model building
        module = tiny_model().train()
        trainer.dist, trainer.device = DistInfo(rank=0, world_size=2), torch.device("cpu")
        trainer.trained_module = trainer.wrapped = module
        trainer.wrapped_phase = None
        for p in module.parameters():
            p.requires_grad_(False)
        module.head.requires_grad_(True)
        trainer.wrap_for_phase(True)
        first = weakref.ref(trainer.wrapped)
        assert first() is not None and first().module is module
        trainer.wrap_for_phase(True)                # same phase: same wrapper
        assert trainer.wrapped is first()
        module.requires_grad_(True)
        import dinov2_triton.train.distributed as distributed

        real_wrap, alive_when_rewrapping = distributed.wrap_ddp, []

        def spy(*args, **kw):
            alive_when_rewrapping.append(first() is not None)
            return real_wrap(*args, **kw)

        monkeypatch.setattr(distributed, "wrap_ddp", spy)
        gc.disable()          # only the trainer's own collection may free the old wrapper
        try:
            trainer.wrap_for_phase(False)
        finally:
            gc.enable()
        assert alive_when_rewrapping == [False], "the linear-probe DDP wrapper was alive when re-wrapping"
        out = trainer.wrapped(torch.randn(2, 3, TINY_IMG, TINY_IMG))
        out.sum().backward()
        assert module.backbone.blocks[0].attn.qkv.weight.grad is not None
    finally:
        trainer.wrapped = None
        gc.collect()
        tdist.destroy_process_group()


def test_amp_bf16_refused_where_cuda_only_emulates_it(monkeypatch):
    """torch.cuda.is_bf16_supported() is True by emulation below compute
    capability 8.0 (Volta/Turing); --amp bf16 must be refused there, and
    allowed where the GPU has BF16 in hardware. The CUDA queries are patched:
    no GPU here."""
    from dinov2_triton.train.engine import check_amp

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\) has no BF16.*xformers"):
        check_amp("bf16", cuda, "xformers")
    check_amp("fp16", cuda, "xformers")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    check_amp("bf16", cuda, "xformers")
    check_amp("bf16", torch.device("cpu"))
