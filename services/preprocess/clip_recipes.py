"""CLIP (open_clip) preprocessing: the image transform and the tokenizer, as open_clip does them.

Image recipe ``clip_image``: open_clip's inference transform for a model's ``PreprocessCfg``
(ViT-B-32: resize the shortest side to 224 with bicubic, centre crop 224x224, RGB), stopped
before ``ToTensor``/``Normalize``. It hands the model uint8 CHW RGB, a quarter of the bytes of
the float tensor, and the inference stage divides by 255 and normalises with the model's own
mean and std (``open_clip_loader``), which are exactly ToTensor's and Normalize's operations.

open_clip applies torchvision transforms to a PIL image, and torchvision resizes PIL images with
``PIL.Image.resize`` (always antialiased). To give the model the same pixels as open_clip we do
the same resize through PIL on the RGB pixels of the decoded image; OpenCV or torch resizing
would differ by a few grey levels. No torch is needed: only PIL and numpy.

Text recipe ``clip_tokenize``: CLIP's BPE tokenizer, reimplemented without torch in
``clip_tokenizer`` (same ids as open_clip's SimpleTokenizer; imported on first use). open_clip
silently truncates a text that does not fit the context; a truncated prompt is a different
prompt, so we refuse it with the token count instead.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from inferline.common.errors import ConfigError, InvalidInput, quoted
from inferline.common.transform import ImageTransform
from inferline.services.preprocess.recipes import (
    PARAM_CHECKS,
    PREPROCESSORS,
    TEXT_PREPROCESSORS,
    RecipeLimits,
    check_size,
    size_param,
)

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")
DEFAULT_TOKENIZER = "ViT-B-32"
DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _positive_int(params: Mapping[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() or value < 1:
        raise InvalidInput(f"clip {key} must be a positive integer, got {quoted(value)}")
    return int(value)


def _choice(params: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = params.get(key, default)
    if value not in allowed:
        raise InvalidInput(f"clip_image {key} must be one of {', '.join(allowed)}, got {quoted(value)}")
    return value


def _resized_size(height: int, width: int, target: tuple[int, int], mode: str) -> tuple[int, int]:
    """The (height, width) open_clip's resize step produces, computed as it computes it.

    - shortest, square target: torchvision ``Resize(int)``: the short side becomes the target,
      the long side ``int(target * long / short)`` (truncated, not rounded);
    - shortest, non-square target, and longest: open_clip's ``ResizeKeepRatio``: both sides
      divided by the min (shortest) or max (longest) of the two ratios, Python-``round``ed;
    - squash: the target itself.
    """
    target_h, target_w = target
    if mode == "squash":
        return target_h, target_w
    if mode == "shortest" and target_h == target_w:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target_h, int(target_h * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_h, new_w
    ratio_h, ratio_w = height / target_h, width / target_w
    longest = 1.0 if mode == "longest" else 0.0
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(height * 1.0 / ratio), round(width * 1.0 / ratio)


def _interpolation(mode: str, target: tuple[int, int], requested: str) -> Image.Resampling:
    # open_clip builds ResizeKeepRatio(image_size) for a non-square 'shortest' target without
    # passing the interpolation, so that case is always bicubic; we do what it does.
    if mode == "shortest" and target[0] != target[1]:
        return Image.Resampling.BICUBIC
    return _INTERPOLATIONS[requested]


def _image_params(params: Mapping[str, Any]) -> tuple[tuple[int, int], str, str, int]:
    """size, resize_mode, interpolation and fill_color, checked."""
    target = size_param(params, "clip_image", 224)
    mode = _choice(params, "resize_mode", "shortest", _RESIZE_MODES)
    requested = _choice(params, "interpolation", "bicubic", tuple(_INTERPOLATIONS))
    fill = params.get("fill_color", 0)
    integer = not isinstance(fill, bool) and isinstance(fill, (int, float)) and float(fill).is_integer()
    if not integer or not 0 <= fill <= 255:
        raise InvalidInput(f"clip_image fill_color must be an integer 0..255, got {quoted(fill)}")
    return target, mode, requested, int(fill)


@PARAM_CHECKS.register("clip_image")
def check_clip_image(params: Mapping[str, Any], limits: RecipeLimits) -> None:
    check_size(_image_params(params)[0], "clip_image", limits)


@PARAM_CHECKS.register("clip_tokenize")
def check_clip_tokenize(params: Mapping[str, Any], limits: RecipeLimits) -> None:
    """A context holds one token per byte of text at most (plus start and end), so a longer one
    than ``max_text_bytes + 2`` only pads: it is refused rather than allocated (8 bytes a slot)."""
    context_length = _positive_int(params, "context_length", DEFAULT_CONTEXT_LENGTH)
    if context_length > limits.max_text_bytes + 2:
        raise InvalidInput(
            f"clip_tokenize context_length {context_length} is over the limit of {limits.max_text_bytes + 2} "
            "(INFERLINE_MAX_TEXT_BYTES + 2); use the context_length from the model's metadata"
        )
    _tokenizer_params(params)


def _tokenizer_params(params: Mapping[str, Any]) -> str | None:
    """The ``vocab`` path (None: open_clip's), after checking ``tokenizer`` and ``vocab``."""
    name = params.get("tokenizer", DEFAULT_TOKENIZER)
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"clip_tokenize tokenizer must be an open_clip model name, got {quoted(name)}")
    vocab = params.get("vocab")
    # The path arrives in a request: only a file of the vocabulary's own name is ever opened, so
    # a caller cannot make the stage read (or probe for) any other file.
    if vocab is not None and (not isinstance(vocab, str) or Path(vocab).name != VOCAB_FILE):
        raise InvalidInput(f"clip_tokenize vocab must be the path of {VOCAB_FILE}, got {quoted(vocab)}")
    return vocab


