"""The HTTP gateway in this process: uvicorn on a socket bound to a free port, on its own thread.

Coverage sees the gateway's code, and tests talk to it with a plain ``httpx.Client``, as any HTTP
client would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from inferline.common.settings import Settings
from inferline.services.gateway.server import build_server


class RunningGateway:
    def __init__(self, settings: Settings, controller_target: str, wrap: Callable[[Any], Any] | None = None):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.settings = dataclasses.replace(
            settings, controller_target=controller_target, gateway_port=self.port, host="127.0.0.1"
        )
        self.server: uvicorn.Server = build_server(self.settings)
        if wrap is not None:  # e.g. an Ingress's path rewrite in front of the app
            self.server.config.app = wrap(self.server.config.app)
        # uvicorn installs no signal handlers off the main thread; stop() asks it to exit.
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.socket])),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start; its log above says why")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.socket.close()


def ingress_at(prefix: str) -> Callable[[Any], Any]:
    """What an Ingress with a rewrite does in front of the gateway: serves it at ``prefix``,
    strips the prefix from the path and says so in ``X-Forwarded-Prefix``; anything else is 404."""

    def wrap(app: Any) -> Any:
        async def ingress(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope["path"]
            if path != prefix and not path.startswith(prefix + "/"):
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b"not under the ingress's prefix"})
                return
            inner = path[len(prefix):] or "/"
            headers = [*scope["headers"], (b"x-forwarded-prefix", prefix.encode())]
            await app({**scope, "path": inner, "raw_path": inner.encode(), "headers": headers}, receive, send)

        return ingress

    return wrap
