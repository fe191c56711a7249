"""Shared fixtures. Stage-specific fixtures live in tests/fixtures/*.py."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep 2-core CI machines from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.data",
    "tests.fixtures.triton",
]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
