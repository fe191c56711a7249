"""The measuring half of dinov2_triton.tune.search: who competes, one candidate loaded
into the running server and measured, the journal of points and the budget.

:class:`Session` measures a candidate (dinov2_triton.tune.space.with_knobs on the
repository's config.pbtxt, loaded with a config override through the
key-protected repository API, checked against what the server then reports,
capacity at the SLO by dinov2_triton.bench.capacity, peak memory of the model's instances),
caches it by its key, journals it as ``<run>/search/points/<n>.json`` (one
dinov2_triton.bench.capacity_records.SearchPoint each; a resumed search reads them back)
and prints one line per point with the ETA.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dinov2_triton.bench.capacity_records import (
    Excluded,
    SearchPoint,
    SearchSettings,
    ServingConfig,
)

log = logging.getLogger("dinov2_triton.tune.search")
POINTS_DIR = "search/points"
SETTINGS_FILE = "search/settings.json"
#: growth of the rate ramp when a candidate starts at the previous capacity
WARM_GROWTH = 1.25


class SearchInputError(ValueError):
    """Bad flags or files (CLI exit 2)."""


class BudgetSpent(Exception):
    """The time left cannot pay for another candidate."""


@dataclass
class Target:
    """One competing variant: its served model, exported config and space."""
    variant: str
    model: str
    base: Any                          # ModelConfig of <repository>/<model>/config.pbtxt
    config_path: Path
    space: dict[str, list[Any]]
    input_data: Path | None = None
    shapes: list[str] = field(default_factory=list)
    best_rps: float | None = None      # the best feasible capacity so far: the next point starts near it

    def remember(self, point: SearchPoint) -> None:
        cap = point.capacity
        if point.model == self.model and point.feasible and cap and cap.capacity_rps and (
                self.best_rps is None or cap.capacity_rps > self.best_rps):
            self.best_rps = cap.capacity_rps


# ----------------------------------------------------------------------------- who competes
def competitors(manifest, wanted: Sequence[str] | None, ready: Sequence[str]) -> tuple[list, list[Excluded]]:
    """[(variant, manifest entry)] that may compete, and the excluded with the reason."""
    entries = manifest.variants
    unknown = [v for v in (wanted or []) if v not in entries]
    if unknown:
        raise SearchInputError(f"--variants {unknown}: not in the export manifest (it has {sorted(entries)})")
    keep, out = [], []
    for name, e in entries.items():
        if wanted and name not in wanted:
            continue
        why = None
        if e.status == "GATE_FAILED" or e.gate_passed is False:
            why = "accuracy gate FAILED: " + ("; ".join(e.gate_failures) or e.reason or "see the export manifest")
        elif e.status != "OK":
            why = f"{e.status}: {e.reason or ''}".rstrip(": ")
        elif e.gate_passed is not True:
            why = "no gate verdict in the export manifest"
        elif not e.published:
            why = "not published into the repository"
        elif e.model_name not in ready:
            why = f"{e.model_name} is not READY on the server"
        if why:
            out.append(Excluded(variant=name, reason=why))
        else:
            keep.append((name, e))
    return keep, out


def version_dir(model_dir: Path, version: int | None) -> Path | None:
    if version is not None and (model_dir / str(version)).is_dir():
        return model_dir / str(version)
    nums = sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    return model_dir / str(nums[0]) if nums else None


def load_base(repository: Path, model: str):
    """The repository's config.pbtxt of ``model`` as a ModelConfig."""
    from dinov2_triton.export.triton_config import ConfigError, parse_config

    path = repository / model / "config.pbtxt"
    try:
        return parse_config(path.read_text(encoding="utf-8")), path
    except OSError as exc:
        raise SearchInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ConfigError as exc:
        raise SearchInputError(f"{path}: {exc}") from None


def config_json(cfg) -> str:
    """A ModelConfig as the JSON Triton's load(config=...) takes."""
    from google.protobuf import json_format

    return json_format.MessageToJson(cfg, preserving_proto_field_name=True)


def check_config(cfg, base) -> str:
    """config.pbtxt text of a candidate: the text round trip is lossless, and
    export's contract checker passes wherever it passes for the exported config."""
    from dinov2_triton.export.triton_config import ConfigError, parse_config, to_text, validate_config

    text = to_text(cfg)
    if parse_config(text) != cfg:
        raise ConfigError(f"{cfg.name}: config.pbtxt round trip changed the candidate")
    try:
        validate_config(base)
    except ConfigError:
        return text        # a model export did not write: the round trip is the check there is
    return validate_config(cfg)


