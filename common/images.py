"""Encoded bytes -> BGR pixels, safely.

The header is read first (Pillow parses it without decoding), so an image over the pixel limit
(``INFERLINE_MAX_IMAGE_PIXELS``) is refused before a single pixel is allocated: a 50 KB PNG that
claims 100k x 100k pixels costs nothing, and the EXIF orientation is found without decoding too.
Pixels are then decoded by OpenCV, as ultralytics does, and the EXIF orientation is applied
explicitly rather than trusting each decoder's defaults.

Pixels come from OpenCV when it is installed (ultralytics decodes with ``cv2.imread``, and
OpenCV is the faster decoder), otherwise from Pillow, converted to exactly OpenCV's
``IMREAD_COLOR`` bytes: the preprocess and postprocess container images leave OpenCV out to
meet their size budget (see ``services/preprocess/resize.py``). Both use libjpeg-turbo with the
same settings, so JPEG pixels agree; ``tests/unit/test_images.py`` checks every format and mode
through both decoders.

The format is chosen from the magic bytes and parsed by that Pillow plugin alone, not through
``PIL.Image.open``: only the four formats we serve are ever parsed, and ultralytics (imported
in the same process in in-process mode) monkey-patches ``Image.open`` to install packages.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from inferline.common.errors import InvalidInput

try:  # the fast decoder, when installed; see the module docstring
    import cv2
except ImportError:  # pragma: no cover - exercised in the slim container images (tests/deploy)
    cv2 = None  # type: ignore[assignment]  # and DECODER is "pillow"

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_NOT_AN_IMAGE = f"not a decodable image: expected one of {', '.join(FORMATS)}"
_EXIF_ORIENTATION = 0x0112


def decode_image(data: bytes, *, max_pixels: int, decoder: str | None = None) -> np.ndarray:
    """HxWx3 uint8 BGR, upright according to EXIF. ``decoder`` ("opencv" or "pillow") is for
    tests; by default OpenCV when installed, else Pillow (same pixels)."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    width, height, orientation = _probe(data, max_pixels)
    decode = _decode_opencv if (decoder or DECODER) == "opencv" else _decode_pillow
    pixels = decode(data)
    if pixels is None:
        raise InvalidInput(f"image ({width}x{height}) could not be decoded; the file may be truncated or corrupt")
    return apply_orientation(pixels, orientation)


DECODER = "opencv" if cv2 is not None else "pillow"


def _decode_opencv(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


def _decode_pillow(data: bytes) -> np.ndarray | None:
    """Pillow's pixels as OpenCV's ``IMREAD_COLOR`` would give them: BGR, 8 bits, alpha dropped
    (not blended), grey replicated, 16-bit samples reduced to their high byte, CMYK converted
    with OpenCV's formula from the raw (Adobe-inverted) samples."""
    try:
        with _parser(data)(io.BytesIO(data)) as image:
            image.load()
            if image.mode == "CMYK":
                return _cmyk_to_bgr(np.asarray(image), inverted="adobe" in image.info)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError):
        return None


def _cmyk_to_bgr(cmyk: np.ndarray, *, inverted: bool) -> np.ndarray:
    """OpenCV's icvCvt_CMYK2BGR on the samples libjpeg returns (Pillow inverts Adobe files)."""
    raw = (255 - cmyk if inverted else cmyk).astype(np.int32)
    k = raw[:, :, 3]
    channels = [k - (((255 - raw[:, :, i]) * k) >> 8) for i in (2, 1, 0)]  # B from Y, G from M, R from C
    return np.stack(channels, axis=2).astype(np.uint8)


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
            orientation = int(_exif(image, data).get(_EXIF_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError):
        raise InvalidInput(_NOT_AN_IMAGE) from None
    return width, height, orientation


# PNG chunks Pillow reads the EXIF orientation from (eXIf, "Raw profile type exif" text, XMP).
_PNG_METADATA_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})


def _exif(image: ImageFile.ImageFile, data: bytes) -> Image.Exif:
    """The image's EXIF as Pillow's ``getexif`` gives it, without decoding the pixels.

    ``PngImageFile.getexif`` decodes the whole image first (``load()``), only to see the chunks
    after the pixel data: a 143 KB PNG of 7000x7000 was decompressed to 147 MB here and then
    decoded again by OpenCV. The chunks before the pixels are in ``info`` already, so when none
    of the metadata chunks follows the pixel data, the generic ``Image.getexif`` reads the
    same tags from ``info`` alone (the same result, nothing decoded).
    """
    if isinstance(image, PngImagePlugin.PngImageFile) and not _png_metadata_after_pixels(data):
        return Image.Image.getexif(image)
    return image.getexif()


def _png_metadata_after_pixels(data: bytes) -> bool:
    """Whether a metadata chunk follows the first IDAT: a walk over chunk headers, no inflating."""
    pos, seen_pixels = 8, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            seen_pixels = True
        elif kind == b"IEND":
            return False
        elif seen_pixels and kind in _PNG_METADATA_CHUNKS:
            return True
        pos += 12 + length
    return False


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF orientation tag's eight cases (as PIL.ImageOps.exif_transpose), as contiguous
    arrays: pure index permutations, so numpy gives the same bytes as OpenCV's flip/rotate."""
    if orientation not in _ORIENTATIONS:
        return pixels
    return np.ascontiguousarray(_ORIENTATIONS[orientation](pixels))


def _transposed(pixels: np.ndarray) -> np.ndarray:
    return pixels.transpose(1, 0, 2)


_ORIENTATIONS = {
    2: lambda p: p[:, ::-1],  # mirrored
    3: lambda p: p[::-1, ::-1],  # rotated 180
    4: lambda p: p[::-1],  # flipped
    5: _transposed,  # transposed
    6: lambda p: _transposed(p)[:, ::-1],  # rotated 90 clockwise
    7: lambda p: _transposed(p)[::-1, ::-1],  # transversed
    8: lambda p: _transposed(p)[::-1],  # rotated 90 counter-clockwise
}
