"""What the commands share: the controller's address and deadline options, the client they
make from them, where output goes, and the exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings
from inferline.services.client import Client
from inferline.services.presentation.documents import error_dict

EXIT_FAILED = 1
EXIT_SOME_ITEMS_FAILED = 2
_DEFAULT_TARGET = next(f.default for f in dataclasses.fields(Settings) if f.name == "controller_target")


def add_target(parser: argparse.ArgumentParser) -> None:
    """``--target`` and the TLS files of the channel to it. Their defaults are read when the
    command runs (``settings``), not when the parser is built."""
    parser.add_argument(
        "--target",
        help="controller address (default: INFERLINE_CONTROLLER_TARGET, else localhost:INFERLINE_CONTROLLER_PORT)",
    )
    parser.add_argument("--tls-ca", type=Path, help="CA the controller's certificate must chain to (TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, with --tls-key (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="client key, with --tls-cert (mutual TLS)")


def add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per request, seconds")


def labels(raw: str) -> list[str]:
    """``--labels "a car, a dog"`` -> ["a car", "a dog"]."""
    found = [part.strip() for part in raw.split(",") if part.strip()]
    if not found:
        raise argparse.ArgumentTypeError("give at least one label")
    return found


def target(args: argparse.Namespace, settings: Settings) -> str:
    """``--target``, else INFERLINE_CONTROLLER_TARGET when set, else this host's controller on
    INFERLINE_CONTROLLER_PORT (the port ``inferline up`` and ``serve controller`` listen on)."""
    if getattr(args, "target", None):
        return str(args.target)
    if settings.controller_target != _DEFAULT_TARGET:
        return settings.controller_target
    return f"localhost:{settings.controller_port}"


def settings(args: argparse.Namespace) -> Settings:
    """The environment's settings with the command's TLS flags over them."""
    found = Settings.from_env()
    flags = {"tls_ca_file": "tls_ca", "tls_cert_file": "tls_cert", "tls_key_file": "tls_key"}
    given = {name: getattr(args, flag) for name, flag in flags.items() if getattr(args, flag, None) is not None}
    for name, path in given.items():
        if not path.is_file():
            raise ConfigError(f"--{flags[name].replace('_', '-')} {path}: no such file")
    return dataclasses.replace(found, **given) if given else found


def client(args: argparse.Namespace) -> Client:
    """A client of the command's target, over TLS when ``--tls-ca`` or INFERLINE_TLS_CA_FILE is
    given (mutual TLS with a client certificate and key too), as the services' own channels are."""
    resolved = settings(args)
    return Client(target(args, resolved), resolved, timeout=getattr(args, "timeout", None))


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
