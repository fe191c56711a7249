#!/usr/bin/env python3
"""`python production_benchmarking.py ...` is `python -m perf.production_benchmarking ...` (same flags; see --help)."""
import sys

from train.launcher import run_module_main

if __name__ == "__main__":
    sys.exit(run_module_main("perf.production_benchmarking"))
