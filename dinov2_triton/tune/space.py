"""What dinov2_triton.tune.search varies, and in which order it tries it.

The knobs of one model's config (:class:`dinov2_triton.bench.capacity_records.ServingConfig`):

* ``instances``: ``instance_group[0].count``;
* ``threads``: intra-op threads per instance, as the model's backend reads
  them from the config's ``parameters`` (dinov2_triton.export.triton_config.THREAD_PARAMETERS: Triton's
  onnxruntime backend ``intra_op_thread_count``, its pytorch backend
  ``INTRA_OP_THREAD_COUNT``, its openvino backend ``INFERENCE_NUM_THREADS``;
  the CPU stand-ins in serve/backends read the same names); None where the
  backend has no such parameter (TensorRT, Python models);
* ``max_queue_delay_us`` and ``preferred_batch_sizes`` of the dynamic batcher;
* ``max_batch_size``: never above what the model allows
  (:func:`batch_limit`: a fixed batch dimension of an ONNX graph, the
  exported maximum for a TensorRT plan, whose profile ends there);
* ``queue_policy``: keep (True) or remove (False) the exported
  ``dynamic_batching.default_queue_policy``. Only tried when asked
  (``--queue-policies on,off``), because removing it removes the server's
  load shedding: under overload requests then queue without bound. It is a
  knob at all because Triton 2.51 pays for the policy on a one-instance
  model (measured here: p99 57-60 ms instead of 19-20 ms at 40 req/s open
  loop on dinov2_onnx 56 px; docs/field-notes.md #13); the pipeline's tune
  stage measures each chosen configuration with and without it.

:func:`with_knobs` turns the repository's config.pbtxt (a ModelConfig
protobuf) plus knobs into a candidate config; everything else of the
exported config (I/O, warm-up, labels, version policy, other parameters) is
kept. The queue policy's ``max_queue_size``: export's default size is
recomputed for the candidate's instances and max_batch_size
(dinov2_triton.export.triton_config.default_max_queue_size); a size of the
user's keeps its allowance of full batches per instance.

Strategies over a space (knob -> values): :func:`grid` (every combination,
the default configuration first) and :func:`coordinate_ascent` (start at the
default, try every value of one knob with the others held, move to the best,
next knob; repeat passes until one improves nothing).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from dinov2_triton.bench.capacity_records import SearchPoint, ServingConfig
from dinov2_triton.export.triton_config import backend_of, default_max_queue_size, thread_parameter

KNOBS = ("instances", "threads", "max_queue_delay_us", "preferred_batch_sizes", "max_batch_size", "queue_policy")


class SpaceError(ValueError):
    """A knob value the model cannot take (named in the message)."""


def knobs_of(cfg) -> ServingConfig:
    """The knobs of a ModelConfig protobuf as it is."""
    param = thread_parameter(cfg)
    threads = None
    if param and param in cfg.parameters:
        try:
            threads = int(cfg.parameters[param].string_value)
        except ValueError:
            raise SpaceError(f"model {cfg.name}: parameter {param} is "
                             f"{cfg.parameters[param].string_value!r}, not a thread count") from None
    return ServingConfig(instances=sum(g.count or 1 for g in cfg.instance_group) or 1, threads=threads,
                         max_queue_delay_us=int(cfg.dynamic_batching.max_queue_delay_microseconds),
                         preferred_batch_sizes=sorted(cfg.dynamic_batching.preferred_batch_size),
                         max_batch_size=int(cfg.max_batch_size),
                         queue_policy=True if cfg.dynamic_batching.HasField("default_queue_policy") else None)


def with_knobs(base, knobs: ServingConfig):
    """A copy of ``base`` (ModelConfig) with ``knobs`` set."""
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = pb.ModelConfig()
    cfg.CopyFrom(base)
    old = knobs_of(base)
    if len(cfg.instance_group) != 1:
        raise SpaceError(f"model {cfg.name}: {len(cfg.instance_group)} instance groups; the search turns one")
    cfg.instance_group[0].count = knobs.instances
    param = thread_parameter(cfg)
    if knobs.threads is not None:
        if param is None:
            raise SpaceError(f"model {cfg.name}: backend {backend_of(cfg)!r} has no thread-count parameter")
        cfg.parameters[param].string_value = str(knobs.threads)
    elif param and param in cfg.parameters:
        del cfg.parameters[param]
    cfg.max_batch_size = knobs.max_batch_size
    batching = cfg.dynamic_batching
    batching.max_queue_delay_microseconds = knobs.max_queue_delay_us
    del batching.preferred_batch_size[:]
    batching.preferred_batch_size.extend(b for b in knobs.preferred_batch_sizes if b <= knobs.max_batch_size)
    if knobs.queue_policy is False:
        batching.ClearField("default_queue_policy")
    elif knobs.queue_policy and not batching.HasField("default_queue_policy"):
        raise SpaceError(f"model {cfg.name}: the exported config has no default_queue_policy to keep")
    policy = batching.default_queue_policy
    if batching.HasField("default_queue_policy") and policy.max_queue_size:
        timeout_ms = policy.default_timeout_microseconds / 1000
        if policy.max_queue_size == default_max_queue_size(old.max_batch_size, old.instances, timeout_ms):
            # export's default size: the same rule for the new knobs (the timeout stays the first bound)
            policy.max_queue_size = default_max_queue_size(knobs.max_batch_size, knobs.instances, timeout_ms)
        else:
            # a size of the user's: keep its allowance of full batches per instance
            per = policy.max_queue_size / (old.instances * max(old.max_batch_size, 1))
            policy.max_queue_size = max(1, round(per * knobs.instances * max(knobs.max_batch_size, 1)))
    for warm in cfg.model_warmup:
        warm.batch_size = min(warm.batch_size, max(knobs.max_batch_size, 1))
    return cfg


def batch_limit(cfg, version_dir: Path | None) -> int | None:
    """The largest max_batch_size the model allows: a fixed batch dimension
    of its ONNX graph, the exported value for a TensorRT plan (its profile's
    maximum); None when the graph's batch axis is dynamic."""
    if backend_of(cfg) == "tensorrt":
        return int(cfg.max_batch_size)
    if backend_of(cfg) == "onnxruntime" and version_dir is not None:
        path = version_dir / (cfg.default_model_filename or "model.onnx")
        if path.is_file():
            import onnx

            graph = onnx.load(str(path), load_external_data=False).graph
            for inp in graph.input:
                dims = inp.type.tensor_type.shape.dim
                if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                    return int(dims[0].dim_value)
    return None


