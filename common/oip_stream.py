"""OIP's ``ModelStreamInfer`` for any server: each request of a stream answered on its own.

As Triton does, the requests of one stream run concurrently and each is answered as soon as it
is done, so a client matches answers by ``id``: requests streamed to the inference stage reach
its dynamic batcher together, which is what streaming is for. A failed request is answered by
its ``error_message`` (the status table's text: no interceptor sees a stream's messages) and the
stream goes on; when the caller leaves, its unfinished requests are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from inferline.common.generated import grpc_service_pb2
from inferline.common.status import status_for

log = logging.getLogger(__name__)

Infer = Callable[[grpc_service_pb2.ModelInferRequest], Awaitable[grpc_service_pb2.ModelInferResponse]]


async def stream_infer(
    requests: AsyncIterator[grpc_service_pb2.ModelInferRequest], infer: Infer
) -> AsyncIterator[grpc_service_pb2.ModelStreamInferResponse]:
    answers: asyncio.Queue[grpc_service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()

    async def answer(request: grpc_service_pb2.ModelInferRequest) -> None:
        try:
            response = grpc_service_pb2.ModelStreamInferResponse(infer_response=await infer(request))
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("ModelStreamInfer request failed")
            response = grpc_service_pb2.ModelStreamInferResponse(
                error_message=message,
                infer_response=grpc_service_pb2.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )
        await answers.put(response)

    async def read() -> None:
        jobs: list[asyncio.Future[None]] = []
        try:
            async for request in requests:
                jobs.append(asyncio.ensure_future(answer(request)))
            await asyncio.gather(*jobs)
        finally:  # the caller went away (or the stream ended): nothing more to answer
            for job in jobs:
                job.cancel()
            answers.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (response := await answers.get()) is not None:
            yield response
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
