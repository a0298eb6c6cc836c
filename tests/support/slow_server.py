"""A server built on the common bootstrap whose one method takes a while: for drain tests.

``python -m tests.support.slow_server PORT``. The handler prints ``in-flight`` when a call
has started, so a test can send SIGTERM exactly while a call is running.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from inferline.common.server import Service, serve
from inferline.common.settings import Settings

SERVICE = "inferline.test.Slow"
METHOD = f"/{SERVICE}/Wait"
SECONDS = 1.5


async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    print("in-flight", flush=True)
    await asyncio.sleep(SECONDS)
    return b"done"


def register(server: grpc.aio.Server) -> list[str]:
    handler = grpc.unary_unary_rpc_method_handler(wait)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Wait": handler})])
    return [SERVICE]


if __name__ == "__main__":
    asyncio.run(serve(Service("slow", register), Settings(grace_period_s=10.0), port=int(sys.argv[1])))
