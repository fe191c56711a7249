"""Measurement: perf_analyzer sweeps against a live server (real test-split inputs,
shapes from the server's model config, client and server-side breakdown),
open-loop capacity at a latency SLO, the in-process benchmark of every
variant, memory, the machine and versions a number was measured on, and
``PerfResults`` (results.json: one writer, one reader). The stage that runs
these with live parity and writes the report is ``pipeline.bench_stage``.

Importing this package is cheap (no torch): heavy imports live in functions.
"""
