"""``inferline serve | up | profile``: run one stage, run the whole stack, profile inference."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

from inferline.common.errors import InferlineError
from inferline.common.logs import configure_logging
from inferline.common.server import serve
from inferline.common.settings import CONTROLLER, GATEWAY, STAGES, Settings
from inferline.services.cli import shared
from inferline.services.stack import UP_ORDER, LocalStack, parse_replicas

log = logging.getLogger("inferline")

# prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve_cmd = commands.add_parser("serve", help="run one stage (or the HTTP gateway) in the foreground")
    serve_cmd.add_argument("stage", choices=(*STAGES, GATEWAY))
    serve_cmd.add_argument("--port", type=int, help="default: INFERLINE_<STAGE>_PORT")
    serve_cmd.add_argument(
        "--exit-with-parent", type=int, metavar="PID",
        help="stop (as on SIGTERM) when process PID, which started this one, exits even by SIGKILL "
             "(how `inferline up` starts its stages, so none outlives it holding its port; Linux)",
    )
    _add_inprocess(serve_cmd)
    serve_cmd.set_defaults(handler=cmd_serve)

    up = commands.add_parser(
        "up", help="run the four stages and the HTTP gateway as local processes until Ctrl-C, restarting any that exits"
    )
    _add_inprocess(up)
    up.add_argument(
        "--replicas", action="append", default=[], metavar="STAGE=N",
        help="run N copies of a stage on ports of their own, its callers spread over them "
             "(repeatable: --replicas inference=2 --replicas postprocess=2)",
    )
    up.set_defaults(handler=cmd_up)

    profile = commands.add_parser("profile", help="PyTorch profiler trace of the inference stage's next N batches")
    profile.add_argument("--batches", type=int, default=10, help="forward passes to capture")
    profile.add_argument("--model", default="", help="only this model's passes (default: the first to run)")
    profile.add_argument(
        "--metrics", help="the inference stage's metrics address (default: localhost:INFERLINE_INFERENCE_METRICS_PORT)"
    )
    profile.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the batches")
    profile.set_defaults(handler=cmd_profile)


def _add_inprocess(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inprocess", action="store_true",
        help="the controller runs the three stages' code in its own process, without gRPC between "
             "them (INFERLINE_INPROCESS=true): for measuring what the service boundaries cost",
    )


def _exit_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent exits; armed here, after exec, rather than in a
    preexec_fn, which is unsafe in a parent with threads. A parent already gone ends it now."""
    if sys.platform != "linux":
        return
    import ctypes  # noqa: PLC0415 - Linux only

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(f"the process that started this one ({parent}) has already exited")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.exit_with_parent is not None:
        _exit_with_parent(args.exit_with_parent)
    settings = Settings.from_env()
    if args.inprocess:
        if args.stage != CONTROLLER:
            return shared.fail("--inprocess is a mode of the controller (inferline serve controller --inprocess)")
        settings = dataclasses.replace(settings, inprocess=True)
    configure_logging(settings.log_level, args.stage, settings.log_format)
    if args.stage == GATEWAY:
        return serve_gateway(settings, args.port)
    port = args.port if args.port is not None else settings.port(args.stage)
    module = importlib.import_module(f"inferline.services.{args.stage}.servicer")

    async def run() -> None:
        await serve(module.build_service(settings), settings, port=port)

    try:
        asyncio.run(run())
    except InferlineError as exc:
        log.error("%s cannot start: %s", args.stage, exc)
        return shared.EXIT_FAILED
    return 0


def serve_gateway(settings: Settings, port: int | None) -> int:
    """`inferline serve gateway`: the HTTP gateway in front of the controller at INFERLINE_CONTROLLER_TARGET."""
    from inferline.services.gateway.server import serve as serve_http  # noqa: PLC0415 - FastAPI only where it is used

    if port is not None:
        settings = dataclasses.replace(settings, gateway_port=port)
    asyncio.run(serve_http(settings))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Arms the inference stage's profiler (docs/monitoring.md) and prints where the trace went."""
    address = args.metrics or f"localhost:{Settings.from_env().inference_metrics_port}"
    params = {"batches": args.batches, "timeout": args.timeout, **({"model": args.model} if args.model else {})}
    query = urllib.parse.urlencode(params)
    request = urllib.request.Request(f"http://{address}/debug/profile?{query}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout + 10) as reply:  # noqa: S310 - http:// built above
            print(reply.read().decode())
    except urllib.error.HTTPError as exc:
        return shared.fail(json.loads(exc.read()).get("error", exc.reason))
    except OSError as exc:
        return shared.fail(
            f"cannot reach the inference stage's metrics port at {address} ({exc}); pass --metrics HOST:PORT"
        )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """The stack, supervised: a process that exits is restarted (services/stack.py) until
    SIGTERM or Ctrl-C stops `inferline up` itself."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, "up")
    replicas = parse_replicas(args.replicas)
    # The gateway finds the controller where this stack puts it, unless told otherwise.
    env = {"INFERLINE_CONTROLLER_TARGET": f"localhost:{settings.controller_port}", **os.environ}
    if args.inprocess:  # one controller process holding the three stages, and the gateway
        if set(replicas) - {CONTROLLER}:
            return shared.fail("with --inprocess only the controller has replicas (--replicas controller=N)")
        env["INFERLINE_INPROCESS"] = "true"
        stack = LocalStack(settings, env=env, stages=(CONTROLLER, GATEWAY), replicas=replicas, supervise=True)
    else:
        stack = LocalStack(settings, env=env, stages=UP_ORDER, replicas=replicas, supervise=True)
    stopping = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stack.start()
    log.info(
        "inferline is up: controller at %s, gateway at http://localhost:%d (Ctrl-C stops it)",
        stack.controller_target, settings.gateway_port,
    )
    while not stopping.wait(0.5):  # the signal handler runs on this thread, between waits
        pass
    codes = stack.stop()
    log.info("stopped (%s)", ", ".join(f"{k}={v}" for k, v in codes.items()))
    return 0
