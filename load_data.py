#!/usr/bin/env python3
"""`python load_data.py ...` is `python -m train.load_data ...` (same flags; see --help)."""
import sys

from train.launcher import run_module_main

if __name__ == "__main__":
    sys.exit(run_module_main("train.load_data"))
