"""perf/capacity.py: capacity at a p99 SLO under open-loop (Poisson) load.

The search logic runs against a simulated M/D/1 server with a known answer;
the real thing runs perf_analyzer's request-rate mode against the REAL local
Triton server on a model with a KNOWN service time (a Python-backend model
that sleeps a fixed time per image, one instance: it cannot serve more than
1000 / service_ms images per second; ``INSTANCES`` of them, that many times more),
its config made by export's own generator (export/triton_config.preprocess_config).
Measurement windows are the shortest the rates allow (0.5 s where 50 requests
fill them)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from dinov2_triton.bench import capacity as cap
from dinov2_triton.bench import perf_analyzer as pa
from dinov2_triton.bench.capacity_records import RatePoint

SLEEPY_MODEL_PY = '''\
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Sleeps service_time_ms per image: one instance serves at most 1000 / service_time_ms images/s."""

    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.seconds = float(cfg["parameters"]["service_time_ms"]["string_value"]) / 1000
        self.dims = [int(d) for d in cfg["output"][0]["dims"]]

    def execute(self, requests):
        out = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().shape[0]
            time.sleep(self.seconds * n)
            out.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("pixel_values", np.zeros([n, *self.dims], np.float32))]))
        return out
'''


def write_sleepy_model(root: Path, name: str, service_ms: float, *, instances: int = 1,
                       max_batch_size: int = 4, queue_timeout_ms: float = 0) -> Path:
    """A model with a known service time: image bytes [1] -> pixel_values [3,8,8]
    (the preprocessing model's contract, so export's generator and checker apply).
    ``queue_timeout_ms`` 0: no queue policy, so that the capacity is the service
    time's alone (one instance with a policy stalls on Triton 2.51; shedding by a
    short queue is tested on its own); > 0: export's queue policy."""
    from dinov2_triton.export.triton_config import preprocess_config, validate_config

    cfg = preprocess_config(image_size=8, max_batch_size=max_batch_size, instances=instances, warmup_file=False,
                            queue_timeout_ms=queue_timeout_ms, parameters={"service_time_ms": service_ms})
    cfg.name = name
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "config.pbtxt").write_text(validate_config(cfg))
    (root / name / "1" / "model.py").write_text(SLEEPY_MODEL_PY)
    return root / name


def write_manifest(repo: Path, variants: dict[str, tuple[str, str, bool]]) -> None:
    """An export manifest whose variants are ``name -> (model, status, gate passed)``."""
    from dinov2_triton.core.preprocessing import PreprocessConfig
    from dinov2_triton.export.manifest import ExportManifest, write_export_manifest

    entries = {name: dict(name=name, model_name=model, platform="python", filename="model.py", precision="fp32",
                          gate="fp32", status=status, published=True, requested=True, version=1, gate_passed=ok,
                          gate_failures=[] if ok else ["top-1 agreement 91.00% < 99.90%"],
                          headline={"top1_agreement": 1.0 if ok else 0.91})
               for name, (model, status, ok) in variants.items()}
    m = ExportManifest.new(
        run_id="test", created="2026-12-01T00:00:00Z", repository=str(repo),
        source_checkpoint=dict(path="model_final.pth", sha256="0" * 64, size_bytes=1), img_size=14,
        num_classes=4, embed_dim=6, class_names=[f"c{i}" for i in range(4)],
        preprocessing=PreprocessConfig(image_size=14, resize_size=16).to_dict(), versions={}, git_revision="test",
        options={}, requested_variants=list(variants), eval_set=dict(split="test", n=8, synthetic=True,
                                                                       labelled=False),
        baseline=dict(name="pytorch"), variants=entries)
    write_export_manifest(m, repo)


def bytes_samples(n: int = 8):
    from dinov2_triton.bench.input_data import synthetic_samples

    return synthetic_samples((3, 8, 8), n=n, encoded_size=8)


# ----------------------------------------------------------------------------- the rules, no server
def test_settings_name_the_flag():
    with pytest.raises(ValueError, match="--slo-p99-ms 0"):
        cap.capacity_settings(slo_p99_ms=0)
    with pytest.raises(ValueError, match="--rate-growth 1"):
        cap.capacity_settings(slo_p99_ms=10, growth=1)
    with pytest.raises(ValueError, match="--max-rate 5"):
        cap.capacity_settings(slo_p99_ms=10, start_rate=10, max_rate=5)
    s = cap.capacity_settings(slo_p99_ms=10)
    assert (s.distribution, s.max_error_rate, s.batch_size) == ("poisson", 0.001, 1)


def test_open_loop_command_and_its_csv(tmp_path):
    s = pa.MeasurementSettings(window_ms=2000, max_trials=4)
    cmd = pa.build_command("pa", model="m", url="h:1", protocol="grpc", batch_size=1, settings=s, input_data=None,
                           shapes=[], csv_path="o.csv", metrics_url=None, request_rate=42.5, max_threads=4,
                           request_intervals="r42.5.intervals")
    for flag in ("--request-intervals=r42.5.intervals", "--async", "--max-threads=4"):
        assert flag in cmd
    # never perf_analyzer's own Poisson schedule (its fixed draws offer ~16 % less, perf/arrivals.py)
    assert not any(c.startswith(("--concurrency-range", "--request-rate-range", "--request-distribution"))
                   for c in cmd)
    with pytest.raises(ValueError, match="--request-intervals"):
        pa.build_command("pa", model="m", url="h:1", protocol="grpc", batch_size=1, settings=s, input_data=None,
                         shapes=[], csv_path="o.csv", metrics_url=None, request_rate=42.5)
    const = pa.build_command("pa", model="m", url="h:1", protocol="grpc", batch_size=1, settings=s, input_data=None,
                             shapes=[], csv_path="o.csv", metrics_url=None, request_rate=42.5,
                             request_distribution="constant")
    assert "--request-rate-range=42.5:42.5:1" in const and "--request-distribution=constant" in const
    with pytest.raises(ValueError, match="exactly one"):
        pa.build_command("pa", model="m", url="h:1", protocol="grpc", batch_size=1, concurrency=1, settings=s,
                         input_data=None, shapes=[], csv_path="o.csv", metrics_url=None, request_rate=3)
    # captured from perf_analyzer 2.50, request-rate mode (the load column is "Request Rate")
    (tmp_path / "r.csv").write_text(
        "Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
        "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
        "Avg latency,request/response,response wait\n"
        "30,29.07,6,309,17562,26,33601,211,1,47587,85407,100093,149570,51719,7,51706\n")
    row = pa.parse_csv(tmp_path / "r.csv")[0]
    assert row["request_rate"] == 30 and row["p99_latency_us"] == 149570 and "concurrency" not in row


def test_poisson_schedule_offers_exactly_the_rate(tmp_path):
    """The --request-intervals file: whole microseconds, one pass holds exactly
    ``rate`` requests per second, the same seed gives the same pattern, and
    the intervals look exponential (coefficient of variation ~1, not constant)."""
    import numpy as np

    from dinov2_triton.bench import arrivals

    for rate in (0.5, 10, 43.6, 2500):
        iv = arrivals.poisson_intervals(rate, 3000)
        assert all(isinstance(v, int) and v >= 0 for v in iv)
        assert sum(iv) == round(3000 / rate * 1e6)                  # to the microsecond
        cv = np.std(iv) / np.mean(iv)
        assert 0.9 < cv < 1.1, (rate, cv)
    assert arrivals.poisson_intervals(10, 50) == arrivals.poisson_intervals(10, 50)
    assert arrivals.poisson_intervals(10, 50) != arrivals.poisson_intervals(10, 50, seed=1)
    assert arrivals.schedule_length(10, 30) == arrivals.MIN_INTERVALS
    assert arrivals.schedule_length(5000, 100) == arrivals.MAX_INTERVALS
    f = arrivals.write_poisson_schedule(tmp_path / "r.intervals", 42.5, 6.0)
    assert arrivals.offered_rate(f) == pytest.approx(42.5, rel=1e-6)
    with pytest.raises(ValueError, match="must be > 0"):
        arrivals.poisson_intervals(0, 10)


def test_judge_each_verdict():
    s = cap.capacity_settings(slo_p99_ms=100, window_ms=1000)
    ok = {"p99_latency_us": 80_000, "throughput_infer_per_s": 195.0}
    assert cap.judge(200, ok, s, delayed_pct=0.0)[0] == "PASS"
    assert cap.judge(200, {**ok, "p99_latency_us": 120_000}, s, delayed_pct=0.0) == (
        "OVER_SLO", "p99 120.0 ms > SLO 100 ms")
    assert cap.judge(200, {**ok, "throughput_infer_per_s": 100.0}, s, delayed_pct=0.0)[0] == "NOT_SUSTAINED"
    assert cap.judge(200, ok, s, delayed_pct=2.0)[0] == "PASS"
    assert cap.judge(200, ok, s, delayed_pct=12.0)[0] == "CLIENT_LIMITED"
    # batch 4: the offered images are 4 x the rate
    s4 = cap.capacity_settings(slo_p99_ms=100, window_ms=1000, batch_size=4)
    assert cap.judge(50, ok, s4, delayed_pct=0.0)[0] == "PASS"
    assert cap.judge(100, ok, s4, delayed_pct=0.0)[0] == "NOT_SUSTAINED"


def test_low_rates_get_longer_windows():
    s = cap.capacity_settings(slo_p99_ms=100, window_ms=1000)
    assert cap.window_ms(200, s) == 1000
    assert cap.window_ms(10, s) == 1000 * cap.MIN_WINDOW_REQUESTS // 10
    # keep-up tolerance: 3 sigma of the 3 windows' request count, at least the floor
    assert cap.keep_up_tolerance(1000, s) == cap.KEEP_UP_FLOOR == 0.10       # 3000 requests: 5.5 %
    assert cap.keep_up_tolerance(50, s) == pytest.approx(3 / math.sqrt(150))  # 24 %
    assert cap.judge(1000, {"p99_latency_us": 80_000, "throughput_infer_per_s": 880.0}, s,
                     delayed_pct=0.0)[0] == "NOT_SUSTAINED"


def _md1_p99_ms(rate: float, service_ms: float) -> float:
    """p99 sojourn time of an M/D/1 queue (heavy-traffic exponential tail), inf at or above capacity."""
    rho = rate * service_ms / 1000
    if rho >= 1:
        return math.inf
    return service_ms + max(0.0, math.log(100 * rho)) * service_ms * rho / (2 * (1 - rho))


def _true_capacity(service_ms: float, slo_ms: float) -> float:
    """The highest rate whose M/D/1 p99 meets the SLO (bisection on the formula)."""
    lo, hi = 0.0, 1000 / service_ms
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _md1_p99_ms(mid, service_ms) <= slo_ms else (lo, mid)
    return lo


class SimulatedServer:
    """A probe for find_capacity: an M/D/1 queue with a fixed service time, on a fake clock."""

    def __init__(self, service_ms: float, slo_ms: float, seconds_per_point: float = 5.0):
        self.service_ms, self.slo, self.now, self.rates = service_ms, slo_ms, 0.0, []
        self.seconds = seconds_per_point

    def clock(self) -> float:
        return self.now

    def __call__(self, rate: float) -> RatePoint:
        self.rates.append(rate)
        self.now += self.seconds
        p99 = _md1_p99_ms(rate, self.service_ms)
        if math.isinf(p99):
            return RatePoint(rate_rps=rate, status="OVER_SLO", reason="queue grows", p99_ms=10_000.0,
                             wall_s=self.seconds)
        return RatePoint(rate_rps=rate, status="PASS" if p99 <= self.slo else "OVER_SLO", reason="sim",
                         p99_ms=p99, throughput_img_s=rate, wall_s=self.seconds)


def test_find_capacity_converges_on_the_known_answer():
    sim = SimulatedServer(service_ms=10, slo_ms=200)
    s = cap.capacity_settings(slo_p99_ms=200, precision=0.05, budget_s=1000)
    truth = _true_capacity(10, 200)
    c = cap.find_capacity(sim, s, model="sim", clock=sim.clock)
    assert c.stop == "converged"
    assert c.capacity_rps <= truth < c.failed_rps <= c.capacity_rps * 1.05 + 1e-9
    assert c.capacity_img_s == c.capacity_rps and c.p99_at_capacity_ms <= 200
    assert sim.rates[:4] == [10, 20, 40, 80] and len(c.points) == len(sim.rates)
    # the knee: p99 doubles from the lightest load's somewhere between 20 and 80 req/s
    assert c.knee_rps in (20, 40)


def test_find_capacity_ramps_down_and_keeps_the_budget():
    sim = SimulatedServer(service_ms=100, slo_ms=5000)        # capacity 10 req/s: the start rate 40 fails
    s = cap.capacity_settings(slo_p99_ms=5000, start_rate=40, budget_s=1000)
    c = cap.find_capacity(sim, s, model="sim", clock=sim.clock)
    assert sim.rates[:3] == [40, 20, 10] and c.stop == "converged"
    assert c.capacity_rps <= _true_capacity(100, 5000) < c.failed_rps <= 10
    # a warm start (a search's previous capacity) takes one small step, then the usual factor
    sim = SimulatedServer(service_ms=100, slo_ms=5000)
    c = cap.find_capacity(sim, s, model="sim", start_rate=40, growth=1.25, clock=sim.clock)
    assert sim.rates[:3] == [40, 32, 16] and c.capacity_rps <= _true_capacity(100, 5000) < c.failed_rps
    # 16 s of budget at 5 s a point: a 4th point would overrun it, so it stops after 3 and says so
    sim = SimulatedServer(service_ms=10, slo_ms=200, seconds_per_point=5.0)
    s = cap.capacity_settings(slo_p99_ms=200, budget_s=16)
    c = cap.find_capacity(sim, s, model="sim", clock=sim.clock)
    assert c.stop == "budget" and len(c.points) == 3 and c.capacity_rps == 40 and c.failed_rps is None
    assert "time budget 16 s" in c.reason
    # nothing passes down to the minimum rate
    sim = SimulatedServer(service_ms=10_000, slo_ms=1)
    s = cap.capacity_settings(slo_p99_ms=1, budget_s=1e6)
    c = cap.find_capacity(sim, s, model="sim", clock=sim.clock)
    assert c.stop == "no_passing_rate" and c.capacity_rps is None and c.capacity_img_s is None


class ScriptedServer:
    """A probe that answers each rate with the p99s (ms) given for it, in turn; an SLO of 100 ms."""

    def __init__(self, script: dict[float, list]):
        self.script, self.now, self.rates = {r: list(v) for r, v in script.items()}, 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self, rate: float) -> RatePoint:
        self.rates.append(rate)
        self.now += 10
        answer = self.script[rate].pop(0)
        if answer == "ERRORS":
            return RatePoint(rate_rps=rate, status="ERRORS", reason="2 request(s) failed", failures=2, wall_s=10)
        return RatePoint(rate_rps=rate, status="PASS" if answer <= 100 else "OVER_SLO", reason="scripted",
                         p99_ms=answer, throughput_img_s=rate, delayed_pct=0.0, wall_s=10)


def test_a_marginal_verdict_is_measured_again_and_judged_on_the_mean():
    s = cap.capacity_settings(slo_p99_ms=100, start_rate=10, growth=2, precision=0.5, budget_s=1000)
    # 20 req/s: 110 ms fails alone, 110 and 70 (mean 90) pass; 40: far over, never rechecked
    sim = ScriptedServer({10: [20.0], 20: [110.0, 70.0], 40: [900.0], 28.284: [400.0]})
    sim.script[math.sqrt(20 * 40)] = sim.script.pop(28.284)
    c = cap.find_capacity(sim, s, model="m", clock=sim.clock, progress=lambda _: None)
    assert sim.rates[:4] == [10, 20, 20, 40]
    first, again = c.points[1], c.points[2]
    assert first.rechecked and first.status == "OVER_SLO" and not c.points[0].rechecked
    assert again.status == "PASS" and again.mean_p99_ms == 90.0 and again.p99_ms == 70.0
    assert "p99 110.0 then 70.0 ms, judged on the mean" in again.reason
    assert c.capacity_rps == 20 and c.p99_at_capacity_ms == 90.0
    # a marginal pass that fails again (95 then 140: mean 117.5) is a failing rate
    sim = ScriptedServer({10: [20.0], 20: [95.0, 140.0], 5: [30.0], 14.142: [50.0]})
    sim.script[math.sqrt(10 * 20)] = sim.script.pop(14.142)
    c = cap.find_capacity(sim, s, model="m", clock=sim.clock, progress=lambda _: None)
    assert c.points[2].status == "OVER_SLO" and c.points[2].mean_p99_ms == 117.5
    assert c.capacity_rps == math.sqrt(10 * 20) and c.failed_rps == 20
    # a re-measurement that failed otherwise keeps its own verdict
    sim = ScriptedServer({10: [20.0], 20: [90.0, "ERRORS"], 14.142: [50.0]})
    sim.script[math.sqrt(10 * 20)] = sim.script.pop(14.142)
    c = cap.find_capacity(sim, s, model="m", clock=sim.clock, progress=lambda _: None)
    assert c.points[2].status == "ERRORS" and "p99 90.0 ms the first time" in c.points[2].reason
    assert c.capacity_rps == math.sqrt(10 * 20)


def test_recheck_margin_bounds_and_switch():
    s = cap.capacity_settings(slo_p99_ms=100)
    assert s.recheck_margin == 0.5
    point = lambda p99, status="PASS": RatePoint(rate_rps=1, status=status, reason="", p99_ms=p99, wall_s=1)  # noqa: E731
    assert [cap.marginal(point(v, "PASS" if v <= 100 else "OVER_SLO"), s) for v in (66.6, 66.7, 100, 150, 150.1)] \
        == [False, True, True, True, False]
    assert not cap.marginal(point(90, "NOT_SUSTAINED"), s)
    assert not cap.marginal(point(90).model_copy(update={"mean_p99_ms": 90.0}), s)   # never a third time
    once = cap.capacity_settings(slo_p99_ms=100, recheck_margin=0)
    assert not cap.marginal(point(99), once)
    sim = ScriptedServer({10: [20.0], 20: [110.0], 14.142: [50.0]})
    sim.script[math.sqrt(10 * 20)] = sim.script.pop(14.142)
    c = cap.find_capacity(sim, once.model_copy(update={"precision": 0.5}), model="m", clock=sim.clock,
                          progress=lambda _: None)
    assert sim.rates == [10, 20, math.sqrt(10 * 20)] and not any(p.rechecked for p in c.points)
    with pytest.raises(ValueError, match="--recheck-margin 1.5"):
        cap.capacity_settings(slo_p99_ms=100, recheck_margin=1.5)


def test_no_recheck_when_the_budget_is_spent():
    s = cap.capacity_settings(slo_p99_ms=100, start_rate=10, budget_s=25)
    sim = ScriptedServer({10: [20.0], 20: [90.0, 60.0]})
    lines: list[str] = []
    c = cap.find_capacity(sim, s, model="m", clock=sim.clock, progress=lines.append)
    assert sim.rates == [10, 20] and c.stop == "budget" and c.capacity_rps == 20
    assert any("no budget left to measure it again" in line for line in lines)


class NoisyServer:
    """M/D/1 whose service time varies from one measurement to the next (the
    machine's speed drifts) and whose p99 has a further log-normal noise:
    what two shared cores look like near capacity."""

    def __init__(self, seed: int, service_ms=8.0, speed_sigma=0.08, p99_sigma=0.2):
        import random

        self.rng, self.service, self.speed, self.noise, self.now = random.Random(seed), service_ms, speed_sigma, \
            p99_sigma, 0.0

    def clock(self) -> float:
        return self.now

    def __call__(self, rate: float) -> RatePoint:
        self.now += 11
        p99 = _md1_p99_ms(rate, self.service * math.exp(self.rng.gauss(0, self.speed)))
        p99 = 5000.0 if p99 > 5000 else p99 * math.exp(self.rng.gauss(0, self.noise))
        return RatePoint(rate_rps=rate, status="PASS" if p99 <= 100 else "OVER_SLO", reason="noisy", p99_ms=p99,
                         throughput_img_s=rate, wall_s=11)


def test_rechecking_makes_two_measurements_agree_more_often():
    """Golden numbers of a seeded simulation (issue 12: two measurements within 15 %)."""
    def agreeing_pairs(margin: float) -> int:
        s = cap.capacity_settings(slo_p99_ms=100, start_rate=17, budget_s=240, recheck_margin=margin)
        n = 0
        for seed in range(100):
            caps = [cap.find_capacity(sim, s, model="m", clock=sim.clock, progress=lambda _: None).capacity_rps
                    for sim in (NoisyServer(2 * seed), NoisyServer(2 * seed + 1))]
            n += abs(caps[0] - caps[1]) <= 0.15 * max(caps)
        return n

    once, rechecked = agreeing_pairs(0.0), agreeing_pairs(0.5)
    assert (once, rechecked) == (80, 92)     # of 100 seeded pairs
    assert rechecked > once


def test_repeatability_names_a_change_of_machine_speed():
    from dinov2_triton.bench.capacity_records import Capacity, CapacityRun

    def measured(model, repeat, img_s, compute_ms, rate=193.5):
        first = RatePoint(rate_rps=rate, status="PASS", reason="", p99_ms=20.0, compute_ms=compute_ms, wall_s=11)
        return Capacity(model=model, repeat=repeat, capacity_rps=img_s, capacity_img_s=img_s, p99_at_capacity_ms=80.0,
                        failed_rps=None, knee_rps=None, stop="converged", reason="", points=[first], wall_s=100)

    run = CapacityRun(settings=cap.capacity_settings(slo_p99_ms=100), results=[
        measured("a", 1, 623.2, 6.758), measured("b", 1, 312.3, 10.0), measured("a", 2, 881.4, 4.859),
        measured("b", 2, 312.3, 10.5), measured("c", 1, 100.0, 1.0)])
    (ma, a), (mb, b) = cap.repeatability(run)          # "c" was measured once: no line
    assert (ma, mb) == ("a", "b")
    assert a == ("623.2 and 881.4 img/s, 41.4% apart; server compute per request at the lightest rate "
                 "(193.5 req/s): 6.76 and 4.86 ms, 39% apart: the machine's speed changed between the measurements")
    assert b.startswith("312.3 and 312.3 img/s, 0.0% apart;") and b.endswith("10.00 and 10.50 ms")


def test_knee_needs_a_doubling():
    pts = [RatePoint(rate_rps=r, status="PASS", reason="", p99_ms=p, wall_s=1) for r, p in
           ((10, 20.0), (20, 25.0), (40, 39.0), (80, 90.0))]
    assert cap.knee_rate(pts) == 40
    assert cap.knee_rate(pts[:3]) is None and cap.knee_rate(pts[:1]) is None


# ----------------------------------------------------------------------------- the real server
SERVICE_MS = 25.0          # one instance: at most 40 images/s (a longer sleep drowns the per-request overhead)
#: instances of ``sleepy4``: at most 4 x 40 = 160 images/s. The capacity searches run at 40-170
#: requests/s, whose windows hold enough requests at 0.5 s (MIN_WINDOW_REQUESTS), where one
#: instance's 10-40 requests/s need 1.25-5 s windows
INSTANCES = 4
#: the SLO of the sleepy4 searches: 25 of its service times (25 ms / 4 instances): with it a rate above
#: the capacity builds a queue that breaks the SLO within perf_analyzer's windows, as with one instance
SLO4_MS = 25 * SERVICE_MS / INSTANCES


@pytest.fixture(scope="module")
def sleepy_server(tmp_path_factory, triton_server_factory):
    root = tmp_path_factory.mktemp("sleepy_repo")
    write_sleepy_model(root, "sleepy", SERVICE_MS)
    write_sleepy_model(root, "sleepy4", SERVICE_MS, instances=INSTANCES)
    return triton_server_factory(root)


@pytest.mark.triton
def test_capacity_of_a_model_with_a_known_service_time(sleepy_server, tmp_path):
    truth = INSTANCES * 1000 / SERVICE_MS
    # SLO 25 service times: a queue of deterministic service meets it up to ~0.9 of the capacity.
    # The ramp starts at half the capacity (80 req/s: 0.5 s windows; 40 req/s needed 1.25 s ones)
    s = cap.capacity_settings(slo_p99_ms=SLO4_MS, window_ms=500, start_rate=truth / 2, precision=0.1, budget_s=150)
    run = cap.run_capacity(url=sleepy_server.url_grpc, models=["sleepy4"], samples=bytes_samples(), settings=s,
                           out_dir=tmp_path, api_key=sleepy_server.api_key)
    assert run.failures == []
    (c,) = run.results
    rates = [(p.rate_rps, p.status, p.p99_ms) for p in c.points]
    assert c.stop == "converged", rates
    # the upper bound is the bisection's resolution (precision 0.1); with perf_analyzer's own
    # Poisson schedule 43.6 req/s "passed" here: it offered 16 % less (perf/arrivals.py)
    assert 0.7 * truth <= c.capacity_img_s <= 1.1 * truth, rates
    # above the true capacity nothing passes
    assert all(p.status != "PASS" for p in c.points if p.rate_rps > 1.1 * truth), rates
    light = [p for p in c.points if p.rate_rps <= 0.5 * truth]
    assert light and all(p.status == "PASS" and p.successes and p.error_rate == 0 for p in light), rates
    assert c.failed_rps is not None and c.failed_rps <= 1.3 * truth
    assert Path(c.points[0].csv).is_file() and "--request-intervals=" in c.points[0].command
    assert sleepy_server.api_key not in c.points[0].command



@pytest.mark.triton
def test_the_offered_rate_is_the_asked_rate(sleepy_server, tmp_path):
    """Half the capacity, the finder's own window for the rate: the server
    answers what was offered. perf_analyzer's --request-distribution=poisson
    served 16.8 of 20 req/s here, every time (its fixed draws, perf/arrivals.py);
    the seeded schedule 20.4."""
    s = cap.capacity_settings(slo_p99_ms=25 * SERVICE_MS, window_ms=500, budget_s=60)
    data, shapes, _ = cap.prepare_inputs(sleepy_server.url_grpc, "grpc", "sleepy4", bytes_samples(), tmp_path,
                                         batch_size=1, api_key=sleepy_server.api_key)
    probe = cap.RateProbe(model="sleepy4", url=sleepy_server.url_grpc, settings=s, input_data=data, shapes=shapes,
                          out_dir=tmp_path, api_key=sleepy_server.api_key)
    rate = 0.5 * INSTANCES * 1000 / SERVICE_MS
    p = probe(rate)
    assert p.status == "PASS", p
    assert 0.92 * rate <= p.throughput_img_s <= 1.08 * rate, p
    # the server's own count over the whole run: at least the measured windows' requests
    assert p.successes >= 3 * cap.window_ms(rate, s) / 1000 * rate * 0.9, p


@pytest.mark.triton
def test_a_rate_is_measured_on_an_idle_server(sleepy_server, tmp_path):
    """Requests still queued when a rate starts (here 160 sent at once to the
    four-instance model by another client: ~1 s of work) are waited for
    (drain_s), so the rate is measured with its own latency, not the backlog's.
    The four instances let the light rate (0.15 of the capacity, 24 req/s) fill
    ~2 s windows; one instance's 12 req/s needed 4 s ones. A higher rate would
    be shorter still, but perf_analyzer's late sends grow with the rate on a
    loaded host (48 req/s: 5.8 % late, CLIENT_LIMITED, at a load of 3-4)."""
    import threading

    s = cap.capacity_settings(slo_p99_ms=10 * SERVICE_MS, window_ms=500, budget_s=60)
    data, shapes, _ = cap.prepare_inputs(sleepy_server.url_grpc, "grpc", "sleepy4", bytes_samples(), tmp_path,
                                         batch_size=1, api_key=sleepy_server.api_key)
    probe = cap.RateProbe(model="sleepy4", url=sleepy_server.url_grpc, settings=s, input_data=data, shapes=shapes,
                          out_dir=tmp_path, api_key=sleepy_server.api_key)
    assert probe.wait_idle() < 1.5                                       # idle: one quiet interval or two
    backlog_n = 40 * INSTANCES                                           # 40 service times on each instance

    def backlog():
        with sleepy_server.connect("grpc") as conn:
            blob = conn.bytes_input("image", [bytes_samples(1).encoded[0]])
            conn.infer_many("sleepy4", [([blob], None)] * backlog_n, concurrency=backlog_n)

    t = threading.Thread(target=backlog)
    t.start()
    time.sleep(0.3)
    try:
        light = probe(0.15 * INSTANCES * 1000 / SERVICE_MS)
    finally:
        t.join()
    assert light.drain_s is not None and light.drain_s > 0.5, light
    # Measured behind the backlog, p99 would be the backlog's wait (40 x SERVICE_MS); measured on
    # the idle server it is the rate's own latency. Half the backlog tells the two apart on a busy
    # host too (a host running other work measured p99 124 ms here, the backlog is 1000 ms).
    assert light.status == "PASS" and light.p99_ms < 40 * SERVICE_MS / 2, light

@pytest.mark.triton
def test_shed_requests_fail_the_rate(sleepy_server, tmp_path):
    """A queue that holds one request sheds load above capacity: the rate
    fails with the server's words and the count of failed requests."""
    from dinov2_triton.export.triton_config import parse_config
    from dinov2_triton.tune.session import config_json

    base = parse_config((Path(sleepy_server.repository) / "sleepy" / "config.pbtxt").read_text())
    base.dynamic_batching.default_queue_policy.max_queue_size = 1
    with sleepy_server.connect("grpc") as conn:
        conn.load_model("sleepy", config=config_json(base))
    try:
        s = cap.capacity_settings(slo_p99_ms=1000, window_ms=1000, budget_s=60)
        data, shapes, served = cap.prepare_inputs(sleepy_server.url_grpc, "grpc", "sleepy", bytes_samples(),
                                                  tmp_path, batch_size=1)
        assert served["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1
        probe = cap.RateProbe(model="sleepy", url=sleepy_server.url_grpc, settings=s, input_data=data,
                              shapes=shapes, out_dir=tmp_path, api_key=sleepy_server.api_key)
        p = probe(3 * 1000 / SERVICE_MS)
        assert p.status == "ERRORS" and p.failures >= 1, p.reason
        assert "Exceeds maximum queue size" in p.reason and p.error_rate > s.max_error_rate
    finally:
        with sleepy_server.connect("grpc") as conn:
            conn.load_model("sleepy", config=config_json(parse_config(
                (Path(sleepy_server.repository) / "sleepy" / "config.pbtxt").read_text())))


@pytest.mark.triton
def test_a_model_that_is_not_served_is_a_clear_failure(sleepy_server, tmp_path):
    s = cap.capacity_settings(slo_p99_ms=100, window_ms=1000, budget_s=30)
    run = cap.run_capacity(url=sleepy_server.url_grpc, models=["no_such_model"], samples=bytes_samples(),
                           settings=s, out_dir=tmp_path)
    assert run.results == [] and len(run.failures) == 1
    assert "no_such_model" in run.failures[0] and "not ready" in run.failures[0]


@pytest.mark.triton
def test_perf_run_measures_capacity_twice_and_recommends_by_it(sleepy_server, tmp_path):
    """python -m dinov2_triton.pipeline.bench_stage --capacity: every served model's capacity at the SLO,
    measured twice, in the report with the p99-vs-load plot; the recommendation
    is by capacity, among the variants that pass their gates."""
    from dinov2_triton.bench.perf_analyzer import MeasurementSettings
    from dinov2_triton.pipeline.bench_stage import run_perf

    repo = Path(sleepy_server.repository)
    write_manifest(repo, {"onnx": ("sleepy4", "OK", True)})
    try:
        # 16 requests in flight keep the 4 instances busy (the batcher gives each up to 4): the sweep's
        # closed-loop throughput is near the capacity, and so the ramp starts at half of it, not at 10 req/s.
        # Measured in time windows: with a fixed count of 64 requests perf_analyzer 2.50 reported
        # 64 infer/s here at 16, 32 and 64 in flight (the ramp then started at a quarter of the capacity)
        run = run_perf(model_path=None, repository=repo, url=sleepy_server.url_grpc, models="sleepy4",
                       in_process=False, parity=False, concurrency=[16], batch_sizes=[1],
                       api_key=sleepy_server.api_key,
                       settings=MeasurementSettings(window_ms=500, collect_metrics=False),
                       capacity=dict(slo_p99_ms=SLO4_MS, window_ms=500, precision=0.5, budget_s=90),
                       capacity_repeats=2, out=tmp_path, run_id="cap")
    finally:
        (repo / "export_manifest.json").unlink()
    res = run.results
    assert run.exit_code == 0, res.errors
    assert [(c.model, c.repeat) for c in res.capacity.results] == [("sleepy4", 1), ("sleepy4", 2)]
    sweep_thr = res.perf_analyzer.points[0].metrics["throughput_infer_per_s"]
    for c in res.capacity.results:
        assert c.capacity_img_s and c.capacity_img_s <= 1.1 * INSTANCES * 1000 / SERVICE_MS  # the resolution
        # the ramp starts at half the closed-loop throughput the sweep measured
        assert c.points[0].rate_rps == pytest.approx(max(0.5 * sweep_thr, 10.0), rel=1e-3)
    rec = res.recommendation
    assert rec.source == "capacity" and rec.variant == "sleepy4" and rec.slo_p99_ms == SLO4_MS
    assert rec.reason.startswith("deploy variant sleepy4 with its served configuration: capacity")
    md = run.report.md.read_text()
    assert f"Capacity at p99 <= {SLO4_MS:g} ms (open loop)" in md and "apart" in md and "How to read capacity" in md
    assert (tmp_path / "cap" / "p99_vs_offered_load.png").is_file()
