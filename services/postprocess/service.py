"""The postprocess stage's domain service: model outputs to detections, detections to renderings,
embeddings to rankings and clusters.

It knows no gRPC: the servicer (``servicer.py``) converts its protos, and the controller's local
ports call it directly. Counts, names and scalars are checked before any item is read; a bad
item of ``detections`` fails alone, its exception returned in its place.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from inferline.common.api import NO_CLUSTERING, ClusterOptions, Embeddings, Ranking
from inferline.common.detections import Detection, DetectOptions
from inferline.common.errors import InvalidInput, at_most, quoted
from inferline.common.items import map_items
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.common.telemetry import span
from inferline.common.transform import ImageTransform
from inferline.services.postprocess.device_nms import NMS_DEVICE, torch_device
from inferline.services.postprocess.embeddings import kmeans, l2_normalize, rank, threshold_groups, zero_shot
from inferline.services.postprocess.recipes import POSTPROCESSORS, load_families
from inferline.services.presentation.renderers import RENDERERS, Rendered, RenderInput

# One image's model outputs and the transform its input was made with.
Outputs = tuple[Mapping[str, np.ndarray], ImageTransform]


class Postprocessor:
    def __init__(self, settings: Settings):
        load_families()
        self.settings = settings
        # NMS and PNG encoding are numpy/OpenCV work that releases the GIL: a thread pool keeps
        # the event loop free and runs a batch's items in parallel.
        self.pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="postprocess")
        # Where YOLO's NMS runs (device_nms.py): a recipe parameter, so the recipes stay pure.
        device = torch_device(settings.postprocess_device)
        self.nms_params: dict[str, str] = {NMS_DEVICE: device} if device else {}

    async def detections(
        self,
        recipe: Recipe,
        options: DetectOptions,
        labels: Sequence[str],
        items: Sequence[Outputs | Exception],
    ) -> list[list[Detection] | Exception]:
        """Each item's detections on its original image. An item given as an exception (its
        outputs failed to arrive) stays failed; NaN outputs or a bad transform fail their item."""
        postprocessor = POSTPROCESSORS.get(recipe.name, error=InvalidInput)
        options.validate()
        at_most(len(items), self.settings.max_batch_images, "items", "INFERLINE_MAX_BATCH_IMAGES")
        labels = tuple(labels)
        params = {**recipe.params, **self.nms_params}

        def run(item: Outputs | Exception) -> list[Detection]:
            if isinstance(item, Exception):
                raise item
            outputs, transform = item
            outputs = {name: _finite(array, f"output {quoted(name)}") for name, array in outputs.items()}
            with span("nms", **{"inferline.recipe": recipe.name}):
                return postprocessor(outputs, check_transform(transform), options, params, labels)

        return await map_items(self.pool, run, items)

    async def render(self, format: str, items: Sequence[RenderInput]) -> list[Rendered]:
        """One rendering per item in ``format`` ("json", "csv", "png"); any failure fails the call."""
        renderer = partial(RENDERERS.get(format, error=InvalidInput), max_pixels=self.settings.max_image_pixels)
        at_most(len(items), self.settings.max_batch_images, "items", "INFERLINE_MAX_BATCH_IMAGES")
        items = list(items)  # read once: checked here, rendered on the pool
        for item in items:
            _check_render_item(item)

        def run(item: RenderInput) -> Rendered:
            with span("render", **{"inferline.format": format, "inferline.image_size": f"{item.width}x{item.height}"}):
                return renderer(item)

        rendered = []
        for outcome in await map_items(self.pool, run, items):
            if isinstance(outcome, BaseException):
                raise outcome
            rendered.append(outcome)
        return rendered

    async def embeddings(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[np.ndarray],
        logit_scale: float = 0.0,
        top_k: int = 0,
        cluster: ClusterOptions = NO_CLUSTERING,
    ) -> Embeddings:
        """L2-normalised embeddings, with zero-shot rankings (``top_k`` > 0), text-to-image
        rankings and clusters as asked. Counts and scalars are checked first, then the vectors:
        a refusal costs no decoding."""
        settings = self.settings
        at_most(len(images), settings.max_embeddings, "image embeddings", "INFERLINE_MAX_EMBEDDINGS")
        at_most(len(texts), settings.max_labels, "text embeddings", "INFERLINE_MAX_LABELS")
        count = len(images) + len(texts)
        if top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {top_k}")
        if top_k and len(texts) and not (math.isfinite(logit_scale) and logit_scale > 0):
            raise InvalidInput("zero-shot needs a positive, finite logit_scale (from the model's metadata)")
        if cluster.k < 0 or not -1.0 <= cluster.threshold <= 1.0:
            raise InvalidInput(
                "cluster.k must be >= 0 and cluster.threshold a cosine within [-1, 1], "
                f"got {cluster.k} and {cluster.threshold}"
            )
        if cluster.wanted and count > settings.max_cluster_items:
            raise InvalidInput(
                f"clustering {count} embeddings is over the limit of {settings.max_cluster_items} "
                "(INFERLINE_MAX_CLUSTER_ITEMS): it compares every pair; cluster fewer at a time"
            )
        if cluster.k > count:
            raise InvalidInput(f"cannot make {cluster.k} clusters of {count} embeddings")
        image_matrix = _matrix(images, "image", settings.max_embedding_dim)
        text_matrix = _matrix(texts, "text", settings.max_embedding_dim)
        if image_matrix.shape[1] and text_matrix.shape[1] and image_matrix.shape[1] != text_matrix.shape[1]:
            raise InvalidInput(
                f"image embeddings have {image_matrix.shape[1]} dimensions, text embeddings {text_matrix.shape[1]}"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool, _embeddings, image_matrix, text_matrix, logit_scale, top_k, cluster.k, cluster.threshold
        )

    async def close(self) -> None:
        self.pool.shutdown(wait=True)



def check_transform(transform: ImageTransform) -> ImageTransform:
    """A transform from preprocess is always sound; one a caller sent may not be, and would put
    boxes at infinity or divide by zero."""
    t = transform
    if t.orig_width <= 0 or t.orig_height <= 0 or t.input_width <= 0 or t.input_height <= 0:
        raise InvalidInput("item has no valid image transform (sizes must be positive)")
    if not all(math.isfinite(v) for v in (t.scale_x, t.scale_y, t.pad_x, t.pad_y)):
        raise InvalidInput("item's image transform must have finite scales and pads; send the one preprocess returned")
    if t.scale_x <= 0 or t.scale_y <= 0:
        raise InvalidInput(f"item's image transform has a non-positive scale ({t.scale_x}, {t.scale_y})")
    return transform


def _matrix(vectors: Sequence[np.ndarray], kind: str, max_dim: int) -> np.ndarray:
    """Stacks 1-D embeddings; (0, 0) when there are none."""
    if not len(vectors):  # len: a (n, dim) array is a sequence of vectors too
        return np.zeros((0, 0), np.float32)
    vectors = list(vectors)
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


def _check_render_item(item: RenderInput) -> None:
    if item.width < 0 or item.height < 0:
        raise InvalidInput(f"render item {quoted(item.name)} has a negative size {item.width}x{item.height}")
    for detection in item.detections:
        if not all(math.isfinite(v) for v in (*detection.box, detection.score)):
            raise InvalidInput(f"render item {quoted(item.name)} has a detection with a NaN or infinite box or score")


def _embeddings(
    images: np.ndarray, texts: np.ndarray, logit_scale: float, top_k: int, k: int, threshold: float
) -> Embeddings:
    images = l2_normalize(images) if len(images) else images
    texts = l2_normalize(texts) if len(texts) else texts
    result = Embeddings(images, texts)
    if top_k and len(images) and len(texts):
        result.zero_shot = [
            _ranking(indices, scores) for indices, scores in zero_shot(images, texts, logit_scale, top_k)
        ]
    if len(images) and len(texts):
        result.text_to_images = [_ranking(indices, scores) for indices, scores in rank(texts, images)]
    everything = [m for m in (images, texts) if len(m)]
    if everything and (k > 0 or threshold > 0):
        stacked = np.concatenate(everything)
        result.clusters = (kmeans(stacked, k) if k > 0 else threshold_groups(stacked, threshold)).tolist()
    return result


def _ranking(indices: np.ndarray, scores: np.ndarray) -> Ranking:
    return Ranking(tuple(indices.tolist()), tuple(scores.tolist()))
