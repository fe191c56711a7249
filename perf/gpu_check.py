"""GPU check for a CUDA machine that has PyTorch and ONNX but neither Triton
nor TensorRT (python -m perf.gpu_check, or scripts/gpu_check.sh).

1. a few fine-tuning steps of ViT-S/14 with AMP (and xformers attention when
   importable), images/s and peak GPU memory;
2. eager FP32 / FP16 / BF16 and TorchScript FP32 inference: latency at batch 1,
   throughput at the large batch, top-1 agreement and cosine vs FP32.
Prints one markdown table (paste it into the README with the GPU's name).
Random-init weights: parity of FP16/BF16 against FP32 on a random model is a
pessimistic case (small logit margins)."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _timed(fn, sync, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def run_gpu_check(*, arch: str = "vits14", img_size: int = 224, batch: int = 64, train_steps: int = 20,
                  iters: int = 30, num_classes: int = 10) -> dict:
    import numpy as np
    import torch

    from train.metrics import parity_metrics
    from train.model import build_model

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to PyTorch: run this on a GPU host")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "arch": arch, "img_size": img_size,
            "batch": batch, "rows": []}
    torch.manual_seed(0)
    sync = torch.cuda.synchronize

    # 1. fine-tuning steps with AMP (bf16 where supported) and xformers if present
    try:
        import xformers.ops  # noqa: F401
        attention = "xformers"
    except ImportError:
        attention = "sdpa"
    model = build_model(arch, weights="random", num_classes=num_classes, img_size=img_size,
                        attention=attention).model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite training loss {loss.item()}")

    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    times = _timed(step, sync, train_steps)
    info["rows"].append({"what": f"fine-tune step (AMP {str(amp_dtype).split('.')[-1]}, {attention})",
                         "latency_ms_p50": 1e3 * float(np.median(times)),
                         "images_per_s": batch / float(np.median(times)),
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "top1_agreement": None, "cosine": None})
    del opt
    model = build_model(arch, weights="random", num_classes=num_classes, img_size=img_size).model.to(dev).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)  # random heads tie every class; scale like a trained head

    # 2. inference variants, parity vs eager FP32 on the same inputs
    xs = torch.randn(256, 3, img_size, img_size, device=dev)
    x1 = xs[:1]
    xb = xs[:batch]

    @torch.no_grad()
    def outputs(fn):
        return torch.cat([fn(xs[i:i + batch]).float() for i in range(0, len(xs), batch)]).cpu().numpy()

    ref = outputs(model)
    traced = torch.jit.trace(model, x1, check_trace=False)
    variants = {
        "eager FP32": (model, None),
        "eager FP16 (autocast)": (model, torch.float16),
        "eager BF16 (autocast)": (model, torch.bfloat16),
        "TorchScript FP32": (traced, None),
    }
    for name, (fn, dtype) in variants.items():
        def call(inp, fn=fn, dtype=dtype):
            if dtype is None:
                return fn(inp)
            with torch.autocast("cuda", dtype=dtype):
                return fn(inp)
        with torch.no_grad():
            for _ in range(5):
                call(x1), call(xb)
            torch.cuda.reset_peak_memory_stats()
            lat = _timed(lambda: call(x1), sync, iters)
            thr = _timed(lambda: call(xb), sync, max(5, iters // 3))
            cand = outputs(lambda inp: call(inp))
        par = parity_metrics(ref, cand)
        info["rows"].append({"what": f"inference {name}", "latency_ms_p50": 1e3 * float(np.median(lat)),
                             "images_per_s": batch / float(np.median(thr)),
                             "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                             "top1_agreement": par["top1_agreement"], "cosine": par["logits"]["cosine_mean"]})
    return info


def format_table(info: dict) -> str:
    lines = [f"GPU: {info['gpu']} (sm {info['compute_capability']}), torch {info['torch']}, CUDA {info['cuda']}, "
             f"{info['arch']} random init, {info['img_size']} px, large batch {info['batch']}",
             "", "| what | p50 latency ms (batch 1; train: per step) | images/s (large batch) | peak GPU mem GiB "
             "| top-1 agreement vs FP32 | logit cosine |", "|---|---|---|---|---|---|"]
    for r in info["rows"]:
        agree = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.2%}"
        cos = "-" if r["cosine"] is None else f"{r['cosine']:.6f}"
        lines.append(f"| {r['what']} | {r['latency_ms_p50']:.2f} | {r['images_per_s']:.0f} | "
                     f"{r['peak_mem_gib']:.2f} | {agree} | {cos} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vits14")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args(argv)
    try:
        info = run_gpu_check(arch=a.arch, img_size=a.img_size, batch=a.batch, train_steps=a.train_steps,
                             iters=a.iters)
    except RuntimeError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    print(format_table(info))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(info, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
