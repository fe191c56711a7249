"""dinov2_triton.tune (search, space, session, policy) and the pipeline's tune stage.

Against the REAL local Triton server: two models with known service times
(tests/test_capacity.py's sleeping Python model, configs from export's
generator), one passing its accuracy gate, one 10x faster that FAILED it. The
instance count is searched: two instances of a sleeping model serve twice
the images, so a config override that is really loaded shows in the
capacity. The gated-out model is never measured and never wins; an
interrupted search resumes without re-measuring. The tune stage searches a
repository exported with the queue policy, applies the winner atomically
(--apply's path), measures the policy's A/B in it, and a restarted server
serves it. Measurement windows are short (0.5 s: the models are fast enough
to fill them) and bisections coarse (25 %; the tune stage's 45 %, its ramp
from 160 req/s: the two-instance capacity in 3 rates): the claims are about
which configuration wins and what is served, not about a precise capacity. The
resume test's ramp grows x1.25, not x2: from 80 req/s one step passes or fails
the one-instance capacity (~100 req/s), where x2 went to 160 and bisected back
through rates far above it (3-5 s each); and a rate gets perf_analyzer's least
number of windows (3): a rate far above a capacity is judged in 1.5 s, not 3,
and one at the edge may fail as unstable, a lower capacity for both sides of
the comparison alike."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from dinov2_triton.bench.capacity_records import SearchPoint, ServingConfig
from dinov2_triton.tune import search as ps
from dinov2_triton.tune import space as sp
from tests.test_capacity import write_manifest, write_sleepy_model

SLOW_MS, FAST_MS = 10.0, 1.0            # one instance: 100 and 1000 images/s
# rates of 40-200 requests/s fill 0.5 s windows (dinov2_triton.bench.capacity.MIN_WINDOW_REQUESTS)
CAPACITY = dict(window_ms=500, max_trials=3, start_rate=80, growth=1.25, precision=0.25, budget_s=40)
SEARCH = dict(slo_p99_ms=25 * SLOW_MS, instances=(2,), threads=(), delays_us=(), capacity=CAPACITY)


def make_repo(root: Path) -> Path:
    write_sleepy_model(root, "slow_ok", SLOW_MS)
    write_sleepy_model(root, "fast_bad", FAST_MS)
    write_manifest(root, {"onnx": ("slow_ok", "OK", True), "onnx_int8": ("fast_bad", "GATE_FAILED", False)})
    return root


def served_instances(server, model: str) -> int:
    with server.connect("grpc") as conn:
        return sum(int(g.get("count", 1)) for g in conn.model_config(model)["instance_group"])


# ----------------------------------------------------------------------------- no server
def test_knobs_round_trip_on_an_exported_config():
    from dinov2_triton.export.triton_config import default_max_queue_size, default_threads
    from tests.fixtures.triton import tiny_config_message

    base = tiny_config_message("m", "onnxruntime_onnx", max_batch_size=8)     # export's defaults
    k = sp.knobs_of(base)
    assert (k.instances, k.threads, k.max_batch_size, k.preferred_batch_sizes, k.queue_policy) == (
        2, default_threads(2), 8, [], True)
    cand = sp.with_knobs(base, ServingConfig(instances=3, threads=1, max_queue_delay_us=500,
                                             preferred_batch_sizes=[2, 16], max_batch_size=4,
                                             queue_policy=k.queue_policy))
    assert cand.parameters["intra_op_thread_count"].string_value == "1"       # Triton's onnxruntime name
    assert list(cand.dynamic_batching.preferred_batch_size) == [2]           # 16 > max_batch_size
    assert sp.knobs_of(cand) == ServingConfig(instances=3, threads=1, max_queue_delay_us=500,
                                              preferred_batch_sizes=[2], max_batch_size=4,
                                              queue_policy=k.queue_policy)
    assert base.instance_group[0].count == 2                                  # the base is not touched
    # export's default queue size, recomputed for the candidate's instances and batch
    assert cand.dynamic_batching.default_queue_policy.max_queue_size == default_max_queue_size(4, 3, 2000)
    # what the server reports back: Triton completes an empty preferred_batch_size with [max_batch_size]
    from dinov2_triton.tune.session import served_mismatch

    policy = {"default_timeout_microseconds": 2_000_000, "max_queue_size": 2048, "allow_timeout_override": True}
    served = {"instance_group": [{"count": 2}], "max_batch_size": 8,
              "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": k.max_queue_delay_us,
                                   "default_queue_policy": policy},
              "parameters": {"intra_op_thread_count": {"string_value": str(k.threads)}}}
    assert served_mismatch(served, k, base) == []
    asked = k.model_copy(update={"instances": 5, "threads": k.threads + 1, "preferred_batch_sizes": [4]})
    assert served_mismatch(served, asked, base) == [
        "instances 2 (asked 5)", "preferred_batch_size [8]",
        "queue policy max_queue_size 2048 (asked 2560)",      # 64 full batches x 5 instances
        f"intra_op_thread_count '{k.threads}' (asked {k.threads + 1})"]
    ts = tiny_config_message("t", "pytorch_libtorch")
    assert sp.thread_parameter(ts) == "INTRA_OP_THREAD_COUNT"
    with pytest.raises(sp.SpaceError, match="no thread-count parameter"):
        sp.with_knobs(tiny_config_message("p", "tensorrt_plan"), k.model_copy(update={"threads": 2}))



def test_the_queue_policy_is_removed_only_when_asked():
    """--queue-policies on,off on a repository exported with shedding (export's
    default): a candidate without the policy is a named, validated config, its
    key says so, the server's answer is checked for it (and, with the policy,
    its bounds), and a space without the flag never drops it (no silent loss
    of load shedding)."""
    from dinov2_triton.tune.session import check_config, served_mismatch
    from tests.fixtures.triton import tiny_config_message

    plain = tiny_config_message("m", "onnxruntime_onnx", max_batch_size=8)
    plain.dynamic_batching.ClearField("default_queue_policy")       # exported with --queue-timeout-ms 0
    assert sp.knobs_of(plain).queue_policy is None and "queue" not in sp.config_key("m", sp.knobs_of(plain))
    with pytest.raises(sp.SpaceError, match="no default_queue_policy to keep"):
        sp.build_space(plain, limit=None, instances=(), threads=(), delays_us=(), preferred=(),
                       max_batch_sizes=(), queue_policies=(True,))
    assert sp.build_space(plain, limit=None, instances=(), threads=(), delays_us=(), preferred=(),
                          max_batch_sizes=(), queue_policies=(True, False)[1:])["queue_policy"] == [None]
    base = tiny_config_message("m", "onnxruntime_onnx", max_batch_size=8)    # export's default: shedding on
    assert base.dynamic_batching.default_queue_policy.default_timeout_microseconds == 2_000_000
    k = sp.knobs_of(base)
    assert k.queue_policy is True
    plain = sp.build_space(base, limit=None, instances=(1, 2), threads=(), delays_us=(), preferred=(),
                           max_batch_sizes=())
    assert plain["queue_policy"] == [True] and all(c.queue_policy for c in sp.grid(plain))
    both = sp.build_space(base, limit=None, instances=(), threads=(), delays_us=(), preferred=(),
                          max_batch_sizes=(), queue_policies=(True, False))
    assert both["queue_policy"] == [True, False]
    off = k.model_copy(update={"queue_policy": False})
    cand = sp.with_knobs(base, off)
    assert not cand.dynamic_batching.HasField("default_queue_policy")
    assert sp.knobs_of(cand) == off.model_copy(update={"queue_policy": None})   # reads back as 'has none'
    assert sp.config_key("m", off).endswith(" queue=off") and "queue" not in sp.config_key("m", k)
    assert "default_queue_policy" not in check_config(cand, base)
    served = {"instance_group": [{"count": k.instances}], "max_batch_size": 8,
              "dynamic_batching": {"preferred_batch_size": k.preferred_batch_sizes,
                                   "max_queue_delay_microseconds": k.max_queue_delay_us},
              "parameters": {"intra_op_thread_count": {"string_value": str(k.threads)}}}
    assert served_mismatch(served, off, base) == []
    assert served_mismatch(served, k, base) == ["default_queue_policy absent (asked kept)"]
    policy = {"default_timeout_microseconds": 2_000_000, "max_queue_size": 2048, "allow_timeout_override": True}
    shedding = {**served, "dynamic_batching": {**served["dynamic_batching"], "default_queue_policy": policy}}
    assert served_mismatch(shedding, k, base) == []
    # the server must report the bounds written: a different timeout or size is named
    short = {**policy, "default_timeout_microseconds": 300_000, "max_queue_size": 8}
    wrong = {**served, "dynamic_batching": {**served["dynamic_batching"], "default_queue_policy": short}}
    assert served_mismatch(wrong, k, base) == ["queue policy default_timeout_microseconds 300000 (asked 2000000)",
                                               "queue policy max_queue_size 8 (asked 2048)"]
    # export's default size follows the instances (the timeout stays the first bound); a size of one's own scales
    assert sp.with_knobs(base, k.model_copy(update={"instances": 8})).dynamic_batching.default_queue_policy \
        .max_queue_size == 64 * 8 * 8
    base.dynamic_batching.default_queue_policy.max_queue_size = 32
    assert sp.with_knobs(base, k.model_copy(update={"instances": 4})).dynamic_batching.default_queue_policy \
        .max_queue_size == 64
    with pytest.raises(sp.SpaceError, match="no default_queue_policy to keep"):
        sp.with_knobs(cand, k)
    assert ps._switches("on,off", "--queue-policies") == [True, False]
    with pytest.raises(ps.SearchInputError, match="--queue-policies"):
        ps._switches("maybe", "--queue-policies")

def test_space_respects_the_graph_batch_limit(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from tests.fixtures.triton import tiny_config_message

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [4, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 3, 8, 8])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["logits"])],
                                                  "g", [x], [y])), tmp_path / "model.onnx")
    base = tiny_config_message("m", "onnxruntime_onnx")
    assert sp.batch_limit(base, tmp_path) == 4
    with pytest.raises(sp.SpaceError, match=r"--max-batch-sizes \[8\]: the model allows 1..4"):
        sp.build_space(base, limit=4, instances=[1], threads=[], delays_us=[], preferred=[], max_batch_sizes=[8])
    k = sp.knobs_of(base)          # export's default: 2 instances, the host's cores shared as threads
    space = sp.build_space(base, limit=4, instances=[3, 1], threads=[k.threads + 1], delays_us=[0], preferred=[[2]],
                           max_batch_sizes=[2])
    assert space["instances"] == [2, 3, 1] and space["threads"] == [k.threads, k.threads + 1]
    assert space["max_batch_size"] == [4, 2] and space["preferred_batch_sizes"] == [[], [2]]
    assert space["queue_policy"] == [True]                  # kept: shedding is never dropped unasked
    assert sp.size(space) == 3 * 2 * 2 * 2 * 2
    assert next(sp.grid(space)) == sp.knobs_of(base)       # the exported default comes first


def _fake_point(cfg: ServingConfig, value: float, i: int) -> SearchPoint:
    from dinov2_triton.bench.capacity_records import Capacity

    cap = Capacity(model="m", capacity_rps=value, capacity_img_s=value, p99_at_capacity_ms=1.0, failed_rps=None,
                   knee_rps=None, stop="converged", reason="", wall_s=1.0)
    return SearchPoint(index=i, key=sp.config_key("m", cfg), model="m", config=cfg, capacity=cap, feasible=True,
                       measured="now")


def test_coordinate_ascent_finds_a_separable_optimum_with_fewer_points_than_the_grid():
    space = {"instances": [1, 2, 3], "threads": [2, 1, 4], "max_queue_delay_us": [2000, 0, 8000],
             "preferred_batch_sizes": [[4, 8]], "max_batch_size": [8]}
    # capacity peaks at instances 2, threads 1, delay 8000 (one knob at a time reaches it)
    gain = {"instances": {1: 0, 2: 30, 3: 10}, "threads": {2: 0, 1: 20, 4: -5},
            "max_queue_delay_us": {2000: 0, 0: -3, 8000: 7}}
    seen: dict[str, SearchPoint] = {}

    def evaluate(cfg: ServingConfig) -> SearchPoint:
        key = sp.config_key("m", cfg)
        if key not in seen:
            value = 100 + sum(gain[k][getattr(cfg, k)] for k in gain)
            seen[key] = _fake_point(cfg, value, len(seen) + 1)
        return seen[key]

    best = sp.coordinate_ascent(space, evaluate)
    assert (best.config.instances, best.config.threads, best.config.max_queue_delay_us) == (2, 1, 8000)
    assert best.capacity.capacity_img_s == 157 and len(seen) < sp.size(space) == 27


def test_coordinate_ascent_searches_instances_and_threads_together():
    """2 instances x 1 thread is best, but 2 instances with the backend's default
    threads (each using every core) and 1 instance x 1 thread are both worse
    than the default: one knob at a time never gets there, the joint step does."""
    space = {"instances": [1, 2], "threads": [None, 1, 2], "max_queue_delay_us": [2000, 0],
             "preferred_batch_sizes": [[4, 8]], "max_batch_size": [8]}
    value = {(1, None): 100, (2, None): 60, (1, 1): 70, (1, 2): 100, (2, 1): 230, (2, 2): 50}
    seen: dict[str, SearchPoint] = {}

    def evaluate(cfg: ServingConfig) -> SearchPoint:
        key = sp.config_key("m", cfg)
        if key not in seen:
            v = value[(cfg.instances, cfg.threads)] + (5 if cfg.max_queue_delay_us == 0 else 0)
            seen[key] = _fake_point(cfg, v, len(seen) + 1)
        return seen[key]

    best = sp.coordinate_ascent(space, evaluate)
    assert (best.config.instances, best.config.threads, best.config.max_queue_delay_us) == (2, 1, 0)
    assert best.capacity.capacity_img_s == 235
    # first pass: the default, the 5 other instance x thread pairs, 1 more delay (7); the second
    # pass tries the pairs again at the new delay (5), finds nothing better and stops
    assert sp.first_pass_size(space) == 7 and len(seen) == 12
    assert sp.first_pass_size({**space, "threads": [None]}) == 3          # no thread knob: one at a time


def test_apply_is_atomic(tmp_path, monkeypatch):
    """A crash in the middle of writing config.pbtxt leaves the old file, byte
    for byte, and no temporary file; the server is not touched."""
    import dinov2_triton.core.artifact_io as aio
    from dinov2_triton.export.triton_config import parse_config

    write_sleepy_model(tmp_path, "slow_ok", SLOW_MS)
    path = tmp_path / "slow_ok" / "config.pbtxt"
    before = path.read_bytes()
    base = parse_config(before.decode())
    target = ps.Target(variant="onnx", model="slow_ok", base=base, config_path=path, space={})
    win = _fake_point(sp.knobs_of(base).model_copy(update={"instances": 2}), 80.0, 1)
    loads = []
    session = SimpleNamespace(settings=SimpleNamespace(capacity=SimpleNamespace(slo_p99_ms=100.0)),
                              points={win.key: win}, say=lambda m: None, load=lambda *a: loads.append(a))

    def crash(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(aio.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ps._apply(session, target, win, "run-1", None)
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["1", "config.pbtxt"]
    assert loads == []
    monkeypatch.undo()
    applied = ps._apply(session, target, win, "run-1", None)
    cfg = parse_config(path.read_text())
    assert applied.path == str(path) and cfg.instance_group[0].count == 2 and len(loads) == 1
    assert cfg.parameters["search_run_id"].string_value == "run-1"
    assert cfg.parameters["search_capacity_img_per_s"].string_value == "80.0"


# ----------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def search_server(tmp_path_factory, triton_server_factory):
    return triton_server_factory(make_repo(tmp_path_factory.mktemp("search_repo")))


class _Interrupt:
    """A progress callback that presses Ctrl-C once the first point is journaled."""

    def __init__(self):
        self.lines = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        if msg.startswith("[1/"):
            raise KeyboardInterrupt


@pytest.mark.triton
def test_search_resumes_and_never_lets_a_gated_out_variant_win(search_server, tmp_path):
    server = search_server
    stop = _Interrupt()
    first = ps.run_search(url=server.url_grpc, repository=server.repository, api_key=server.api_key,
                          out=tmp_path, run_id="s1", progress=stop, **SEARCH)
    assert first.exit_code == 130 and first.results.search.stopped == "interrupted"
    (p1,) = first.results.search.points
    assert p1.is_default and p1.config.instances == 1 and p1.feasible
    line = next(m for m in stop.lines if m.startswith("[1/"))
    assert line.startswith("[1/~2] slow_ok|inst=1") and f"img/s at p99 <= {25 * SLOW_MS:g} ms" in line
    assert "ETA" in line
    assert "--resume" in stop.lines[-1]
    assert served_instances(server, "slow_ok") == 1          # the exported config is served again

    lines = []
    out = ps.run_search(url=server.url_grpc, repository=server.repository, api_key=server.api_key,
                        budget_s=600, resume=first.run_dir, progress=lines.append)
    s = out.results.search
    print("\n".join(stop.lines + lines))     # shown by pytest when an assert below fails
    assert out.exit_code == 0, out.results.errors
    assert len(s.points) == 2 and s.points[0].measured == p1.measured       # kept, not measured again
    # the new point starts near the best capacity measured before the interruption
    first_rate = next(m for m in lines if " req/s: " in m)
    assert first_rate.startswith(f"  slow_ok {p1.capacity.capacity_rps:.1f} req/s"), first_rate
    assert sorted(p.name for p in (first.run_dir / ps.POINTS_DIR).iterdir()) == ["001.json", "002.json"]
    # the gated-out model (12x faster) never competes
    assert [x.variant for x in s.excluded] == ["onnx_int8"] and "gate FAILED" in s.excluded[0].reason
    assert all(p.model == "slow_ok" for p in s.points)
    assert not (first.run_dir / "search" / "input_data" / "fast_bad.json").exists()
    # two sleeping instances serve about twice the images: the override was loaded and measured
    one, two = (p.capacity.capacity_img_s for p in s.points)
    assert two >= 1.4 * one, [(p.key, p.capacity.capacity_img_s) for p in s.points]
    assert s.winner == s.points[1].key and "inst=2" in s.winner
    cmp = s.comparison
    assert cmp is not None and cmp.ratio >= 1.4 and cmp.default.repeat == cmp.winner.repeat == 2
    assert cmp.default.stop == cmp.winner.stop == "converged"        # its own budget: 3x a point's
    assert "ran out of its budget" not in out.report.md.read_text()
    # had the default's bisection run out of budget, the report says its number is a lower bound
    from dinov2_triton.report.capacity import search_blocks

    short = cmp.default.model_copy(update={"stop": "budget", "reason": "time budget 270 s spent"})
    cut = out.results.model_copy(update={"search": s.model_copy(update={
        "comparison": cmp.model_copy(update={"default": short})})})
    text = " ".join(str(b) for b in search_blocks(cut, []))
    assert "exported default's bisection ran out of its budget" in text and "time budget 270 s spent" in text
    rec = out.results.recommendation
    assert rec.source == "search" and rec.variant == "slow_ok" and rec.configuration.instances == 2
    assert rec.reason.startswith("deploy variant slow_ok with configuration 2 instance(s)")
    assert "top-1 agreement 100.00%" in rec.reason
    md = out.report.md.read_text()
    assert "Top 3 configurations per variant" in md and "Ratio winner / default" in md
    assert (out.run_dir / "p99_vs_offered_load.png").is_file()
    assert served_instances(server, "slow_ok") == 1          # no --apply: the exported config is served


def _capacity(img_s: float | None, stop: str = "converged"):
    from dinov2_triton.bench.capacity_records import Capacity

    return Capacity(model="m", capacity_rps=img_s, capacity_img_s=img_s, p99_at_capacity_ms=50.0 if img_s else None,
                    failed_rps=None, knee_rps=None, stop=stop, reason="", wall_s=10.0)


def test_the_policy_costs_capacity_only_beyond_the_tolerance():
    from dinov2_triton.tune.policy import AB_TOLERANCE, policy_verdict

    assert AB_TOLERANCE == 0.2
    ratio, costs, line = policy_verdict(_capacity(85.0), _capacity(100.0))
    assert (ratio, costs) == (0.85, False) and "no cost beyond the noise (>= 0.80x)" in line
    ratio, costs, line = policy_verdict(_capacity(29.0), _capacity(100.0))    # the one-instance stall: 0.29x
    assert (ratio, costs) == (0.29, True) and "costs capacity (below 0.80x)" in line
    assert policy_verdict(_capacity(None), _capacity(100.0))[:2] == (0.0, True)
    assert policy_verdict(_capacity(50.0), _capacity(None))[:2] == (None, False)
    assert policy_verdict(_capacity(None), _capacity(None))[:2] == (None, None)
    _, _, line = policy_verdict(_capacity(90.0, stop="budget"), _capacity(100.0))
    assert "the with-policy bisection ran out of budget (a lower bound)" in line
    assert "both bisections ran out of budget" in policy_verdict(_capacity(90.0, stop="budget"),
                                                                 _capacity(100.0, stop="budget"))[2]


def test_the_next_configuration_is_chosen_where_the_policy_costs_capacity():
    from dinov2_triton.bench.capacity_records import PolicyAB
    from dinov2_triton.tune.policy import choose_configuration

    cfgs = [ServingConfig(instances=i, threads=1, max_queue_delay_us=0, max_batch_size=8, queue_policy=True)
            for i in (2, 1, 3)]
    ranked = [_fake_point(c, v, i + 1) for i, (c, v) in enumerate(zip(cfgs, (300.0, 250.0, 200.0)))]

    def measure_with(costs: list):
        measured = []

        def measure(point, i):
            measured.append((point.key, i))
            return PolicyAB(key=point.key, config=point.config, with_policy=_capacity(1.0),
                            without_policy=_capacity(1.0), ratio=1.0, tolerance=0.2, costs=costs[i],
                            verdict="scripted")
        return measure, measured

    measure, measured = measure_with([True, False, False])
    chosen, abs_, notes, free = choose_configuration(ranked, measure, alternatives=2)
    assert free and chosen is ranked[1] and [k for k, _ in measured] == [ranked[0].key, ranked[1].key]
    assert len(abs_) == 2 and "costs capacity in " + ranked[0].key in notes[0]
    # it cost everywhere it was measured (1 + alternatives): the search's winner, shedding still on
    measure, measured = measure_with([True, True, True])
    chosen, abs_, notes, free = choose_configuration(ranked, measure, alternatives=1)
    assert not free and chosen is ranked[0] and len(measured) == 2
    assert "cost capacity in every configuration measured (2)" in notes[-1]
    # not decided (no side met the SLO) is no evidence of a cost: the first serves
    measure, measured = measure_with([None])
    assert choose_configuration(ranked, measure, alternatives=2)[0] is ranked[0] and len(measured) == 1


def _tune_workdir(root: Path, data: Path) -> Path:
    """A pipeline work folder: a sleepy classifier exported with the queue policy and two instances
    (export's defaults), the dinov2 ensemble calling it, the manifest, a data folder."""
    from tritonclient.grpc import model_config_pb2 as pb

    from dinov2_triton.export.triton_config import SHEDDING_QUEUE_TIMEOUT_MS, to_text

    repo = root / "model_repository"
    write_sleepy_model(repo, "sleepy_cls", TUNE_MS, instances=2, queue_timeout_ms=SHEDDING_QUEUE_TIMEOUT_MS)
    write_manifest(repo, {"onnx": ("sleepy_cls", "OK", True)})
    ens = pb.ModelConfig(name="dinov2", platform="ensemble", max_batch_size=4)
    ens.input.add(name="image", data_type=pb.TYPE_STRING).dims.append(1)
    ens.output.add(name="pixel_values", data_type=pb.TYPE_FP32).dims.extend([3, 8, 8])
    step = ens.ensemble_scheduling.step.add(model_name="sleepy_cls", model_version=-1)
    step.input_map["image"], step.output_map["pixel_values"] = "image", "pixel_values"
    (repo / "dinov2" / "1").mkdir(parents=True)
    (repo / "dinov2" / "config.pbtxt").write_text(to_text(ens))
    (root / "data").symlink_to(data)
    return root


TUNE_MS = 10.0              # one instance: 100 images/s, two: 200
TUNE = ["tune.slo_p99_ms=250", "tune.budget_min=1.5", "tune.point_budget_s=25", "tune.ab_budget_s=25",
        "tune.rate_window_ms=500", "tune.rate_precision=0.45", "tune.start_rate=160", "tune.alternatives=1"]


@pytest.mark.triton
def test_the_tune_stage_applies_its_choice_with_shedding_on_and_a_restart_serves_it(tmp_path, tiny_dataset,
                                                                                    triton_server_factory):
    """The pipeline's tune stage on a repository exported with the queue policy: the search's
    instances step (a sleeping model: two instances serve twice the images), the winner applied
    (config.pbtxt written, the run id and capacity in its parameters, loaded at once), the queue
    policy's A/B measured in it, the file and what the server reports the same, every step of the
    ensemble shedding, the A/B in the search's results and report; a restarted server serves it."""
    from dinov2_triton.export.triton_config import parse_config
    from dinov2_triton.pipeline.capacity_stage import run_tune
    from dinov2_triton.pipeline.recipes import resolve
    from dinov2_triton.pipeline.stages import Context, Layout, StageResult

    root = _tune_workdir(tmp_path / "work", tiny_dataset)
    repo = root / "model_repository"
    lines: list[str] = []
    ctx = Context(recipe=resolve(None, sets=TUNE).recipe, layout=Layout(root), say=lines.append)
    ctx.server = triton_server_factory(repo)
    # the ensemble calls a variant that failed its gate (published with allow_failed_gates): not measured
    write_manifest(repo, {"onnx": ("sleepy_cls", "GATE_FAILED", False)})
    skipped = run_tune(ctx)
    assert isinstance(skipped, StageResult) and skipped.status == "warning" and "gate FAILED" in skipped.note
    assert ctx.serving is None and not (root / "reports").exists() and "not run" in ctx.warnings[-1]
    write_manifest(repo, {"onnx": ("sleepy_cls", "OK", True)})
    note = run_tune(ctx)
    print("\n".join(lines))          # shown by pytest when an assert below fails
    c = ctx.serving
    assert c is not None and isinstance(note, str), (note, c)
    assert (c.model, c.variant, c.space) == ("sleepy_cls", "onnx", "joint")
    search = ps_results(c.search_run)
    assert {p.config.instances for p in search.points} == {1, 2} and all(p.config.queue_policy for p in search.points)
    one, two = (next(p.capacity.capacity_img_s for p in search.points if p.config.instances == n) for n in (1, 2))
    assert two >= 1.4 * one and c.search_winner == search.winner and "inst=2" in search.winner
    assert search.applied is not None and search.applied.key == search.winner
    # the A/B: the winner first, both sides measured in this run, the verdict from the ratio
    first = c.ab[0]
    assert first.key == search.winner and first.config.queue_policy is True
    assert first.with_policy.points and first.without_policy.points and first.tolerance == 0.2
    if first.ratio:
        assert first.costs == (first.ratio < 0.8)
    if first.costs is not True:
        assert c.chosen == search.winner and len(c.ab) == 1
    else:       # the next configuration where the policy costs nothing, else the winner (shedding stays on)
        assert len(c.ab) == 2 and c.chosen in (search.winner, c.ab[1].key) and c.notes
    # what is served is the file, with the policy; the ensemble's step sheds
    cfg = parse_config((root / "model_repository" / "sleepy_cls" / "config.pbtxt").read_text())
    assert cfg.instance_group[0].count == c.config.instances and cfg.dynamic_batching.HasField("default_queue_policy")
    assert cfg.parameters["search_run_id"].string_value == "search"
    if c.chosen == search.winner:
        assert float(cfg.parameters["search_capacity_img_per_s"].string_value) == pytest.approx(
            max(p.capacity.capacity_img_s for p in search.points), abs=0.06)
    assert c.served_matches and "matches the applied config" in c.served, c.served
    assert served_instances(ctx.server, "sleepy_cls") == c.config.instances
    assert c.ensemble_steps_shed == {"sleepy_cls": True}
    assert c.search_s > 0 and c.ab_s > 0 and c.wall_s >= c.search_s + c.ab_s - 1
    assert any(m.startswith("tune: ") and "in all (search" in m for m in lines)
    # stored with the search's results (schema-checked on read) and shown in its report
    assert ps_results(c.search_run, serving=True).serving == c
    md = (Path(c.search_run) / "report.md").read_text()
    assert "Serving configuration of `sleepy_cls`, load shedding on" in md and first.key in md
    # a restarted server serves the file (the first one stops while it starts: SIGTERM at once, its
    # Python-backend instances finalized in the background, ~1.2 s each)
    from tests.fixtures.triton import stop_in_background

    stop_in_background(ctx.server.stop, "the tune stage's server")
    again = triton_server_factory(root / "model_repository")
    assert served_instances(again, "sleepy_cls") == c.config.instances
    with again.connect("grpc") as conn:
        assert conn.model_config("sleepy_cls")["parameters"]["search_run_id"]["string_value"] == "search"


def ps_results(run_dir, *, serving: bool = False):
    """The search's results.json (its ``search`` section; the whole record with ``serving``)."""
    from dinov2_triton.bench.results import RESULTS_FILE, read_results

    record = read_results(Path(run_dir) / RESULTS_FILE)
    return record if serving else record.search


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(ps.SearchInputError, match="export manifest"):
        ps.run_search(url="127.0.0.1:1", repository=tmp_path, slo_p99_ms=10)
    assert ps.main(["--resume", str(tmp_path), "--instances", "1,2"]) == 2
