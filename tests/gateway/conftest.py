"""A gateway in front of the session's in-process stack, and one in front of nothing."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway import RunningGateway


@pytest.fixture(scope="session")
def gateway(stack) -> Iterator[RunningGateway]:
    running = RunningGateway(stack.settings, stack.controller)
    yield running
    running.stop()


@pytest.fixture()
def http(gateway: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=120) as client:
        yield client


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orphan_gateway(settings) -> Iterator[RunningGateway]:
    """A gateway whose controller is down: every call must answer 503, never hang or 500."""
    running = RunningGateway(settings, f"127.0.0.1:{closed_port()}")
    yield running
    running.stop()
