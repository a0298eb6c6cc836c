"""Decoding: formats, EXIF orientation, and refusing decompression bombs before decoding.

Every behaviour holds for both decoders: OpenCV (when installed) and Pillow (the slim container
images), and the Pillow decoder gives OpenCV's exact pixels for every format and mode."""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from inferline.common.errors import InvalidInput
from inferline.common.images import decode_image, probe_image

LIMIT = 50_000_000
DECODERS = ["opencv", "pillow"]


def _encode(array_rgb: np.ndarray, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_rgb).save(out, format=fmt, **kwargs)
    return out.getvalue()


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_lossless_formats_decode_to_exact_bgr_pixels(fmt, decoder):
    rgb = _gradient()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(_encode(rgb, fmt, **kwargs), max_pixels=LIMIT, decoder=decoder)
    np.testing.assert_array_equal(decoded, rgb[..., ::-1])


@pytest.mark.parametrize("decoder", DECODERS)
def test_jpeg_decodes_like_opencv_does_for_ultralytics(decoder):
    data = _encode(_gradient(), "JPEG", quality=90)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decode_image(data, max_pixels=LIMIT, decoder=decoder), expected)


@pytest.mark.parametrize("decoder", DECODERS)
def test_grayscale_and_alpha_images_become_three_channel(decoder):
    gray = _encode(_gradient()[..., 0], "PNG")
    rgba = _encode(np.dstack([_gradient(), np.full((40, 60), 128, np.uint8)]), "PNG")
    assert decode_image(gray, max_pixels=LIMIT, decoder=decoder).shape == (40, 60, 3)
    assert decode_image(rgba, max_pixels=LIMIT, decoder=decoder).shape == (40, 60, 3)


def _pil_saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _variants() -> dict[str, bytes]:
    """One image in every format and pixel mode a client is likely to send."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    smooth = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    noisy = np.clip(smooth.astype(int) + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(noisy)
    bgr = noisy[..., ::-1].copy()
    wide16 = rng.integers(0, 65536, (48, 64, 3), dtype=np.uint16)
    return {
        **{f"jpeg 4:{s}": _pil_saved(rgb, "JPEG", quality=90, subsampling=i)
           for i, s in enumerate(["4:4", "2:2", "2:0"])},
        "jpeg progressive": _pil_saved(rgb, "JPEG", quality=80, progressive=True),
        "jpeg grey": _pil_saved(rgb.convert("L"), "JPEG"),
        "jpeg cmyk (adobe)": _pil_saved(rgb.convert("CMYK"), "JPEG"),
        "jpeg written by opencv": cv2.imencode(".jpg", bgr)[1].tobytes(),
        "png rgba": _pil_saved(rgb.convert("RGBA"), "PNG"),
        "png grey+alpha": _pil_saved(rgb.convert("LA"), "PNG"),
        "png palette": _pil_saved(rgb.convert("P"), "PNG"),
        "png 1-bit": _pil_saved(rgb.convert("1"), "PNG"),
        "png 16-bit colour": cv2.imencode(".png", wide16)[1].tobytes(),
        "png 16-bit grey": cv2.imencode(".png", wide16[..., 0].copy())[1].tobytes(),
        "png 16-bit with alpha": cv2.imencode(".png", np.dstack([wide16, wide16[..., :1]]))[1].tobytes(),
        "webp lossy": _pil_saved(rgb, "WEBP", quality=75),
        "webp written by opencv": cv2.imencode(".webp", bgr)[1].tobytes(),
        "bmp grey": _pil_saved(rgb.convert("L"), "BMP"),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_pillow_decoder_gives_opencvs_pixels_in_every_mode(name):
    data = _variants()[name]
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    np.testing.assert_array_equal(decode_image(data, max_pixels=LIMIT, decoder="pillow"), expected)


def test_pillow_decoder_gives_opencvs_pixels_on_the_sample_images(sample_images):
    for path in sample_images:
        data = path.read_bytes()
        np.testing.assert_array_equal(
            decode_image(data, max_pixels=LIMIT, decoder="pillow"),
            decode_image(data, max_pixels=LIMIT, decoder="opencv"), err_msg=path.name)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil_exif_transpose(orientation, decoder):
    image = Image.fromarray(_gradient(30, 50))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="PNG", exif=exif)
    data = out.getvalue()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[..., ::-1]
    decoded = decode_image(data, max_pixels=LIMIT, decoder=decoder)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.flags.c_contiguous


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"),
    ],
)
@pytest.mark.parametrize("decoder", DECODERS)
def test_undecodable_bytes_are_invalid_input(data, message, decoder):
    with pytest.raises(InvalidInput, match=message):
        decode_image(data, max_pixels=LIMIT, decoder=decoder)


@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_png_is_invalid_input(decoder):
    data = _encode(_gradient(200, 200), "PNG")
    with pytest.raises(InvalidInput):
        decode_image(data[: len(data) // 3], max_pixels=LIMIT, decoder=decoder)


def test_pillow_decoder_refuses_a_truncated_jpeg():
    """OpenCV returns whatever rows it decoded (grey below); Pillow refuses, which is the
    better answer for a service: the client learns its upload was cut."""
    data = _encode(_gradient(200, 200), "JPEG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT, decoder="pillow")


def test_unsupported_formats_are_refused_naming_the_supported_ones():
    with pytest.raises(InvalidInput, match="expected one of JPEG, PNG, WEBP, BMP"):
        decode_image(_encode(_gradient(), "TIFF"), max_pixels=LIMIT)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: a decompression bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(InvalidInput, match="over the limit of 1000000"):
        decode_image(_png_header_claiming(2000, 1000), max_pixels=1_000_000)


def test_gigantic_claimed_size_is_refused_without_allocating():
    with pytest.raises(InvalidInput, match="limit"):
        decode_image(_png_header_claiming(100_000, 100_000), max_pixels=LIMIT)


def _png_with_orientation(orientation: int, *, after_pixels: bool) -> bytes:
    """A PNG whose eXIf chunk sits before the pixel data (as Pillow writes it) or after it
    (allowed by the PNG spec's third edition, and what some tools write)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(_gradient(30, 50)).save(out, format="PNG", exif=exif)
    data = out.getvalue()
    if not after_pixels:
        return data
    start = data.index(b"eXIf") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    chunk = data[start : start + 12 + length]
    without = data[:start] + data[start + 12 + length :]
    end = without.index(b"IEND") - 4
    return without[:end] + chunk + without[end:]


@pytest.mark.parametrize("after_pixels", [False, True])
def test_png_orientation_is_applied_wherever_its_exif_chunk_sits(after_pixels):
    data = _png_with_orientation(6, after_pixels=after_pixels)
    assert (data.index(b"eXIf") > data.index(b"IDAT")) is after_pixels
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[..., ::-1]
    np.testing.assert_array_equal(decode_image(data, max_pixels=LIMIT, decoder="opencv"), expected)


def test_png_orientation_before_the_pixel_data_is_read_without_decoding_them(monkeypatch):
    """Pillow's PngImageFile.getexif decodes the whole image to look for chunks after the pixels;
    a 143 KB PNG of 7000x7000 became 147 MB that way, before OpenCV decoded it again."""
    def refuse(self):
        raise AssertionError("the PNG's pixels were decoded to read its header")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    assert probe_image(_png_with_orientation(8, after_pixels=False), LIMIT) == (50, 30, 8)
    assert probe_image(_encode(_gradient(), "PNG"), LIMIT) == (60, 40, 1)
