#!/usr/bin/env python3
"""The seed's command: `python finetune.py --data_path DIR --output_path DIR ...` is `dinov2-triton train`.

The seed's underscore spellings (--data_path) and the package's kebab ones
(--data-path) both work; see `python finetune.py --help`. Runs under the
checkout's .venv when there is one (dinov2_triton/seed_commands.py)."""
import os
import sys

from dinov2_triton.seed_commands import run_seed_command

if __name__ == "__main__":
    sys.exit(run_seed_command("dinov2_triton.train.finetune", os.path.dirname(os.path.abspath(__file__))))
