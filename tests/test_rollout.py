"""Rollouts and shutdowns that lose no request, against the REAL local Triton
server: a new version published and loaded under load (``dinov2-triton serve
reload``), a rollback (``dinov2-triton serve rollback``), ``dinov2-triton serve stop``
with requests in flight, and the drain settings of ``dinov2-triton serve container``."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.qa import reliability as rel
from dinov2_triton.serve import local_server as ls
from dinov2_triton.serve import rollout
from dinov2_triton.serve.cli import main as serve_main
from tests.fixtures import fake_docker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live_repo(tmp_path_factory, tiny_repository) -> Path:
    """A copy of the tiny export: the rollout publishes versions into it."""
    return rel.copy_repository(tiny_repository, tmp_path_factory.mktemp("live") / "repo",
                               ["dinov2_onnx", "dinov2_preprocess", "dinov2"])


@pytest.fixture(scope="module")
def server(triton_server_factory, live_repo, tmp_path_factory):
    pid_file = tmp_path_factory.mktemp("pid") / "triton.pid"
    return triton_server_factory(live_repo, pid_file=pid_file)


def _pixels(conn):
    return [conn.tensor_input("pixel_values", np.full((2, 3, 28, 28), 0.25, np.float32))]


@pytest.mark.triton
def test_rollout_and_rollback_under_load_fail_no_request(server, live_repo, capsys):
    """Load on the variant and on the ensemble while version 2 is published
    and loaded, then rolled back to 1: every request answered, responses
    name the version that answered, the logits do not change."""
    from dinov2_triton.export.serving_models import sample_png

    image = sample_png(28)

    def images(conn):
        return [conn.bytes_input("image", [image])]

    with server.connect("grpc") as conn:
        before = conn.infer("dinov2_onnx", _pixels(conn)).as_numpy("logits")
        before_ens = conn.infer("dinov2", images(conn)).as_numpy("logits")
        stop = threading.Event()
        out: dict[str, rel.LoadResult] = {}
        loads = [threading.Thread(target=lambda m=m, f=f, c=c: out.setdefault(m, rel.closed_loop(
            conn, m, f, concurrency=c, stop=stop))) for m, f, c in
            (("dinov2_onnx", _pixels, 3), ("dinov2", images, 2))]
        for t in loads:
            t.start()
        time.sleep(1.0)
        new = rel.publish_copy_of_latest(live_repo, "dinov2_onnx")
        assert new == 2
        assert serve_main(["reload", "dinov2_onnx", "--pid-file", str(server.pid_file)]) == 0
        assert "dinov2_onnx: reload: serving version 2 (was 1)" in capsys.readouterr().out
        time.sleep(1.0)
        assert serve_main(["rollback", "dinov2_onnx", "--pid-file", str(server.pid_file)]) == 0
        assert "dinov2_onnx: rollback: serving version 1 (was 2)" in capsys.readouterr().out
        time.sleep(1.0)
        stop.set()
        for t in loads:
            t.join()
        after = conn.infer("dinov2_onnx", _pixels(conn))
        after_ens = conn.infer("dinov2", images(conn)).as_numpy("logits")
    variant, ensemble = out["dinov2_onnx"], out["dinov2"]
    for res in (variant, ensemble):
        assert res.ok > 20 and res.failed == 0 and res.shed == 0, res.to_dict()
    assert set(variant.versions) == {"1", "2"}, variant.versions          # the switch, and back
    assert set(ensemble.versions) == {"1"}   # the ensemble's own version; it follows its step's newest
    from dinov2_triton.client.classifier import response_model_version

    assert response_model_version(after) == "1"
    np.testing.assert_array_equal(after.as_numpy("logits"), before)
    np.testing.assert_array_equal(after_ens, before_ens)
    with server.connect("http") as admin:
        assert rollout.served_versions(admin, "dinov2_onnx") == (1,)
        # back to the newest: the reload sends config.pbtxt (a plain load would keep the rollback)
        assert rollout.reload_model(admin, "dinov2_onnx", repository=live_repo).after == (2,)


@pytest.mark.triton
def test_rollback_and_reload_errors_are_one_line(server, live_repo, capsys):
    with server.connect("http") as admin:
        with pytest.raises(rollout.RolloutError, match=r"dinov2: no version older than 1 is kept in .*--keep-versions"):
            rollout.rollback_model(admin, "dinov2", repository=live_repo)
        with pytest.raises(rollout.RolloutError, match="version 7 is not in"):
            rollout.rollback_model(admin, "dinov2_onnx", repository=live_repo, version=7)
        with pytest.raises(rollout.RolloutError, match="give --version N, or --repository"):
            rollout.rollback_model(admin, "dinov2_onnx")
        with pytest.raises(rollout.RolloutError, match="not loaded on the server"):
            rollout.rollback_model(admin, "no_such_model", version=1)
    with server.connect("http", with_key=False) as anonymous:
        with pytest.raises(Exception, match="API key"):
            rollout.reload_model(anonymous, "dinov2_onnx")
    assert serve_main(["reload", "dinov2_onnx", "--pid-file", str(server.pid_file.parent / "none.pid")]) == 1
    assert "no local server recorded in" in capsys.readouterr().err


@pytest.mark.triton
def test_export_reload_switches_the_live_server_to_what_it_published(server, live_repo, tiny_checkpoint,
                                                                     tiny_dataset, capsys):
    """`dinov2-triton export ... --reload URL`: the versions it published are the
    ones the server answers with afterwards."""
    from dinov2_triton.export.cli import main as export_main

    with server.connect("http") as admin:
        before = {m: rollout.served_versions(admin, m) for m in ("dinov2_onnx", "dinov2_preprocess", "dinov2")}
    code = export_main(["--model-path", str(tiny_checkpoint), "--repository", str(live_repo),
                        "--data-path", str(tiny_dataset), "--variants", "onnx", "--bench-seconds", "0",
                        "--eval-size", "16", "--reload", server.url_http,
                        "--api-key-file", str(server.api_key_file), "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    with server.connect("http") as admin:
        after = {m: rollout.served_versions(admin, m) for m in before}
    for model in before:
        newest = rollout.disk_versions(live_repo, model)[-1]
        assert after[model] == (newest,) and newest > max(before[model]), (model, before, after)
        assert f"reload: {model}: reload: serving version {newest}" in out
    with server.connect("grpc") as conn:
        assert conn.infer("dinov2_onnx", _pixels(conn)).as_numpy("logits").shape == (2, 3)


@pytest.mark.triton
def test_stop_under_load_answers_what_it_accepted(triton_server_factory, tmp_path, capsys):
    """`dinov2-triton serve stop` with requests in flight on a 300 ms-per-batch
    model: every accepted request is answered, new ones are refused, the
    process is gone well within the exit timeout."""
    from tests.fixtures.slow_model import write_slow_model

    write_slow_model(tmp_path / "repo", "slow", delay_ms=300, max_batch_size=4, queue_timeout_ms=10_000)
    pid_file = tmp_path / "triton.pid"
    handle = triton_server_factory(tmp_path / "repo", pid_file=pid_file, exit_timeout_s=10)
    x = np.full((1, 3, 8, 8), 0.5, np.float32)
    stopping, stop = threading.Event(), threading.Event()
    holder: dict[str, rel.LoadResult] = {}
    with handle.connect("grpc") as conn:
        load = threading.Thread(target=lambda: holder.setdefault("r", rel.closed_loop(
            conn, "slow", lambda c: [c.tensor_input("pixel_values", x)], concurrency=12, stop=stop,
            quit_on_error=stopping)))
        load.start()
        time.sleep(1.0)
        stopping.set()
        t_stop = time.perf_counter()
        assert serve_main(["stop", "--pid-file", str(pid_file),
                           "--replica-file", str(tmp_path / "no-replicas.json")]) == 0
        exit_s = time.perf_counter() - t_stop
        stop.set()
        load.join()
    assert f"stopped tritonserver (pid {handle.pid})" in capsys.readouterr().out
    res = holder["r"]
    counts = rel.shutdown_accounting(res.records, t_stop)
    assert counts["in_flight_at_stop"] >= 8, counts           # 12 clients, batches of 4 take 300 ms
    assert counts["lost"] == 0, (counts, res.errors)
    assert counts["answered"] + counts["refused_at_stop"] == counts["in_flight_at_stop"]
    assert counts["answered"] >= 4, counts
    # refused once the signal has landed (a request sent in the first moments of
    # the stop command, before SIGTERM, is still accepted and then answered)
    late = [r for r in res.records if r[0] > t_stop + 0.5]
    assert all(r[2] != "ok" for r in late), late
    assert exit_s < handle.exit_timeout_s, exit_s
    assert not handle.is_alive() and not pid_file.exists()
    assert ls.ports_in_use([handle.http_port, handle.grpc_port]) == []
    from dinov2_triton.serve.triton_access import ServerUnreachable

    with handle.connect("grpc") as conn, pytest.raises(ServerUnreachable):
        conn.infer("slow", [conn.tensor_input("pixel_values", x)])


@pytest.mark.parametrize("flag, seconds", [([], 30), (["--exit-timeout-secs", "12"], 12)])
def test_container_drains_with_the_same_exit_timeout(tmp_path, monkeypatch, capsys, flag, seconds):
    """The container's tritonserver gets --exit-timeout-secs (default 30, as the
    local server) and docker waits 10 s longer before SIGKILL: on run (its
    --stop-timeout) and on `serve stop` (docker stop without -t uses it)."""
    assert ls.DEFAULT_EXIT_TIMEOUT_S == 30
    repo = tmp_path / "model_repository"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text('name: "m"\nplatform: "onnxruntime_onnx"\n')
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", str(fake_docker.install(tmp_path / "bin", log, running=True)))
    assert serve_main(["container", "--repository", str(repo), "--name", "drain-test",
                       "--api-key-file", str(tmp_path / "key"), *flag]) == 0
    (run,) = fake_docker.subcommand(log, "run")
    assert f"--exit-timeout-secs={seconds}" in run
    assert run[run.index("--stop-timeout") + 1] == str(seconds + 10)
    assert run[run.index("--name") + 1] == "drain-test"
    capsys.readouterr()
    assert serve_main(["stop", "--name", "drain-test", "--pid-file", str(tmp_path / "none.pid"),
                       "--replica-file", str(tmp_path / "none.json")]) == 0
    assert fake_docker.subcommand(log, "stop") == [["stop", "drain-test"]]
    assert "stopped container drain-test" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        serve_main(["container", "--repository", str(repo), "--exit-timeout-secs", "soon"])
    assert bad.value.code == 2 and "--exit-timeout-secs: invalid int value: 'soon'" in capsys.readouterr().err
    assert serve_main(["container", "--repository", str(repo), "--exit-timeout-secs", "-1", "--dry-run"]) == 1
    assert "--exit-timeout-secs -1: a whole number of seconds >= 0" in capsys.readouterr().err