def served_mismatch(served: dict[str, Any], knobs: ServingConfig, base) -> list[str]:
    """What the server reports differently from the candidate (empty: applied)."""
    from dinov2_triton.tune.space import thread_parameter

    got = []
    count = sum(int(g.get("count", 1)) for g in served.get("instance_group") or [])
    if count != knobs.instances:
        got.append(f"instances {count} (asked {knobs.instances})")
    if served.get("max_batch_size") != knobs.max_batch_size:
        got.append(f"max_batch_size {served.get('max_batch_size')} (asked {knobs.max_batch_size})")
    db = served.get("dynamic_batching") or {}
    if int(db.get("max_queue_delay_microseconds", 0)) != knobs.max_queue_delay_us:
        got.append(f"max_queue_delay_microseconds {db.get('max_queue_delay_microseconds')}")
    asked = [b for b in knobs.preferred_batch_sizes if b <= knobs.max_batch_size]
    # Triton completes an empty preferred_batch_size with [max_batch_size]
    if sorted(db.get("preferred_batch_size") or []) not in ([asked] if asked else [[], [knobs.max_batch_size]]):
        got.append(f"preferred_batch_size {db.get('preferred_batch_size')}")
    want = base.dynamic_batching.HasField("default_queue_policy") if knobs.queue_policy is None else knobs.queue_policy
    if bool(db.get("default_queue_policy")) != want:
        got.append(f"default_queue_policy {'present' if db.get('default_queue_policy') else 'absent'} "
                   f"(asked {'kept' if want else 'removed'})")
    elif want:
        got += _policy_mismatch(db["default_queue_policy"], base, knobs)
    param = thread_parameter(base)
    if knobs.threads is not None:
        val = ((served.get("parameters") or {}).get(param) or {}).get("string_value")
        if val != str(knobs.threads):
            got.append(f"{param} {val!r} (asked {knobs.threads})")
    return got


def _policy_mismatch(served: dict[str, Any], base, knobs: ServingConfig) -> list[str]:
    """The served queue policy's bounds against the candidate's (timeout, size, action)."""
    from dinov2_triton.tune.space import SpaceError, with_knobs

    try:
        asked = with_knobs(base, knobs).dynamic_batching.default_queue_policy
    except SpaceError:
        return []
    pairs = (("default_timeout_microseconds", int(served.get("default_timeout_microseconds", 0)),
              asked.default_timeout_microseconds),
             ("max_queue_size", int(served.get("max_queue_size", 0)), asked.max_queue_size),
             ("allow_timeout_override", bool(served.get("allow_timeout_override", False)),
              asked.allow_timeout_override))
    out = [f"queue policy {name} {got} (asked {want})" for name, got, want in pairs if got != want]
    action = served.get("timeout_action", "REJECT")
    if asked.timeout_action == 0 and action not in ("REJECT", 0):
        out.append(f"queue policy timeout_action {action} (asked REJECT)")
    return out


