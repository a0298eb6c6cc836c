"""gRPC transport of the preprocess stage: proto <-> ``Preprocessor`` (service.py), nothing else."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import numpy as np

from inferline.common import tensors
from inferline.common.cuda_ipc import CudaUnavailable
from inferline.common.errors import InvalidInput
from inferline.common.generated import preprocess_pb2, preprocess_pb2_grpc, types_pb2
from inferline.common.items import LazySequence
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.shm import ObjectMissing
from inferline.common.status import OK, item_status
from inferline.common.transform import Region
from inferline.services.preprocess.device_outputs import CudaRoom
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
        to_device = request.HasField("output_cuda")
        outcomes = await self.service.images(recipe, images, regions, on_device=to_device)
        arrays = [None if isinstance(o, BaseException) else o[0] for o in outcomes]
        placed: list[int | None] = [None] * len(outcomes)
        in_cuda = False
        if to_device:
            cuda = request.output_cuda
            room = CudaRoom(cuda.region, cuda.raw_handle, cuda.device_id, cuda.region_byte_size, cuda.offset,
                            cuda.byte_size)
            try:
                placed = await self.service.place_on_device(room, arrays)
                in_cuda = True
            except CudaUnavailable as exc:
                response.cuda_unavailable = str(exc)
        if not in_cuda:
            arrays = [_host(array) for array in arrays]
        if not in_cuda and request.HasField("output_shm"):
            shm = request.output_shm
            try:
                placed = await self.service.place(shm.key, shm.offset, shm.byte_size, arrays)
            except ObjectMissing as exc:
                response.shm_unavailable = str(exc)
        for outcome, array, offset in zip(outcomes, arrays, placed, strict=True):
            if isinstance(outcome, BaseException):
                response.images.add(status=item_status(outcome))
                continue
            transform = types_pb2.ImageTransform(**dataclasses.asdict(outcome[1]))
            if offset is None:
                response.images.add(tensor=tensors.to_proto(_host(array), "images"), transform=transform, status=OK)
            else:
                assert array is not None  # an outcome that is no exception has its array
                tensor = tensors.to_proto(np.empty(0, _dtype(array)), "images")
                tensor.shape[:] = array.shape
                response.images.add(tensor=tensor, transform=transform, status=OK, in_shm=not in_cuda,
                                    in_cuda=in_cuda, shm_offset=offset)
        return response


def _host(array: Any) -> Any:
    """A host array for a tensor made on the GPU (that stayed there for a device region)."""
    return array.cpu().numpy() if hasattr(array, "cpu") else array


def _dtype(array: Any) -> np.dtype:
    """numpy's dtype for a numpy array or a torch tensor (``torch.uint8`` -> ``uint8``)."""
    return array.dtype if isinstance(array.dtype, np.dtype) else np.dtype(str(array.dtype).removeprefix("torch."))


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
