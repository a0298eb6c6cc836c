"""Encoded bytes -> BGR pixels, safely.

The header is read first (Pillow parses it without decoding), so an image over the pixel limit
is refused before a single pixel is allocated: a 50 KB PNG that claims 100k x 100k pixels costs
nothing. Pixels are then decoded by OpenCV, as ultralytics does, and the EXIF orientation is
applied explicitly rather than trusting each decoder's defaults.

The format is chosen from the magic bytes and parsed by that Pillow plugin alone, not through
``PIL.Image.open``: only the four formats we serve are ever parsed, and ultralytics (imported
in the same process in in-process mode) monkey-patches ``Image.open`` to install packages.
"""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from inferline.common.errors import InvalidInput

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_NOT_AN_IMAGE = f"not a decodable image: expected one of {', '.join(FORMATS)}"
_EXIF_ORIENTATION = 0x0112


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 BGR, upright according to EXIF."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    width, height, orientation = _probe(data, max_pixels)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        raise InvalidInput(f"image ({width}x{height}) could not be decoded; the file may be truncated or corrupt")
    return apply_orientation(pixels, orientation)


def probe_image(data: bytes, max_pixels: int) -> tuple[int, int, int]:
    """Width, height and EXIF orientation from the header, after the format and pixel-limit
    checks; nothing is decoded (for decoders other than OpenCV, such as nvJPEG)."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    return _probe(data, max_pixels)


def _parser(data: bytes) -> type[ImageFile.ImageFile]:
    if data.startswith(b"\xff\xd8\xff"):
        return JpegImagePlugin.JpegImageFile
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PngImagePlugin.PngImageFile
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return WebPImagePlugin.WebPImageFile
    if data.startswith(b"BM"):
        return BmpImagePlugin.BmpImageFile
    raise InvalidInput(_NOT_AN_IMAGE)


def _probe(data: bytes, max_pixels: int) -> tuple[int, int, int]:
    parser = _parser(data)
    try:
        with parser(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                    "(INFERLINE_MAX_IMAGE_PIXELS)"
                )
            # Only now: for PNG, Pillow decodes the whole image to find an eXIf chunk.
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError):
        raise InvalidInput(_NOT_AN_IMAGE) from None
    return width, height, orientation


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF orientation tag's eight cases (as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.transpose(pixels)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(pixels), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels
