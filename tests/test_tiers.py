"""The test tiers of tests/conftest.py: decided from what a test uses, and enforced.

A test is ``integration`` when it uses a server fixture or carries a
triton/haproxy/kubectl marker, ``slow`` when it uses an expensive fixture,
``unit`` otherwise; ``network`` tests are in no tier and skipped unless
asked. A unit test that starts tritonserver, haproxy or kubectl fails naming
the marker; no test but a network one connects beyond loopback."""
from __future__ import annotations

import socket
import subprocess
from types import SimpleNamespace

import pytest

from tests import conftest as tiers


def _item(*marks: str, fixtures: tuple[str, ...] = ()):
    return SimpleNamespace(iter_markers=lambda: [SimpleNamespace(name=m) for m in marks], fixturenames=fixtures)


@pytest.mark.parametrize("marks, fixtures, tier", [
    ((), (), "unit"),
    ((), ("tmp_path", "tiny_repository"), "unit"),
    ((), ("triton_server",), "integration"),
    ((), ("sleepy_server", "triton_server_factory"), "integration"),   # through another fixture
    ((), ("replica_set",), "integration"),
    (("triton",), (), "integration"),
    (("haproxy",), (), "integration"),
    (("kubectl",), (), "integration"),
    (("slow", "triton"), (), "integration"),
    (("slow",), (), None),
    ((), ("cpu_repository",), None),
    (("network",), (), None),
    (("network",), ("triton_server",), None),
])
def test_tier_follows_what_the_test_uses(marks, fixtures, tier):
    assert tiers.tier_of(_item(*marks, fixtures=fixtures)) == tier


def test_this_test_is_in_the_unit_tier(request):
    assert request.node.get_closest_marker("unit") and not request.node.get_closest_marker("integration")


@pytest.mark.parametrize("args, executable, name", [
    (["kubectl", "kustomize", "x"], None, "kubectl"),
    (["/usr/sbin/haproxy", "-c", "-f", "x"], None, "haproxy"),
    ("tritonserver --model-repository=/r", None, "tritonserver"),
    (["python", "-c", "pass"], "/opt/triton/bin/tritonserver", "tritonserver"),
    ([b"/usr/bin/true"], None, "true"),
])
def test_program_names(args, executable, name):
    assert tiers._program(args, executable) == name


def test_a_unit_test_cannot_start_a_guarded_program():
    guard = tiers.guarded_execute_child("tests/test_x.py::test_y")
    with pytest.raises(RuntimeError, match=r"test_y starts kubectl: not a unit test; mark it @pytest.mark.kubectl"):
        guard(None, ["kubectl", "version"], None)
    # and this test runs under that guard itself
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.haproxy"):
        subprocess.run(["haproxy", "-v"], capture_output=True)


def test_no_connection_beyond_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError, match="no network in tests"):
            s.connect(("192.0.2.1", 443))          # TEST-NET-1: never reached
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError, match="no network in tests"):
            s.connect_ex(("192.0.2.1", 443))
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname(), timeout=5):
        pass                                        # loopback works


@pytest.mark.network
def test_network_tests_are_skipped_unless_asked():
    """Skipped in a normal run (this body never runs then); with -m network it runs and the guards are off."""
    assert socket.socket.connect is tiers._real_connect
