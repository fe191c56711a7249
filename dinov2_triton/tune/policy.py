"""What the queue policy costs in one serving configuration, measured: the
capacity at the SLO (dinov2_triton.bench.capacity) of the configuration in
``<repository>/<model>/config.pbtxt`` without its
``dynamic_batching.default_queue_policy`` (loaded as a config override) and
with it (the file reloaded, what the server then reports checked against
the file), one after the other in the same run.

    ab = measure_policy_ab(url=..., repository=..., model="dinov2_onnx", settings=cs, ...)
    ab.ratio, ab.costs, ab.verdict

Load shedding is on by default (dinov2_triton.export.triton_config), and
Triton 2.51 stalls with a policy on a one-instance model
(docs/field-notes.md #13): the pipeline's tune stage measures this A/B in the
configuration it chose, and moves to the next configuration of its search
where the policy costs capacity.

When does the policy cost capacity, beyond measurement noise? When the
capacity with it is below (1 - ``tolerance``) x the capacity without it.
:data:`AB_TOLERANCE` (0.2) is the bisection's resolution (the tune stage
bisects to 10 %) plus the spread of two measurements of one configuration in
one run on 2 shared cores (4-9 %, docs/capacity.md). The stall it guards
against is far outside that (0.29x: 76 vs 266 img/s). A side whose
bisection ran out of budget is named (its capacity is a lower bound).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from dinov2_triton.bench.capacity_records import Capacity, CapacitySettings, PolicyAB, ServingConfig

log = logging.getLogger("dinov2_triton.tune.policy")
#: the policy costs capacity when with / without < 1 - AB_TOLERANCE (see the module docstring)
AB_TOLERANCE = 0.2
#: both sides start at this fraction of the capacity the search measured for the configuration
#: (usually a passing rate) and ramp by x1.25 (WARM_GROWTH), not x2: the capacity is near
AB_START_FRACTION = 0.9


class PolicyError(RuntimeError):
    """The A/B cannot be measured (no policy in the file, the server did not apply a config)."""


def policy_verdict(with_policy: Capacity, without: Capacity, tolerance: float = AB_TOLERANCE
                   ) -> tuple[float | None, bool | None, str]:
    """(with / without, whether the policy costs capacity, one line). ``costs``
    None: neither side met the SLO, nothing to compare."""
    w, o = with_policy.capacity_img_s, without.capacity_img_s
    if w is None and o is None:
        return None, None, "no rate met the SLO with or without the policy: not decided"
    if w is None:
        return 0.0, True, f"no rate met the SLO with the policy; {o:.1f} img/s without it"
    if o is None:
        return None, False, f"{w:.1f} img/s with the policy; no rate met the SLO without it"
    ratio = round(w / o, 3)
    costs = ratio < 1 - tolerance
    line = (f"{w:.1f} img/s with the policy vs {o:.1f} without: {ratio:.2f}x, "
            + (f"the policy costs capacity (below {1 - tolerance:.2f}x)" if costs
               else f"no cost beyond the noise (>= {1 - tolerance:.2f}x)"))
    lower = [label for label, c in (("with", with_policy), ("without", without)) if c.stop == "budget"]
    if len(lower) == 2:
        line += "; both bisections ran out of budget (lower bounds)"
    elif lower:
        line += f"; the {lower[0]}-policy bisection ran out of budget (a lower bound)"
    return ratio, costs, line


def measure_policy_ab(*, url: str, api_key: str | None, repository: str | Path, model: str,
                      settings: CapacitySettings, input_data: Path | None, shapes: Sequence[str], out_dir: Path,
                      search_rps: float | None = None, tolerance: float = AB_TOLERANCE,
                      progress: Callable[[str], None] | None = None) -> PolicyAB:
    """The A/B of ``model`` as its config.pbtxt in ``repository`` stands: first
    without the policy (an override), then with it (the file reloaded, what
    the server reports checked against it); the file's configuration is
    served at the end. Both sides start at AB_START_FRACTION x ``search_rps``
    (the capacity the search measured; None: the settings' start rate).
    Raises PolicyError, CapacityError, TritonError."""
    from dinov2_triton.bench.capacity import MIN_RATE, RateProbe, find_capacity
    from dinov2_triton.tune.session import WARM_GROWTH, config_json, load_base
    from dinov2_triton.tune.space import config_key, knobs_of, with_knobs

    say = progress or (lambda m: log.info(m))
    base, path = load_base(Path(repository), model)
    knobs = knobs_of(base)
    if not knobs.queue_policy:
        raise PolicyError(f"{path}: no dynamic_batching.default_queue_policy to measure (exported with "
                          "--queue-timeout-ms 0?)")
    off = knobs.model_copy(update={"queue_policy": False})
    start_rate = max(AB_START_FRACTION * search_rps, MIN_RATE) if search_rps else None
    if start_rate:
        settings = settings.model_copy(update={"growth": min(settings.growth, WARM_GROWTH)})
    caps: dict[str, Capacity] = {}
    for label, cfg_knobs in (("without", off), ("with", knobs)):
        if label == "without":
            _load(url, api_key, model, config_json(with_knobs(base, off)))
        else:
            reload_from_repository(url, api_key, model, repository)
        wrong = served_differences(url, api_key, model, base, cfg_knobs)
        if wrong:
            raise PolicyError(f"{model}: the server did not apply the {label}-policy configuration: it reports "
                              + "; ".join(wrong))
        say(f"== queue policy A/B of {config_key(model, knobs)}: {label} the policy")
        probe = RateProbe(model=model, url=url, settings=settings, input_data=input_data, shapes=shapes,
                          out_dir=out_dir / f"{label}-policy", api_key=api_key)
        caps[label] = find_capacity(probe, settings, model=model, start_rate=start_rate, progress=say)
    ratio, costs, verdict = policy_verdict(caps["with"], caps["without"], tolerance)
    say(f"  => {verdict}")
    return PolicyAB(key=config_key(model, knobs), config=knobs, with_policy=caps["with"],
                    without_policy=caps["without"], ratio=ratio, tolerance=tolerance, costs=costs, verdict=verdict)


def _load(url: str, api_key: str | None, model: str, config: str | None) -> None:
    from dinov2_triton.serve.triton_access import connect

    with connect(url, "grpc", api_key=api_key, timeout_s=300.0) as conn:
        conn.load_model(model, config=config)


def reload_from_repository(url: str, api_key: str | None, model: str, repository: str | Path) -> None:
    """Serve ``<repository>/<model>/config.pbtxt`` (the file's config is sent along:
    Triton 2.51 keeps an earlier override when a plain load finds the folder unchanged)."""
    from dinov2_triton.serve.rollout import RolloutError, reload_model
    from dinov2_triton.serve.triton_access import connect

    with connect(url, "grpc", api_key=api_key, timeout_s=300.0) as conn:
        try:
            reload_model(conn, model, repository=repository)
        except RolloutError as exc:
            raise PolicyError(str(exc)) from None


def served_differences(url: str, api_key: str | None, model: str, base, knobs: ServingConfig) -> list[str]:
    """What the server reports for ``model`` differently from ``knobs`` on ``base`` (empty: applied)."""
    from dinov2_triton.serve.triton_access import connect
    from dinov2_triton.tune.session import served_mismatch

    with connect(url, "grpc", api_key=api_key) as conn:
        return served_mismatch(conn.model_config(model), knobs, base)


def steps_shed(url: str, api_key: str | None, ensemble: str) -> dict[str, bool]:
    """Each model the ensemble calls -> whether the server serves it with a queue
    policy (an ensemble sheds only through its steps)."""
    from dinov2_triton.serve.triton_access import connect

    with connect(url, "grpc", api_key=api_key) as conn:
        steps = [s["model_name"] for s in (conn.model_config(ensemble).get("ensemble_scheduling") or {})
                 .get("step", [])]
        return {m: bool((conn.model_config(m).get("dynamic_batching") or {}).get("default_queue_policy"))
                for m in steps}


def choose_configuration(ranked: Sequence, measure: Callable[[object, int], PolicyAB], *, alternatives: int,
                         say: Callable[[str], None] | None = None) -> tuple[object, list[PolicyAB], list[str], bool]:
    """The first of ``ranked`` (search points, best capacity first) in which the
    queue policy costs no capacity: ``measure(point, i)`` applies the i-th
    point (the first is applied already) and returns its A/B; at most
    1 + ``alternatives`` points are measured. Returns (chosen point, every
    A/B, notes, whether a point without cost was found). Where the policy cost
    capacity in every point measured, the first point is chosen: load
    shedding stays on."""
    say = say or (lambda m: log.info(m))
    tried = list(ranked[:1 + max(0, alternatives)])
    abs_: list[PolicyAB] = []
    notes: list[str] = []
    for i, point in enumerate(tried):
        ab = measure(point, i)
        abs_.append(ab)
        if ab.costs is not True:
            return point, abs_, notes, True
        note = f"the queue policy costs capacity in {ab.key} ({ab.verdict})"
        notes.append(note)
        say(f"{note}; " + ("trying the next configuration of the search" if i + 1 < len(tried)
                           else "no configuration left to try"))
    notes.append(f"the queue policy cost capacity in every configuration measured ({len(abs_)}); "
                 f"{tried[0].key} serves, with load shedding on")
    return tried[0], abs_, notes, False
