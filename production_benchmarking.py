#!/usr/bin/env python3
"""The seed's command: `python production_benchmarking.py --model_path FILE ...` benchmarks the
fine-tuned model and every exported variant in process and writes a report (installed, the same
run with every option is `dinov2-triton bench`).

The seed's underscore spellings (--model_path) and the package's kebab ones
(--model-path) both work; see `python production_benchmarking.py --help`.
Runs under the checkout's .venv when there is one (dinov2_triton/seed_commands.py)."""
import os
import sys

from dinov2_triton.seed_commands import run_seed_command

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(run_seed_command("dinov2_triton.pipeline.production_benchmarking", here))
