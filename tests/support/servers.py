"""In-process servers for tests: real grpc.aio servers on free ports, on a background loop.

Tests talk to them with ordinary synchronous stubs, so no test needs an event loop of its own
and a server outlives any single test when a fixture shares it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc

from inferline.common.server import ServerApp, Service
from inferline.common.settings import Settings


class LoopThread:
    """An event loop running on a daemon thread; ``run`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RunningServer:
    def __init__(self, loop: LoopThread, app: ServerApp):
        self.loop = loop
        self.app = app

    @property
    def address(self) -> str:
        return self.app.address

    def stop(self, grace: float = 0.5) -> None:
        self.loop.run(self.app.stop(grace))


def start_service(loop: LoopThread, build, settings: Settings) -> RunningServer:
    """``build(settings) -> Service`` is called on the loop, as in production."""

    async def start() -> ServerApp:
        service: Service = build(settings)
        app = ServerApp(service, settings, port=0, host="127.0.0.1")
        await app.start()
        return app

    return RunningServer(loop, loop.run(start()))


def start_stage(loop: LoopThread, stage: str, settings: Settings) -> RunningServer:
    module = importlib.import_module(f"inferline.services.{stage}.servicer")
    return start_service(loop, module.build_service, settings)


class InProcessStack:
    """The four stages in this process; the controller is pointed at the other three."""

    def __init__(self, settings: Settings):
        self.loop = LoopThread()
        self.servers: dict[str, RunningServer] = {}
        for stage in ("preprocess", "inference", "postprocess"):
            self.servers[stage] = start_stage(self.loop, stage, settings)
        self.settings = dataclasses.replace(
            settings, **{f"{s}_target": self.servers[s].address for s in ("preprocess", "inference", "postprocess")}
        )
        self.servers["controller"] = start_stage(self.loop, "controller", self.settings)

    @property
    def controller(self) -> str:
        return self.servers["controller"].address

    def close(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()
        self.loop.close()


@contextlib.contextmanager
def stage_channel(stage: str, settings: Settings) -> Iterator[grpc.Channel]:
    """One stage on its own loop and a channel to it, for the length of the block."""
    loop = LoopThread()
    server = start_stage(loop, stage, settings)
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield channel
    finally:
        server.stop()
        loop.close()
