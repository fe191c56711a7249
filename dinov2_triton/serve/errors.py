"""Errors of the serving stage's local server (start, reach, stop)."""
from __future__ import annotations


class ServeError(RuntimeError):
    """The local server cannot be started, reached or stopped."""


class PortsBusyError(ServeError):
    """A port the server needs is taken (usually: a server is already running)."""
