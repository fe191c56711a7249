"""``logs/triton-replicas.json``: what ``dinov2-triton serve start --replicas N`` started.

:class:`ReplicaSetRecord` is the one record of this file; it has one writer
(:func:`write_replica_set`, called by dinov2_triton.serve.replicas whenever the set
changes) and one reader (:func:`read_replica_set`), used by ``python -m
serve stop|status`` and perf/failover.py. Each replica's own pid file (the
single server's format, dinov2_triton.serve.local_server) holds its pid and ports; this
record points at them and adds what the set adds: CPUs, threads, the
balancer and the models it health-checks.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dinov2_triton.core.records import Record

DEFAULT_REPLICA_FILE = "logs/triton-replicas.json"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ReplicaEntry(_Part):
    name: str                  # the balancer's server name: r0, r1, ...
    pid_file: str              # dinov2_triton.serve.local_server pid file of this replica
    log_file: str
    http_port: int
    grpc_port: int
    metrics_port: int
    cpus: list[int]            # taskset CPU list
    threads: int               # intra-op threads of its classifier models


class BalancerEntry(_Part):
    pid: int
    started: float | None      # process start time (a recycled pid is not ours)
    host: str
    http_port: int
    grpc_port: int
    stats_port: int            # /metrics (Prometheus exporter) and /stats
    config_file: str
    log_file: str
    stats_socket: str          # admin socket (show stat)


class ReplicaSetRecord(Record):
    SCHEMA_VERSION = 1
    KIND = "replica set record"
    REGENERATE = "dinov2-triton serve start --replicas N"

    created: str
    repository: str
    api_key_file: str          # one key for every replica (clients use it through the balancer)
    models: list[str]          # loaded on every replica and health-checked by the balancer
    failed: dict[str, str] = {}   # selected models that no replica could load -> why
    skipped: dict[str, str] = {}  # models that cannot run on this machine -> why
    balancer: BalancerEntry
    replicas: list[ReplicaEntry]


def write_replica_set(record: ReplicaSetRecord, path: str | os.PathLike) -> Path:
    from dinov2_triton.core.artifact_io import atomic_write_json

    return atomic_write_json(path, record.to_dict())


def read_replica_set(path: str | os.PathLike) -> ReplicaSetRecord | None:
    """The record at ``path``, or None when there is no file. A file that is
    not a valid record raises RecordError naming it and the field."""
    from dinov2_triton.core.artifact_io import read_json

    path = Path(path)
    if not path.is_file():
        return None
    return ReplicaSetRecord.from_dict(read_json(path, what="replica set record"), source=path)
