"""The ``inferline`` command: run the stack, run one stage, and call the public API.

One module per job, each adding its subcommands (``add_commands``) with their handlers:
``serve`` (serve, up, profile), ``detect``, ``predict`` (classify, embed, models), ``evaluate``
(eval), ``bench``, ``export``, ``fetch-models``, ``demo`` and ``triton-repository``. This module assembles the
parser, accepts ultralytics-style ``key=value`` arguments beside flags, and turns failures into
exit codes: 1 for a failed command or call (a call's error names its gRPC status, as the client
raised it; never a traceback), 2 when only some images or texts failed (each is listed on stderr).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from inferline.common.errors import InferlineError, StageUnavailable
from inferline.common.status import status_for
from inferline.services.cli import (
    bench,
    demo,
    detect,
    evaluate,
    export,
    fetch_models,
    keyvalue,
    predict,
    serve,
    shared,
    sources,
    triton,
)

COMMANDS = (serve, detect, predict, evaluate, bench, export, fetch_models, demo, triton)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(keyvalue.as_flags(parser, sys.argv[1:] if argv is None else argv))
    try:
        return int(args.handler(args) or 0)
    except InferlineError as exc:
        if isinstance(exc.__cause__, grpc.RpcError):  # a call failed: say with which status
            code, message = status_for(exc)
            if isinstance(exc, StageUnavailable) and _unreachable(message):
                message = (
                    f"cannot reach the controller at {shared.target(args, shared.settings(args))} ({message}); "
                    "start the stack with `inferline up`, or pass --target or set INFERLINE_CONTROLLER_PORT"
                )
            return shared.fail(f"{code.name}: {message}")
        return shared.fail(str(exc))
    except (FileNotFoundError, RuntimeError, TimeoutError, sources.SourceError) as exc:
        return shared.fail(str(exc))


def _unreachable(details: str) -> bool:
    """Whether an UNAVAILABLE came from the channel (nothing listening, no such host, a TLS
    handshake refused) rather than from a controller whose stage is down."""
    lowered = details.lower()
    return any(sign in lowered for sign in ("failed to connect", "connection refused", "dns resolution", "handshake"))
