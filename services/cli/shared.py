"""What the commands share: the controller's address and deadline options, the client they
make from them, where output goes, and the exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from inferline.common.settings import Settings
from inferline.services.client import Client
from inferline.services.presentation.documents import error_dict

EXIT_FAILED = 1
EXIT_SOME_ITEMS_FAILED = 2


def add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=Settings().controller_target, help="controller address")


def add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per request, seconds")


def labels(raw: str) -> list[str]:
    """``--labels "a car, a dog"`` -> ["a car", "a dog"]."""
    found = [part.strip() for part in raw.split(",") if part.strip()]
    if not found:
        raise argparse.ArgumentTypeError("give at least one label")
    return found


def client(args: argparse.Namespace) -> Client:
    """A client of ``--target``, over TLS when INFERLINE_TLS_CA_FILE (and a client certificate,
    for mutual TLS) are set, as the services' own channels are."""
    return Client(args.target, Settings.from_env(), timeout=getattr(args, "timeout", None))


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED


def write(text: str, out: Path | None) -> None:
    """To ``out``, or to stdout (ending in a newline) without one."""
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def report_failures(items: Iterable[tuple[str, Exception | None]]) -> int:
    """Each failed item on stderr; the exit code says whether any failed."""
    failed = [(name, error_dict(error)) for name, error in items if error is not None]
    for name, shown in failed:
        assert shown is not None
        print(f"error: {name}: {shown['code']}: {shown['message']}", file=sys.stderr)
    return EXIT_SOME_ITEMS_FAILED if failed else 0
