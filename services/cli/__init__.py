"""The ``inferline`` command: run the stack, run one stage, and call the public API.

One module per job, each adding its subcommands (``add_commands``) with their handlers:
``serve`` (serve, up, profile), ``predict`` (detect, classify, embed, models), ``bench``,
``export``, ``fetch-models``, ``demo`` and ``triton-repository``. This module assembles the
parser and turns failures into exit codes:
1 for a failed command or call (a call's error names its gRPC status, as the client raised it),
2 when only some images or texts failed (each is listed on stderr).
"""

from __future__ import annotations

import argparse

import grpc

from inferline.common.errors import InferlineError
from inferline.common.status import status_for
from inferline.services.cli import bench, demo, export, fetch_models, predict, serve, shared, triton

COMMANDS = (serve, predict, bench, export, fetch_models, demo, triton)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except InferlineError as exc:
        if isinstance(exc.__cause__, grpc.RpcError):  # a call failed: say with which status
            code, message = status_for(exc)
            return shared.fail(f"{code.name}: {message}")
        return shared.fail(str(exc))
    except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
        return shared.fail(str(exc))
