"""gRPC transport of the preprocess stage."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np

from inferline.common import tensors
from inferline.common.errors import InvalidInput
from inferline.common.generated import preprocess_pb2, preprocess_pb2_grpc, types_pb2
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.status import OK, item_status
from inferline.common.transform import ImageTransform
from inferline.common.images import decode_image
from inferline.services.preprocess.recipes import load_families, PREPROCESSORS, Preprocessor


def preprocess_one(data: bytes, preprocessor: Preprocessor, recipe: Recipe, max_pixels: int) -> tuple[np.ndarray, ImageTransform]:
    return preprocessor(decode_image(data, max_pixels=max_pixels), recipe.params)


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, settings: Settings, pool: ThreadPoolExecutor):
        self.settings = settings
        # Decode and resize release the GIL inside OpenCV, so threads give real parallelism
        # across the images of a batch without blocking the event loop.
        self.pool = pool

    async def Preprocess(self, request, context):
        recipe = Recipe.from_proto(request.recipe)
        preprocessor = PREPROCESSORS.get(recipe.name, error=InvalidInput)
        if not request.images:
            raise InvalidInput("no images in the request")
        loop = asyncio.get_running_loop()
        work = partial(preprocess_one, preprocessor=preprocessor, recipe=recipe, max_pixels=self.settings.max_image_pixels)
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(self.pool, work, image.data) for image in request.images),
            return_exceptions=True,
        )
        response = preprocess_pb2.PreprocessResponse()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                response.images.add(status=item_status(outcome))
                continue
            array, transform = outcome
            response.images.add(
                tensor=tensors.to_proto(array, "images"),
                transform=types_pb2.ImageTransform(**dataclasses.asdict(transform)),
                status=OK,
            )
        return response


def build_service(settings: Settings) -> Service:
    load_families()
    pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="preprocess")
    servicer = PreprocessServicer(settings, pool)

    def register(server: grpc.aio.Server) -> list[str]:
        preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, server)
        return [preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name]

    async def close() -> None:
        pool.shutdown(wait=True)

    return Service("preprocess", register, close=close)
