"""GPU check for a CUDA machine with PyTorch, without Triton or TensorRT:
``dinov2-triton qa gpu-check`` (< 8 minutes; --time-limit stops it).

1. matrix-multiply peak in FP32, TF32, FP16 and BF16 (torch only);
2. a few fine-tuning steps of ViT-S/14 with AMP (xformers attention when it
   can run this dtype on this GPU, else PyTorch SDPA), images/s and peak memory;
3. eager FP32 / FP16 / BF16 and TorchScript FP32 inference: latency at batch
   1, throughput at the large batch, top-1 agreement and cosine vs FP32.

Every row is OK, SKIPPED or FAILED with its reason; one failing row never
stops the others. Runs where only torch and numpy are installed: the rows
that need the DINOv2 model (timm) are SKIPPED and say so. Prints one
markdown table (paste it into the README with the GPU's name).
Random-init weights: parity of FP16/BF16 against FP32 on a random model is a
pessimistic case (small logit margins).

BF16 is chosen only where the GPU has it in hardware (compute capability >=
8.0): torch.cuda.is_bf16_supported() is True by emulation on older GPUs,
where xformers then raises NotImplementedError ("bf16 is only supported on
A100+") and emulated BF16 timings mean nothing."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable


class SkipRow(Exception):
    """This row cannot run here; str() is the reason."""


class time_limit:
    """Stop the process after ``seconds`` (0: never), printing every thread's
    traceback first (faulthandler): a bound on a GPU run that hangs in a
    driver call, which no Python timeout could interrupt."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        if self.seconds > 0:
            import faulthandler

            stream = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=stream)
        return self

    def __exit__(self, *exc):
        if self.seconds > 0:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
        return False


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (OSError, ValueError, AttributeError):
        return False


