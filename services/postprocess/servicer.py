"""gRPC transport of the postprocess stage."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np

from inferline.common import tensors
from inferline.common.detections import DetectOptions, detections_from_proto, detections_to_proto
from inferline.common.errors import InvalidInput, at_most, quoted
from inferline.common.generated import postprocess_pb2, postprocess_pb2_grpc, types_pb2
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.status import OK, item_status
from inferline.common.telemetry import in_context, span
from inferline.common.transform import ImageTransform
from inferline.services.postprocess.embeddings import kmeans, l2_normalize, rank, threshold_groups, zero_shot
from inferline.services.postprocess.recipes import POSTPROCESSORS, load_families
from inferline.services.presentation.renderers import RENDERERS, RenderInput

FORMAT_NAMES = {
    types_pb2.RENDER_FORMAT_JSON: "json",
    types_pb2.RENDER_FORMAT_CSV: "csv",
    types_pb2.RENDER_FORMAT_PNG: "png",
}


def _transform(message: types_pb2.ImageTransform) -> ImageTransform:
    if message.orig_width <= 0 or message.orig_height <= 0 or message.input_width <= 0 or message.input_height <= 0:
        raise InvalidInput("item has no valid image transform (sizes must be positive)")
    if not all(math.isfinite(v) for v in (message.scale_x, message.scale_y, message.pad_x, message.pad_y)):
        raise InvalidInput("item's image transform must have finite scales and pads; send the one preprocess returned")
    if message.scale_x <= 0 or message.scale_y <= 0:
        raise InvalidInput(f"item's image transform has a non-positive scale ({message.scale_x}, {message.scale_y})")
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
        at_most(len(request.items), self.settings.max_batch_images, "items", "INFERLINE_MAX_BATCH_IMAGES")
        labels = tuple(request.labels)

        def run(item: postprocess_pb2.PostprocessItem):
            outputs = {t.name: _finite(tensors.from_proto(t), f"output {quoted(t.name)}") for t in item.outputs}
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
        at_most(len(request.items), self.settings.max_batch_images, "items", "INFERLINE_MAX_BATCH_IMAGES")
        for item in request.items:
            _check_render_item(item)

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
        """Counts and scalars first, then the vectors: a refusal costs no decoding."""
        settings = self.settings
        at_most(len(request.images), settings.max_embeddings, "image embeddings", "INFERLINE_MAX_EMBEDDINGS")
        at_most(len(request.texts), settings.max_labels, "text embeddings", "INFERLINE_MAX_LABELS")
        count = len(request.images) + len(request.texts)
        if request.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {request.top_k}")
        if request.top_k and request.texts and not (math.isfinite(request.logit_scale) and request.logit_scale > 0):
            raise InvalidInput("zero-shot needs a positive, finite logit_scale (from the model's metadata)")
        cluster = request.cluster
        if cluster.k < 0 or not -1.0 <= cluster.threshold <= 1.0:
            raise InvalidInput(
                f"cluster.k must be >= 0 and cluster.threshold a cosine within [-1, 1], got {cluster.k} and {cluster.threshold}"
            )
        if (cluster.k > 0 or cluster.threshold > 0) and count > settings.max_cluster_items:
            raise InvalidInput(
                f"clustering {count} embeddings is over the limit of {settings.max_cluster_items} "
                "(INFERLINE_MAX_CLUSTER_ITEMS): it compares every pair; cluster fewer at a time"
            )
        if cluster.k > count:
            raise InvalidInput(f"cannot make {cluster.k} clusters of {count} embeddings")
        images = _matrix(request.images, "image", settings.max_embedding_dim)
        texts = _matrix(request.texts, "text", settings.max_embedding_dim)
        if images.shape[1] and texts.shape[1] and images.shape[1] != texts.shape[1]:
            raise InvalidInput(f"image embeddings have {images.shape[1]} dimensions, text embeddings {texts.shape[1]}")
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


def _matrix(messages, kind: str, max_dim: int) -> np.ndarray:
    """Stacks 1-D embedding tensors; (0, 0) when there are none."""
    if not messages:
        return np.zeros((0, 0), np.float32)
    vectors = [tensors.from_proto(t) for t in messages]
    shapes = {v.shape for v in vectors}
    if any(v.ndim != 1 for v in vectors) or len(shapes) != 1:
        raise InvalidInput(f"{kind} embeddings must be 1-D and of one length, got shapes {quoted(sorted(shapes))}")
    (width,) = shapes.pop()
    if width > max_dim:
        raise InvalidInput(
            f"{kind} embeddings have {width} dimensions, over the limit of {max_dim} (INFERLINE_MAX_EMBEDDING_DIM)"
        )
    if any(v.dtype.kind not in "fiu" for v in vectors):
        raise InvalidInput(f"{kind} embeddings must hold numbers (float or integer tensors)")
    return _finite(np.stack(vectors).astype(np.float32), f"{kind} embeddings")


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    """NaN or infinity in a float tensor would come out as NaN boxes, scores or similarities, or
    fail deep in the arithmetic: the sender's data is wrong, so it is refused as such."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"{what}: NaN or infinite values are not allowed")
    return array


def _check_render_item(item: postprocess_pb2.RenderItem) -> None:
    if item.width < 0 or item.height < 0:
        raise InvalidInput(f"render item {quoted(item.name)} has a negative size {item.width}x{item.height}")
    for detection in item.detections:
        box = detection.box
        values = (box.x1, box.y1, box.x2, box.y2, detection.score)
        if not all(math.isfinite(v) for v in values):
            raise InvalidInput(f"render item {quoted(item.name)} has a detection with a NaN or infinite box or score")


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
        response.clusters.extend((kmeans(stacked, k) if k > 0 else threshold_groups(stacked, threshold)).tolist())
    return response
