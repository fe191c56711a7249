"""Stage 2: fine-tune a DINOv2 classifier on the data folder from ``dinov2-triton data``.

    dinov2-triton train --data-path ./data/ --output-path ./models/ [flags]
    torchrun --nproc_per_node N -m dinov2_triton.train.finetune ...        (DDP)

Configuration is layered: defaults < `--config file.yaml` < command-line flags
(train/finetune_config.py); the resolved configuration is written to
`<output-path>/config.yaml` with the git revision and library versions. A run
resumes from `<output-path>/checkpoint_last.pth` by default (`--no-resume`
starts over). The run itself is train/trainer.py (`finetune(cfg)`).

Outputs (rank 0 only): model_final.pth, model_best.pth, checkpoint_last.pth,
metrics.json, config.yaml, train.log, training_curves.png,
confusion_matrix.png (see docs/architecture.md for the checkpoint record).
This module is the command line only: argument parsing and exit codes.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from dinov2_triton.train.finetune_config import (
    AMPS,
    ARCH_NAMES,
    ATTENTIONS,
    DEFAULT_LR,
    DEVICES,
    HEADS,
    MODES,
    ConfigError,
    FinetuneConfig,
    resolve_config,
)

_DEFAULTS = FinetuneConfig()


PROG = "dinov2-triton train"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = _DEFAULTS
    S = argparse.SUPPRESS  # only flags given on the command line override the YAML file
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        description="Stage 2: fine-tune a DINOv2 classifier on a data folder written by dinov2-triton data.",
        epilog="Precedence: defaults < --config YAML < flags. Resumes from OUTPUT/checkpoint_last.pth "
               "unless --no-resume. Multi-process: torchrun --nproc_per_node N -m dinov2_triton.train.finetune ...")
    g = p.add_argument_group("Required (defaults follow the seed contract)")
    g.add_argument("--data-path", dest="data_path", default=S, metavar="DIR",
                   help=f"data folder from dinov2-triton data (default: {d.data_path})")
    g.add_argument("--output-path", dest="output_path", default=S, metavar="DIR",
                   help=f"where models, metrics and plots go (default: {d.output_path})")
    g = p.add_argument_group("Model")
    g.add_argument("--arch", choices=ARCH_NAMES, default=S, help=f"backbone (default: {d.arch})")
    g.add_argument("--weights", default=S, metavar="SRC",
                   help="random | hub | a hub id (e.g. timm/vit_small_patch14_dinov2.lvd142m) | a local "
                        f".pth/.safetensors file, official or timm layout (default: {d.weights})")
    g.add_argument("--img-size", dest="img_size", type=int, default=S, metavar="PX",
                   help=f"input size, a multiple of the patch (14 DINOv2, 16 DINOv3; default: {d.img_size})")
    g.add_argument("--head", choices=HEADS, default=S,
                   help=f"embedding fed to the linear head (default: {d.head})")
    g.add_argument("--attention", choices=ATTENTIONS, default=S,
                   help=f"attention kernel for training; xformers needs a GPU (default: {d.attention})")
    g.add_argument("--backbone-overrides", dest="backbone_overrides", type=json.loads, default=S,
                   metavar="JSON", help='extra timm kwargs, e.g. \'{"depth": 2}\' (tiny test models)')
    g = p.add_argument_group("What trains")
    g.add_argument("--mode", choices=MODES, default=S,
                   help=f"linear probe | full fine-tune | LoRA on attention qkv/proj | last N blocks "
                        f"(default: {d.mode})")
    g.add_argument("--cache-features", dest="cache_features", action="store_true", default=S,
                   help="--mode linear: compute backbone embeddings once (no augmentation) and train the head on them")
    g.add_argument("--layer-decay", dest="layer_decay", type=float, default=S, metavar="X",
                   help=f"layer-wise lr decay per block, 1 = off (default: {d.layer_decay})")
    g.add_argument("--lora-rank", dest="lora_rank", type=int, default=S, metavar="N",
                   help=f"(default: {d.lora_rank})")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=S, metavar="X",
                   help=f"(default: {d.lora_alpha})")
    g.add_argument("--lora-dropout", dest="lora_dropout", type=float, default=S, metavar="X",
                   help=f"(default: {d.lora_dropout})")
    g.add_argument("--unfreeze-blocks", dest="unfreeze_blocks", type=int, default=S, metavar="N",
                   help=f"--mode lastn: train the last N blocks + final norm + head (default: {d.unfreeze_blocks})")
    g.add_argument("--lp-epochs", dest="lp_epochs", type=int, default=S, metavar="K",
                   help=f"linear-probe warm start: K head-only epochs before full/lora/lastn (default: {d.lp_epochs})")
    g.add_argument("--lp-lr", dest="lp_lr", type=float, default=S, metavar="X",
                   help=f"lr of the warm start (default: {d.lp_lr})")
    g = p.add_argument_group("Optimisation")
    g.add_argument("--epochs", type=int, default=S, metavar="N", help=f"(default: {d.epochs}, plus --lp-epochs)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S, metavar="N",
                   help=f"per process (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=S, metavar="X",
                   help="peak AdamW lr of the head (default by mode: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=S, metavar="X",
                   help=f"cosine floor (default: {d.min_lr})")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, metavar="X",
                   help=f"AdamW weight decay, not on norms/biases/tokens (default: {d.weight_decay})")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S, metavar="X",
                   help=f"linear warm-up, per step (default: {d.warmup_epochs})")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=S, metavar="X",
                   help=f"(default: {d.label_smoothing})")
    g.add_argument("--accum-steps", dest="accum_steps", type=int, default=S, metavar="N",
                   help=f"gradient accumulation (default: {d.accum_steps})")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=S, metavar="X",
                   help=f"max gradient norm, 0 = off (default: {d.clip_grad})")
    g.add_argument("--amp", choices=AMPS, default=S,
                   help=f"mixed precision; fp16 needs a GPU (default: {d.amp})")
    g.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_true", default=S,
                   help="recompute activations in backward (less memory, ~30%% slower)")
    g.add_argument("--no-augment", dest="no_augment", action="store_true", default=S,
                   help="train on the evaluation preprocessing (no random crop/flip)")
    g.add_argument("--seed", type=int, default=S, metavar="N", help=f"(default: {d.seed})")
    g = p.add_argument_group("Run")
    g.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML with any of these options (keys with _ or -); flags override it")
    g.add_argument("--device", choices=DEVICES, default=S, help=f"(default: {d.device})")
    g.add_argument("--num-workers", dest="num_workers", type=int, default=S, metavar="N",
                   help="DataLoader workers per process (default: min(8, CPUs - 1))")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=S,
                   help="continue from OUTPUT/checkpoint_last.pth if present (default: on)")
    g.add_argument("--max-train-batches", dest="max_train_batches", type=int, default=S, metavar="N",
                   help="stop each epoch after N batches (smoke runs; default: whole epoch)")
    g.add_argument("--save-every-steps", dest="save_every_steps", type=int, default=S, metavar="N",
                   help="also write checkpoint_last.pth every N optimizer steps (default: end of epoch only)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no tqdm progress bars (epoch summary lines stay)")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = vars(build_parser(prog).parse_args(argv))
    config_file = args.pop("config", None)
    try:
        cfg = resolve_config(args, config_file)
        from dinov2_triton.train.trainer import finetune

        finetune(cfg)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from checkpoint_last.pth", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the known errors below get a message, not a traceback
        from dinov2_triton.core.records import RecordError
        from dinov2_triton.data.datasets import ManifestError
        from dinov2_triton.train.engine import NonFiniteError
        from dinov2_triton.train.model import WeightsError

        if isinstance(exc, NonFiniteError):
            print(f"error: {exc}", file=sys.stderr)
            return 3
        if isinstance(exc, (ConfigError, WeightsError, ManifestError, RecordError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
