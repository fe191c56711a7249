"""Perf stage: measure every variant in process and through the live Triton
endpoint, check parity, and write one report that puts accuracy next to
latency, throughput, size and memory.

- `perf.production_benchmarking`: in-process latency/throughput/memory per
  variant (`python -m perf.production_benchmarking --model_path ...`).
- `perf.perf_analyzer`: the perf_analyzer sweep against a server (real
  test-split inputs, shapes from the server's model config, client and
  server-side breakdown parsed from its CSV).
- `perf.system_info`: machine, versions, matmul peak, FLOPs per image.
- `perf.memory`: peak RSS of a run, server memory (process tree, metrics).
- `perf.report`: report.md / report.html / results.json / plots.
- `perf.run`: the perf stage CLI (`python -m perf.run --url ...`).

Importing this package is cheap (no torch): heavy imports live in functions.
"""
