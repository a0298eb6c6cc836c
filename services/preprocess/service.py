"""The preprocess stage's domain service: encoded images and texts in, model input tensors out.

It knows no gRPC: the servicer (``servicer.py``) converts its protos, and the controller's local
ports call it directly. Request-level problems (no images, over a limit, an unknown recipe or
bad parameters) raise ``InvalidInput`` before any work; a bad item fails alone, its exception
returned in its place.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from inferline.common.errors import ConfigError, InvalidInput, at_most, quoted
from inferline.common.images import decode_image
from inferline.common.items import map_items
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.common.shm import ALIGN, SharedMemoryRegistry
from inferline.common.shm_pool import PREFIX as POOL_PREFIX
from inferline.common.telemetry import in_context, span, traced
from inferline.common.transform import ImageTransform, Region
from inferline.services.preprocess.device_outputs import CudaRoom, DeviceOutputs
from inferline.services.preprocess.recipes import (
    PREPROCESSORS,
    TEXT_PREPROCESSORS,
    RecipeLimits,
    check_params,
    load_families,
)

T = TypeVar("T")
Preprocessed = tuple[np.ndarray, ImageTransform]


class Preprocessor:
    def __init__(self, settings: Settings):
        load_families()
        self.settings = settings
        self.torch_device = torch_device(settings.preprocess_device)
        self.limits = RecipeLimits.from_settings(settings)
        # Decode, resize and tokenise release the GIL (OpenCV, Pillow) or are short, so a thread
        # pool gives real parallelism across a batch without blocking the event loop.
        self.pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="preprocess")
        # The controller's pool objects this stage writes outputs into (issue 16).
        self.shared_memory = SharedMemoryRegistry(settings.shm_max_regions, settings.shm_max_bytes)
        # The controllers' device pools, for outputs that stay on the GPU (device_outputs.py).
        self.device_outputs = DeviceOutputs(settings.cuda_shm_max_regions, settings.cuda_shm_max_bytes)

    async def images(
        self, recipe: Recipe, images: Sequence[bytes], regions: Sequence[Region] = (), on_device: bool = False
    ) -> list[Preprocessed | Exception]:
        """One outcome per image, or per region (cut from its image) when regions are given.
        With ``on_device``, images letterboxed on the GPU stay there as torch tensors (for a
        device output region); everything else is a host array."""
        self._check_images(recipe, images, regions)
        preprocessor = _traced(PREPROCESSORS.get(recipe.name, error=InvalidInput), recipe.name)

        def decode(data: bytes) -> np.ndarray:
            with span("decode", **{"inferline.encoded_bytes": len(data)}):
                return decode_image(data, max_pixels=self.settings.max_image_pixels)

        if not regions and self.torch_device is not None and recipe.name == "letterbox":
            return await self._letterbox_on_device(images, recipe, decode, on_device)
        if not regions:
            return await map_items(self.pool, lambda data: preprocessor(decode(data), recipe.params), images)
        decoded = await map_items(self.pool, decode, images)

        def cut(region: Region) -> Preprocessed:
            if not 0 <= region.image < len(decoded):
                raise InvalidInput(f"region refers to image {region.image}; the request has {len(decoded)}")
            source = decoded[region.image]
            if isinstance(source, BaseException):
                raise source
            return preprocessor(np.ascontiguousarray(crop(source, region.box)), recipe.params)

        return await map_items(self.pool, cut, regions)

    async def texts(self, recipe: Recipe, texts: Sequence[str]) -> list[np.ndarray | Exception]:
        """Token ids per text; a text over INFERLINE_MAX_TEXT_BYTES fails alone."""
        if not texts:
            raise InvalidInput("no texts in the request")
        tokenizer = TEXT_PREPROCESSORS.get(recipe.name, error=InvalidInput)
        at_most(len(texts), self.settings.max_labels, "texts", "INFERLINE_MAX_LABELS")
        check_params(recipe.name, recipe.params, self.limits)
        limit = self.settings.max_text_bytes

        def tokenize(text: str) -> np.ndarray:
            size = len(text.encode("utf-8"))
            if size > limit:
                raise InvalidInput(
                    f"text is {size} bytes, over the limit of {limit} (INFERLINE_MAX_TEXT_BYTES); "
                    "a model's context holds far less: shorten it"
                )
            return tokenizer(text, recipe.params)

        return await map_items(self.pool, tokenize, texts)

    async def place(
        self, key: str, offset: int, byte_size: int, arrays: Sequence[np.ndarray | None]
    ) -> list[int | None]:
        """Writes the arrays one after another (each ``ALIGN``-aligned) into ``byte_size`` bytes
        at ``offset`` of shm object ``key``; returns where each went, None for an array left
        out (None given, or no room left: it travels inline). ``ObjectMissing`` when the object
        is not in this stage's /dev/shm; ``InvalidInput`` when the room lies outside it, or when
        ``key`` is not a controller's pool: this stage writes only into those."""
        if not key.lstrip("/").startswith(POOL_PREFIX):
            raise InvalidInput(
                f"output_shm key {quoted(key)} is not a controller's pool object ({POOL_PREFIX}...): "
                "the preprocess stage writes into no other shared memory"
            )
        self.shared_memory.attach(key)
        room = self.shared_memory.writable(key, offset, byte_size, "preprocess output")
        where: list[int | None] = []
        at = 0
        jobs = []
        for array in arrays:
            if array is None or at + array.nbytes > byte_size:
                where.append(None)
                continue
            target = np.frombuffer(room[at : at + array.nbytes], array.dtype).reshape(array.shape)
            jobs.append((target, array))
            where.append(offset + at)
            at += -(-array.nbytes // ALIGN) * ALIGN
        # Copies release the GIL: the thread pool keeps them off the event loop.
        await asyncio.get_running_loop().run_in_executor(self.pool, _copy_all, jobs)
        return where

    async def place_on_device(self, room: CudaRoom, arrays: Sequence[Any]) -> list[int | None]:
        """Writes the outputs into a controller's device pool (device_outputs.py); where each
        went. CudaUnavailable when this stage cannot open the pool: the caller sends them otherwise."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, in_context(self.device_outputs.place), room, arrays)

    async def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.device_outputs.close()
        self.shared_memory.close()

    def _check_images(self, recipe: Recipe, images: Sequence[bytes], regions: Sequence[Region]) -> None:
        """Everything checkable before work starts: what the request carries, how many, and the
        recipe's parameters, so that an absurd request costs microseconds whoever sends it."""
        settings = self.settings
        if regions and not images:
            raise InvalidInput("regions need the images they are cut from")
        if not images:
            raise InvalidInput("no images or texts in the request")
        PREPROCESSORS.get(recipe.name, error=InvalidInput)
        at_most(len(images), settings.max_batch_images, "images", "INFERLINE_MAX_BATCH_IMAGES")
        at_most(len(regions), settings.max_regions, "regions", "INFERLINE_MAX_REGIONS")
        check_params(recipe.name, recipe.params, self.limits)

    async def _letterbox_on_device(
        self, images: Sequence[bytes], recipe: Recipe, decode: Callable[[bytes], np.ndarray], on_device: bool
    ) -> list[Preprocessed | Exception]:
        """JPEGs in one batched device decode (nvJPEG on CUDA), the rest through OpenCV."""
        from inferline.services.preprocess import gpu  # noqa: PLC0415 - imports torch

        images = list(images)  # each read of a LazySequence converts again; the JPEGs go in one list anyway
        is_jpeg = [gpu.is_jpeg(data) for data in images]
        jpegs = [i for i, yes in enumerate(is_jpeg) if yes]
        others = [i for i, yes in enumerate(is_jpeg) if not yes]
        loop = asyncio.get_running_loop()
        batch_job: Awaitable[list] = (
            loop.run_in_executor(
                self.pool,
                in_context(
                    traced(
                        "decode_letterbox",
                        gpu.letterbox_batch,
                        **{"inferline.device": str(self.torch_device), "inferline.batch_size": len(jpegs)},
                    )
                ),
                [images[i] for i in jpegs],
                recipe.params,
                self.torch_device,
                self.settings.max_image_pixels,
                on_device and str(self.torch_device).startswith("cuda"),
            )
            if jpegs
            else _done([])
        )
        letterbox = PREPROCESSORS.get("letterbox")
        rest_job = asyncio.ensure_future(
            map_items(self.pool, lambda data: letterbox(decode(data), recipe.params), [images[i] for i in others])
        )
        try:
            batched = await batch_job
        except InvalidInput as exc:  # the one JPEG of the request is bad
            batched = [exc]
        rest = await rest_job
        outcomes: list = [None] * len(images)
        for i, outcome in zip(jpegs, batched, strict=False):
            outcomes[i] = outcome
        for i, outcome in zip(others, rest, strict=False):
            outcomes[i] = outcome
        return outcomes



def _copy_all(jobs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    for target, array in jobs:
        np.copyto(target, array)


def crop(pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The box's pixels, the box rounded outwards and clipped to the image."""
    if not all(math.isfinite(v) for v in box):
        raise InvalidInput(f"region box {box} must be finite pixel coordinates")
    height, width = pixels.shape[:2]
    bx1, by1, bx2, by2 = box
    x1, y1 = max(int(np.floor(bx1)), 0), max(int(np.floor(by1)), 0)
    x2, y2 = min(int(np.ceil(bx2)), width), min(int(np.ceil(by2)), height)
    if x2 <= x1 or y2 <= y1:
        raise InvalidInput(f"region ({bx1}, {by1}, {bx2}, {by2}) has no pixels inside the image")
    return pixels[y1:y2, x1:x2]


def _traced(preprocessor: Callable[..., Preprocessed], name: str) -> Callable[..., Preprocessed]:
    """The recipe (letterbox, clip_image, ...) as one span, with the image size in and out."""

    def run(pixels: np.ndarray, params: dict) -> Preprocessed:
        with span(name, **{"inferline.image_size": f"{pixels.shape[1]}x{pixels.shape[0]}"}) as current:
            array, transform = preprocessor(pixels, params)
            current.set_attribute("inferline.input_size", f"{transform.input_width}x{transform.input_height}")
            return array, transform

    return run


async def _done(value: T) -> T:
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
