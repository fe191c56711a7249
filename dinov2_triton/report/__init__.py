"""Reports from measured results: the ranking policy (which variant to deploy), the
figures, the Markdown/HTML report, the side-by-side CPU comparison and the published
results files (``benchmarks/<date>-<cpu>.md`` + ``.json``); ``dinov2-triton report
render|compare|publish`` (``report.cli``). Nothing here measures."""