# ----------------------------------------------------------------------------- the session
class Session:
    """Measures candidates through the running server; caches and journals
    every point; keeps the time budget; restores what it changed."""

    def __init__(self, *, url: str, api_key: str | None, settings: SearchSettings, run_dir: Path,
                 server_pid: int | None, planned: int, points: Sequence[SearchPoint] = (),
                 progress: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.url, self.api_key, self.settings, self.run_dir = url, api_key, settings, run_dir
        self.server_pid, self.planned, self.clock = server_pid, planned, clock
        self.say = progress or (lambda msg: log.info(msg))
        self.points: dict[str, SearchPoint] = {p.key: p for p in points}
        self.spent_before = sum(_cost(p) for p in points)
        self.t0 = clock()
        self.deadline = float("inf")
        self.measured_now = 0

    # ----------------------------------------------------------------- time
    def elapsed(self) -> float:
        return self.spent_before + (self.clock() - self.t0)

    def budget_left(self) -> float:
        return self.settings.budget_s - self.elapsed()

    def mean_cost(self) -> float | None:
        costs = [_cost(p) for p in self.points.values()]
        return sum(costs) / len(costs) if costs else None

    # ----------------------------------------------------------------- server
    def load(self, model: str, cfg) -> None:
        from dinov2_triton.serve.triton_access import connect

        with connect(self.url, self.settings.capacity.protocol, api_key=self.api_key, timeout_s=300.0) as conn:
            conn.load_model(model, config=config_json(cfg))

    def served(self, model: str) -> dict[str, Any]:
        from dinov2_triton.serve.triton_access import connect

        with connect(self.url, self.settings.capacity.protocol, api_key=self.api_key) as conn:
            return conn.model_config(model)

    # ----------------------------------------------------------------- one candidate
    def evaluate(self, target: Target, knobs: ServingConfig) -> SearchPoint:
        from dinov2_triton.tune.space import config_key

        key = config_key(target.model, knobs)
        if key in self.points:
            return self.points[key]
        mean = self.mean_cost()
        if mean is not None and self.clock() + mean > self.deadline:
            raise BudgetSpent()
        point = self._measure(target, knobs, key)
        self.points[key] = point
        self.measured_now += 1
        from dinov2_triton.core.artifact_io import atomic_write_json

        atomic_write_json(self.run_dir / POINTS_DIR / f"{point.index:03d}.json", point.model_dump(mode="json"))
        self.say(self._line(target, point))
        return point

    def _measure(self, target: Target, knobs: ServingConfig, key: str) -> SearchPoint:
        from dinov2_triton.bench.capacity import CapacityError, RateProbe, find_capacity
        from dinov2_triton.bench.memory import MemorySampler
        from dinov2_triton.core.artifact_io import utc_now
        from dinov2_triton.export.triton_config import ConfigError
        from dinov2_triton.serve.triton_access import TritonError
        from dinov2_triton.tune.space import SpaceError, with_knobs

        cs = self.settings.capacity
        common = dict(index=len(self.points) + 1, key=key, model=target.model, variant=target.variant,
                      config=knobs, is_default=(knobs == _default(target)), measured=utc_now())
        t0 = self.clock()
        try:
            cfg = with_knobs(target.base, knobs)
            check_config(cfg, target.base)
            self.load(target.model, cfg)
            wrong = served_mismatch(self.served(target.model), knobs, target.base)
            if wrong:
                raise TritonError("the server did not apply the config override: it reports " + ", ".join(wrong))
        except (SpaceError, ConfigError, TritonError) as exc:
            return SearchPoint(**common, error=f"load: {exc}", load_s=round(self.clock() - t0, 1),
                               violations=["not loaded"])
        load_s = round(self.clock() - t0, 1)
        budget = min(cs.budget_s, max(self.deadline - self.clock(), 1.0))
        # points are measured once (no recheck of marginal verdicts): rechecks would cost
        # points the budget holds; the same-run comparison of the winner rechecks (dinov2_triton.tune.search)
        probe = RateProbe(model=target.model, url=self.url,
                          settings=cs.model_copy(update={"budget_s": budget, "recheck_margin": 0.0}),
                          input_data=target.input_data, shapes=target.shapes, api_key=self.api_key,
                          out_dir=self.run_dir / "search" / "perf_analyzer" / f"{common['index']:03d}")
        sampler = MemorySampler(pid=self.server_pid, models=[target.model]) if self.server_pid else None
        try:
            with sampler if sampler else _Nothing():
                cap = find_capacity(probe, probe.settings, model=target.model, start_rate=target.best_rps,
                                    growth=WARM_GROWTH if target.best_rps else None, progress=self.say)
        except CapacityError as exc:
            return SearchPoint(**common, error=f"capacity: {exc}", load_s=load_s, violations=["not measured"])
        mem = sampler.peak_per_model.get(target.model) if sampler else None
        point = SearchPoint(**common, capacity=cap, load_s=load_s,
                            peak_memory_mb=round(mem / 2**20, 1) if mem else None)
        point.violations = self._violations(point)
        point.feasible = not point.violations
        target.remember(point)
        return point

    def _violations(self, p: SearchPoint) -> list[str]:
        s, cap = self.settings, p.capacity
        out = []
        if cap is None or cap.capacity_img_s is None:
            out.append(f"no rate met p99 <= {s.capacity.slo_p99_ms:g} ms")
        elif s.min_throughput is not None and cap.capacity_img_s < s.min_throughput:
            out.append(f"capacity {cap.capacity_img_s:.1f} img/s < --min-throughput {s.min_throughput:g}")
        if s.max_memory_mb is not None:
            if p.peak_memory_mb is None:
                out.append("memory not measured (--max-memory-mb needs the local server's process)")
            elif p.peak_memory_mb > s.max_memory_mb:
                out.append(f"peak memory {p.peak_memory_mb:.0f} MB > --max-memory-mb {s.max_memory_mb:g}")
        return out

    def _line(self, target: Target, p: SearchPoint) -> str:
        from dinov2_triton.tune.space import score

        done = len(self.points)
        best = max((score(q) for q in self.points.values() if q.model == target.model), default=float("-inf"))
        mean = self.mean_cost() or 0.0
        eta = max(0.0, min(mean * max(self.planned - done, 0), self.budget_left()))
        eta_s = _clock(eta) if done < self.planned else f"<= {_clock(max(self.budget_left(), 0))} (next pass)"
        cap = p.capacity
        what = (p.error or "") if cap is None else (
            f"{cap.capacity_img_s:.1f} img/s at p99 <= {self.settings.capacity.slo_p99_ms:g} ms "
            f"(p99 {cap.p99_at_capacity_ms:.1f} ms)" if cap.capacity_img_s else f"infeasible: {cap.reason}")
        if p.violations and cap is not None and cap.capacity_img_s:
            what += " INFEASIBLE: " + "; ".join(p.violations)
        best_s = f"best {best:.1f} img/s" if best > float("-inf") else "no feasible point yet"
        return (f"[{done}/~{max(self.planned, done)}] {p.key}: {what} | {best_s} | {_cost(p):.0f} s | elapsed "
                f"{_clock(self.elapsed())}, ETA {eta_s} (budget left {_clock(max(self.budget_left(), 0))})")

    def restore(self, target: Target) -> None:
        """Serve the repository's own config again (an override sticks until replaced)."""
        from dinov2_triton.serve.triton_access import TritonError

        try:
            self.load(target.model, target.base)
        except TritonError as exc:
            self.say(f"WARNING: could not restore {target.model}'s exported config: {exc}")


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cost(p: SearchPoint) -> float:
    return (p.load_s or 0.0) + (p.capacity.wall_s if p.capacity else 0.0)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


def _default(target: Target) -> ServingConfig:
    from dinov2_triton.tune.space import knobs_of

    return knobs_of(target.base)
