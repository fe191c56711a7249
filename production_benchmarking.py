#!/usr/bin/env python3
"""`python production_benchmarking.py ...` is `python -m dinov2_triton.pipeline.production_benchmarking ...` (same flags; see --help)."""
import sys

from dinov2_triton.seed_commands import run_module_main

if __name__ == "__main__":
    sys.exit(run_module_main("dinov2_triton.pipeline.production_benchmarking"))
