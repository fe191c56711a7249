"""``dinov2-triton serve``: the local Triton server, replicas, rollouts, the NVIDIA container, Kubernetes.

  dinov2-triton serve start [--repository ./model_repository] [--models a,b] \\
      [--http-port 8000 --grpc-port 8001 --metrics-port 8002] [--replicas N]
  dinov2-triton serve status [--json]
  dinov2-triton serve stop                       the local server, its replicas and the container
  dinov2-triton serve reload MODEL [MODEL...]    serve the newest version folder (zero downtime)
  dinov2-triton serve rollback MODEL [--version N]   serve the previous version kept on disk
  dinov2-triton serve container [--models a,b]   GPU host: the pinned NVIDIA Triton container
  dinov2-triton serve kubernetes --image REGISTRY/dinov2-triton-serve --out DIR

``start`` runs the real tritonserver on this machine's CPU (stand-in
backends), returns once it is ready and leaves it running (``--foreground``
keeps it attached). ``container`` runs the pinned NVIDIA Triton container in
the foreground (Ctrl-C stops it). Ports default to $HTTP_PORT / $GRPC_PORT /
$METRICS_PORT, then 8000/8001/8002. The model-repository API (load/unload/
index) needs the header ``triton-api-key: <key>`` (gRPC metadata
``triton-grpc-protocol-triton-api-key``); the key is in the file printed at
start (mode 0600).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_LOG = "logs/triton.log"
DEFAULT_PID = "logs/triton.pid"
#: = dinov2_triton.serve.replica_record.DEFAULT_REPLICA_FILE (repeated: --help stays a light import)
DEFAULT_REPLICA_FILE = "logs/triton-replicas.json"


PROG = "dinov2-triton serve"


def _port(env: str, default: int) -> int:
    value = os.environ.get(env)
    if not value:
        return default
    if not value.isdigit():
        raise SystemExit(f"error: ${env}={value!r} is not a port number (unset it or give --{env.split('_')[0].lower()}"
                         f"-port)")
    return int(value)


def _server_flags(cmd: argparse.ArgumentParser, exit_timeout_s: int) -> None:
    """The flags ``start`` and ``container`` share."""
    cmd.add_argument("--repository", default="model_repository",
                     help="Triton model repository (default: %(default)s)")
    cmd.add_argument("--http-port", type=int, default=_port("HTTP_PORT", 8000), help="default: $HTTP_PORT or 8000")
    cmd.add_argument("--grpc-port", type=int, default=_port("GRPC_PORT", 8001), help="default: $GRPC_PORT or 8001")
    cmd.add_argument("--metrics-port", type=int, default=_port("METRICS_PORT", 8002),
                     help="default: $METRICS_PORT or 8002")
    cmd.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    cmd.add_argument("--exit-timeout-secs", type=int, default=exit_timeout_s,
                     help="on stop (SIGTERM) the server refuses new requests and answers the ones "
                          "it holds for up to this long (tritonserver --exit-timeout-secs; "
                          "default: %(default)s, as Triton's)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from dinov2_triton.serve.container import DEFAULT_API_KEY_FILE, DEFAULT_NAME, IMAGE_NAME
    from dinov2_triton.serve.local_server import DEFAULT_EXIT_TIMEOUT_S
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="start the local server (CPU) and wait until it is ready")
    _server_flags(start, DEFAULT_EXIT_TIMEOUT_S)
    start.add_argument("--models", default="*",
                       help="comma-separated models to load, or * for every model that can run "
                            "on this machine (default)")
    start.add_argument("--log-file", default=DEFAULT_LOG, help="default: %(default)s")
    start.add_argument("--pid-file", default=DEFAULT_PID, help="default: %(default)s")
    start.add_argument("--api-key-file", default=None,
                       help="where the API key is written, mode 0600 (default: the log file "
                            "with suffix .api_key); an existing key there is not reused")
    start.add_argument("--timeout", type=float, default=180.0,
                       help="seconds to wait for readiness (default: %(default)s)")
    start.add_argument("--require-all", action="store_true",
                       help="fail (and stop the server) if any selected model fails to load")
    start.add_argument("--foreground", action="store_true",
                       help="stay attached until the server exits or Ctrl-C")
    start.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="start N servers (each on its own share of the CPUs and its own loopback "
                            "ports) behind an HAProxy load balancer that takes --http-port/--grpc-port "
                            "(--metrics-port: the balancer's /metrics and /stats); recorded in "
                            "--replica-file")
    start.add_argument("--replica-file", default=DEFAULT_REPLICA_FILE, help="default: %(default)s")

    stop = sub.add_parser("stop", help="stop the local server, its replica set and the container, whichever run")
    stop.add_argument("--pid-file", default=DEFAULT_PID, help="default: %(default)s")
    stop.add_argument("--timeout", type=float, default=None,
                      help="seconds to wait for the server to drain and exit before SIGKILL "
                           "(default: the exit timeout it was started with + 10 s)")
    stop.add_argument("--replica-file", default=DEFAULT_REPLICA_FILE,
                      help="the replica set to stop too, if one runs (default: %(default)s)")
    stop.add_argument("--name", default=DEFAULT_NAME,
                      help="the container of `serve container` to stop too, if it runs (default: %(default)s)")

    box = sub.add_parser("container", help="GPU host: serve the repository with the pinned NVIDIA Triton "
                                           "container (docker, NVIDIA Container Toolkit); foreground")
    _server_flags(box, DEFAULT_EXIT_TIMEOUT_S)
    box.add_argument("--models", default="*",
                     help="comma-separated models to load, or * for every model of the repository (default)")
    box.add_argument("--name", default=DEFAULT_NAME, help="container name (default: %(default)s)")
    box.add_argument("--api-key-file", default=DEFAULT_API_KEY_FILE,
                     help="where the new API key is written, mode 0600 (default: %(default)s)")
    what = box.add_mutually_exclusive_group()
    what.add_argument("--build-only", action="store_true",
                      help=f"only build the image ({IMAGE_NAME}:<pinned tag>; push it for `serve kubernetes`)")
    what.add_argument("--dry-run", action="store_true",
                      help="print the docker commands (API key elided) and run nothing; needs no docker")

    kube = sub.add_parser("kubernetes", help="write Kustomize overlays for this repository "
                          "(models, image tag, memory) over the packaged manifests")
    kube.add_argument("--repository", default="model_repository", help="default: %(default)s")
    kube.add_argument("--image", required=True,
                      help=f"registry/name of the image `serve container --build-only` builds ({IMAGE_NAME}, "
                           f"pushed to your registry; the tag is the pinned TRITON_CONTAINER_TAG)")
    kube.add_argument("--out", required=True, help="folder for kustomization.yaml and kserve/")
    kube.add_argument("--hardware", choices=("gpu", "cpu"), default="gpu", help="default: %(default)s")
    where = kube.add_mutually_exclusive_group()
    where.add_argument("--storage-uri", default=None, help="s3://, gs:// or as:// folder of the repository")
    where.add_argument("--volume", action="store_true",
                       help="read the repository from the read-only PVC dinov2-triton-models instead")
    kube.add_argument("--memory", default=None, help="memory request = limit, e.g. 6Gi (default: estimated "
                                                      "from the model files)")
    kube.add_argument("--queue-target-us", type=int, default=None,
                      help="HPA target: average queue time per request in microseconds (default: the "
                           "hardware component's)")
    kube.add_argument("--render", action="store_true", help="also print the rendered manifests")

    for name, text in (("reload", "load MODEL again: its newest version folder takes the traffic, "
                                  "with no failed request"),
                       ("rollback", "serve the previous version of MODEL kept on disk (a config "
                                    "override; the next reload returns to the newest)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("models", nargs="+" if name == "reload" else 1, metavar="MODEL")
        if name == "rollback":
            cmd.add_argument("--version", type=int, default=None,
                             help="version to serve (default: the newest on disk below the served one)")
        cmd.add_argument("--url", default=None,
                         help="server host:port (default: the local server of --pid-file)")
        cmd.add_argument("--protocol", choices=("http", "grpc"), default="http")
        cmd.add_argument("--api-key-file", default=None,
                         help="the server's API key (default: the local server's, or $TRITON_API_KEY)")
        cmd.add_argument("--repository", default=None,
                         help="the repository folder the server reads (default: the local server's); "
                              "used to find and check version folders")
        cmd.add_argument("--pid-file", default=DEFAULT_PID, help="default: %(default)s")

    status = sub.add_parser("status", help="is it running, ready, which models")
    status.add_argument("--pid-file", default=DEFAULT_PID, help="default: %(default)s")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--replica-file", default=DEFAULT_REPLICA_FILE,
                        help="the replica set to report, if one runs (default: %(default)s)")
    return parser


def cmd_start(args) -> int:
    from dinov2_triton.serve import local_server as ls
    from dinov2_triton.serve.triton_access import API_KEY_HEADER, GRPC_API_KEY_HEADER

    if args.replicas is not None:
        return cmd_start_replicas(args)
    running = ls.handle_from_pid_file(args.pid_file)
    if running is not None:
        print(f"error: a server started with {args.pid_file} is already running (pid "
              f"{running.pid}, http {running.url_http}); stop it first: {args.prog} stop",
              file=sys.stderr)
        return 1
    models = "*" if args.models.strip() == "*" else [m for m in args.models.split(",") if m]
    try:
        handle = ls.start_server(
            args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, host=args.host, load_models=models,
            log_file=args.log_file, api_key_file=args.api_key_file, pid_file=args.pid_file,
            exit_timeout_s=args.exit_timeout_secs)
    except (ls.ServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        states = handle.wait_ready(timeout=args.timeout)
    except ls.ServeError as exc:
        handle.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = {m: s for m, s in states.items() if s != "READY"}
    print(f"tritonserver {handle.server_metadata().get('version', '?')} ready (pid {handle.pid})")
    print(f"  http    {handle.url_http}\n  grpc    {handle.url_grpc}\n"
          f"  metrics {handle.url_metrics}")
    for name, state in states.items():
        print(f"  model {name}: {state.splitlines()[0] if state else state}")
    for name, why in handle.plan.skipped.items():
        print(f"  model {name}: not loaded: {why}")
    print(f"  log     {handle.log_file}\n"
          f"  api key {handle.api_key_file} (HTTP header {API_KEY_HEADER}, gRPC metadata "
          f"{GRPC_API_KEY_HEADER})\n"
          f"  stop    {args.prog} stop --pid-file {args.pid_file}")
    if failed and args.require_all:
        handle.stop()
        print(f"error: model(s) failed to load: {', '.join(failed)}; server stopped "
              f"(details in {handle.log_file})", file=sys.stderr)
        return 3
    if args.foreground:
        try:
            handle.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            handle.stop()
    return 0


def cmd_stop(args) -> int:
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.serve import local_server as ls
    from dinov2_triton.serve import replicas

    record = ls.read_pid_file(args.pid_file)
    if ls.stop_server(args.pid_file, timeout=args.timeout):
        print(f"stopped tritonserver (pid {record['pid']})")
    else:
        print(f"no server running (pid file {args.pid_file})")
    try:
        if replicas.stop_replica_set(args.replica_file, timeout=args.timeout):
            print(f"stopped the replica set of {args.replica_file} (balancer and every replica)")
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from dinov2_triton.serve.container import stop_container

    if stop_container(args.name, timeout=args.timeout):
        print(f"stopped container {args.name}")
    return 0


def cmd_status(args) -> int:
    from dinov2_triton.serve import local_server as ls
    from dinov2_triton.serve.replica_record import read_replica_set

    if read_replica_set(args.replica_file) is not None and ls.read_pid_file(args.pid_file) is None:
        return cmd_status_replicas(args)
    status = ls.server_status(args.pid_file)
    if args.json:
        print(json.dumps(status, indent=2))
    elif not status["running"]:
        print(f"not running (pid file {args.pid_file})")
    else:
        print(f"tritonserver {status.get('version') or '?'} pid {status['pid']}: "
              f"{'ready' if status['ready'] else 'NOT ready'}")
        print(f"  http {status['http']}  grpc {status['grpc']}  metrics {status['metrics']}")
        models = status.get("models", {})
        for name, state in (models.items() if isinstance(models, dict) else []):
            print(f"  model {name}: {state.splitlines()[0] if state else state}")
        print(f"  log {status['log_file']}")
    return 0 if status["running"] and status.get("ready") else 1


def cmd_start_replicas(args) -> int:
    from dinov2_triton.serve import replicas
    from dinov2_triton.serve.errors import ServeError
    from dinov2_triton.serve.triton_access import API_KEY_HEADER

    models = "*" if args.models.strip() == "*" else [m for m in args.models.split(",") if m]
    try:
        rs = replicas.start_replica_set(
            args.repository, args.replicas, host=args.host, http_port=args.http_port,
            grpc_port=args.grpc_port, metrics_port=args.metrics_port, models=models,
            log_dir=os.path.dirname(os.path.abspath(args.log_file)), record_file=args.replica_file,
            api_key_file=args.api_key_file, timeout=args.timeout, exit_timeout_s=args.exit_timeout_secs)
    except (ServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.replicas} replica(s) behind haproxy (pid {rs.balancer.pid}), in rotation: "
          f"{', '.join(rs.balancer.in_rotation())}")
    print(f"  http    {rs.url_http}\n  grpc    {rs.url_grpc}\n  stats   {rs.url_stats} "
          f"(balancer /metrics on the same port)")
    for i, h in enumerate(rs.replicas):
        print(f"  {rs.name(i)}      pid {h.pid}, cpus {','.join(map(str, rs.shares[i]))}, http {h.url_http}, "
              f"grpc {h.url_grpc}, metrics {h.url_metrics}")
    for name in rs.models:
        print(f"  model {name}: READY")
    for name, why in {**rs.failed, **rs.plan.skipped}.items():
        print(f"  model {name}: not loaded: {why}")
    print(f"  logs    {rs.log_dir}\n  api key {rs.api_key_file} (HTTP header {API_KEY_HEADER}; the "
          f"repository API through the balancer reaches one replica)\n"
          f"  stop    {args.prog} stop --replica-file {args.replica_file}")
    if rs.failed and args.require_all:
        rs.stop()
        print(f"error: model(s) failed to load: {', '.join(rs.failed)}; stopped", file=sys.stderr)
        return 3
    if args.foreground:
        try:
            rs.balancer.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            rs.stop()
    return 0


def cmd_status_replicas(args) -> int:
    from dinov2_triton.serve import replicas

    status = replicas.replica_set_status(args.replica_file)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if status.get("ready") else 1
    if not status["running"]:
        print(f"replica set of {args.replica_file}: balancer not running")
        return 1
    print(f"replica set ({args.replica_file}): balancer pid {status['balancer_pid']}, "
          f"{'ready' if status['ready'] else 'NOT ready (no replica in rotation)'}")
    print(f"  http {status['http']}  grpc {status['grpc']}  stats {status['stats']}")
    for r in status["replicas"]:
        print(f"  {r['name']}: {'running' if r['running'] else 'NOT running'}, "
              f"{'ready' if r['ready'] else 'not ready'}, balancer {r['balancer_state']}, cpus "
              f"{','.join(map(str, r['cpus']))} ({r['threads']} thread(s)), http {r['http']}, grpc {r['grpc']}")
    print(f"  models {', '.join(status['models'])}; balancer log {status['balancer_log']}")
    return 0 if status["ready"] else 1


def cmd_container(args) -> int:
    import secrets

    from dinov2_triton.core.release_pin import PinError
    from dinov2_triton.serve import container as box
    from dinov2_triton.serve.local_server import write_api_key

    models = None if args.models.strip() == "*" else [m.strip() for m in args.models.split(",") if m.strip()]
    key = "<api-key>" if args.dry_run else secrets.token_urlsafe(32)
    try:
        launch = box.plan_container(args.repository, api_key=key, models=models, host=args.host,
                                    http_port=args.http_port, grpc_port=args.grpc_port,
                                    metrics_port=args.metrics_port, exit_timeout_s=args.exit_timeout_secs,
                                    name=args.name)
        if args.dry_run:
            import shlex

            print(shlex.join(launch.build_argv))
            print(shlex.join(launch.run_argv))
            return 0
        box.check_host(image=launch.pin.triton_image)
        print(f"building {launch.image} from {launch.pin.triton_image} (+ {box.PILLOW_REQUIREMENT})", flush=True)
        box.build_image(launch)
        if args.build_only:
            print(f"built {launch.image}; for Kubernetes: docker tag {launch.image} REGISTRY/{box.IMAGE_NAME}:"
                  f"{launch.pin.container_tag} && docker push it, then {args.prog} kubernetes --image "
                  f"REGISTRY/{box.IMAGE_NAME} ...")
            return 0
        write_api_key(args.api_key_file, key)
    except (box.ContainerError, PinError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in box.describe(launch, args.api_key_file):
        print(f"  {line}")
    print(f"  stop    Ctrl-C, or {args.prog} stop --name {launch.name}", flush=True)
    return box.run_container(launch)


def cmd_kubernetes(args) -> int:
    from dinov2_triton.core.release_pin import PinError
    from dinov2_triton.serve import kubernetes as k8s
    from dinov2_triton.serve.errors import ServeError

    try:
        info = k8s.write_kubernetes(args.repository, image=args.image, out=args.out, hardware=args.hardware,
                                    storage_uri=args.storage_uri, volume=args.volume, memory=args.memory,
                                    queue_target_us=args.queue_target_us)
        docs = k8s.render(args.out) if args.render else None
    except (ServeError, PinError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{info['hardware']}: {len(info['models'])} model(s) {', '.join(info['models'])}; image {info['image']}; "
          f"memory {info['memory']}")
    for name, why in info["skipped"].items():
        print(f"  not loaded: {name}: {why}")
    for path in info["files"]:
        print(f"  wrote {path}")
    print(f"  render: kubectl kustomize {args.out}   apply: kubectl apply -k {args.out}")
    if docs is not None:
        import yaml

        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


def cmd_rollout(args) -> int:
    from dinov2_triton.serve import rollout
    from dinov2_triton.serve.triton_access import TritonError, connect

    try:
        target = rollout.resolve_target(url=args.url, protocol=args.protocol, api_key_file=args.api_key_file,
                                        pid_file=args.pid_file, repository=args.repository)
        with connect(target.url, target.protocol, api_key=target.api_key, timeout_s=300.0) as conn:
            conn.check_live()
            for model in args.models:
                if args.command == "reload":
                    done = rollout.reload_model(conn, model, repository=target.repository)
                else:
                    done = rollout.rollback_model(conn, model, repository=target.repository,
                                                  version=args.version)
                print(done.describe())
    except (rollout.RolloutError, TritonError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv=None, *, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s")
    args = build_parser(prog or PROG).parse_args(argv)
    args.prog = prog or PROG
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "container": cmd_container,
            "kubernetes": cmd_kubernetes, "reload": cmd_rollout, "rollback": cmd_rollout}[args.command](args)
