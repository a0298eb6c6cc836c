"""Decoding: formats, EXIF orientation, and refusing decompression bombs before decoding."""

import io
import zlib
import struct

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from inferline.common.errors import InvalidInput
from inferline.common.images import decode_image

LIMIT = 50_000_000


def _encode(array_rgb: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_rgb).save(out, format=fmt, **kwargs)
    return out.getvalue()


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_lossless_formats_decode_to_exact_bgr_pixels(fmt):
    rgb = _gradient()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(_encode(rgb, fmt, **kwargs), max_pixels=LIMIT)
    np.testing.assert_array_equal(decoded, rgb[..., ::-1])


def test_jpeg_decodes_like_opencv_does_for_ultralytics():
    data = _encode(_gradient(), "JPEG", quality=90)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decode_image(data, max_pixels=LIMIT), expected)


def test_grayscale_and_alpha_images_become_three_channel():
    gray = _encode(_gradient()[..., 0], "PNG")
    rgba = _encode(np.dstack([_gradient(), np.full((40, 60), 128, np.uint8)]), "PNG")
    assert decode_image(gray, max_pixels=LIMIT).shape == (40, 60, 3)
    assert decode_image(rgba, max_pixels=LIMIT).shape == (40, 60, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil_exif_transpose(orientation):
    image = Image.fromarray(_gradient(30, 50))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="PNG", exif=exif)
    data = out.getvalue()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[..., ::-1]
    np.testing.assert_array_equal(decode_image(data, max_pixels=LIMIT), expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"),
    ],
)
def test_undecodable_bytes_are_invalid_input(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(data, max_pixels=LIMIT)


def test_truncated_png_is_invalid_input():
    data = _encode(_gradient(200, 200), "PNG")
    with pytest.raises(InvalidInput):
        decode_image(data[: len(data) // 3], max_pixels=LIMIT)


def test_unsupported_formats_are_refused_naming_the_supported_ones():
    with pytest.raises(InvalidInput, match="expected one of JPEG, PNG, WEBP, BMP"):
        decode_image(_encode(_gradient(), "TIFF"), max_pixels=LIMIT)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: a decompression bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(InvalidInput, match="over the limit of 1000000"):
        decode_image(_png_header_claiming(2000, 1000), max_pixels=1_000_000)


def test_gigantic_claimed_size_is_refused_without_allocating():
    with pytest.raises(InvalidInput, match="limit"):
        decode_image(_png_header_claiming(100_000, 100_000), max_pixels=LIMIT)
