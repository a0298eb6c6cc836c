"""The preprocess stage's GPU path: nvJPEG decoding and letterboxing with torch on the device.

At thousands of images per second, JPEG decoding is what a CPU preprocess stage runs out of
first. With ``INFERLINE_PREPROCESS_DEVICE=cuda`` the letterbox recipe decodes a request's JPEGs
in one batched ``torchvision.io.decode_jpeg(device="cuda")`` call (nvJPEG), resizes them with
bilinear interpolation on the GPU and pads them there; only the finished uint8 tensors come back
to host memory for the trip to the inference stage. Other formats (PNG, WebP, BMP) and crops
take the OpenCV path. The geometry is the OpenCV path's (``letterbox_geometry``), so boxes map
back identically; pixels differ by the interpolation's rounding (OpenCV's fixed-point weights
against float bilinear), which moves detections by far less than the parity tolerance.

The same code runs on ``device="cpu"``, which is how it is tested on machines without a GPU;
torch is imported only when this path is switched on (the stage stays torch-free otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from inferline.common.errors import InvalidInput
from inferline.common.images import probe_image
from inferline.common.transform import ImageTransform
from inferline.services.preprocess.letterbox import letterbox_geometry
from inferline.services.preprocess.yolo_recipes import LetterboxParams

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data.startswith(JPEG_MAGIC)


def decode_jpegs(datas: Sequence[bytes], device: str, max_pixels: int) -> list[Any]:
    """(3, H, W) uint8 RGB tensors on ``device``, EXIF orientation applied; the pixel limit is
    checked from the headers before anything is decoded. Raises InvalidInput for the batch when
    one file fails, so the caller can retry the items one by one."""
    import torch  # noqa: PLC0415 - the torch extra, only on the device path
    from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

    for data in datas:
        probe_image(data, max_pixels)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError as exc:
        raise InvalidInput(f"JPEG could not be decoded: {' '.join(str(exc).split())[:200]}") from None


def letterbox_tensor(image: Any, params: Mapping[str, Any]) -> tuple[np.ndarray, ImageTransform]:
    """The letterbox recipe on a (3, H, W) uint8 RGB tensor: resize on its device, pad, and return
    the (3, H', W') uint8 host array with its transform."""
    letterboxed, transform = letterbox_on_device(image, params)
    return letterboxed.cpu().numpy(), transform


def letterbox_on_device(image: Any, params: Mapping[str, Any]) -> tuple[Any, ImageTransform]:
    """As ``letterbox_tensor``, but the (3, H', W') uint8 tensor stays on the image's device: what
    a device output region is filled from (device_outputs.py)."""
    import torch  # noqa: PLC0415 - the torch extra, only on the device path

    _, height, width = image.shape
    p = LetterboxParams.parse(params)
    g = letterbox_geometry(height, width, p.size, stride=p.stride, auto=p.auto, scaleup=p.scaleup)
    if (g.new_w, g.new_h) != (width, height):
        resized = torch.nn.functional.interpolate(image[None].float(), size=(g.new_h, g.new_w), mode="bilinear",
                                                  align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    if g.left or g.right or g.top or g.bottom:
        image = torch.nn.functional.pad(image, (g.left, g.right, g.top, g.bottom), value=p.pad_value)
    return image.contiguous(), g.transform(width, height)


def letterbox_batch(
    datas: Sequence[bytes], params: Mapping[str, Any], device: str, max_pixels: int, on_device: bool = False
) -> list[tuple[Any, ImageTransform] | Exception]:
    """One decode call for the batch; a file that fails the batch is retried alone, so it fails
    its own item only. Host arrays, or with ``on_device`` the tensors where they were made (for a
    device output region: device_outputs.py)."""
    letterbox = letterbox_on_device if on_device else letterbox_tensor
    try:
        images = decode_jpegs(datas, device, max_pixels)
    except InvalidInput:
        if len(datas) == 1:
            raise
        return [_one(data, params, device, max_pixels, letterbox) for data in datas]
    return [letterbox(image, params) for image in images]


def _one(
    data: bytes, params: Mapping[str, Any], device: str, max_pixels: int, letterbox: Callable[..., Any]
) -> tuple[Any, ImageTransform] | Exception:
    try:
        result: tuple[Any, ImageTransform] = letterbox(decode_jpegs([data], device, max_pixels)[0], params)
        return result
    except InvalidInput as exc:
        return exc
