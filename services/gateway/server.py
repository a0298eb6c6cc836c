"""Running the gateway: uvicorn on the configured port, or on a socket a test bound already."""

from __future__ import annotations

import logging
import signal
import socket

import uvicorn

from inferline.common.settings import Settings
from inferline.services.gateway.app import create_app

log = logging.getLogger(__name__)


def build_server(settings: Settings) -> uvicorn.Server:
    """uvicorn with our logging (not its own) and the stages' grace period for draining on SIGTERM."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,  # RequestContext logs each request once, with its request id
        timeout_graceful_shutdown=int(settings.grace_period_s),
        server_header=False,
    )
    return uvicorn.Server(config)


async def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Until SIGTERM/SIGINT (uvicorn's handlers), then drain the open requests."""
    server = build_server(settings)
    # Once drained, uvicorn re-raises the signal that stopped it; with a handler that does nothing
    # the process then exits 0, as the gRPC stages do, instead of dying by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    log.info(
        "gateway listening on %s:%d, controller at %s", settings.host, settings.gateway_port, settings.controller_target
    )
    await server.serve(sockets=sockets)
