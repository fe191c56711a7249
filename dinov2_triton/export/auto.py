"""`--variants auto` (the default of `dinov2-triton export` and of the pipeline):
build every variant this host can run, then let the `dinov2` ensemble call the
fastest one that passed its gate, measured in this same run on this host.

Which variant is fastest is not knowable from its precision: on an AVX2-only
EPYC ONNX Runtime's dynamic INT8 beat the ModelOpt Q/DQ INT8 and OpenVINO's
INT8 was slower than its FP32; with VNNI/AMX/BF16 the order changes
(docs/cpu-engines.md). So nothing here ranks by kind; the export's own
in-process benchmark (dinov2_triton.export.benchmark, batch `max_batch_size`,
after verification) decides.

Two measurements, in order: the export's in-process benchmark picks the
variant the ensemble calls first (:func:`deployment_choice`, recorded with
the ranking it was chosen from in the export manifest's ensemble entry);
then the bench stage of the pipeline measures every gated variant served
through Triton and points the ensemble at the fastest of them
(dinov2_triton.pipeline.bench_stage.follow_fastest, with
dinov2_triton.report.ranking.recommend: served and in-process rankings differ, e.g.
OpenVINO on an AVX2 EPYC served at 0.57x its in-process rate). The bench
report's recommendation is the manifest's entry
(dinov2_triton.report.ranking.recommend_deployed), so what the report recommends is
what `dinov2` serves.

    candidates(gpu=None)                  -> the variant names `auto` builds on this host
    expand(names)                         -> (variant names, export options)
    deployment_choice(manifest)           -> Choice (variant, why, ranking) or None
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

AUTO = "auto"
#: export option that `auto` sets; dinov2_triton.export.serving_models reads it
ENSEMBLE_CHOICE_OPTION = "ensemble_choice"
FASTEST = "fastest"
#: how the ensemble's classifier was chosen, as the manifest records it (ServingModelEntry.classifier_choice)
CHOSEN_FASTEST = "fastest gated (auto)"
#: ... and after the bench stage pointed it at the fastest gated variant served through Triton
CHOSEN_SERVED = "fastest gated, served (auto)"
#: the choices made by measurement (the report recommends what the ensemble calls)
MEASURED_CHOICES = (CHOSEN_FASTEST, CHOSEN_SERVED)
# TensorRT plans run on NVIDIA GPUs only; every other registered platform runs on a CPU.
_GPU_ONLY_PLATFORMS = ("tensorrt_plan",)


def host_has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible to torch here (where the TensorRT candidates can build)."""
    try:
        import torch
    except ImportError:   # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def candidates(gpu: bool | None = None) -> list[str]:
    """Every registered variant this host can run, in the registry's order: on
    a CPU host the CPU ones (the ONNX FP32 parent, TorchScript and FP16
    included: FP16 is measured, not assumed slow; BF16 is a candidate and
    SKIPPED with its reason where the CPU has no BF16), on a GPU host also the
    TensorRT ones. ``gpu`` None: ask torch."""
    from dinov2_triton.export.registry import load_builtin_variants

    gpu = host_has_gpu() if gpu is None else gpu
    return [n for n, v in load_builtin_variants().items() if gpu or v.platform not in _GPU_ONLY_PLATFORMS]


def expand(names: Iterable[str], *, gpu: bool | None = None) -> tuple[list[str], dict[str, Any]]:
    """``auto`` in a variant list -> this host's candidates in its place (names
    given beside it are kept, no duplicates), and the option that makes the
    ensemble call the fastest gated one. A list without ``auto`` is returned as
    given: a user who names variants gets exactly those."""
    names = list(names)
    if AUTO not in names:
        return names, {}
    out: list[str] = []
    for n in names:
        for m in (candidates(gpu) if n == AUTO else [n]):
            if m not in out:
                out.append(m)
    return out, {ENSEMBLE_CHOICE_OPTION: FASTEST}


@dataclass(frozen=True)
class Choice:
    """The variant the ensemble calls and why, with every gated variant it was chosen from."""
    variant: str
    why: str
    ranking: list[dict[str, Any]] = field(default_factory=list)


def _throughput(entry) -> tuple[float | None, int | None]:
    bench = entry.benchmark or {}
    batch = bench.get("throughput_batch")
    cell = bench.get(f"batch{batch}") if batch else None
    value = cell.get("img_per_s") if isinstance(cell, dict) else None
    return (float(value) if isinstance(value, (int, float)) else None), batch


def ranking(manifest) -> list[dict[str, Any]]:
    """Published variants that passed their gate, fastest first, with the
    in-process throughput they were measured at (unmeasured ones last). A
    variant that failed its gate, was skipped or failed to build is not here:
    it can never be chosen, however fast it is."""
    rows = []
    for name, e in manifest.variants.items():
        if not e.published or e.status != "OK" or e.gate_passed is not True:
            continue
        thr, batch = _throughput(e)
        rows.append({"variant": name, "model_name": e.model_name, "images_per_s": thr, "batch_size": batch})
    rows.sort(key=lambda r: -(r["images_per_s"] or -1.0))
    return rows


def deployment_choice(manifest) -> Choice | None:
    """The fastest published variant that passed its gate, by the export's
    in-process throughput at batch ``max_batch_size`` on this host; None when
    no such variant has a measured throughput (``--bench-seconds 0``: the
    caller falls back to the registry's preference and says so)."""
    rows = [r for r in ranking(manifest) if r["images_per_s"]]
    if not rows:
        return None
    best = rows[0]
    others = ", ".join(f"{r['variant']} {r['images_per_s']:.1f}" for r in rows[1:]) or "no other gated variant"
    why = (f"auto: the fastest gated variant measured in this run, {best['variant']} "
           f"{best['images_per_s']:.1f} img/s in process at batch {best['batch_size']} (then: {others})")
    return Choice(variant=best["variant"], why=why, ranking=rows)