def build_space(cfg, *, limit: int | None, instances: Sequence[int], threads: Sequence[int],
                delays_us: Sequence[int], preferred: Sequence[Sequence[int]],
                max_batch_sizes: Sequence[int], queue_policies: Sequence[bool] = ()) -> dict[str, list[Any]]:
    """knob -> values for one model; the default configuration's value first.
    An empty sequence keeps the knob at its default. Raises SpaceError for a
    value the model cannot take."""
    default = knobs_of(cfg)
    space: dict[str, list[Any]] = {}

    def values(name: str, given: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for v in [getattr(default, name), *given]:
            if v not in out:        # lists (preferred batch sizes) are not hashable: compare
                out.append(v)
        return out

    bad = [b for b in max_batch_sizes if b < 1 or (limit is not None and b > limit)]
    if bad:
        raise SpaceError(f"model {cfg.name}: --max-batch-sizes {bad}: the model allows 1..{limit}")
    if thread_parameter(cfg) is None and threads:
        threads = []     # the backend has no thread parameter: the knob does not exist for it
    space["instances"] = values("instances", [int(i) for i in instances])
    space["threads"] = values("threads", [int(t) for t in threads])
    space["max_queue_delay_us"] = values("max_queue_delay_us", [int(d) for d in delays_us])
    space["preferred_batch_sizes"] = values("preferred_batch_sizes", [sorted(int(b) for b in p) for p in preferred])
    space["max_batch_size"] = values("max_batch_size", [int(b) for b in max_batch_sizes])
    if default.queue_policy is None:
        if True in queue_policies:
            raise SpaceError(f"model {cfg.name}: --queue-policies on: the exported config has no "
                             "default_queue_policy to keep")
        queue_policies = ()          # nothing to remove either
    space["queue_policy"] = values("queue_policy", [bool(q) for q in queue_policies])
    if any(i < 1 for i in space["instances"]) or any(t is not None and t < 1 for t in space["threads"]):
        raise SpaceError(f"model {cfg.name}: instance and thread counts must be >= 1")
    if any(d < 0 for d in space["max_queue_delay_us"]):
        raise SpaceError(f"model {cfg.name}: --queue-delays-us must be >= 0")
    return space


def size(space: Mapping[str, Sequence[Any]]) -> int:
    n = 1
    for v in space.values():
        n *= max(len(v), 1)
    return n


def config_key(model: str, k: ServingConfig) -> str:
    """A stable name for a candidate (file names, resume, the report)."""
    pbs = ",".join(str(b) for b in k.preferred_batch_sizes if b <= k.max_batch_size) or "none"
    thr = "default" if k.threads is None else str(k.threads)
    # the policy is named only when removed: keys of runs before the knob stay valid (--resume)
    queue = " queue=off" if k.queue_policy is False else ""
    return (f"{model}|inst={k.instances} threads={thr} delay={k.max_queue_delay_us}us pbs={pbs} "
            f"mbs={k.max_batch_size}{queue}")


def _make(values: Mapping[str, Any]) -> ServingConfig:
    return ServingConfig(**values)


def grid(space: Mapping[str, Sequence[Any]]) -> Iterator[ServingConfig]:
    """Every combination; the first is the default configuration."""
    names = [k for k in KNOBS if k in space]
    for combo in itertools.product(*(space[k] for k in names)):
        yield _make(dict(zip(names, combo)))


def score(point: SearchPoint | None) -> float:
    """What the search maximises: capacity at the SLO of a feasible point."""
    if point is None or not point.feasible or point.capacity is None:
        return float("-inf")
    return point.capacity.capacity_img_s or float("-inf")


def coordinate_ascent(space: Mapping[str, Sequence[Any]], evaluate: Callable[[ServingConfig], SearchPoint],
                      *, max_passes: int = 3) -> SearchPoint | None:
    """Start at the default (every knob's first value); per knob, try each
    value with the others held and keep the best; stop after a pass that
    improved nothing. Knobs of one :data:`JOINT_KNOBS` group are tried
    together, every combination of their values. ``evaluate`` caches: a
    configuration seen before costs nothing. Returns the best point (None
    when nothing was measured)."""
    names = [k for k in KNOBS if k in space]
    current = {k: space[k][0] for k in names}
    best = evaluate(_make(current))
    for _ in range(max_passes):
        improved = False
        for group in _groups(names, space):
            for values in itertools.product(*(space[k] for k in group)):
                trial = {**current, **dict(zip(group, values))}
                if trial == current:
                    continue
                p = evaluate(_make(trial))
                if score(p) > score(best):
                    best, current, improved = p, trial, True
        if not improved:
            break
    return best


#: knobs whose best values depend on each other, searched as one: on a CPU the
#: instances and their intra-op threads share the same cores (2 instances x ORT's
#: default of one thread per core oversubscribe them, 2 x 1 does not). One at a time,
#: the ascent kept 1 instance (2 x default threads was slower) and never met 2 x 1,
#: the best configuration when it was measured (scripts/capacity.sh, README)
JOINT_KNOBS = (("instances", "threads"),)


def first_pass_size(space: Mapping[str, Sequence[Any]]) -> int:
    """Configurations coordinate ascent measures in its first pass (the default included)."""
    names = [k for k in KNOBS if k in space]
    return 1 + sum(math.prod(len(space[k]) for k in g) - 1 for g in _groups(names, space))


def _groups(names: Sequence[str], space: Mapping[str, Sequence[Any]]) -> list[tuple[str, ...]]:
    """The ascent's steps in KNOBS order: a joint group where all its knobs vary, else single knobs."""
    out: list[tuple[str, ...]] = []
    for name in names:
        if len(space[name]) < 2 or any(name in g for g in out):
            continue
        group = next((g for g in JOINT_KNOBS if name in g and all(len(space.get(k, ())) > 1 for k in g)), (name,))
        out.append(group)
    return out
