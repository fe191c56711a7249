"""Training throughput of a DINOv2 classifier on this machine.

    dinov2-triton train-bench --arch vits14 --img-size 224 112 --batch-size 8 --steps 5

For each (mode, image size) a fresh subprocess builds the model (random
init: speed does not depend on the weights), runs `--warmup` untimed steps,
then `--steps` timed ones, and reports images/s and the peak resident memory
of that process (so one configuration's peak does not leak into the next).

Modes measured: `linear` = backbone forward without gradients + head
forward/backward + AdamW step (what --mode linear does per batch; with
--cache-features the backbone runs once per image instead);
`full` = forward + backward + AdamW step over every parameter; `lastn` and
`lora` are available too."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Sequence

MODES = ("linear", "full", "lastn", "lora")


def measure(*, arch: str, img_size: int, batch_size: int, steps: int, warmup: int, mode: str,
            amp: str = "none", device: str = "cpu", num_classes: int = 10,
            backbone_overrides: dict | None = None, grad_checkpointing: bool = False) -> dict[str, Any]:
    """Time `steps` training steps in this process; returns the numbers."""
    import resource
    import time

    import torch
    from torch import nn

    from dinov2_triton.train.engine import autocast
    from dinov2_triton.train.model import build_model
    from dinov2_triton.train.optim import build_optimizer
    from dinov2_triton.train.peft_modes import setup_mode

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(arch, weights="random", num_classes=num_classes, img_size=img_size,
                        backbone_overrides=backbone_overrides).model
    setup = setup_mode(model, mode, unfreeze_blocks=2)
    model = setup.model.to(dev).train()
    if grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, layer_decay=0.75)
    criterion = nn.CrossEntropyLoss()
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)

    def step() -> None:
        with autocast(dev, amp):
            if mode == "linear":
                with torch.no_grad():
                    emb = model.embed(x)
                logits = model.head(emb.float())
            else:
                logits = model(x)
            loss = criterion(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    return {
        "arch": arch, "mode": mode, "img_size": img_size, "batch_size": batch_size, "steps": steps,
        "warmup": warmup, "amp": amp, "device": device, "threads": torch.get_num_threads(),
        "images_per_s": batch_size * steps / total, "s_per_step": total / steps,
        "s_per_step_min": min(times), "peak_rss_mib": peak_rss_mib,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
    }


def run_isolated(**kw: Any) -> dict[str, Any]:
    """measure() in a fresh interpreter (clean peak-memory accounting)."""
    cmd = [sys.executable, "-m", "dinov2_triton.train.benchmark", "--measure-one", json.dumps(kw)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if r.returncode != 0:
        raise RuntimeError(f"benchmark of {kw} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| mode | img px | batch | images/s | s/step | peak RSS MiB | trainable params |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['img_size']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
                     f"{r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {r['trainable_params'] / 1e6:.2f} M |")
    return "\n".join(lines)


PROG = "dinov2-triton train-bench"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or PROG,
                                description="Training throughput (images/s) and peak memory per mode and image size.")
    p.add_argument("--arch", default="vits14", help="dinov2_triton.train.model.ARCHS name (default: vits14)")
    p.add_argument("--img-size", dest="img_size", type=int, nargs="+", default=[224],
                   help="one or more sizes, multiples of 14 (default: 224)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="(default: 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["linear", "full"],
                   help="(default: linear full)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="(default: none)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: cpu)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--measure-one", metavar="JSON", help=argparse.SUPPRESS)  # run_isolated's child
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure(**json.loads(args.measure_one))))
        return 0
    from dinov2_triton.train.archs import check_image_size

    try:
        for size in args.img_size:
            check_image_size(args.arch, size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        print("error: --steps and --batch-size must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.amp == "fp16" and args.device == "cpu":
        print("error: --amp fp16 needs --device cuda", file=sys.stderr)
        return 2
    rows = []
    for size in args.img_size:
        for mode in args.modes:
            print(f"measuring {args.arch} {mode} at {size} px, batch {args.batch_size} ...", file=sys.stderr,
                  flush=True)
            try:
                rows.append(run_isolated(arch=args.arch, img_size=size, batch_size=args.batch_size,
                                         steps=args.steps, warmup=args.warmup, mode=mode, amp=args.amp,
                                         device=args.device, grad_checkpointing=args.grad_checkpointing))
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    r0 = rows[0]
    print(f"\n{args.arch}, random init, {args.device} ({r0['threads']} threads), amp {args.amp}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
