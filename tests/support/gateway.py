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

import uvicorn

from inferline.common.settings import Settings
from inferline.services.gateway.server import build_server


class RunningGateway:
    def __init__(self, settings: Settings, controller_target: str):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.settings = dataclasses.replace(
            settings, controller_target=controller_target, gateway_port=self.port, host="127.0.0.1"
        )
        self.server: uvicorn.Server = build_server(self.settings)
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
