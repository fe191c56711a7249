"""Perf stage: measure every variant in process and through the live Triton
endpoint, check parity, and write one report that puts accuracy next to
latency, throughput, size and memory.

- `perf.inprocess`: in-process latency/throughput/memory per variant (the
  library); `python -m perf.production_benchmarking --model_path ...` is its
  thin CLI (a report, like perf.run without a server).
- `perf.perf_analyzer`: the perf_analyzer sweep against a server (real
  test-split inputs, shapes from the server's model config, client and
  server-side breakdown parsed from its CSV).
- `perf.system_info`: machine, versions, matmul peak, FLOPs per image.
- `perf.memory`: peak RSS of a run, server memory (process tree, metrics).
- `perf.results`: `PerfResults`, the typed results.json record, its one
  writer (`write_results`) and one reader (`read_results`).
- `perf.ranking`: one row per variant, the recommendation, slower-than-parent flags.
- `perf.plots`: the report's figures.
- `perf.report`: report.md / report.html (`python -m perf.report --results ...`).
- `perf.run`: the perf stage CLI (`python -m perf.run --url ...`).

Importing this package is cheap (no torch): heavy imports live in functions.
"""