def _timed(fn, sync, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def native_bf16(torch) -> bool:
    """BF16 arithmetic in hardware (not emulated) on the current CUDA device."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def choose_amp_dtype(torch):
    return torch.bfloat16 if native_bf16(torch) else torch.float16


def choose_attention(torch, dtype, *, probe: Callable[[Any], None] | None = None) -> tuple[str, str]:
    """("xformers" | "sdpa", why). xformers only when it is importable and
    runs `dtype` on this GPU (a tiny memory_efficient_attention call)."""
    try:
        import xformers.ops as xops
    except ImportError:
        return "sdpa", "xformers not installed"

    def default_probe(dt):
        q = torch.randn(1, 8, 2, 64, device="cuda", dtype=dt)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()

    try:
        (probe or default_probe)(dtype)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return "sdpa", f"xformers cannot run {str(dtype).split('.')[-1]} here ({first[:120]}); PyTorch SDPA instead"
    return "xformers", "xformers memory-efficient attention"


def _row(rows: list[dict], what: str, fn: Callable[[], dict]) -> None:
    t0 = time.perf_counter()
    try:
        out = {"status": "OK", **fn()}
    except SkipRow as exc:
        out = {"status": "SKIPPED", "note": str(exc)}
    except Exception as exc:  # noqa: BLE001 - one row's failure is reported, the others still run
        first = (str(exc).strip().splitlines() or [""])[0]
        out = {"status": "FAILED", "note": f"{type(exc).__name__}: {first[:200]}"}
    out.setdefault("note", "")
    rows.append({"what": what, "seconds": round(time.perf_counter() - t0, 2), **out})


def _matmul_rows(torch, rows: list[dict], *, n: int = 4096, iters: int = 10) -> None:
    sync = torch.cuda.synchronize
    cases = [("FP32", torch.float32, False), ("TF32", torch.float32, True), ("FP16", torch.float16, False),
             ("BF16", torch.bfloat16, False)]
    for name, dtype, tf32 in cases:
        def run(dtype=dtype, tf32=tf32, name=name):
            if name == "BF16" and not native_bf16(torch):
                raise SkipRow("BF16 is emulated on this GPU (compute capability < 8.0): not measured")
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                a = torch.randn(n, n, device="cuda", dtype=dtype)
                b = torch.randn(n, n, device="cuda", dtype=dtype)
                for _ in range(3):
                    a @ b
                times = _timed(lambda: a @ b, sync, iters)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            best = min(times)
            return {"tflops": 2 * n ** 3 / best / 1e12, "latency_ms_p50": 1e3 * sorted(times)[len(times) // 2]}
        _row(rows, f"matmul {n}x{n} {name}", run)


def run_gpu_check(*, arch: str = "vits14", img_size: int = 224, batch: int = 64, train_steps: int = 20,
                  iters: int = 30, num_classes: int = 10) -> dict:
    try:
        import torch
    except ImportError:
        raise RuntimeError("torch is not installed: this check needs PyTorch with CUDA") from None
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA GPU visible to PyTorch {torch.__version__} (CUDA build: {torch.version.cuda}): "
                           f"run this on a GPU host")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    amp_dtype = choose_amp_dtype(torch)
    info: dict[str, Any] = {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                            "torch": torch.__version__, "cuda": torch.version.cuda, "arch": arch,
                            "img_size": img_size, "batch": batch, "amp_dtype": str(amp_dtype).split(".")[-1],
                            "native_bf16": native_bf16(torch), "rows": []}
    rows = info["rows"]
    torch.manual_seed(0)
    sync = torch.cuda.synchronize

    _matmul_rows(torch, rows)

    try:
        import numpy as np
        import timm  # noqa: F401 - dinov2_triton.train.model builds DINOv2 with it

        from dinov2_triton.train.metrics import parity_metrics
        from dinov2_triton.train.model import build_model
        model_missing = None
    except ImportError as exc:
        model_missing = (f"{exc.name or exc} not installed: the DINOv2 model needs it "
                         f"(pip install -r requirements/lock-gpu.txt)")
    names = ["fine-tune step (AMP)", "inference eager FP32", "inference eager FP16 (autocast)",
             "inference eager BF16 (autocast)", "inference TorchScript FP32"]
    if model_missing:
        def skip():
            raise SkipRow(model_missing)
        for name in names:
            _row(rows, name, skip)
        return info

    # 1. fine-tuning steps with AMP
    attention, why = choose_attention(torch, amp_dtype)
    info["attention"] = attention

    def train():
        model = build_model(arch, weights="random", num_classes=num_classes, img_size=img_size,
                            attention=attention).model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
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
        return {"latency_ms_p50": 1e3 * float(np.median(times)), "images_per_s": batch / float(np.median(times)),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "note": f"AMP {str(amp_dtype).split('.')[-1]}, {why}"}

    _row(rows, names[0], train)
    torch.cuda.empty_cache()

    # 2. inference variants, parity vs eager FP32 on the same inputs
    model = build_model(arch, weights="random", num_classes=num_classes, img_size=img_size).model.to(dev).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)  # random heads tie every class; scale like a trained head
    xs = torch.randn(256, 3, img_size, img_size, device=dev)
    x1, xb = xs[:1], xs[:batch]

    @torch.no_grad()
    def outputs(fn):
        return torch.cat([fn(xs[i:i + batch]).float() for i in range(0, len(xs), batch)]).cpu().numpy()

    ref = outputs(model)
    variants = {names[1]: (lambda: model, None), names[2]: (lambda: model, torch.float16),
                names[3]: (lambda: model, torch.bfloat16),
                names[4]: (lambda: torch.jit.trace(model, x1, check_trace=False), None)}
    for name, (make, dtype) in variants.items():
        def measure(make=make, dtype=dtype):
            if dtype is torch.bfloat16 and not native_bf16(torch):
                raise SkipRow(f"BF16 is emulated on compute capability {props.major}.{props.minor}: not measured")
            fn = make()

            def call(inp):
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
                cand = outputs(call)
            par = parity_metrics(ref, cand)
            return {"latency_ms_p50": 1e3 * float(np.median(lat)), "images_per_s": batch / float(np.median(thr)),
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "top1_agreement": par["top1_agreement"], "cosine": par["logits"]["cosine_mean"]}
        _row(rows, name, measure)
    return info


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(info: dict) -> str:
    lines = [f"GPU: {info['gpu']} (sm {info['compute_capability']}), torch {info['torch']}, CUDA {info['cuda']}, "
             f"{info['arch']} random init, {info['img_size']} px, large batch {info['batch']}, AMP "
             f"{info['amp_dtype']} (native BF16: {info['native_bf16']})",
             "", "| what | status | p50 latency ms (batch 1; train: per step) | images/s (large batch) | TFLOP/s "
             "| peak GPU mem GiB | top-1 agreement vs FP32 | logit cosine | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        lines.append(f"| {r['what']} | {r['status']} | {_fmt(r.get('latency_ms_p50'), '.2f')} | "
                     f"{_fmt(r.get('images_per_s'), '.0f')} | {_fmt(r.get('tflops'), '.1f')} | "
                     f"{_fmt(r.get('peak_mem_gib'), '.2f')} | {_fmt(r.get('top1_agreement'), '.2%')} | "
                     f"{_fmt(r.get('cosine'), '.6f')} | {r.get('note', '')} |")
    return "\n".join(lines)


PROG = "dinov2-triton qa gpu-check"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit code: 0 every row OK or SKIPPED, 1 a row FAILED, 2 no CUDA GPU / no "
                                       "torch.")
    p.add_argument("--arch", default="vits14", help="default: %(default)s")
    p.add_argument("--img-size", type=int, default=224, help="default: %(default)s")
    p.add_argument("--batch", type=int, default=64, help="the large batch (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=20, help="default: %(default)s")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per row (default: %(default)s)")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--time-limit", type=float, default=480,
                   help="stop after this many seconds, printing where it was; 0: no limit (default: %(default)s)")
    return p


def _print_gpus() -> None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        print("[gpu_check] nvidia-smi not found", file=sys.stderr)
        return
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    print(proc.stdout.strip() or f"[gpu_check] nvidia-smi failed: {proc.stderr.strip()[-200:]}", file=sys.stderr)


def main(argv=None, *, prog: str | None = None) -> int:
    a = build_parser(prog or PROG).parse_args(argv)
    try:
        with time_limit(a.time_limit):
            _print_gpus()
            info = run_gpu_check(arch=a.arch, img_size=a.img_size, batch=a.batch, train_steps=a.train_steps,
                                 iters=a.iters)
    except RuntimeError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    print(format_table(info))
    if a.json:
        from dinov2_triton.core.artifact_io import atomic_write_json

        atomic_write_json(a.json, info)
    return 1 if any(r["status"] == "FAILED" for r in info["rows"]) else 0
