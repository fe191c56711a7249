"""The seed's three root commands, as thin calls into the package.

``python load_data.py --data_path DIR ...``, ``python finetune.py --data_path
DIR --output_path DIR ...`` and ``python production_benchmarking.py
--model_path FILE ...`` are scripts at the checkout root, the way timm keeps
``train.py`` and ``validate.py`` beside its package. Each one calls
:func:`run_seed_command` with its own folder, which

* re-runs the script with the checkout's ``.venv/bin/python`` (created by
  scripts/setup_env.sh) when that exists and is not the running interpreter,
  saying so on stderr, so the pinned stack is what runs
  (``DINOV2_TRITON_SYSTEM_PYTHON=1`` stays on the current interpreter);
* translates the seed's underscore spellings (``--data_path``,
  ``--output_path``, ``--model_path``, ...) to the package's one kebab-case
  spelling (``--data-path``, ...); the kebab spellings work as well;
* calls the package command's ``main(argv, prog=<script name>)``.

Standard library only: this runs before the pinned environment is chosen.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

SYSTEM_PYTHON_ENV = "DINOV2_TRITON_SYSTEM_PYTHON"


def kebab_flags(argv: Sequence[str]) -> list[str]:
    """``--data_path X`` -> ``--data-path X`` (and ``--data_path=X``); values and a bare ``--`` onward unchanged."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _venv_python(root: Path) -> Path | None:
    """The checkout's venv interpreter when it exists and is not the one running."""
    venv = root / ".venv"
    python = venv / "bin" / "python"
    if not python.exists() or os.environ.get(SYSTEM_PYTHON_ENV) == "1":
        return None
    try:
        if Path(sys.prefix).resolve() == venv.resolve():
            return None
    except OSError:
        pass
    return python


def run_seed_command(module: str, root: str | os.PathLike, argv: Sequence[str] | None = None) -> int:
    """Run ``module``'s ``main`` for the root script in folder ``root`` (the checkout).

    First re-executes the calling script under ``root/.venv/bin/python`` when
    needed (this call then never returns)."""
    root = Path(root).resolve()
    python = _venv_python(root)
    if python is not None:
        print(f"[{Path(sys.argv[0]).name}] running with {python} (the project's pinned environment)",
              file=sys.stderr, flush=True)
        os.execv(str(python), [str(python), *sys.argv])
    args = kebab_flags(sys.argv[1:] if argv is None else argv)
    return int(importlib.import_module(module).main(args, prog=Path(sys.argv[0]).name) or 0)
