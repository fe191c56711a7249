"""`dinov2-triton export --variants cpu-auto`: build every CPU candidate, then let
the `dinov2` ensemble call the fastest one that passed its gate, measured in
this same run on this host.

Which variant is fastest on a CPU is not knowable from its precision: on an
AVX2-only EPYC ONNX Runtime's dynamic INT8 beat the ModelOpt Q/DQ INT8 and
OpenVINO's INT8 was slower than its FP32; with VNNI/AMX/BF16 the order
changes (README, "the fastest CPU deployment"). So nothing here ranks by
kind; the export's own in-process benchmark (dinov2_triton.export.benchmark, batch
`max_batch_size`, after verification) decides.

    cpu_candidates()           -> the variant names cpu-auto builds
    fastest_gated(manifest)    -> (variant, why, fallback) for the ensemble
"""
from __future__ import annotations

from typing import Any

CPU_AUTO = "cpu-auto"
#: option the CLI sets for cpu-auto; dinov2_triton.export.serving_models reads it
ENSEMBLE_CHOICE_OPTION = "ensemble_choice"
FASTEST = "fastest"
# TensorRT plans run on NVIDIA GPUs only; every other registered platform runs on a CPU.
_GPU_ONLY_PLATFORMS = ("tensorrt_plan",)


def cpu_candidates() -> list[str]:
    """Every registered variant that runs on a CPU (the ONNX FP32 parent and
    TorchScript included), in the registry's order. FP16 is a candidate too:
    it is measured, not assumed to be slow."""
    from dinov2_triton.export.registry import load_builtin_variants

    return [n for n, v in load_builtin_variants().items() if v.platform not in _GPU_ONLY_PLATFORMS]


def _throughput(entry) -> tuple[float | None, int | None]:
    bench = entry.benchmark or {}
    batch = bench.get("throughput_batch")
    cell = bench.get(f"batch{batch}") if batch else None
    value = cell.get("img_per_s") if isinstance(cell, dict) else None
    return (float(value) if isinstance(value, (int, float)) else None), batch


def ranking(manifest) -> list[dict[str, Any]]:
    """Published variants that passed their gate, fastest first, with the
    in-process throughput they were measured at (unmeasured ones last)."""
    rows = []
    for name, e in manifest.variants.items():
        if not e.published or e.status != "OK" or e.gate_passed is not True:
            continue
        thr, batch = _throughput(e)
        rows.append({"variant": name, "images_per_s": thr, "batch_size": batch})
    rows.sort(key=lambda r: -(r["images_per_s"] or -1.0))
    return rows


def fastest_gated(manifest) -> tuple[str | None, str | None, bool]:
    """(variant the ensemble should call, why, whether that is a fallback
    the user should hear about). None when no published variant passed its
    gate with a measured throughput (the caller falls back to the registry's
    preference and says so)."""
    rows = [r for r in ranking(manifest) if r["images_per_s"]]
    if not rows:
        return None, ("cpu-auto: no published variant passed its gate with a measured throughput "
                      "(--bench-seconds 0?)"), True
    best = rows[0]
    others = ", ".join(f"{r['variant']} {r['images_per_s']:.1f}" for r in rows[1:]) or "no other gated variant"
    why = (f"cpu-auto: fastest gated variant measured in this run, {best['variant']} "
           f"{best['images_per_s']:.1f} img/s in process at batch {best['batch_size']} (then: {others})")
    return best["variant"], why, False
