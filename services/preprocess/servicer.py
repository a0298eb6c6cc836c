"""gRPC transport of the preprocess stage."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from inferline.common import tensors
from inferline.common.errors import ConfigError, InvalidInput, at_most
from inferline.common.generated import preprocess_pb2, preprocess_pb2_grpc, types_pb2
from inferline.common.images import decode_image
from inferline.common.recipes import Recipe
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.status import OK, item_status
from inferline.common.telemetry import in_context, span, traced
from inferline.common.transform import ImageTransform
from inferline.services.preprocess.recipes import (
    PREPROCESSORS,
    TEXT_PREPROCESSORS,
    RecipeLimits,
    check_params,
    load_families,
)


def crop(pixels: np.ndarray, box: types_pb2.Box) -> np.ndarray:
    """The box's pixels, the box rounded outwards and clipped to the image."""
    corners = (box.x1, box.y1, box.x2, box.y2)
    if not all(math.isfinite(v) for v in corners):
        raise InvalidInput(f"region box {corners} must be finite pixel coordinates")
    height, width = pixels.shape[:2]
    x1, y1 = max(int(np.floor(box.x1)), 0), max(int(np.floor(box.y1)), 0)
    x2, y2 = min(int(np.ceil(box.x2)), width), min(int(np.ceil(box.y2)), height)
    if x2 <= x1 or y2 <= y1:
        raise InvalidInput(f"region ({box.x1}, {box.y1}, {box.x2}, {box.y2}) has no pixels inside the image")
    return pixels[y1:y2, x1:x2]


class PreprocessServicer(preprocess_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, settings: Settings, pool: ThreadPoolExecutor):
        self.settings = settings
        # Decode, resize and tokenise release the GIL (OpenCV, Pillow) or are short, so a thread
        # pool gives real parallelism across a batch without blocking the event loop.
        self.pool = pool
        self.torch_device = torch_device(settings.preprocess_device)
        self.limits = RecipeLimits.from_settings(settings)

    async def Preprocess(self, request, context):  # noqa: N802 - gRPC's method name
        recipe = Recipe.from_proto(request.recipe)
        self._validate(request, recipe)
        if request.texts:
            return await self._texts(recipe, request.texts)
        preprocessor = _traced(PREPROCESSORS.get(recipe.name, error=InvalidInput), recipe.name)

        def decode(data: bytes) -> np.ndarray:
            with span("decode", **{"inferline.encoded_bytes": len(data)}):
                return decode_image(data, max_pixels=self.settings.max_image_pixels)

        response = preprocess_pb2.PreprocessResponse()
        if not request.regions and self.torch_device is not None and recipe.name == "letterbox":
            _fill_images(response, await self._letterbox_on_device(request.images, recipe, decode))
            return response
        if not request.regions:
            outcomes = await self._map(lambda image: preprocessor(decode(image.data), recipe.params), request.images)
            _fill_images(response, outcomes)
            return response
        decoded = await self._map(lambda image: decode(image.data), request.images)

        def cut(region: types_pb2.Region) -> tuple[np.ndarray, ImageTransform]:
            if not 0 <= region.image < len(decoded):
                raise InvalidInput(f"region refers to image {region.image}; the request has {len(decoded)}")
            source = decoded[region.image]
            if isinstance(source, BaseException):
                raise source
            return preprocessor(np.ascontiguousarray(crop(source, region.box)), recipe.params)

        _fill_images(response, await self._map(cut, request.regions))
        return response

    def _validate(self, request: preprocess_pb2.PreprocessRequest, recipe: Recipe) -> None:
        """Everything checkable before work starts: what the request carries, how many, and the
        recipe's parameters, so that an absurd request costs microseconds whoever sends it."""
        settings = self.settings
        if request.texts:
            if request.images or request.regions:
                raise InvalidInput("a preprocess request carries images or texts, not both")
            TEXT_PREPROCESSORS.get(recipe.name, error=InvalidInput)
            at_most(len(request.texts), settings.max_labels, "texts", "INFERLINE_MAX_LABELS")
        else:
            if request.regions and not request.images:
                raise InvalidInput("regions need the images they are cut from")
            if not request.images:
                raise InvalidInput("no images or texts in the request")
            PREPROCESSORS.get(recipe.name, error=InvalidInput)
            at_most(len(request.images), settings.max_batch_images, "images", "INFERLINE_MAX_BATCH_IMAGES")
            at_most(len(request.regions), settings.max_regions, "regions", "INFERLINE_MAX_REGIONS")
        check_params(recipe.name, recipe.params, self.limits)

    async def _letterbox_on_device(self, images, recipe: Recipe, decode) -> list:
        """JPEGs in one batched device decode (nvJPEG on CUDA), the rest through OpenCV."""
        from inferline.services.preprocess import gpu  # noqa: PLC0415 - imports torch

        is_jpeg = [gpu.is_jpeg(image.data) for image in images]
        jpegs = [i for i, yes in enumerate(is_jpeg) if yes]
        others = [i for i, yes in enumerate(is_jpeg) if not yes]
        loop = asyncio.get_running_loop()
        batch_job = loop.run_in_executor(
            self.pool,
            in_context(traced("decode_letterbox", gpu.letterbox_batch,
                              **{"inferline.device": str(self.torch_device), "inferline.batch_size": len(jpegs)})),
            [images[i].data for i in jpegs], recipe.params, self.torch_device,
            self.settings.max_image_pixels,
        ) if jpegs else _done([])
        letterbox = PREPROCESSORS.get("letterbox")
        rest_job = asyncio.ensure_future(
            self._map(lambda image: letterbox(decode(image.data), recipe.params), [images[i] for i in others])
        )
        try:
            batched = await batch_job
        except InvalidInput as exc:  # the one JPEG of the request is bad
            batched = [exc]
        rest = await rest_job
        outcomes: list = [None] * len(images)
        for i, outcome in zip(jpegs, batched, strict=True):
            outcomes[i] = outcome
        for i, outcome in zip(others, rest, strict=True):
            outcomes[i] = outcome
        return outcomes

    async def _texts(self, recipe: Recipe, texts: Iterable[str]) -> preprocess_pb2.PreprocessResponse:
        tokenizer = TEXT_PREPROCESSORS.get(recipe.name, error=InvalidInput)
        response = preprocess_pb2.PreprocessResponse()
        limit = self.settings.max_text_bytes

        def tokenize(text: str) -> Any:
            size = len(text.encode("utf-8"))
            if size > limit:
                raise InvalidInput(
                    f"text is {size} bytes, over the limit of {limit} (INFERLINE_MAX_TEXT_BYTES); "
                    "a model's context holds far less: shorten it"
                )
            return tokenizer(text, recipe.params)

        for outcome in await self._map(tokenize, texts):
            if isinstance(outcome, BaseException):
                response.texts.add(status=item_status(outcome))
            else:
                response.texts.add(tensor=tensors.to_proto(outcome, "tokens"), status=OK)
        return response

    async def _map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(self.pool, in_context(fn), item) for item in items),
                                    return_exceptions=True)


