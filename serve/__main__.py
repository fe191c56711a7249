"""Local Triton server on CPU: ``python -m serve start|stop|status``.

  python -m serve start --repository ./model_repository \\
      --http-port 8000 --grpc-port 8001 --metrics-port 8002 \\
      [--models a,b] [--log-file logs/triton.log] [--pid-file logs/triton.pid]
  python -m serve status [--json]
  python -m serve stop

``start`` returns once the server is ready and leaves it running in the
background (``--foreground`` keeps it attached; Ctrl-C stops it). Ports
default to $HTTP_PORT / $GRPC_PORT / $METRICS_PORT, then 8000/8001/8002.
The model-repository API (load/unload/index) needs the header
``triton-api-key: <key>`` (gRPC metadata ``triton-grpc-protocol-triton-api-key``);
the key is in the file printed at start (mode 0600).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_LOG = "logs/triton.log"
DEFAULT_PID = "logs/triton.pid"


def _port(env: str, default: int) -> int:
    value = os.environ.get(env)
    return int(value) if value else default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start the local server and wait until it is ready")
    start.add_argument("--repository", default="model_repository",
                       help="Triton model repository (default: %(default)s)")
    start.add_argument("--http-port", type=int, default=_port("HTTP_PORT", 8000))
    start.add_argument("--grpc-port", type=int, default=_port("GRPC_PORT", 8001))
    start.add_argument("--metrics-port", type=int, default=_port("METRICS_PORT", 8002))
    start.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s; 0.0.0.0 for all)")
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

    stop = sub.add_parser("stop", help="stop the server recorded in the pid file")
    stop.add_argument("--pid-file", default=DEFAULT_PID, help="default: %(default)s")
    stop.add_argument("--timeout", type=float, default=30.0,
                      help="seconds before SIGKILL (default: %(default)s)")

    status = sub.add_parser("status", help="is it running, ready, which models")
    status.add_argument("--pid-file", default=DEFAULT_PID, help="default: %(default)s")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def cmd_start(args) -> int:
    from serve import local_server as ls
    from serve.triton_access import API_KEY_HEADER, GRPC_API_KEY_HEADER

    running = ls.handle_from_pid_file(args.pid_file)
    if running is not None:
        print(f"error: a server started with {args.pid_file} is already running (pid "
              f"{running.pid}, http {running.url_http}); stop it first: python -m serve stop",
              file=sys.stderr)
        return 1
    models = "*" if args.models.strip() == "*" else [m for m in args.models.split(",") if m]
    try:
        handle = ls.start_server(
            args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, host=args.host, load_models=models,
            log_file=args.log_file, api_key_file=args.api_key_file, pid_file=args.pid_file)
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
          f"  stop    python -m serve stop --pid-file {args.pid_file}")
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
    from serve import local_server as ls

    record = ls.read_pid_file(args.pid_file)
    if ls.stop_server(args.pid_file, timeout=args.timeout):
        print(f"stopped tritonserver (pid {record['pid']})")
    else:
        print(f"no server running (pid file {args.pid_file})")
    return 0


def cmd_status(args) -> int:
    from serve import local_server as ls

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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s")
    args = build_parser().parse_args(argv)
    return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
