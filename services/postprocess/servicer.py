"""gRPC transport of the postprocess stage: proto <-> ``Postprocessor`` (service.py), nothing else."""

from __future__ import annotations

import grpc

from inferline.common import tensors
from inferline.common.api import ClusterOptions, format_from_proto
from inferline.common.detections import DetectOptions, detections_from_proto, detections_to_proto
from inferline.common.errors import InvalidInput
from inferline.common.generated import postprocess_pb2, postprocess_pb2_grpc, types_pb2
from inferline.common.items import LazySequence
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.status import OK, item_status
from inferline.common.transform import ImageTransform
from inferline.services.postprocess.service import Outputs, Postprocessor
from inferline.services.presentation.renderers import RenderInput


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, service: Postprocessor):
        self.service = service

    async def Postprocess(self, request, context):  # noqa: N802 - gRPC's method name
        outcomes = await self.service.detections(
            Recipe.from_proto(request.recipe),
            DetectOptions.from_proto(request.options),
            request.labels,
            LazySequence(request.items, _outputs),
        )
        response = postprocess_pb2.PostprocessResponse()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                response.results.add(status=item_status(outcome))
            else:
                response.results.add(detections=detections_to_proto(outcome), status=OK)
        return response

    async def Render(self, request, context):  # noqa: N802 - gRPC's method name
        rendered = await self.service.render(
            format_from_proto(request.format), LazySequence(request.items, _render_input)
        )
        response = postprocess_pb2.RenderResponse()
        for outcome in rendered:
            response.renderings.add(format=request.format, content_type=outcome.content_type, content=outcome.content)
        return response

    async def Embeddings(self, request, context):  # noqa: N802 - gRPC's method name
        result = await self.service.embeddings(
            LazySequence(request.images, tensors.from_proto),
            LazySequence(request.texts, tensors.from_proto),
            logit_scale=request.logit_scale,
            top_k=request.top_k,
            cluster=ClusterOptions.from_proto(request.cluster),
        )
        return postprocess_pb2.EmbeddingsResponse(
            images=[tensors.to_proto(v, "embedding") for v in result.images],
            texts=[tensors.to_proto(v, "embedding") for v in result.texts],
            zero_shot=[r.to_proto() for r in result.zero_shot],
            text_to_images=[r.to_proto() for r in result.text_to_images],
            clusters=result.clusters,
        )


def _outputs(item: postprocess_pb2.PostprocessItem) -> Outputs | Exception:
    """A malformed tensor (``tensors.from_proto`` says how) fails its item only; the service
    checks the transform, whoever sent it."""
    try:
        outputs = {t.name: tensors.from_proto(t) for t in item.outputs}
    except InvalidInput as exc:
        return exc
    return outputs, _transform(item.transform)


def _transform(message: types_pb2.ImageTransform) -> ImageTransform:
    return ImageTransform(
        message.orig_width, message.orig_height, message.input_width, message.input_height,
        message.scale_x, message.scale_y, message.pad_x, message.pad_y,
    )


def _render_input(item: postprocess_pb2.RenderItem) -> RenderInput:
    return RenderInput(item.name, item.width, item.height, detections_from_proto(item.detections), item.image)


def build_service(settings: Settings) -> Service:
    """The stage's server; ``.domain`` is its ``Postprocessor``, for callers in this process."""
    postprocessor = Postprocessor(settings)
    servicer = PostprocessServicer(postprocessor)

    def register(server: grpc.aio.Server) -> list[str]:
        postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server)
        return [postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name]

    return Service("postprocess", register, close=postprocessor.close, servicer=servicer, domain=postprocessor)
