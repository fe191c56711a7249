"""Run a stage's ``main()`` from a root-level script (``python finetune.py ...``).

The seed's commands (``python load_data.py``, ``python finetune.py``,
``python production_benchmarking.py``) are thin scripts at the repository
root, the way timm keeps ``train.py`` and ``validate.py`` beside its package.
They must work with whatever ``python`` is first on PATH: when that is not
the project's ``.venv`` (created by scripts/setup_env.sh) the script re-runs
itself with ``.venv/bin/python`` and says so on stderr, so the pinned stack
is what runs. Set ``DINOV2_TRITON_SYSTEM_PYTHON=1`` to stay on the current
interpreter. Standard library only."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"


def _in_project_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV.resolve()
    except OSError:
        return False


def run_module_main(module: str) -> int:
    """Import ``module`` and return its ``main()``, first re-executing the
    calling script under the project's venv when needed."""
    venv_python = VENV / "bin" / "python"
    if (not _in_project_venv() and venv_python.exists()
            and os.environ.get("DINOV2_TRITON_SYSTEM_PYTHON") != "1"):
        print(f"[{Path(sys.argv[0]).name}] running with {venv_python} (the project's pinned environment)",
              file=sys.stderr, flush=True)
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(module).main()
