#!/usr/bin/env python3
"""`python finetune.py ...` is `python -m train.finetune ...` (same flags; see --help)."""
import sys

from train.launcher import run_module_main

if __name__ == "__main__":
    sys.exit(run_module_main("train.finetune"))
