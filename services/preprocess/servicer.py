"""gRPC transport of the preprocess stage: proto <-> ``Preprocessor`` (service.py), nothing else."""

from __future__ import annotations

import dataclasses

import grpc

from inferline.common import tensors
from inferline.common.errors import InvalidInput
from inferline.common.generated import preprocess_pb2, preprocess_pb2_grpc, types_pb2
from inferline.common.items import LazySequence
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.shm import ObjectMissing
from inferline.common.status import OK, item_status
from inferline.common.transform import Region
from inferline.services.preprocess.service import Preprocessor


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, service: Preprocessor):
        self.service = service

    async def Preprocess(self, request, context):  # noqa: N802 - gRPC's method name
        recipe = Recipe.from_proto(request.recipe)
        response = preprocess_pb2.PreprocessResponse()
        if request.texts:
            if request.images or request.regions:
                raise InvalidInput("a preprocess request carries images or texts, not both")
            for tokens in await self.service.texts(recipe, request.texts):
                if isinstance(tokens, BaseException):
                    response.texts.add(status=item_status(tokens))
                else:
                    response.texts.add(tensor=tensors.to_proto(tokens, "tokens"), status=OK)
            return response
        images = LazySequence(request.images, lambda image: image.data)
        regions = LazySequence(request.regions, _region)
        outcomes = await self.service.images(recipe, images, regions)
        arrays = [None if isinstance(o, BaseException) else o[0] for o in outcomes]
        placed: list[int | None] = [None] * len(outcomes)
        if request.HasField("output_shm"):
            room = request.output_shm
            try:
                placed = await self.service.place(room.key, room.offset, room.byte_size, arrays)
            except ObjectMissing as exc:
                response.shm_unavailable = str(exc)
        for outcome, offset in zip(outcomes, placed, strict=True):
            if isinstance(outcome, BaseException):
                response.images.add(status=item_status(outcome))
                continue
            array, transform = outcome[0], types_pb2.ImageTransform(**dataclasses.asdict(outcome[1]))
            if offset is None:
                response.images.add(tensor=tensors.to_proto(array, "images"), transform=transform, status=OK)
            else:
                tensor = tensors.to_proto(array[:0], "images")
                tensor.shape[:] = array.shape
                response.images.add(tensor=tensor, transform=transform, status=OK, in_shm=True, shm_offset=offset)
        return response


def _region(message: types_pb2.Region) -> Region:
    box = message.box
    return Region(message.image, (box.x1, box.y1, box.x2, box.y2))


def build_service(settings: Settings) -> Service:
    """The stage's server; ``.domain`` is its ``Preprocessor``, for callers in this process."""
    preprocessor = Preprocessor(settings)
    servicer = PreprocessServicer(preprocessor)

    def register(server: grpc.aio.Server) -> list[str]:
        preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, server)
        return [preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name]

    return Service("preprocess", register, close=preprocessor.close, servicer=servicer, domain=preprocessor)
