"""Shared fixtures, and the test tiers. Stage-specific fixtures live in tests/fixtures/*.py.

Tiers (markers registered in pyproject.toml; set here at collection, from what
a test uses, so nobody has to remember them):

- ``integration``: the test runs a real external service or tool: it uses a
  fixture that starts the local Triton server or the replica set behind
  HAProxy (INTEGRATION_FIXTURES, directly or through another fixture), or it
  carries one of the markers ``triton``, ``haproxy``, ``kubectl``
  (INTEGRATION_MARKERS: it runs that program itself).
- ``slow``: marked by hand, or set here for a test that uses a fixture
  whose set-up alone takes tens of seconds (SLOW_FIXTURES). In the whole
  suite, not in the unit tier.
- ``unit``: every other test that is neither ``slow`` nor ``network``: no
  server, no HAProxy, no kubectl, no network, the whole tier in under 3
  minutes on 2 cores. ``scripts/test.sh -m unit``.
  A unit test that starts tritonserver, haproxy or kubectl anyway fails and
  says which marker it needs.
- ``network``: needs the package index (PyPI). Skipped unless asked for:
  ``-m network`` (or any ``-m`` expression that selects it) or
  ``DINOV2_TRITON_NETWORK_TESTS=1``.

No network unless ``network`` tests were asked for: a connection to anything
but loopback (or a Unix socket) fails with a message saying so, and pip run
by a test or a fixture gets ``PIP_NO_INDEX=1``.
"""
import errno
import ipaddress
import os
import socket
import subprocess
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
    "tests.fixtures.standin",
]

#: fixtures that start the real local Triton server (tests/fixtures/triton.py) or a replica set behind HAProxy
INTEGRATION_FIXTURES = frozenset({"triton_server", "triton_server_factory", "replica_set"})
#: markers of tests that run the real program themselves
INTEGRATION_MARKERS = frozenset({"triton", "haproxy", "kubectl"})
#: fixtures whose set-up alone takes tens of seconds on 2 cores: a test that uses one is slow (whole suite only)
SLOW_FIXTURES = {
    "cpu_repository": "tests/test_cpu_variants.py: exports every CPU variant (OpenVINO, NNCF, ONNX INT8)",
    "optimized": "tests/test_optimize.py: ModelOpt FP16 and INT8 exports",
    "impossible": "tests/test_optimize.py: the INT8 search through every configuration",
}
#: programs a unit test must not start, and the marker a test that does needs
GUARDED_PROGRAMS = {"tritonserver": "triton", "haproxy": "haproxy", "kubectl": "kubectl"}
NETWORK_ENV = "DINOV2_TRITON_NETWORK_TESTS"


def tier_of(item) -> str | None:
    """``integration``, ``unit`` or None (slow or network: only in the whole suite or when asked)."""
    marks = {m.name for m in item.iter_markers()}
    fixtures = set(getattr(item, "fixturenames", ()))
    if "network" in marks:
        return None
    if marks & INTEGRATION_MARKERS or INTEGRATION_FIXTURES & fixtures:
        return "integration"
    return None if "slow" in marks or SLOW_FIXTURES.keys() & fixtures else "unit"


def _network_asked(config) -> bool:
    """DINOV2_TRITON_NETWORK_TESTS=1, or a -m expression that selects a test marked network (-m network,
    -m "network or unit"; not -m "not network")."""
    if os.environ.get(NETWORK_ENV) == "1":
        return True
    expr = config.getoption("markexpr") or ""
    if "network" not in expr:
        return False
    from _pytest.mark.expression import Expression  # pytest's own -m parser (pytest is pinned in the lock)

    return Expression.compile(expr).evaluate(lambda name, **_: name == "network")


def pytest_collection_modifyitems(config, items):
    asked = _network_asked(config)
    for item in items:
        tier = tier_of(item)
        if tier is not None:
            item.add_marker(tier)
        if tier == "integration" and INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker("triton")  # uses a server fixture: runs the real server
        if SLOW_FIXTURES.keys() & set(item.fixturenames):
            item.add_marker("slow")
        if item.get_closest_marker("network") and not asked:
            item.add_marker(pytest.mark.skip(
                reason=f"needs the package index: run with -m network (or {NETWORK_ENV}=1)"))


# --------------------------------------------------------------------------- guards
def _loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _refuse_network(sock, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
        raise OSError(errno.ENETUNREACH, f"no network in tests (tests/conftest.py): connection to {address!r} "
                                         f"refused; a test that needs the package index is marked network")


def _guarded_connect(self, address):
    _refuse_network(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _refuse_network(self, address)
    return _real_connect_ex(self, address)


_real_execute_child = subprocess.Popen._execute_child


def _program(args, executable) -> str:
    """The file name of the program a Popen starts (a shell command line: its first word)."""
    if isinstance(args, (str, bytes)) and not executable:
        words = os.fsdecode(args).split()
        return Path(words[0]).name if words else ""
    first = executable or (args if isinstance(args, os.PathLike) else next(iter(args), ""))
    return Path(os.fsdecode(first)).name


def pytest_configure(config):
    if not _network_asked(config):
        os.environ["PIP_NO_INDEX"] = "1"  # pip started by a test (or a fixture) cannot reach the index
        socket.socket.connect = _guarded_connect
        socket.socket.connect_ex = _guarded_connect_ex


def pytest_unconfigure(config):
    socket.socket.connect, socket.socket.connect_ex = _real_connect, _real_connect_ex


def guarded_execute_child(nodeid: str):
    """subprocess.Popen._execute_child for a unit test: refuses GUARDED_PROGRAMS, naming the marker."""
    def execute_child(self, args, executable, *rest, **kw):
        name = _program(args, executable)
        if name in GUARDED_PROGRAMS:
            raise RuntimeError(f"{nodeid} starts {name}: not a unit test; mark it "
                               f"@pytest.mark.{GUARDED_PROGRAMS[name]} (tests/conftest.py)")
        return _real_execute_child(self, args, executable, *rest, **kw)

    return execute_child


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A ``unit`` test that starts tritonserver, haproxy or kubectl fails, naming the marker it needs.
    Guarded from setup to teardown, so a module- or session-scoped fixture it triggers is caught too."""
    if not item.get_closest_marker("unit"):
        yield
        return
    subprocess.Popen._execute_child = guarded_execute_child(item.nodeid)
    try:
        yield
    finally:
        subprocess.Popen._execute_child = _real_execute_child


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
