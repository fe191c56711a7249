"""``python -m dinov2_triton`` is ``dinov2-triton`` (for an environment whose ``bin/`` is not on PATH)."""
import sys

from dinov2_triton.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dinov2_triton"))
