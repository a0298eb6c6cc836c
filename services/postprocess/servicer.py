"""gRPC transport of the postprocess stage."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np

from inferline.common import tensors
from inferline.common.detections import DetectOptions, detections_from_proto, detections_to_proto
from inferline.common.errors import InvalidInput
from inferline.common.generated import postprocess_pb2, postprocess_pb2_grpc, types_pb2
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.status import OK, item_status
from inferline.common.telemetry import in_context, span
from inferline.common.transform import ImageTransform
from inferline.services.postprocess.embeddings import kmeans, l2_normalize, rank, threshold_groups, zero_shot
from inferline.services.postprocess.recipes import POSTPROCESSORS, load_families
from inferline.services.postprocess.renderers import RENDERERS, RenderInput

FORMAT_NAMES = {
    types_pb2.RENDER_FORMAT_JSON: "json",
    types_pb2.RENDER_FORMAT_CSV: "csv",
    types_pb2.RENDER_FORMAT_PNG: "png",
}


def _transform(message: types_pb2.ImageTransform) -> ImageTransform:
    if message.orig_width <= 0 or message.orig_height <= 0 or message.input_width <= 0 or message.input_height <= 0:
        raise InvalidInput("item has no valid image transform (sizes must be positive)")
    return ImageTransform(
        message.orig_width, message.orig_height, message.input_width, message.input_height,
        message.scale_x, message.scale_y, message.pad_x, message.pad_y,
    )


class PostprocessServicer(postprocess_pb2_grpc.PostprocessServiceServicer):
    def __init__(self, settings: Settings, pool: ThreadPoolExecutor):
        self.settings = settings
        # NMS and PNG encoding are numpy/OpenCV work that releases the GIL: a thread pool keeps
        # the event loop free and runs a batch's items in parallel.
        self.pool = pool

    async def Postprocess(self, request, context):
        recipe = Recipe.from_proto(request.recipe)
        postprocessor = POSTPROCESSORS.get(recipe.name, error=InvalidInput)
        options = DetectOptions.from_proto(request.options)
        labels = tuple(request.labels)

        def run(item: postprocess_pb2.PostprocessItem):
            outputs = {t.name: tensors.from_proto(t) for t in item.outputs}
            with span("nms", **{"inferline.recipe": recipe.name}):
                return postprocessor(outputs, _transform(item.transform), options, recipe.params, labels)

        outcomes = await self._map(run, request.items)
        response = postprocess_pb2.PostprocessResponse()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                response.results.add(status=item_status(outcome))
            else:
                response.results.add(detections=detections_to_proto(outcome), status=OK)
        return response

    async def Render(self, request, context):
        name = FORMAT_NAMES.get(request.format)
        if name is None:
            raise InvalidInput(f"render format must be one of {', '.join(FORMAT_NAMES.values())} (RENDER_FORMAT_*)")
        renderer = partial(RENDERERS.get(name), max_pixels=self.settings.max_image_pixels)

        def run(item: postprocess_pb2.RenderItem):
            with span("render", **{"inferline.format": name, "inferline.image_size": f"{item.width}x{item.height}"}):
                return renderer(
                    RenderInput(item.name, item.width, item.height, detections_from_proto(item.detections), item.image)
                )

        outcomes = await self._map(run, request.items)
        response = postprocess_pb2.RenderResponse()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            response.renderings.add(format=request.format, content_type=outcome.content_type, content=outcome.content)
        return response

    async def Embeddings(self, request, context):
        images = _matrix(request.images, "image")
        texts = _matrix(request.texts, "text")
        if images.shape[1] and texts.shape[1] and images.shape[1] != texts.shape[1]:
            raise InvalidInput(f"image embeddings have {images.shape[1]} dimensions, text embeddings {texts.shape[1]}")
        if request.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {request.top_k}")
        if request.top_k and len(texts) and request.logit_scale <= 0:
            raise InvalidInput("zero-shot needs a positive logit_scale (from the model's metadata)")
        cluster = request.cluster
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, _embeddings, images, texts, request.logit_scale, request.top_k, cluster.k, cluster.threshold)

    async def _map(self, fn, items) -> list:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(self.pool, in_context(fn), item) for item in items), return_exceptions=True)


def build_service(settings: Settings) -> Service:
    load_families()
    pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="postprocess")
    servicer = PostprocessServicer(settings, pool)

    def register(server: grpc.aio.Server) -> list[str]:
        postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server)
        return [postprocess_pb2.DESCRIPTOR.services_by_name["PostprocessService"].full_name]

    async def close() -> None:
        pool.shutdown(wait=True)

    return Service("postprocess", register, close=close, servicer=servicer)


def _matrix(messages, kind: str) -> np.ndarray:
    """Stacks 1-D embedding tensors; (0, 0) when there are none."""
    if not messages:
        return np.zeros((0, 0), np.float32)
    vectors = [tensors.from_proto(t) for t in messages]
    if any(v.ndim != 1 for v in vectors) or len({v.shape for v in vectors}) != 1:
        raise InvalidInput(f"{kind} embeddings must be 1-D and of one length, got shapes {sorted({v.shape for v in vectors})}")
    return np.stack(vectors).astype(np.float32)


def _embeddings(images: np.ndarray, texts: np.ndarray, logit_scale: float, top_k: int, k: int, threshold: float) -> postprocess_pb2.EmbeddingsResponse:
    images = l2_normalize(images) if len(images) else images
    texts = l2_normalize(texts) if len(texts) else texts
    response = postprocess_pb2.EmbeddingsResponse(
        images=[tensors.to_proto(v, "embedding") for v in images],
        texts=[tensors.to_proto(v, "embedding") for v in texts],
    )
    if top_k and len(images) and len(texts):
        for indices, scores in zero_shot(images, texts, logit_scale, top_k):
            response.zero_shot.add(indices=indices.tolist(), scores=scores.tolist())
    if len(images) and len(texts):
        for indices, scores in rank(texts, images):
            response.text_to_images.add(indices=indices.tolist(), scores=scores.tolist())
    everything = [m for m in (images, texts) if len(m)]
    if everything and (k > 0 or threshold > 0):
        stacked = np.concatenate(everything)
        if k > len(stacked):
            raise InvalidInput(f"cannot make {k} clusters of {len(stacked)} embeddings")
        response.clusters.extend((kmeans(stacked, k) if k > 0 else threshold_groups(stacked, threshold)).tolist())
    return response
