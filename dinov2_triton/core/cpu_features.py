"""What arithmetic this CPU has, and which unit runs it.

    read_cpu_flags()                  -> frozenset of /proc/cpuinfo flags ("" text: none)
    bf16_support(flags)               -> (True, None) | (False, NO_BF16_REASON)
    compute_unit(arithmetic, flags)   -> ("VNNI", ["avx512_vnni"])
    unit_of_kernel("brgemm_avx2_f32") -> "AVX2" (OpenVINO/oneDNN primitive names)
    arithmetic_record(layers, flags=..., source=...) -> the export manifest's Arithmetic record

Every function takes the flag set as an argument, so a test can ask what a
host with AMX or with AVX2 only would get. Standard library only.

Arithmetic names: FP32, BF16, FP16, INT8, FP8 (what the matrix multiplies
compute in). Units: AMX (tile matrix unit), VNNI (AVX-512 VNNI or AVX-VNNI
dot products for INT8), AVX-512, AVX2, SSE (the vector unit), GPU.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

ARITHMETICS = ("FP32", "BF16", "FP16", "INT8", "FP8")
UNITS = ("AMX", "VNNI", "AVX-512", "AVX2", "SSE", "GPU")
#: the flags that give a CPU native BF16 arithmetic (AVX-512 BF16 dot products, AMX BF16 tiles)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NO_BF16_REASON = "this CPU has no BF16 arithmetic (no avx512_bf16 / amx_bf16)"

# arithmetic -> [(unit, flags that give it)], best first. ONNX Runtime's MLAS
# and oneDNN (OpenVINO, PyTorch) dispatch on the same extensions: INT8 GEMMs on
# AMX tiles, else VNNI dot products, else AVX-512BW / AVX2 multiply-add
# sequences; FP32 on AVX-512F, else AVX2 + FMA.
_UNITS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "INT8": (("AMX", ("amx_int8",)), ("VNNI", ("avx512_vnni", "avx_vnni")), ("AVX-512", ("avx512bw", "avx512f")),
             ("AVX2", ("avx2",))),
    "BF16": (("AMX", ("amx_bf16",)), ("AVX-512", ("avx512_bf16",))),
    "FP16": (("AMX", ("amx_fp16",)), ("AVX-512", ("avx512_fp16",))),
    "FP32": (("AVX-512", ("avx512f",)), ("AVX2", ("avx2",))),
}


def physical_cores() -> int:
    """Physical cores this process may run on (its CPU affinity, at most the
    physical core count): what one runtime session takes by default."""
    import os

    import psutil

    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    return max(1, min(allowed, psutil.cpu_count(logical=False) or allowed))


def read_cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (or in `cpuinfo`
    text); empty where there is no such file (macOS, Windows)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_support(flags: Iterable[str]) -> tuple[bool, str | None]:
    """(True, None) on a CPU with native BF16 arithmetic; else (False, the reason)."""
    have = set(flags)
    return (True, None) if any(f in have for f in BF16_FLAGS) else (False, NO_BF16_REASON)


def compute_unit(arithmetic: str, flags: Iterable[str]) -> tuple[str, list[str]]:
    """The unit that runs `arithmetic` on a CPU with `flags`, and the flags
    that say so. A CPU without native BF16/FP16 arithmetic gets the FP32
    unit: engines convert such values to FP32 to compute."""
    have = set(flags)
    arithmetic = arithmetic.upper()
    for unit, needs in _UNITS.get(arithmetic, ()):
        found = [f for f in needs if f in have]
        if found:
            return unit, found
    if arithmetic in ("BF16", "FP16"):
        return compute_unit("FP32", have)
    return "SSE", []


def unit_flags(arithmetic: str, unit: str, flags: Iterable[str]) -> list[str]:
    """The flags of `flags` that give `unit` for `arithmetic` (e.g. INT8 on
    VNNI -> ["avx512_vnni"]); [] when none do."""
    have = set(flags)
    for name, needs in _UNITS.get(arithmetic.upper(), ()) + _UNITS["FP32"]:
        if name == unit:
            return [f for f in needs if f in have]
    return []


def unit_of_kernel(kernel: str) -> str | None:
    """The unit a oneDNN/OpenVINO primitive name says it runs on
    ("brgemm_avx512_amx_bf16" -> AMX, "jit_avx512_core_vnni_i8" -> VNNI,
    "brgemm_avx2_f32" -> AVX2); None for names that do not say ("undef",
    "ref", "unknown")."""
    k = kernel.lower()
    for token, unit in (("amx", "AMX"), ("vnni", "VNNI"), ("avx512", "AVX-512"), ("avx2", "AVX2"), ("sse", "SSE")):
        if token in k:
            return unit
    return None


def arithmetic_record(layers: Iterable[tuple[str, str | None]], *, flags: Iterable[str], source: str,
                      note: str | None = None) -> dict[str, Any]:
    """An Arithmetic record from the matrix multiply / convolution layers,
    each (arithmetic, kernel name or None): the largest share names the
    arithmetic; the unit is the one its layers' kernel names say (OpenVINO),
    else the CPU flags'."""
    layers = list(layers)
    if not layers:
        raise ValueError("no matrix multiply or convolution found to describe")
    counts = Counter(a for a, _ in layers)
    shares = {k: round(v / len(layers), 4) for k, v in counts.most_common()}
    arithmetic = next(iter(shares))
    flags = frozenset(flags)
    unit, instructions = compute_unit(arithmetic, flags)
    named = [u for a, k in layers if a == arithmetic and k for u in [unit_of_kernel(k)] if u]
    if named:
        unit = Counter(named).most_common(1)[0][0]
        instructions = unit_flags(arithmetic, unit, flags)
        source += "; unit from the kernel names"
    else:
        source += "; unit from the CPU flags"
    return {"arithmetic": arithmetic, "unit": unit, "instructions": instructions, "shares": shares,
            "kernels": sorted({k for _, k in layers if k}), "source": source, "note": note}