@PREPROCESSORS.register("clip_image")
def clip_image(image: np.ndarray, params: Mapping[str, Any]) -> tuple[np.ndarray, ImageTransform]:
    """BGR HxWx3 uint8 -> uint8 (3, size, size) RGB, identical to open_clip's eval transform
    (before ToTensor/Normalize) applied to a PIL image of the same pixels.

    Params: ``size`` (224, or [height, width]), ``interpolation`` (bicubic | bilinear),
    ``resize_mode`` (shortest | longest | squash), ``fill_color`` (0; the padding of 'longest').
    The transform maps input pixels back to the image: ``x_orig = (x_input - pad_x) / scale_x``,
    where the pad is negative for the part the centre crop cut off.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise InvalidInput(f"clip_image expects an HxWx3 uint8 BGR image, got shape {shape} dtype {dtype}")
    height, width = image.shape[:2]
    if height < 1 or width < 1:
        raise InvalidInput(f"clip_image got an empty image ({width}x{height})")
    target, mode, requested, fill = _image_params(params)

    new_h, new_w = _resized_size(height, width, target, mode)
    if new_h < 1 or new_w < 1:
        raise InvalidInput(f"clip_image: a {width}x{height} image is too thin to resize to {target[1]}x{target[0]}")
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    if (new_h, new_w) != (height, width):  # torchvision returns the image untouched then
        resized = Image.fromarray(rgb).resize((new_w, new_h), _interpolation(mode, target, requested))
        rgb = np.asarray(resized)

    # torchvision center_crop / open_clip center_crop_or_pad: pad (split floor left/top) when the
    # image is smaller than the crop, then crop at round((size - crop) / 2).
    crop_h, crop_w = target
    pad_left = pad_top = 0
    if crop_w > new_w or crop_h > new_h:
        pad_left = (crop_w - new_w) // 2 if crop_w > new_w else 0
        pad_top = (crop_h - new_h) // 2 if crop_h > new_h else 0
        pad_right = (crop_w - new_w + 1) // 2 if crop_w > new_w else 0
        pad_bottom = (crop_h - new_h + 1) // 2 if crop_h > new_h else 0
        # Square 'shortest' is torchvision's CenterCrop (pads with 0); the others are open_clip's
        # CenterCropOrPad(fill=fill_color).
        value = 0 if mode == "shortest" else fill
        rgb = np.pad(rgb, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), constant_values=value)
    padded_h, padded_w = rgb.shape[:2]
    top = int(round((padded_h - crop_h) / 2.0))
    left = int(round((padded_w - crop_w) / 2.0))
    crop = rgb[top : top + crop_h, left : left + crop_w]
    chw = np.ascontiguousarray(crop.transpose(2, 0, 1))
    transform = ImageTransform(
        orig_width=width,
        orig_height=height,
        input_width=crop_w,
        input_height=crop_h,
        scale_x=new_w / width,
        scale_y=new_h / height,
        pad_x=float(pad_left - left),
        pad_y=float(pad_top - top),
    )
    return chw, transform


# One tokenizer per vocabulary file, built on first use (~0.2 s, ~20 MiB). lru_cache does not
# hold concurrent first callers back, so the texts of one request, tokenized in parallel, would
# each build one (and the process keep the peak): the lock makes the others wait for the first.
_TOKENIZER_LOCK = threading.Lock()


# The tokenizer module is imported on first use: it needs ftfy and regex, which an image-only
# preprocess stage need not have installed.
@lru_cache(maxsize=4)
def _cached_tokenizer(vocab: str | None) -> Any:
    try:
        from inferline.services.preprocess.clip_tokenizer import ClipTokenizer, default_vocab_path  # noqa: PLC0415 - on first use (see above)
    except ImportError as exc:
        raise ConfigError(f"clip_tokenize needs ftfy and regex installed ({exc})") from None
    return ClipTokenizer(vocab if vocab is not None else default_vocab_path())


def _tokenizer(vocab: str | None) -> Any:
    with _TOKENIZER_LOCK:
        return _cached_tokenizer(vocab)


@TEXT_PREPROCESSORS.register("clip_tokenize")
def clip_tokenize(text: str, params: Mapping[str, Any]) -> np.ndarray:
    """One text -> int64 (context_length,) token ids, equal to open_clip's
    ``get_tokenizer(tokenizer)([text])[0]``: start token, BPE ids, end token, zero padding.

    Params: ``context_length`` (77), ``tokenizer`` (the open_clip model name, "ViT-B-32"; every
    model whose open_clip tokenizer is CLIP's SimpleTokenizer), ``vocab`` (path to
    ``bpe_simple_vocab_16e6.txt.gz``; default: the one installed with open_clip_torch).
    A text that needs more than ``context_length`` tokens is refused (open_clip would cut it,
    and the embedding would silently describe another text), as is an empty one.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"clip_tokenize expects a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("text is empty; give the words to embed (e.g. 'a photo of a dog')")
    context_length = _positive_int(params, "context_length", DEFAULT_CONTEXT_LENGTH)
    return _tokenizer(_tokenizer_params(params)).tokenize(text, context_length)
