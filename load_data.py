#!/usr/bin/env python3
"""`python load_data.py ...` is `python -m dinov2_triton.data.load ...` (same flags; see --help)."""
import sys

from dinov2_triton.seed_commands import run_module_main

if __name__ == "__main__":
    sys.exit(run_module_main("dinov2_triton.data.load"))