def _traced(
    preprocessor: Callable[..., tuple[np.ndarray, ImageTransform]], name: str
) -> Callable[..., tuple[np.ndarray, ImageTransform]]:
    """The recipe (letterbox, clip_image, ...) as one span, with the image size in and out."""

    def run(pixels: np.ndarray, params: dict) -> tuple[np.ndarray, ImageTransform]:
        with span(name, **{"inferline.image_size": f"{pixels.shape[1]}x{pixels.shape[0]}"}) as current:
            array, transform = preprocessor(pixels, params)
            current.set_attribute("inferline.input_size", f"{transform.input_width}x{transform.input_height}")
            return array, transform

    return run


async def _done(value):
    return value


def torch_device(name: str) -> str | None:
    """The torch device of the GPU path, or None for OpenCV; checked at start-up, not per request."""
    if name == "opencv":
        return None
    if name == "torch-cpu":
        device = "cpu"
    elif name == "cuda" or name.startswith("cuda:"):
        device = name
    else:
        raise ConfigError(f"INFERLINE_PREPROCESS_DEVICE={name!r}: expected opencv, cuda, cuda:N or torch-cpu")
    try:
        import torch  # noqa: PLC0415
        import torchvision  # noqa: F401, PLC0415
    except ImportError:
        raise ConfigError(
            f"INFERLINE_PREPROCESS_DEVICE={name}: needs torch and torchvision (pip install 'inferline[torch]')"
        ) from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"INFERLINE_PREPROCESS_DEVICE={name}: torch sees no CUDA device here; use opencv")
    return device


def _fill_images(response: preprocess_pb2.PreprocessResponse, outcomes: list) -> None:
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


def build_service(settings: Settings) -> Service:
    load_families()
    pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="preprocess")
    servicer = PreprocessServicer(settings, pool)

    def register(server: grpc.aio.Server) -> list[str]:
        preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, server)
        return [preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name]

    async def close() -> None:
        pool.shutdown(wait=True)

    return Service("preprocess", register, close=close, servicer=servicer)
